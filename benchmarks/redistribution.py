"""SinkRedistribution on the trained FLUX fixture with padded captions, and its mechanics on a tiny
transformers vision-language model (LLaVA built from a config: no trained VLM is available offline).

    python benchmarks/redistribution.py                 # writes benchmarks/results/redistribution.{md,json} + PNGs
    python benchmarks/redistribution.py --n 8 --part flux   # a quick look (scratch folder)

FLUX: the fixture was trained with 16 text tokens; captions padded to ``--pads`` tokens (64, 128) give the joint
attention dozens of padding tokens, which soak up the attention of the image queries (the attention
magnets). Every setting moves alpha of the padding's attention to the targets (every other key, the
caption's own tokens, or the image tokens). Settings are swept on dev captions (seed 778) and the best
is reported on held-out captions (seed 777): the pixel judge's accuracy, and PSNR / SSIM against stock
at the same padding (how much the picture changes) and against stock at the training length. Magnets are
given as key positions (the caption's padding); "rule" finds them per call instead (ACT's threshold among
the text keys). time / stock: the pipeline's wall time with the chosen setting over stock at the same
padding, interleaved, median of 3 (8 captions x 4 steps, one torch thread, a shared 2-core machine).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnpatch as ap  # noqa: E402
from attnpatch.models import fixtures, shapes  # noqa: E402
from attnpatch.tools.quality import psnr, ssim  # noqa: E402
from common import machine, out_stem, table, timeit_interleaved, write  # noqa: E402
from fixtures import grid_png  # noqa: E402
from redistribution_vlm import vlm_mechanics  # noqa: E402

SWEEP = {None: (0.5, 0.6, 0.7, 0.8, 0.9), "text": (0.3, 0.6, 0.9), "visual": (0.3, 0.6, 0.9)}  # targets: alphas


def generate(pipe, caps, L, make=None, seed=0):
    """Images (N, 3, 64, 64) for ``caps`` at max_sequence_length ``L``; ``make(n_tokens)`` -> the method for
    captions of that token length (their padding is key positions n_tokens..L-1), None: stock. One
    generator per caption (seed + its index), so every setting sees the same noise per caption."""
    lens = [len(pipe.tokenizer_2(c).input_ids) for c in caps]
    out = [None] * len(caps)
    for n in sorted(set(lens)):
        idx = [i for i, m in enumerate(lens) if m == n]
        gens = [torch.Generator().manual_seed(seed + i) for i in idx]
        method = None if make is None else make(n)
        with (ap.patch(pipe, method) if method is not None else _nothing()):
            imgs = pipe([caps[i] for i in idx], generator=gens, max_sequence_length=L, output_type="pt").images
        for i, img in zip(idx, imgs):
            out[i] = img
    return torch.stack(out)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def judge(imgs, caps) -> dict:
    j = [shapes.judge(i, c) for i, c in zip(imgs, caps)]
    acc = {k: sum(x[k] for x in j) / len(j) for k in j[0]}
    acc["all"] = sum(all(x.values()) for x in j) / len(j)
    return acc


def settings(L):
    """name -> make(n_tokens) of every swept setting (padding given as magnet positions), and the rule."""
    out = {}
    for t, alphas in SWEEP.items():
        for a in alphas:
            out[f"alpha={a}, targets={t or 'all others'}"] = (
                lambda n, a=a, t=t: ap.SinkRedistribution(magnets=list(range(n, L)), alpha=a, targets=t), dict(alpha=a, targets=t))
    out["rule: threshold 1.5 x uniform among text, alpha=0.6"] = (
        lambda n: ap.SinkRedistribution(candidates="text", threshold=1.5, max_magnets=L, alpha=0.6), dict(rule=True))
    return out


def row(name, imgs, caps, stock_pad, stock_train, extra=None) -> dict:
    r = dict(setting=name, **judge(imgs, caps), **(extra or {}))
    r.update(psnr_pad=psnr(imgs, stock_pad), ssim_pad=ssim(imgs, stock_pad), psnr_train=psnr(imgs, stock_train),
             ssim_train=ssim(imgs, stock_train))
    return r


def score(r: dict) -> tuple:
    """The sweep's choice: the judge's mean over colour, shape and place (steadier than all three at
    once on a few dozen captions), ties broken by PSNR against stock at the training length."""
    return (r["color"] + r["shape"] + r["place"]) / 3, r["psnr_train"]


def flux(a, pics: Path) -> dict:
    pipe = fixtures.flux_shapes()
    sets = dict(dev=shapes.images(a.n, seed=778)[1], held=shapes.images(a.n, seed=777)[1])
    train, t0, out = shapes.MAX_TOKENS, time.time(), {}
    ref = {k: generate(pipe, caps, train) for k, caps in sets.items()}
    for L in a.pads:
        base = {k: (ref[k], generate(pipe, caps, L)) for k, caps in sets.items()}

        def measure(name, imgs, k="dev", info=None):
            return row(name, imgs, sets[k], base[k][1], base[k][0], info)

        sweep = [measure(f"stock, {train} tokens (training length)", base["dev"][0]), measure(f"stock, {L} tokens", base["dev"][1])]
        kept = {}
        for name, (make, info) in settings(L).items():
            sweep.append(measure(name, generate(pipe, sets["dev"], L, make), info=info))
            kept[name] = make
            print(f"pad {L} {name}: {score(sweep[-1])} ({time.time() - t0:.0f}s)", file=sys.stderr)
        best = max(sweep[2:], key=score)["setting"]
        held = generate(pipe, sets["held"], L, kept[best])
        final = [measure(f"stock, {train} tokens (training length)", base["held"][0], "held"),
                 measure(f"stock, {L} tokens", base["held"][1], "held"), measure(f"SinkRedistribution {best}", held, "held")]
        show = list(range(min(6, a.n)))
        grid_png([*base["held"][0][show], *base["held"][1][show], *held[show]],
                 [f"stock {train}: {sets['held'][i]}" for i in show] + [f"stock {L}" for _ in show] + ["redistributed" for _ in show],
                 pics / f"flux_pad{L}.png", cols=len(show))
        final[-1]["time_ratio"] = time_ratio(pipe, sets["held"], L, kept[best])
        out[L] = dict(pad=L, sweep=sweep, best=best, held=final)
    return dict(train=train, n=a.n, pads=out, seconds=time.time() - t0)


def time_ratio(pipe, caps, L, make, n=8) -> float:
    """Pipeline time with the method over stock (same padding), interleaved (a b a b ...), median of 3:
    8 captions of one token length, 4 steps."""
    lens = [len(pipe.tokenizer_2(c).input_ids) for c in caps]
    n_tok = max(set(lens), key=lens.count)
    group = [c for c, m in zip(caps, lens) if m == n_tok][:n]
    method = make(n_tok)

    def stock():
        pipe(group, generator=torch.Generator().manual_seed(0), max_sequence_length=L, num_inference_steps=4, output_type="pt")

    def patched():
        with ap.patch(pipe, method):
            stock()

    t = timeit_interleaved({"stock": stock, "patched": patched}, reps=3)
    return t["patched"] / t["stock"]


def percall(reps: int = 5) -> list[dict]:
    """Per-call time of SinkRedistribution over the same call's Dense (both through ``ap.attend`` on sdpa,
    interleaved, median of ``reps``) at FLUX-like joint layers: 256 text keys of which 200 are padding."""
    rows = []
    for side in (32, 64):
        site = ap.Site(grid=(side, side), text_len=256, kind="joint")
        S = 256 + side * side
        q, k, v = (torch.randn(1, 8, S, 64) for _ in range(3))
        pads = list(range(56, 256))
        methods = {"Dense": ap.Dense(), "padding -> all others": ap.SinkRedistribution(magnets=pads, alpha=0.7),
                   "padding -> visual": ap.SinkRedistribution(magnets=pads, alpha=0.7, targets="visual"),
                   "rule among text -> visual": ap.SinkRedistribution(candidates="text", targets="visual", threshold=1.5,
                                                                      max_magnets=64, alpha=0.7)}
        fns = {n: (lambda m=m: ap.attend(q, k, v, m, site, backend="sdpa")) for n, m in methods.items()}
        t = timeit_interleaved(fns, reps=reps)
        rows += [dict(layer=f"{S} tokens (8 heads x 64)", setting=n, ratio=t[n] / t["Dense"]) for n in methods if n != "Dense"]
    return rows


COLS = [("setting", "setting"), ("color", "colour"), ("shape", "shape"), ("place", "place"), ("all", "all three"),
        ("psnr_pad", "PSNR vs stock padded"), ("ssim_pad", "SSIM vs stock padded"),
        ("psnr_train", "PSNR vs stock 16"), ("ssim_train", "SSIM vs stock 16"), ("time_ratio", "time / stock")]


def body(data: dict) -> str:
    out = []
    if "flux" in data:
        f = data["flux"]
        for L, r in f["pads"].items():
            out += [f"## FLUX fixture, captions padded to {L} tokens (trained at {f['train']})", "",
                    f"Held-out captions (n={f['n']}, seed 777), with the setting chosen on the dev sweep below: **{r['best']}**.",
                    "", table(r["held"], COLS), "", f"![stock {f['train']} / stock {L} / redistributed](redistribution/flux_pad{L}.png)",
                    "", f"### Sweep, {L} tokens (dev captions, n={f['n']}, seed 778)", "", table(r["sweep"], COLS), ""]
    if "percall" in data:
        out += ["## Per call, FLUX-like joint layers (one torch thread; time over Dense in the same process)", "",
                table(data["percall"], [("layer", "layer"), ("setting", "setting"), ("ratio", "time / Dense")]), ""]
    if "vlm" in data:
        out += ["## Mechanics on a LLaVA built from a config (SmolLM2-135M language model, tiny random vision tower)", "",
                data["vlm"]["md"], ""]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=32, help="captions per set (dev sweep and held-out)")
    p.add_argument("--pads", type=int, nargs="+", default=[64, 128], help="max_sequence_length values to pad to")
    p.add_argument("--part", choices=("flux", "vlm", "percall", "time", "all"), default="all")
    p.add_argument("--merge", action="store_true", help="rerun --part into the committed results, keeping the other parts")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = out_stem("redistribution", a.out, None if (a.n >= 32 and a.part == "all") or a.merge else "quick")
    pics = out.parent / out.name
    pics.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.with_suffix(".json").read_text()) if a.merge else {}
    data["machine"] = machine()
    if a.part in ("percall", "all"):
        data["percall"] = percall()
    if a.part == "time":  # the chosen settings' pipeline time again (after a speed change), quality rows kept
        pipe, held = fixtures.flux_shapes(), shapes.images(data["flux"]["n"], seed=777)[1]
        for L, r in data["flux"]["pads"].items():
            r["held"][-1]["time_ratio"] = time_ratio(pipe, held, int(L), settings(int(L))[r["best"]][0])
    if a.part in ("flux", "all"):
        data["flux"] = flux(a, pics)
    if a.part in ("vlm", "all"):
        data["vlm"] = vlm_mechanics(pics)
    intro = __doc__.split("\n\n", 2)[2].strip()
    write(out, "SinkRedistribution: attention magnets, redistributed", intro, body(data), data)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
