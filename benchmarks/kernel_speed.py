"""Kernel speed: dense SDPA vs attnpatch's ``tiles`` and compiled ``flex`` kernels vs NATTEN,
side by side in one process, on 2-D image grids and a 3-D video latent, at block densities
near 5 / 10 / 25 / 50 %.

    python benchmarks/kernel_speed.py                 # full run, writes benchmarks/results/kernels.{md,json}
    python benchmarks/kernel_speed.py --quick         # small grids, for a smoke test (writes under the temp folder)
    python benchmarks/kernel_speed.py --grids 128x128 --update   # one grid again, merged into the committed table
    python benchmarks/kernel_speed.py --device cuda   # on a GPU, with attnpatch's Triton kernel as well:
                                                 # writes benchmarks/results/kernels_cuda.{md,json}

Speedup = dense time / kernel time, both measured here; ideal = 1 / block density (the
fraction of the score matrix a block-sparse kernel computes); fraction = speedup / ideal.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
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
from common import machine, out_stem, table, timeit, timeit_interleaved, write  # noqa: E402

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


def token_density(plan, S: int, device="cpu") -> float:
    """Kept fraction of the exact mask, counted in row chunks (on the device the plan was built for:
    its mask_mod's tables live there)."""
    kept = 0
    for s in range(0, S, 2048):
        sub = ap.Plan(mask_mod=lambda b, h, q, kv, s=s: plan.mask_mod(b, h, q + s, kv))
        kept += int(materialise_mask(sub, 1, 1, min(2048, S - s), S, device).sum())
    return kept / S**2


def natten_fn(grid, kw):
    import natten

    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(grid)]

    def run(q, k, v):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(q, k, v, **kw)

    return run


def bench_grid(grid, H, D, reps, natten_mode, use_flex, device="cpu", dtype=torch.float32, use_triton=False) -> list[dict]:
    S = math.prod(grid)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, S, D, generator=g).to(device, dtype) for _ in range(3))
    nq, nk, nv = (t.transpose(1, 2).reshape(1, *grid, H, D).contiguous() for t in (q, k, v))  # NATTEN layout
    site = Site(grid=grid)
    rows, natten_done = [], set()
    for family, method, nkw in points(grid):
        plan = method.plan(q, k, site)
        dens = plan.blocks.density()
        row = dict(grid="x".join(map(str, grid)), tokens=S, family=family, method=repr(method).replace(", causal=False", ""),
                   block_density=dens, token_density=token_density(plan, S, q.device), ideal=1 / dens)
        out = ap.attend(q, k, v, method, site, backend="tiles")
        tiles = ap.kernels.get("tiles")
        prepared = tiles.prepare(q, k, v, plan)  # tokens already in tile order: times the SDPA calls alone
        fns = {"dense": lambda: F.scaled_dot_product_attention(q, k, v),
               "tiles": lambda: ap.attend(q, k, v, method, site, backend="tiles"),
               "calls": lambda: tiles.calls(plan, *prepared[:4])}
        if use_flex:
            ref = ap.attend(q, k, v, method, site, backend="flex")  # compiles for this shape once
            fns["flex"] = lambda: ap.attend(q, k, v, method, site, backend="flex")
            row["flex_max_diff"] = (ref.float() - out.float()).abs().max().item()
        if use_triton:
            ref = ap.attend(q, k, v, method, site, backend="triton")  # compiles the kernel once
            fns["triton"] = lambda: ap.attend(q, k, v, method, site, backend="triton")
            row["triton_max_diff"] = (ref.float() - out.float()).abs().max().item()
        for name, t in timeit_interleaved(fns, reps).items():  # dense timed alongside every point
            row[f"{name}_s"] = t
        t_dense = row["dense_s"]
        if nkw is not None and min(nkw["kernel_size"] if isinstance(nkw["kernel_size"], tuple) else (nkw["kernel_size"],)) < 2:
            nkw = None  # NATTEN needs a kernel of >= 2 on every axis (a 1-frame window is not expressible)
        if nkw is not None and (natten_mode == "all" or (natten_mode == "one" and family not in natten_done)):
            run = natten_fn(grid, nkw)
            o = run(nq, nk, nv)
            row["natten_s"] = timeit(lambda: run(nq, nk, nv), 1, 0)
            row["natten_max_diff"] = (o.reshape(1, S, H, D).transpose(1, 2).float() - out.float()).abs().max().item()
            natten_done.add(family)
        for name in ("tiles", "flex", "natten", "triton"):
            if f"{name}_s" in row:
                row[f"{name}_speedup"] = t_dense / row[f"{name}_s"]
        row["fraction"] = row["tiles_speedup"] / row["ideal"]
        if "triton_speedup" in row:
            row["triton_fraction"] = row["triton_speedup"] / row["ideal"]
        row["calls_fraction"] = t_dense / row["calls_s"] / row["ideal"]
        print(progress(row), flush=True)
        rows.append(row)
    return rows


