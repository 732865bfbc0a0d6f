"""Measure the constants of the kernel cost model (attnpatch/kernels/cost.py) on this machine and
write them to attnpatch/kernels/cost_<device>.json, per torch thread count.

    python benchmarks/calibrate_cost.py                  # CPU, 1 and 2 threads
    python benchmarks/calibrate_cost.py --threads 1,2,4 --out /tmp/cost_cpu.json

Every constant is a lower quartile over interleaved repeats (a shared machine's slow spells hit all alike);
the median of ``--runs`` such calibrations is written. See cost.py for the model each one enters.
Takes a few minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import attnpatch as ap  # noqa: E402
from attnpatch.kernels import cost, tiles  # noqa: E402
from attnpatch.ops.lse import merge, sdpa_lse  # noqa: E402
from attnpatch.plan import Plan, materialise_mask  # noqa: E402


def timed(fns: dict, reps: int) -> dict[str, float]:
    """Lower-quartile seconds of each fn, run in turn within every repeat (order reversed every other
    one): a shared machine's slow spells inflate medians and means, the quartile stays near the rate."""
    for fn in fns.values():
        fn()
    out = {n: [] for n in fns}
    for i in range(reps):
        for n, fn in (list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]):
            t = time.perf_counter()
            fn()
            out[n].append(time.perf_counter() - t)
    return {n: statistics.quantiles(t, n=4)[0] for n, t in out.items()}


def qkv(H, S, D, B=1):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, S, D, generator=g) for _ in range(3))


def window_mask_mod(window):
    def mask_mod(b, h, q_idx, kv_idx):  # SinkWindow's shape: a few comparisons per element
        return (((kv_idx < 4) & (kv_idx >= 0)) | (q_idx - kv_idx < window)) & (kv_idx <= q_idx)
    return mask_mod


DIMS = (32, 64, 128)  # head dims the per-element rates are measured at (cost.per_d interpolates)


def calibrate(threads: int, reps: int) -> dict:
    """The constants at ``threads`` torch threads, from one interleaved set of timings (so every
    constant sees the same machine load; the ratios between them are what the ranking uses)."""
    torch.set_num_threads(threads)
    S, H = 1024, 2
    tiny, mid = qkv(1, 16, 64), qkv(4, 512, 64)
    keep = materialise_mask(Plan(mask_mod=window_mask_mod(256)), 1, 1, S, S, "cpu")
    bias = torch.zeros(keep.shape).masked_fill_(~keep, float("-inf"))
    build = Plan(mask_mod=window_mask_mod(32), causal=True)
    tp, bp = [sdpa_lse(*tiny)] * 2, [sdpa_lse(*mid)] * 2
    rows = torch.randn(4 * 2048, 64)
    idx, out = torch.randperm(rows.shape[0]).int(), torch.empty_like(rows)
    # tiles on block-aligned sliding tiles of a (4, 16, 16) video grid (full blocks, grouped calls, a
    # permutation: the shape it is chosen for), against dense SDPA on the same tensors
    tq = qkv(H, S, 128)
    tplan = ap.SlidingTile(tile=(1, 8, 8), window=(3, 3, 3)).plan(tq[0], tq[1], ap.Site(grid=(4, 16, 16))).with_site(False, 0)
    kern = tiles.Tiles()
    fns = {"tiny": lambda: F.scaled_dot_product_attention(*tiny),
           "build64": lambda: materialise_mask(build, 1, 1, 64, 64, "cpu"),
           "build1024": lambda: materialise_mask(build, 1, 1, 1024, 1024, "cpu"),
           "lse": lambda: sdpa_lse(*tiny), "merge_tiny": lambda: merge(tp), "merge_big": lambda: merge(bp),
           "gather": lambda: torch.index_select(rows, 0, idx, out=out), "tiles": lambda: kern.run(*tq, tplan)}
    for D in DIMS:
        x = tq if D == 128 else qkv(H, S, D)
        fns[f"dense{D}"] = lambda x=x: F.scaled_dot_product_attention(*x)
        fns[f"masked{D}"] = lambda x=x: F.scaled_dot_product_attention(*x, attn_mask=bias)
    fns["causal64"] = lambda x=qkv(H, S, 64): F.scaled_dot_product_attention(*x, is_causal=True)
    # one 256-token diagonal block as tiles runs it (LSE kernel, is_causal) against the same block unmasked
    blk = qkv(8, 256, 64)
    fns["diag256"] = lambda: tiles._causal_lse(*blk, None)
    fns["block256"] = lambda: sdpa_lse(*blk)
    t = timed(fns, reps)
    call, E = t["tiny"], H * S * S
    per = (t["build1024"] - t["build64"]) / (1024 ** 2 - 64 ** 2)
    c = dict(call_s=call, elem_s={str(D): (t[f"dense{D}"] - call) / E for D in DIMS},
             mask_elem_s={str(D): max(0.0, t[f"masked{D}"] - t[f"dense{D}"]) / E for D in DIMS},
             causal_factor=(t["causal64"] - call) / (t["dense64"] - call),
             diag_factor=(t["diag256"] - call) / (t["block256"] - call),
             build_s=max(0.0, t["build64"] - per * 64 ** 2), build_s_per_elem=max(0.0, per),
             lse_s=max(0.0, t["lse"] - call) + t["merge_tiny"] / 2,
             merge_s_per_elem=max(0.0, (t["merge_big"] - t["merge_tiny"]) / (2 * 4 * 512 * 64)),
             gather_s_per_byte=t["gather"] / (rows.numel() * rows.element_size()))
    # tiles_factor: its measured time less the modelled call, LSE, merge and gather terms, over the
    # kept fraction of the dense call on the same tensors, timed alongside
    rest = cost.estimate("tiles", dict(c, tiles_factor=0.0), *tq, tplan)
    c["tiles_factor"] = max(0.5, (t["tiles"] - rest) / (cost.block_stats(tplan.blocks, tplan)["density"] * (t["dense128"] - call)))
    return c


def _median(runs: list[dict]) -> dict:
    """Each constant's median over the runs (per head dim for the per-dim tables), 4 digits."""
    out = {}
    for k in runs[0]:  # cost.KEYS and the optional ones (diag_factor)
        if isinstance(runs[0][k], dict):
            out[k] = {d: float(f"{statistics.median(r[k][d] for r in runs):.4g}") for d in runs[0][k]}
        else:
            out[k] = float(f"{statistics.median(r[k] for r in runs):.4g}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--runs", type=int, default=5, help="calibrations per thread count; each constant is their median")
    p.add_argument("--out", default=str(cost.HERE / "cost_cpu.json"))
    a = p.parse_args(argv)
    table = {}
    for n in (int(x) for x in a.threads.split(",")):
        runs = [calibrate(n, a.reps) for _ in range(a.runs)]  # a loaded machine's spells move single runs
        table[str(n)] = _median(runs)
        print(n, "threads:", table[str(n)], flush=True)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    doc = dict(machine=f"{cpu}, {os.cpu_count()} cores (shared with other work while measured), torch {torch.__version__}",
               date=datetime.date.today().isoformat(), command=f"python benchmarks/calibrate_cost.py --reps {a.reps} --runs {a.runs}", threads=table)
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
