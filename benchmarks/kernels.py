"""Kernel speed: dense SDPA vs attnpatch's ``tiles`` and compiled ``flex`` kernels vs NATTEN,
side by side in one process, on 2-D image grids and a 3-D video latent, at block densities
near 5 / 10 / 25 / 50 %.

    python benchmarks/kernels.py                 # full run, writes benchmarks/results/kernels.{md,json}
    python benchmarks/kernels.py --quick         # small grids, for a smoke test

Speedup = dense time / kernel time, both measured here; ideal = 1 / block density (the
fraction of the score matrix a block-sparse kernel computes); fraction = speedup / ideal.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnpatch as ap  # noqa: E402
from attnpatch import Site  # noqa: E402
from attnpatch.plan import materialise_mask  # noqa: E402
from common import machine, table, timeit, timeit_interleaved, write  # noqa: E402

NA, STA, RAD = ap.Neighborhood, ap.SlidingTile, ap.Radial


def points(grid: tuple) -> list[tuple[str, ap.Method, dict | None]]:
    """(family, method, NATTEN kwargs or None) near 5 / 10 / 25 / 50 % block density."""
    key = "x".join(map(str, grid))
    P = {
        "64x64": [
            ("blocked", NA(window=16, stride=16), dict(kernel_size=16, stride=16)),
            ("blocked", NA(window=(8, 64), stride=(8, 64)), dict(kernel_size=(8, 64), stride=(8, 64))),
            ("blocked", NA(window=32, stride=32), dict(kernel_size=32, stride=32)),
            ("blocked", NA(window=(32, 64), stride=(32, 64)), dict(kernel_size=(32, 64), stride=(32, 64))),
            ("sliding-tile", STA(tile=16, window=1), dict(kernel_size=16, stride=16)),
            ("sliding-tile", STA(tile=(8, 64), window=1), dict(kernel_size=(8, 64), stride=(8, 64))),
            ("sliding-tile", STA(tile=(16, 32), window=(1, 3)), dict(kernel_size=(16, 64), stride=(16, 32))),
            ("sliding-tile", STA(tile=32, window=(1, 3)), dict(kernel_size=(32, 64), stride=32)),
            ("sliding-tile-16", STA(tile=16, window=(1, 3)), dict(kernel_size=(16, 48), stride=16)),
            ("sliding-tile-16", STA(tile=16, window=3), dict(kernel_size=48, stride=16)),
            ("window", NA(window=15, tile=16), dict(kernel_size=15)),
            ("window", NA(window=21, tile=16), dict(kernel_size=21)),
            ("window", NA(window=33, tile=16), dict(kernel_size=33)),
            ("window", NA(window=45, tile=16), dict(kernel_size=45)),
        ],
        "128x128": [
            ("blocked", NA(window=32, stride=32), dict(kernel_size=32, stride=32)),
            ("blocked", NA(window=(32, 64), stride=(32, 64)), dict(kernel_size=(32, 64), stride=(32, 64))),
            ("blocked", NA(window=64, stride=64), dict(kernel_size=64, stride=64)),
            ("blocked", NA(window=(64, 128), stride=(64, 128)), dict(kernel_size=(64, 128), stride=(64, 128))),
            ("sliding-tile", STA(tile=(16, 64), window=1), dict(kernel_size=(16, 64), stride=(16, 64))),
            ("sliding-tile", STA(tile=(16, 64), window=(1, 3)), dict(kernel_size=(16, 128), stride=(16, 64))),
            ("sliding-tile", STA(tile=(16, 64), window=(3, 1)), dict(kernel_size=(48, 64), stride=(16, 64))),
            ("sliding-tile", STA(tile=(16, 64), window=(7, 1)), dict(kernel_size=(112, 64), stride=(16, 64))),
            ("sliding-tile-16", STA(tile=16, window=(1, 3)), dict(kernel_size=(16, 48), stride=16)),
            ("sliding-tile-16", STA(tile=16, window=3), dict(kernel_size=48, stride=16)),
            ("sliding-tile-16", STA(tile=16, window=(3, 5)), dict(kernel_size=(48, 80), stride=16)),
            ("sliding-tile-16", STA(tile=16, window=(5, 7)), dict(kernel_size=(80, 112), stride=16)),
            ("window", NA(window=29, tile=16), dict(kernel_size=29)),
            ("window", NA(window=41, tile=16), dict(kernel_size=41)),
            ("window", NA(window=65, tile=16), dict(kernel_size=65)),
            ("window", NA(window=91, tile=16), dict(kernel_size=91)),
        ],
        "13x30x52": [
            ("blocked", NA(window=(1, 15, 52), stride=(1, 15, 52)), dict(kernel_size=(1, 15, 52), stride=(1, 15, 52))),
            ("blocked", NA(window=(1, 30, 52), stride=(1, 30, 52)), dict(kernel_size=(1, 30, 52), stride=(1, 30, 52))),
            ("blocked", NA(window=(13, 15, 26), stride=(13, 15, 26)), dict(kernel_size=(13, 15, 26), stride=(13, 15, 26))),
            ("blocked", NA(window=(13, 30, 26), stride=(13, 30, 26)), dict(kernel_size=(13, 30, 26), stride=(13, 30, 26))),
            ("sliding-tile", STA(tile=(1, 30, 26), window=1), dict(kernel_size=(1, 30, 26), stride=(1, 30, 26))),
            ("sliding-tile", STA(tile=(1, 30, 26), window=(3, 1, 1)), dict(kernel_size=(3, 30, 26), stride=(1, 30, 26))),
            ("sliding-tile", STA(tile=(1, 30, 26), window=(7, 1, 1)), dict(kernel_size=(7, 30, 26), stride=(1, 30, 26))),
            ("sliding-tile", STA(tile=(1, 30, 26), window=(13, 1, 1)), dict(kernel_size=(13, 30, 26), stride=(1, 30, 26))),
            ("radial", RAD(window=1, decay=4.0, dense_frames=0, tile=(15, 26)), None),
            ("radial", RAD(window=1, decay=2.0, dense_frames=0, tile=(30, 26)), None),
            ("radial", RAD(window=1, decay=2.0, dense_frames=1, tile=(30, 26)), None),
            ("radial", RAD(window=3, decay=2.0, dense_frames=1, tile=(30, 26)), None),
            ("window", NA(window=(3, 9, 13)), dict(kernel_size=(3, 9, 13))),
            ("window", NA(window=(5, 11, 19)), dict(kernel_size=(5, 11, 19))),
            ("window", NA(window=(7, 17, 29)), dict(kernel_size=(7, 17, 29))),
            ("window", NA(window=(9, 23, 37)), dict(kernel_size=(9, 23, 37))),
        ],
    }
    if key in P:
        return P[key]
    n = len(grid)  # --quick grids: a few generic points
    return [("sliding-tile", STA(tile=4, window=1), None), ("window", NA(window=5), dict(kernel_size=5))][: 2 if n < 3 else 1]


def token_density(plan, S: int) -> float:
    """Kept fraction of the exact mask, counted in row chunks."""
    kept = 0
    for s in range(0, S, 2048):
        sub = ap.Plan(mask_mod=lambda b, h, q, kv, s=s: plan.mask_mod(b, h, q + s, kv))
        kept += int(materialise_mask(sub, 1, 1, min(2048, S - s), S, "cpu").sum())
    return kept / S**2


def natten_fn(grid, kw):
    import natten

    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(grid)]

    def run(q, k, v):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(q, k, v, **kw)

    return run


def bench_grid(grid, H, D, reps, natten_mode, use_flex) -> list[dict]:
    S = math.prod(grid)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, S, D, generator=g) for _ in range(3))
    nq, nk, nv = (t.transpose(1, 2).reshape(1, *grid, H, D).contiguous() for t in (q, k, v))  # NATTEN layout
    site = Site(grid=grid)
    rows, natten_done = [], set()
    for family, method, nkw in points(grid):
        plan = method.plan(q, k, site)
        dens = plan.blocks.density()
        row = dict(grid="x".join(map(str, grid)), tokens=S, family=family, method=repr(method).replace(", causal=False", ""),
                   block_density=dens, token_density=token_density(plan, S), ideal=1 / dens)
        out = ap.attend(q, k, v, method, site, backend="tiles")
        tiles = ap.kernels.get("tiles")
        prepared = tiles.prepare(q, k, v, plan)  # tokens already in tile order: times the SDPA calls alone
        fns = {"dense": lambda: F.scaled_dot_product_attention(q, k, v),
               "tiles": lambda: ap.attend(q, k, v, method, site, backend="tiles"),
               "calls": lambda: tiles.calls(plan, *prepared[:4])}
        if use_flex:
            ref = ap.attend(q, k, v, method, site, backend="flex")  # compiles for this shape once
            fns["flex"] = lambda: ap.attend(q, k, v, method, site, backend="flex")
            row["flex_max_diff"] = (ref - out).abs().max().item()
        for name, t in timeit_interleaved(fns, reps).items():  # dense timed alongside every point
            row[f"{name}_s"] = t
        t_dense = row["dense_s"]
        if nkw is not None and min(nkw["kernel_size"] if isinstance(nkw["kernel_size"], tuple) else (nkw["kernel_size"],)) < 2:
            nkw = None  # NATTEN needs a kernel of >= 2 on every axis (a 1-frame window is not expressible)
        if nkw is not None and (natten_mode == "all" or (natten_mode == "one" and family not in natten_done)):
            run = natten_fn(grid, nkw)
            o = run(nq, nk, nv)
            row["natten_s"] = timeit(lambda: run(nq, nk, nv), 1, 0)
            row["natten_max_diff"] = (o.reshape(1, S, H, D).transpose(1, 2) - out).abs().max().item()
            natten_done.add(family)
        for name in ("tiles", "flex", "natten"):
            if f"{name}_s" in row:
                row[f"{name}_speedup"] = t_dense / row[f"{name}_s"]
        row["fraction"] = row["tiles_speedup"] / row["ideal"]
        row["calls_fraction"] = t_dense / row["calls_s"] / row["ideal"]
        print({k_: (round(v_, 3) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grids", default="64x64,128x128,13x30x52")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--natten", choices=["all", "one", "none"], default="all",
                   help="NATTEN at every point, at one point per family and grid, or not at all")
    p.add_argument("--natten-large", choices=["all", "one", "none"], default="one",
                   help="NATTEN mode for grids above 8K tokens (its unfused CPU path costs ~15x dense at any density)")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny grids, 1 rep: a smoke test")
    p.add_argument("--update", action="store_true", help="keep the rows of other grids already in the output JSON")
    p.add_argument("--render", action="store_true", help="only rewrite the markdown from the existing JSON")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "kernels"))
    a = p.parse_args(argv)
    if a.quick:
        a.grids, a.reps, a.heads, a.head_dim = "16x16,4x8x8", 1, 2, 32
    grids = [tuple(int(x) for x in g.split("x")) for g in a.grids.split(",")]
    rows = []
    old = Path(a.out).with_suffix(".json")
    if a.render:
        data = json.loads(old.read_text())
        return render(Path(a.out), data["rows"], data["machine"], data["args"])
    if a.update and old.exists():
        rows = [r for r in json.loads(old.read_text())["rows"] if r["grid"] not in a.grids.split(",")]
    for grid in grids:
        mode = a.natten if math.prod(grid) <= 8192 else a.natten_large
        rows += bench_grid(grid, a.heads, a.head_dim, a.reps, mode, not a.no_flex)
    order = {g: i for i, g in enumerate(["64x64", "128x128", "13x30x52"])}
    rows.sort(key=lambda r: order.get(r["grid"], 99))
    render(Path(a.out), rows, machine(), vars(a))


def summary(rows: list[dict]) -> str:
    """The claims the table supports, counted from it."""
    aligned = [r for r in rows if r["family"] != "window"]
    ok = [r for r in aligned if r["fraction"] >= 0.85]
    low = [f"{r['grid']} {r['method']} ({r['fraction']:.3f}" + (f"; calls alone {r['calls_fraction']:.2f})" if "calls_fraction" in r else ")")
           for r in aligned if r["fraction"] < 0.85]
    win = [r for r in rows if r["family"] == "window" and r["token_density"] <= 0.25]
    faster = [r for r in win if r["tiles_speedup"] > 1]
    ahead = [r for r in rows if all(r["tiles_speedup"] > r.get(f"{o}_speedup", 0) for o in ("flex", "natten"))]
    lines = [
        f"- Block-aligned plans (blocked, sliding-tile, radial): tiles reaches >= 0.85 of the ideal speedup at "
        f"{len(ok)} of {len(aligned)} points. Below it: " + ("; ".join(low) or "none") + ".",
        f"- Stride-1 windows at token density <= 25 %: tiles is faster than dense SDPA at {len(faster)} of {len(win)} points.",
        f"- tiles is faster than compiled FlexAttention and than NATTEN (where measured) at {len(ahead)} of {len(rows)} points.",
        "- Where tiles falls short on this CPU: 'calls / ideal' times the same SDPA calls on q, k, v already in tile "
        "order, so the gap between the two columns is the permutation (one row gather each for q, k and v, one for the "
        "result) and the gap from calls / ideal to 1 is PyTorch's CPU flash kernel itself: on calls of fewer than 768 "
        "queries it runs at ~0.87 of its large-call rate (measured with equal work per "
        "query: 256- and 512-query calls 0.87-0.88 of the dense call's rate, 768 and 1024 at 1.00, at 1 and 2 threads), "
        "so tiles of 256-390 tokens start below 0.9 before any permutation. Rates vary about +-10 % between runs on "
        "this shared 2-core machine.",
    ]
    return "\n".join(lines)


def render(out: Path, rows: list[dict], mach: dict, args: dict) -> None:
    cols = [("grid", "grid"), ("family", "family"), ("method", "method"), ("block_density", "block density"),
            ("token_density", "token density"), ("ideal", "ideal speedup"), ("tiles_speedup", "tiles speedup"),
            ("fraction", "tiles / ideal"), ("calls_fraction", "calls / ideal"), ("flex_speedup", "flex speedup"), ("natten_speedup", "NATTEN speedup")]
    a = argparse.Namespace(**{"heads": 4, "head_dim": 128, "reps": 3, **args})
    intro = (f"B=1, {a.heads} heads, head_dim {a.head_dim}, float32; median of {a.reps} runs after a warm-up "
             "(NATTEN: one run); at every point dense SDPA, tiles (and its SDPA calls alone) and flex run in turn within each repetition, so "
             "the machine's slow spells hit all of them alike. Speedups are dense SDPA time / kernel time in the "
             "same process; ideal = 1 / block "
             "density. flex is attnpatch's FlexAttention kernel compiled with torch.compile (compile time excluded); "
             "NATTEN is natten's na2d / na3d with its default (flex, uncompiled) CPU backend.")
    intro += (" On grids above 8K tokens NATTEN ran at one point per family: its unfused CPU path costs the same at "
              "every density (see the 64x64 rows).\n\n" + summary(rows))
    write(out, "Kernel speed: block-sparse attention vs dense SDPA", intro, table(rows, cols),
          {"machine": mach, "args": args, "rows": rows})


if __name__ == "__main__":
    main()