GRIDS = "64x64,128x128,13x30x52"


def progress(row: dict) -> str:
    """One readable line per measured point."""
    kernels = ", ".join(f"{n} {row[f'{n}_speedup']:.2f}x" for n in ("tiles", "triton", "flex", "natten") if f"{n}_speedup" in row)
    return (f"{row['grid']:>9} {row['family']:<15} {row['method']}: block density {row['block_density']:.3f}, "
            f"ideal {row['ideal']:.2f}x; {kernels} (tiles {row['fraction']:.2f} of ideal)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grids", default=GRIDS)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=None, help="default: 5 on the CPU, 20 on a GPU")
    p.add_argument("--natten", choices=["all", "one", "none"], default="all",
                   help="NATTEN at every point, at one point per family and grid, or not at all")
    p.add_argument("--natten-large", choices=["all", "one", "none"], default="one",
                   help="NATTEN mode for grids above 8K tokens (its unfused CPU path costs ~15x dense at any density)")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when a GPU is visible")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: float32 on the CPU, bfloat16 on a GPU (what the models run in)")
    p.add_argument("--triton", choices=["auto", "on", "off"], default="auto",
                   help="time attnpatch's Triton kernel too; auto: on a GPU (on the CPU only under TRITON_INTERPRET=1, "
                        "where its times mean nothing: a smoke test of the column)")
    p.add_argument("--quick", action="store_true", help="tiny grids, 1 rep: a smoke test (written under the temp folder)")
    p.add_argument("--update", action="store_true", help="keep the rows of other grids already in the output JSON "
                   "(without it a run of some --grids writes under the temp folder, not the committed table)")
    p.add_argument("--render", action="store_true", help="only rewrite the markdown from the existing JSON")
    p.add_argument("--heads", type=int, default=None, help="default: 4 on the CPU, 24 on a GPU (enough to fill it)")
    p.add_argument("--out", default=None, help="output stem; default benchmarks/results/kernels (CPU) or kernels_<device> "
                   "for a full run, the same name under the temp folder for a --quick or partial one")
    a = p.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False)")
    if a.dtype == "auto":
        a.dtype = "float32" if a.device == "cpu" else "bfloat16"
    if a.heads is None:
        a.heads = 4 if a.device == "cpu" else 24
    if a.reps is None:
        a.reps = 5 if a.device == "cpu" else 20
    partial = "--quick" if a.quick else None if a.render or a.update or a.grids == GRIDS else f"--grids {a.grids}"
    a.out = str(out_stem("kernels" if a.device == "cpu" else f"kernels_{a.device}", a.out, partial))
    if a.triton == "auto":
        a.triton = "on" if a.device == "cuda" else "off"
    if a.quick:
        a.grids, a.reps, a.heads, a.head_dim = "16x16,4x8x8", 1, 2, 32
    if a.triton == "on":
        x = torch.zeros(1, 1, 64, a.head_dim, device=a.device, dtype=getattr(torch, a.dtype))
        why = ap.kernels.get("triton").why_not(x, x, x, ap.SlidingTile(tile=8, window=1).plan(x, x, Site(grid=(8, 8))))
        if why:
            p.error(f"--triton on: attnpatch's triton kernel cannot run here: {why}")
    if a.natten != "none" or a.natten_large != "none":
        try:
            import natten  # noqa: F401
        except ImportError:
            print("natten is not installed: no NATTEN column (pip install natten)", file=sys.stderr)
            a.natten = a.natten_large = "none"
    grids = [tuple(int(x) for x in g.split("x")) for g in a.grids.split(",")]
    rows = []
    old = Path(a.out).with_suffix(".json")
    if a.render:
        if not old.is_file():
            p.error(f"--render: no results at {old} (run the benchmark first, or pass --out)")
        data = json.loads(old.read_text())
        return render(Path(a.out), data["rows"], data["machine"], data["args"])
    if a.update and old.exists():
        rows = [r for r in json.loads(old.read_text())["rows"] if r["grid"] not in a.grids.split(",")]
    for grid in grids:
        mode = a.natten if math.prod(grid) <= 8192 else a.natten_large
        rows += bench_grid(grid, a.heads, a.head_dim, a.reps, mode, not a.no_flex, a.device, getattr(torch, a.dtype),
                           a.triton == "on")
    order = {g: i for i, g in enumerate(["64x64", "128x128", "13x30x52"])}
    rows.sort(key=lambda r: order.get(r["grid"], 99))
    render(Path(a.out), rows, machine(), vars(a))


