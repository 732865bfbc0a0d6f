"""Generating above the training resolution on the FLUX fixture (issue 18's main job).

``builtin:flux-shapes`` was trained at 64x64 px (16x16 tokens). At 2x, 3x, 4x the side (32x32,
48x48, 64x64 tokens) stock attention costs more and leaves the training distribution; a window
of the training grid (FreeSwim's inward window, ``InwardWindow``) keeps each token's
training-scale receptive field. For each scale, caption and repeat, every setting generates
(20 steps, seed 0) in turn with stock, so load hits all alike: speed is the median and range of
per-repeat time ratios stock / setting, same process. Quality from the pixels: the fixture's
judge (colour, shape, place of the caption) and a repetition count (connected blobs of the
caption's colour; more than 1 is repetition).

    python benchmarks/highres.py --quick    # 2x and 3x, 1 caption, 1 repeat -> $TMPDIR/attnpatch-bench
    python benchmarks/highres.py            # 2x-4x, 2 captions, 1 round each -> benchmarks/results/highres.*
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import attnpatch as ap  # noqa: E402
from attnpatch.cli.runner import BUILTIN_PROMPTS, parse_method  # noqa: E402
from attnpatch.models import fixtures, shapes  # noqa: E402
from attnpatch.tools.refine import blobs, refine  # noqa: E402

TRAIN_PX, TRAIN_TOKENS = 64, 16
SETTINGS = [  # method specs; "stock" is unpatched; "c2f(s) + M" is FreeSwim's coarse-to-fine pipeline under M
    "stock",
    "Neighborhood(window=16, dense_steps=0)",
    "SlidingTile(tile=16, window=1, dense_steps=0)",
    "InwardWindow(train_grid=16, tile=8, full_every=2)",
    "c2f(0.7)",
    "c2f(0.7) + InwardWindow(train_grid=16, tile=8, dense_steps=0.4)",
    "c2f(0.7) + SlidingTile(tile=8, window=3, dense_steps=0.4)",
]


def split(spec: str) -> tuple[float | None, str | None]:
    """``"c2f(0.7) + Method(...)"`` -> (0.7, "Method(...)"); ``"Method(...)"`` -> (None, it); "stock" -> (None, None)."""
    strength, rest = None, spec.strip()
    if rest.startswith("c2f("):
        strength = float(rest[4:rest.index(")")])
        rest = rest[rest.index(")") + 1:].lstrip(" +")
    return strength, (None if rest in ("", "stock") else rest)


def generate(pipe, spec: str, caption: str, px: int, steps: int):
    """(image (3, px, px) in [0, 1], (wall, cpu) seconds) of one generation under ``spec``: a method (or
    stock) from noise, or ``c2f(s) + method``: FreeSwim's coarse-to-fine pipeline
    (``attnpatch.tools.refine``), timed whole: generation at the training resolution, bilinear
    upsampling to ``px``, then img2img at strength ``s`` (the last ``s * steps`` steps), both
    stages under the method (at the training size the windows here keep every key: exact)."""
    strength, method = split(spec)
    # the fixture's CFG defaults, given explicitly: the guidance wrapper (InwardWindow's override) reads the
    # call's own arguments to tell the conditional pass from the unconditional one
    kw = dict(true_cfg_scale=4.0, negative_prompt="", height=px, width=px, num_inference_steps=steps,
              generator=torch.Generator().manual_seed(0), output_type="pt")
    t, c = time.perf_counter(), time.process_time()
    with ap.patch(pipe, parse_method(method)) if method else contextlib.nullcontext():
        if strength is None:
            img = pipe(caption, **kw).images[0]
        else:
            img = refine(pipe, caption, from_size=TRAIN_PX, strength=strength, **kw).images[0]
    return img, (time.perf_counter() - t, time.process_time() - c)


def run_scale(pipe, scale: int, captions, reps: int, steps: int, settings) -> tuple[list[dict], dict]:
    px = TRAIN_PX * scale
    times = {s: [] for s in settings}  # per (caption, repeat), in order
    images, judged = {}, {}
    for rep in range(reps):
        for cap in captions:
            for s in settings:  # interleaved: every setting in turn with stock
                img, t = generate(pipe, s, cap, px, steps)
                times[s].append(t)  # (wall, cpu)
                images[(s, cap)] = img
                judged[(s, cap)] = {**shapes.judge(img, cap), "blobs": blobs(img, cap)}
            print(f"{scale}x rep {rep} {cap!r}: " + ", ".join(f"[{i}] {times[s][-1][1]:.1f}s" for i, s in enumerate(settings)),
                  file=sys.stderr, flush=True)
    rows = []
    for s in settings:
        ratios = [a[1] / b[1] for a, b in zip(times["stock"], times[s])]  # CPU-time speedup per repeat
        wall = [a[0] / b[0] for a, b in zip(times["stock"], times[s])]
        js = [judged[(s, c)] for c in captions]
        rows.append(dict(scale=f"{scale}x ({px}px, {(px // 4) ** 2} tok)", setting=s,
                         speedup=statistics.median(ratios), lo=min(ratios), hi=max(ratios),
                         wall=statistics.median(wall), wall_lo=min(wall), wall_hi=max(wall),
                         color=sum(j["color"] for j in js) / len(js), shape=sum(j["shape"] for j in js) / len(js),
                         place=sum(j["place"] for j in js) / len(js),
                         blobs=" ".join(str(j["blobs"]) for j in js)))
    return rows, images


def sheet(images: dict, settings, captions, scales, path: Path) -> None:
    """One PNG: a row per (scale, caption), a column per setting, all shown at 256 px."""
    from PIL import Image

    side = 256
    keys = [(sc, c) for sc in scales for c in captions]
    grid = Image.new("RGB", (side * len(settings), side * len(keys)))
    for r, (sc, c) in enumerate(keys):
        for col, s in enumerate(settings):
            img = images[sc][(s, c)].clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()  # (H, W, 3)
            grid.paste(Image.fromarray(img).resize((side, side), Image.NEAREST), (col * side, r * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


COLUMNS = [("scale", "scale"), ("setting", "setting"), ("speedup", "speedup (CPU time, median)"), ("lo", "min"),
           ("hi", "max"), ("wall", "speedup (wall, median)"), ("wall_lo", "min"), ("wall_hi", "max"),
           ("color", "colour"), ("shape", "shape"), ("place", "place"), ("blobs", "blobs per caption")]


def report(stem: Path, rows, images, settings, captions, scales, a) -> None:
    """Write ``stem``.md / .json / .png with the scales done so far."""
    sheet(images, settings, captions, scales, stem.with_suffix(".png"))
    intro = (f"FLUX fixture (trained at {TRAIN_PX}px = {TRAIN_TOKENS}x{TRAIN_TOKENS} tokens), {a.steps} steps, seed 0, "
             f"captions {captions}, {a.reps or 1} round(s) each, scales {scales}. Speedup: stock time / setting time per "
             "(caption, round), every setting run in turn with stock in one process; median, min, max; CPU time of this "
             "process (1 torch thread: robust to other processes on a shared machine) and wall clock. colour / shape / "
             "place: the fixture's pixel judge (fraction of captions). blobs: connected regions of the caption's colour "
             "(1 = one shape, >1 = repetition, 0 = none). `c2f(s) + M`: FreeSwim's coarse-to-fine pipeline, timed whole "
             "(generation at 64px, bilinear upsampling, img2img at strength s; both under M: attnpatch.tools.refine). Pictures: "
             f"{stem.with_suffix('.png').name} (rows: scale x caption; columns: settings in table order).")
    data = dict(machine=common.machine(), steps=a.steps, captions=captions, reps=a.reps or 1, settings=settings, rows=rows)
    common.write(stem, "Above the training resolution: FLUX fixture", intro, common.table(rows, COLUMNS), data)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2x and 3x, 1 caption, 1 repeat (scratch output)")
    p.add_argument("--scales", default=None, help="comma-separated side multiples (default 2,3,4; quick 2,3)")
    p.add_argument("--captions", type=int, default=None, help="fixture captions used (default 2; quick 1)")
    p.add_argument("--reps", type=int, default=None, help="repeats (default 1: each caption is one interleaved round; quick 1)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--settings", default=None, help="';'-separated method specs (default: the SETTINGS list)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    scales = [int(x) for x in (a.scales or ("2,3" if a.quick else "2,3,4")).split(",")]
    captions = BUILTIN_PROMPTS["flux-shapes"][:a.captions or (1 if a.quick else 2)]
    settings = ["stock"] + [s.strip() for s in a.settings.split(";")] if a.settings else SETTINGS
    custom = a.quick or a.scales or a.captions or a.reps or a.settings or a.steps != 20
    stem = common.out_stem("highres", a.out, "quick" if custom else None)
    pipe = fixtures.flux_shapes()
    generate(pipe, "stock", captions[0], TRAIN_PX, 1)  # warm-up
    rows, images = [], {}
    for sc in scales:
        r, images[sc] = run_scale(pipe, sc, captions, a.reps or 1, a.steps, settings)
        rows += r
        report(stem, rows, images, settings, captions, list(images), a)  # after every scale: a cut-short run keeps its rows
    print(common.table(rows, COLUMNS))
    print(f"wrote {stem}.md / .json / .png", file=sys.stderr)


if __name__ == "__main__":
    main()
