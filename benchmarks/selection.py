"""Block selection as XAttention and VMoBA do it, against TopKBlocks' mean pooling (issue 21).

Four parts, each written into benchmarks/results/selection.{md,json} (parts not run keep their rows):

- recall: q / k of every self / joint attention call of the trained fixtures, captured at two denoising
  steps with stock attention, at the fixtures' own size and at 4K tokens (FLUX 256 px = 64x64 image
  tokens, the token grid of FLUX at 1024 px; Wan 13 frames of 128 px = 4x32x32 tokens). Each setting plans
  every captured call; recall = dense attention mass its mask keeps (1024 query rows per call; 512 on synthetic), density =
  block density of the plan (text included). ``oracle`` = the same rule on the true block mass
  (antidiagonal at stride 1 is exactly that). Sweeps: keep, thresholds, stride.
- cost: block estimation + selection at real layer shapes (FLUX 1024 px: 4096 image + 512 text tokens,
  24 heads x 128; Wan 4x32x32 tokens, 12 heads x 128; random q / k: the cost does not depend on them),
  timed interleaved with one dense SDPA call; and whole sparse calls (``ap.attend``) against that call.
- quality: the fixtures at their trained size, every step sparse (dense_steps=0), PSNR / SSIM vs stock
  with the same seed and the pixel judge, at equal density (keep=0.25) and at the papers' thresholds.
- speed: one denoiser forward at real layer dimensions (random weights; benchmarks/pipelines.py's
  harness), patched vs stock, against the Amdahl bound.

    python benchmarks/selection.py --part recall|cost|quality|speed|all [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnpatch as ap  # noqa: E402
from attnpatch import Site  # noqa: E402
from attnpatch.methods.observe import Observed  # noqa: E402
from attnpatch.methods.probe import Recall  # noqa: E402
from common import machine, out_stem, table, timeit_interleaved, write  # noqa: E402

TK = ap.TopKBlocks
CAPTURE = {  # name: (fixture, pipeline kwargs, steps, captured steps, block, stride)
    "flux-16x16": ("flux", {}, 20, (5, 14), (4, 4), 4),
    "flux-64x64": ("flux", dict(height=256, width=256), 8, (2, 5), (8, 8), 8),
    "wan-5x8x8": ("wan", {}, 20, (5, 14), (1, 4, 4), 4),
    "wan-4x32x32": ("wan", dict(num_frames=13, height=128, width=128), 8, (2, 5), (1, 8, 8), 8),
}
CAPTION = {"flux": "a large red circle at the top left", "wan": "a large blue circle moving left"}


def capture(kind: str, kw: dict, steps: int, at: tuple) -> list:
    """(q, k, site) of every self / joint call at the denoising steps ``at`` under stock attention."""
    from attnpatch.models import fixtures

    pipe = (fixtures.flux_shapes if kind == "flux" else fixtures.wan_shapes)()
    pipe.set_progress_bar_config(disable=True)
    calls = []

    def watch(q, k, site, groups):
        if site.kind != "cross" and site.step in at:
            calls.append((q.detach().float().clone(), k.detach().float().clone(), site))

    with torch.no_grad(), ap.patch(pipe, Observed(ap.Dense(), watch)):
        pipe(CAPTION[kind], generator=torch.Generator().manual_seed(0), num_inference_steps=steps, output_type="latent", **kw)
    return calls


LOGIT = 16.0  # synthetic heads: a strength-1 direction adds this to a matching pair's logit (median top probability ~0.08 at 1K keys)
SYNTH = {  # name: (grid, text tokens, heads, RoPE channels per axis (FLUX: text axis first), block, stride)
    "synthetic FLUX-1024": ((64, 64), 512, 24, (16, 56, 56), (8, 8), 8),
    "synthetic Wan 4x32x32": ((4, 32, 32), 0, 12, (44, 42, 42), (1, 8, 8), 8),
}


def _blobs(grid, n, g) -> torch.Tensor:
    """Object id (0: background) of every visual token, row-major: ``n`` discs (moving ones on video)."""
    *T, H, W = grid
    t = torch.arange(T[0] if T else 1).view(-1, 1, 1).float()
    y, x = torch.arange(H).view(1, -1, 1).float(), torch.arange(W).view(1, 1, -1).float()
    obj = torch.zeros(t.shape[0], H, W, dtype=torch.long)
    for i in range(n, 0, -1):
        cy, cx, r, vy, vx = (torch.rand(5, generator=g) * torch.tensor([H, W, 0.2 * min(H, W), 4, 4])).tolist()
        obj[((y - cy - (vy - 2) * t) ** 2 + (x - cx - (vx - 2) * t) ** 2) < (r + 2) ** 2] = i
    return obj.flatten()


def synthetic(grid, text, heads, axes, layers=3, D=128) -> list:
    """q / k of a DiT-like layer at real shapes, no trained weights: each head mixes a shared direction
    (with RoPE: attention to nearby tokens), an object direction per disc (long-range attention inside
    objects) and unit noise, with per-head strengths; RoPE over the grid axes as FLUX / Wan apply it;
    text tokens (FLUX) plain noise at position 0. One seeded set per layer."""
    n = math.prod(grid)
    coords = torch.stack(torch.meshgrid(*[torch.arange(a) for a in grid], indexing="ij"), -1).view(n, -1).float()
    coords = torch.cat([torch.zeros(n, len(axes) - len(grid)), coords], 1)  # FLUX: image tokens at text axis 0
    ang = torch.cat([coords[:, i:i + 1] * 1e4 ** (-torch.arange(0, d, 2) / d) for i, d in enumerate(axes)], 1)  # (n, D/2)
    cos, sin = ang.cos(), ang.sin()
    calls = []
    for layer in range(layers):
        g = torch.Generator().manual_seed(layer)
        obj = _blobs(grid, 8, g)
        scale = (LOGIT * D ** 0.5) ** 0.5  # a strength-1 direction adds LOGIT to the logit of a matching pair
        alpha, beta = (0.3 + 0.7 * torch.rand(2, heads, 1, 1, generator=g)).unbind(0)
        shared = torch.nn.functional.normalize(torch.randn(heads, 1, D, generator=g), dim=-1) * scale
        objs = torch.nn.functional.normalize(torch.randn(heads, 9, D, generator=g), dim=-1) * scale
        base = alpha[0] * shared + beta[0] * objs[:, obj]  # (heads, n, D)

        def rope(x):
            x2 = x.view(*x.shape[:-1], -1, 2)
            return torch.stack([x2[..., 0] * cos - x2[..., 1] * sin, x2[..., 0] * sin + x2[..., 1] * cos], -1).flatten(-2)

        q, k = (torch.cat([torch.randn(1, heads, text, D, generator=g), rope(base + torch.randn(heads, n, D, generator=g))[None]], 2)
                for _ in range(2))
        calls.append((q, k, Site(grid=grid, text_len=text, kind="joint" if text else "self", layer=layer)))
    return calls


def settings(block, stride) -> list[tuple[str, str, ap.Method]]:
    """(family, label, method): the equal-density grid (keep x score x scope), the partition cycle,
    the stride sweep and the papers' thresholds."""
    out = []
    for keep in (0.125, 0.25):
        for scope in ("query", "global"):
            kw = dict(keep=keep, block=block, scope=scope)
            out += [("keep", f"mean, {scope}", TK(**kw)), ("keep", f"antidiagonal s{stride}, {scope}", TK(score="antidiagonal", stride=stride, **kw)),
                    ("keep", f"similarity, {scope}", TK(score="similarity", **kw)),
                    ("keep", f"oracle, {scope}", TK(score="antidiagonal", stride=1, **kw))]
        out += [("keep", "mean, query, cycle", TK(keep=keep, block=block, partition="cycle")),
                ("keep", "similarity, global, cycle", TK(keep=keep, block=block, score="similarity", scope="global", partition="cycle"))]
    for s in (stride // 2, stride * 2):
        out.append(("stride", f"antidiagonal s{s}, query", TK(keep=0.125, block=block, score="antidiagonal", stride=s)))
    for tau in (0.8, 0.9, 0.95):
        out += [("threshold", f"mean, mass {tau}", TK(mass=tau, block=block)),
                ("threshold", f"antidiagonal s{stride}, mass {tau} (XAttention)", TK(mass=tau, block=block, score="antidiagonal", stride=stride))]
    for tau in (0.25, 0.5, 0.75):
        out += [("threshold", f"similarity {tau}, query", TK(mass=tau, block=block, score="similarity")),
                ("threshold", f"similarity {tau}, global, cycle (VMoBA)", TK(mass=tau, block=block, score="similarity", scope="global", partition="cycle"))]
    return out


def recall(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        if name in SYNTH:
            grid, text, heads, axes, block, stride = SYNTH[name]
            calls = synthetic(grid, text, heads, axes)
        else:
            kind, kw, steps, at, block, stride = CAPTURE[name]
            calls = capture(kind, kw, steps, at)
        print(f"{name}: {len(calls)} calls captured, {calls[0][0].shape[2]} tokens", flush=True)
        for family, label, m in settings(block, stride):
            rec = Recall(max_queries=512 if name in SYNTH else 1024)
            for q, k, site in calls:
                rec(q, k, site, [(None, m.plan(q, k, site))])
            s = rec.summary()
            rows.append(dict(shape=name, family=family, setting=label, method=repr(m), recall=s["recall"], density=s["density"]))
            print(f"  {label}: density {s['density']:.3f}, recall {s['recall']:.3f}", flush=True)
    return rows


REAL = {  # name: (grid, text tokens, heads, block, stride)
    "FLUX 1024 px (64x64 + 512 text, 24 heads)": ((64, 64), 512, 24, (8, 8), 8),
    "Wan 4x32x32 (12 heads)": ((4, 32, 32), 0, 12, (1, 8, 8), 8),
}


def cost(quick: bool, reps: int) -> list[dict]:
    rows = []
    for name, (grid, text, H, block, stride) in REAL.items():
        if quick:
            grid, text, H = tuple(max(1, g // 4) for g in grid), text // 8, 2
        site = Site(grid=grid, text_len=text, kind="joint" if text else "self")
        S = site.visual_len + text
        q, k, v = (torch.randn(1, H, S, 128) for _ in range(3))
        ests = {"mean": TK(keep=0.125, block=block), f"antidiagonal s{stride}": TK(keep=0.125, block=block, score="antidiagonal", stride=stride),
                f"antidiagonal s{2 * stride}": TK(keep=0.125, block=block, score="antidiagonal", stride=2 * stride),
                "similarity": TK(keep=0.125, block=block, score="similarity")}
        fns = {"dense SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)}
        for label, m in ests.items():
            lay = m._layouts.get(site, S, q.device)
            fns[f"estimate: {label}"] = lambda m=m, lay=lay: m.select(m.estimate(q, k, site, lay), lay["forced"])
        calls = {f"call: {label}, keep {keep}": TK(keep=keep, block=block, score=sc, stride=stride)
                 for keep in (0.125, 0.25) for label, sc in (("mean", "mean"), (f"antidiagonal s{stride}", "antidiagonal"))}
        for label, m in calls.items():
            fns[label] = lambda m=m: ap.attend(q, k, v, m, site)
        with torch.no_grad():
            t = timeit_interleaved(fns, reps=reps)
        for label, sec in t.items():
            m = calls.get(label)
            plan = m.plan(q, k, site) if m is not None else None
            density = plan.blocks.density() if plan is not None else None
            rows.append(dict(shape=name, what=label, seconds=sec, of_dense=sec / t["dense SDPA"],
                             density=density, ideal=None if density is None else 1 / density,
                             speedup=None if m is None else t["dense SDPA"] / sec))
            print(f"  {name} {label}: {sec:.3f} s, {sec / t['dense SDPA']:.3f} of dense", flush=True)
    return rows


QUALITY = {"flux": ((4, 4), 4), "wan": ((1, 4, 4), 4)}


def quality_settings(block, stride) -> list[tuple[str, ap.Method]]:
    kw = dict(keep=0.25, block=block, dense_steps=0)
    return [("mean, query (TopKBlocks)", TK(**kw)), (f"antidiagonal s{stride}, query", TK(score="antidiagonal", stride=stride, **kw)),
            ("similarity, query", TK(score="similarity", **kw)), ("mean, global", TK(scope="global", **kw)),
            (f"antidiagonal s{stride}, global", TK(score="antidiagonal", stride=stride, scope="global", **kw)),
            ("similarity, global, cycle", TK(score="similarity", scope="global", partition="cycle", **kw)),
            (f"XAttention: antidiagonal s{stride}, mass 0.9", TK(mass=0.9, block=block, score="antidiagonal", stride=stride, dense_steps=0)),
            ("VMoBA: similarity 0.25, global, cycle", TK(mass=0.25, block=block, score="similarity", scope="global", partition="cycle", dense_steps=0)),
            ("mean, mass 0.9", TK(mass=0.9, block=block, dense_steps=0))]


def quality(pics: Path, kinds: list[str]) -> list[dict]:
    from pipelines import CAPTIONS, _generate, judged  # benchmarks/pipelines.py: captions, generation, judge
    from fixtures import grid_png  # benchmarks/fixtures.py

    from attnpatch.models import fixtures
    from attnpatch.tools.quality import psnr, ssim

    rows = []
    for kind in kinds:
        pipe = (fixtures.flux_shapes if kind == "flux" else fixtures.wan_shapes)()
        pipe.set_progress_bar_config(disable=True)
        caps = CAPTIONS[kind]
        ref = _generate(pipe, kind, caps)
        rows.append(dict(model=kind, setting="stock attention", density=1.0, recall=1.0, psnr=None, ssim=1.0, judged=judged(kind, ref, caps)))
        shown, names = [ref[:4] if kind == "flux" else ref[:4, ref.shape[1] // 2]], ["stock"]
        for label, m in quality_settings(*QUALITY[kind]):
            rec = Recall()
            with ap.patch(pipe, Observed(m, rec)):
                out = _generate(pipe, kind, caps)
            s = rec.summary()
            rows.append(dict(model=kind, setting=label, method=repr(m), density=s["density"], recall=s["recall"],
                             psnr=psnr(out, ref), ssim=ssim(out, ref), judged=judged(kind, out, caps)))
            print(f"{kind} {label}: density {s['density']:.3f}, PSNR {rows[-1]['psnr']:.1f} dB", flush=True)
            shown.append(out[:4] if kind == "flux" else out[:4, out.shape[1] // 2])
            names.append(label)
        grid_png([i for g in shown for i in g], [n[:28] if j == 0 else "" for n in names for j in range(4)],
                 pics / f"quality_{kind}.png", cols=8, scale=2)
    return rows


def speed(reps: int) -> list[dict]:
    from pipelines import speed as pipeline_speed  # benchmarks/pipelines.py: stock vs patched forward, Amdahl bound

    def ms(block, stride):
        return [TK(keep=0.125, block=block, dense_steps=0), TK(keep=0.125, block=block, score="antidiagonal", stride=stride, dense_steps=0),
                TK(keep=0.125, block=block, score="similarity", scope="global", partition="cycle", dense_steps=0)]
    configs = {"flux-1024 (1 double + 1 single block)": ("flux", (128, 128), (1, 1), ms((8, 8), 8)),
               "wan 4x32x32 (1 block)": ("wan", (4, 64, 64), (1,), ms((1, 8, 8), 8))}
    return pipeline_speed(configs, False, reps)


INTRO = (
    "`TopKBlocks` options: `score=\"mean\"` (default: mean-pooled q / k), `\"antidiagonal\"` (XAttention: strided "
    "antidiagonal sums, `stride`), `\"similarity\"` (VMoBA's min-max normalised gate; with `mass=` its cumulative-"
    "similarity threshold); `scope=\"global\"` (VMoBA: one budget over all tile pairs); `partition=\"cycle\"` (VMoBA: "
    "layer l tiles along the first axis / the other axes / all axes by l % 3). Recall = fraction of the dense attention "
    "mass the mask keeps; density = fraction of the score matrix computed (text included); oracle = the same rule on "
    "the true block mass. The fixtures are small trained models (4 heads x 24); the 4K-token rows run them at 4x their "
    "trained side (the FLUX-1024 / Wan 4x32x32 token grids, not their head counts).")


def _recall_md(rows: list[dict]) -> str:
    parts = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        keep = [r for r in mine if r["family"] == "keep"]
        by = {}
        for r in keep:  # pivot: one line per setting, recall at each keep (densities alike by construction)
            by.setdefault(r["setting"], {})[r["method"].split("keep=")[1].split(",")[0]] = r
        cols = sorted({k for d in by.values() for k in d}, key=float)
        lines = ["| setting | " + " | ".join(f"recall @ keep {c} (density)" for c in cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {s} | " + " | ".join(f"{d[c]['recall']:.3f} ({d[c]['density']:.3f})" if c in d else "-" for c in cols) + " |"
                  for s, d in by.items()]
        rest = [r for r in mine if r["family"] != "keep"]
        parts.append(f"### {shape}\n\nEqual density (keep fraction per query tile, or of all tile pairs for global):\n\n"
                     + "\n".join(lines) + "\n\nStride and threshold sweeps:\n\n"
                     + table(rest, [("setting", "setting"), ("density", "density"), ("recall", "recall")]))
    return "\n\n".join(parts)


def render(data: dict) -> str:
    parts = []
    if data.get("recall"):
        parts.append("## Recall of dense attention mass\n\n" + _recall_md(data["recall"]))
    if data.get("cost"):
        parts.append("## Estimation cost and per-call speed at real layer shapes\n\nRandom q / k (float32, batch 1, head dim 128), "
                     "timed interleaved with one dense SDPA call (median of the repeats); `call:` rows are whole sparse calls "
                     "(`ap.attend`, estimate + selection + kernel chosen automatically) at keep 0.125 / 0.25; ideal = 1 / density.\n\n"
                     + table(data["cost"], [("shape", "shape"), ("what", "what"), ("seconds", "s"), ("of_dense", "x dense SDPA"),
                                            ("density", "density"), ("speedup", "speedup"), ("ideal", "ideal")]))
    if data.get("quality"):
        parts.append("## Fixtures: quality vs stock at the trained size\n\nEvery step sparse (dense_steps=0), seed 0, PSNR / SSIM "
                     "against stock attention's outputs, judged = caption attributes the pixel judge reads back (FLUX: 8 captions "
                     "at 16x16 tokens, tiles 4x4; Wan: 4 clips at 5x8x8 tokens, tiles 1x4x4).\n\n"
                     + table(data["quality"], [("model", "model"), ("setting", "setting"), ("density", "density"), ("recall", "recall"),
                                               ("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("judged", "judged")])
                     + "\n\nRows: stock, then the table's settings in order (first 4 captions; Wan: middle frame).\n\n"
                     "![flux](selection/quality_flux.png)\n\n![wan](selection/quality_wan.png)")
    if data.get("speed"):
        parts.append("## End to end at real layer dimensions\n\nOne denoiser forward (random weights, float32), stock vs patched, "
                     "benchmarks/pipelines.py's harness: attention share = dense SDPA time of the sparsified calls / forward time; "
                     "bound = 1 / ((1 - share) + share x density).\n\n"
                     + table(data["speed"], [("config", "config"), ("method", "method"), ("density", "density"), ("speedup", "speedup"),
                                             ("bound", "Amdahl bound"), ("fraction", "of bound")]))
    return "\n\n".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["recall", "cost", "quality", "speed", "all"], default="all")
    p.add_argument("--shapes", default=",".join([*CAPTURE, *SYNTH]), help=f"recall part: comma-separated subset of {','.join([*CAPTURE, *SYNTH])}")
    p.add_argument("--models", default="flux,wan", help="quality part: which fixtures")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small shapes, native-size capture only (written under the temp folder)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    out = out_stem("selection", a.out, "--quick" if a.quick else None)
    pics = out.parent / out.name
    pics.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    data = {"machine": machine(), **{k: old.get(k, []) for k in ("recall", "cost", "quality", "speed")}}
    if a.part in ("recall", "all"):
        names = ["flux-16x16"] if a.quick else a.shapes.split(",")
        data["recall"] = [r for r in data["recall"] if r["shape"] not in names] + recall(names)
    if a.part in ("cost", "all"):
        data["cost"] = cost(a.quick, a.reps)
    if a.part in ("quality", "all"):
        kinds = a.models.split(",")
        data["quality"] = [r for r in data["quality"] if r["model"] not in kinds] + quality(pics, kinds)
    if a.part in ("speed", "all") and not a.quick:
        data["speed"] = speed(max(1, a.reps - 1))
    write(out, "Block selection: mean pooling, XAttention's antidiagonal scores, VMoBA's selection", INTRO, render(data), data)


if __name__ == "__main__":
    main()