def summary(rows: list[dict], device: str = "cpu") -> str:
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
    ]
    tri = [r for r in rows if "triton_speedup" in r]
    if tri:
        t_aligned = [r for r in tri if r["family"] != "window"]
        t_ok = [r for r in t_aligned if r["triton_fraction"] >= 0.85]
        t_win = [r for r in tri if r["family"] == "window" and r["token_density"] <= 0.25]
        best = Counter(max(("tiles", "flex", "natten", "triton"), key=lambda n: r.get(f"{n}_speedup", 0)) for r in tri)
        lines += [
            f"- triton reaches >= 0.85 of the ideal speedup at {len(t_ok)} of {len(t_aligned)} block-aligned points; "
            f"it is faster than dense SDPA at {sum(r['triton_speedup'] > 1 for r in t_win)} of {len(t_win)} stride-1 "
            f"window points at token density <= 25 %.",
            "- Fastest sparse kernel per point: " + ", ".join(f"{n} {c}" for n, c in best.most_common()) + f" (of {len(tri)}).",
            "- Largest difference from tiles' output: triton " + f"{max(r['triton_max_diff'] for r in tri):.2g}"
            + (f", flex {max(r['flex_max_diff'] for r in tri if 'flex_max_diff' in r):.2g}" if any("flex_max_diff" in r for r in tri) else "")
            + " (both in the run's dtype).",
        ]
    if device == "cpu":
        lines.append(
            "- Where tiles falls short on this CPU: 'calls / ideal' times the same SDPA calls on q, k, v already in tile "
            "order, so the gap between the two columns is the permutation (one row gather each for q, k and v, one for the "
            "result) and the gap from calls / ideal to 1 is PyTorch's CPU flash kernel itself: on calls of fewer than 768 "
            "queries it runs at ~0.87 of its large-call rate (measured with equal work per "
            "query: 256- and 512-query calls 0.87-0.88 of the dense call's rate, 768 and 1024 at 1.00, at 1 and 2 threads), "
            "so tiles of 256-390 tokens start below 0.9 before any permutation. Rates vary about +-10 % between runs on "
            "this shared 2-core machine.")
    return "\n".join(lines)


def render(out: Path, rows: list[dict], mach: dict, args: dict) -> None:
    cols = [("grid", "grid"), ("family", "family"), ("method", "method"), ("block_density", "block density"),
            ("token_density", "token density"), ("ideal", "ideal speedup"), ("tiles_speedup", "tiles speedup"),
            ("fraction", "tiles / ideal"), ("calls_fraction", "calls / ideal")]
    has_triton = any("triton_speedup" in r for r in rows)
    if has_triton:
        cols += [("triton_speedup", "triton speedup"), ("triton_fraction", "triton / ideal")]
    cols += [("flex_speedup", "flex speedup"), ("natten_speedup", "NATTEN speedup")]
    a = argparse.Namespace(**{"heads": 4, "head_dim": 128, "reps": 3, "device": "cpu", "dtype": "float32", **args})
    gpu = a.device != "cpu"
    intro = (f"B=1, {a.heads} heads, head_dim {a.head_dim}, {a.dtype} on {'the GPU' if gpu else 'the CPU'}; median of {a.reps} "
             "runs after a warm-up (NATTEN: one run)" + ("; every timed call is bracketed by torch.cuda.synchronize()" if gpu else "")
             + "; at every point dense SDPA, tiles (and its SDPA calls alone), "
             + ("triton, " if has_triton else "") + "and flex run in turn within each "
             "repetition, so the machine's slow spells hit all of them alike. Speedups are dense SDPA time / kernel time "
             "in the same process; ideal = 1 / block density. flex is attnpatch's FlexAttention kernel compiled with "
             "torch.compile (compile time excluded)" + ("; triton is attnpatch's block-sparse flash-attention kernel "
                                                        "(64-token blocks, first call's compile excluded)" if gpu else "")
             + "; NATTEN is natten's na2d / na3d with its default " + ("backend" if gpu else "(flex, uncompiled) CPU backend")
             + " where installed.")
    if not gpu and has_triton:
        intro += " triton ran under TRITON_INTERPRET=1 (Triton's CPU interpreter): its times here mean nothing."
    if not gpu:
        intro += (" On grids above 8K tokens NATTEN ran at one point per family: its unfused CPU path costs the same at "
                  "every density (see the 64x64 rows).")
    intro += "\n\n" + summary(rows, a.device)
    write(out, "Kernel speed: block-sparse attention vs dense SDPA", intro, table(rows, cols),
          {"machine": mach, "args": args, "rows": rows})


if __name__ == "__main__":
    main()
