"""attnpatch under diffusers' Ulysses context parallelism: correctness, per-rank balance, time.

    python benchmarks/parallel.py            # full run: benchmarks/results/parallel.{md,json}
    python benchmarks/parallel.py --quick    # fewer jobs, 2 repeats (under the temp folder)

1. Correctness, on 2 gloo processes (this CPU): every family with a ``_cp_plan`` that attnpatch
   supports x every sparse / calibrated / guided method, max |parallel - one process| of the
   patched output and max |parallel - stock| (the method changes the output).
2. Balance at real sizes, computed from the plans (no model run): the work per rank (max / mean
   of the ranks' summed block density) for Wan2.1-14B at 720p / 81 frames over 8 ranks and FLUX
   at 2048x2048 over 4, dealing heads in Ulysses' order and by work (``patchers.balance``).
3. Time: a whole forward of a small FLUX transformer (2 blocks, 4 heads of 64, 48x48 grid) in one process and
   under Ulysses-2, stock and patched, interleaved over repeats (every rank one torch thread).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, out_stem, table, write  # noqa: E402

import attnpatch as ap  # noqa: E402
from attnpatch.patchers import balance  # noqa: E402
from attnpatch.tools import parallel_check as pc  # noqa: E402

# name, Site, tokens, heads, ranks, head dim
SIZES = [("Wan2.1-14B 720p, 81 frames", ap.Site(grid=(21, 45, 80)), 21 * 45 * 80, 40, 8, 128),
         ("FLUX 2048x2048", ap.Site(grid=(128, 128), text_len=512, kind="joint"), 128 * 128 + 512, 24, 4, 128)]


def _profile(H: int, dims: int, dense: int, window: tuple) -> dict:
    """A per-head profile with ``dense`` heads (the first ones) left full and the others windowed:
    the shape calibrated profiles take (a few global heads), written out, not calibrated here."""
    full = [10**6] * dims  # clamped to the grid: whole axes
    return {"window": torch.tensor([[full] * dense + [list(window)] * (H - dense)])}


def methods_at(name: str, H: int, dims: int) -> list:
    if dims == 3:
        w = (5, 15, 15)
        return [ap.Neighborhood(window=w), ap.SlidingTile(tile=(1, 8, 8), window=(3, 5, 5)), ap.Radial(tile=8),
                ap.InwardWindow(train_grid=(21, 30, 52)), ap.TopKBlocks(keep=0.25),
                ap.Neighborhood(profile=_profile(H, 3, H // 4, w))]
    w = (33, 33)
    return [ap.Neighborhood(window=w), ap.SlidingTile(tile=16, window=3), ap.InwardWindow(train_grid=64),
            ap.TopKBlocks(keep=0.25), ap.Neighborhood(profile=_profile(H, 2, H // 4, w))]


def balance_rows() -> list[dict]:
    rows = []
    for name, site, S, H, N, D in SIZES:
        for m in methods_at(name, H, len(site.grid)):
            label = f"{type(m).__name__}(profile: {H // 4} of {H} heads full)" if getattr(m, "profile", None) is not None else repr(m)
            t = time.perf_counter()
            w = balance.head_work(m, site, H, S, S, D)
            row = dict(size=name, ranks=N, heads=H, method=label)
            if w is None:
                row.update(note="data-dependent: each head keeps the same fraction of its blocks; not estimated, order kept")
            else:
                dealt = balance.deal(w, N)
                row.update(density_min=float(w.min()), density_max=float(w.max()),
                           in_order=balance.imbalance(w, balance.in_order(H, N)), dealt=balance.imbalance(w, dealt),
                           used="dealt by work" if balance.order(w, N) is not None else "Ulysses' order")
            row["seconds"] = time.perf_counter() - t
            rows.append(row)
            print(f"[balance] {name} {label}: {row.get('in_order', '-')} -> {row.get('dealt', '-')}", flush=True)
    return rows


def correctness_jobs(quick: bool) -> list[dict]:
    def per_family(f):
        out = [ap.Neighborhood(window=3), ap.SlidingTile(tile=2, window=1), ap.TopKBlocks(keep=0.25, block=2),
               ap.InwardWindow(train_grid=2), ap.Temperature(tau=0.8), ap.EntropyScale(train_len=8), ap.PAG(),
               ap.PAG(soft=0.5)]
        return out + ([ap.Radial(window=1, tile=2, dense_frames=0)] if f != "flux" else [])

    fams = ("flux",) if quick else pc.FAMILIES
    jobs = [dict(family=f, method=m) for f in fams for m in per_family(f)]
    jobs += [dict(family=f, method=ap.SharedAttention(), batch=2) for f in fams]
    jobs += [dict(family=f, method=ap.Neighborhood(window=3), order="before") for f in fams]
    if not quick:
        jobs += [dict(family="wan22", method=ap.Neighborhood(window=3)), dict(family="wan22", method=ap.PAG())]
    return jobs


def render(data: dict) -> tuple[str, str]:
    corr, bal, tim = data["correctness"], data["balance"], data["time"]
    worst = max((r["par_vs_single"] for r in corr if "par_vs_single" in r), default=float("nan"))
    failed = [r for r in corr if "error" in r]
    intro = (f"Ulysses-2 on 2 gloo processes: {len(corr)} jobs, worst |parallel - one process| {worst:.1e}"
             f"{'; FAILED: ' + ', '.join(r['family'] + ' ' + r['method'] for r in failed) if failed else ''}. "
             "Ring / unified attention is refused (tests/test_parallel.py).")
    body = "## Correctness (max absolute difference of the patched output)\n\n" + table(
        corr, [("family", "family"), ("method", "method"), ("order", "patched"), ("par_vs_single", "vs one process"),
               ("par_vs_stock", "vs stock"), ("routed", "routed calls"), ("error", "error")])
    body += ("\n\n## Balance at real sizes, from the plans\n\nWork of a rank = sum of its heads' block densities (what "
             "a block-sparse kernel computes); max / mean over ranks, 1 = even. A per-head profile's dense heads pile up "
             "on the first ranks in Ulysses' order; attnpatch then deals heads by work (H / N per rank), exactly.\n\n")
    body += table(bal, [("size", "size"), ("ranks", "ranks"), ("heads", "heads"), ("method", "method"),
                        ("density_min", "head density min"), ("density_max", "max"), ("in_order", "max/mean in order"),
                        ("dealt", "max/mean dealt"), ("used", "attnpatch uses"), ("note", "note")])
    load = data.get("load")
    body += ("\n\n## Time: one forward, stock vs patched, one process vs Ulysses-2 (ms, median)\n\n"
             + (f"Machine load (1-minute average) {load[0]} before and {load[1]} after the timing on {data['machine']['cores']} "
                "cores: above the core count, other processes shared them and the spread shows it.\n\n" if load else "") + table(
        tim, [("method", "method"), ("reps", "reps"), ("stock_one_ms", "stock 1 proc"), ("patched_one_ms", "patched 1 proc"),
              ("stock_par_ms", "stock Ulysses-2"), ("patched_par_ms", "patched Ulysses-2"),
              ("speedup_par", "speedup under Ulysses-2"), ("speedup_min", "min"), ("speedup_max", "max"), ("error", "error")]))
    return intro, body


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="FLUX only, 2 repeats, no real-size balance (temp folder)")
    p.add_argument("--reps", type=int, default=None, help="timing repeats (default 5; --quick 2)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    reps = a.reps or (2 if a.quick else 5)
    out = out_stem("parallel", a.out, "--quick" if a.quick else None)
    data = dict(machine={**machine(), "torch_threads": "1 per process"}, args=dict(quick=a.quick, reps=reps))
    data["correctness"] = pc.check(correctness_jobs(a.quick), world=2)
    data["balance"] = [] if a.quick else balance_rows()
    timed = [ap.Neighborhood(window=9, tile=8), ap.SlidingTile(tile=8, window=3)]
    load0 = os.getloadavg()[0]
    data["time"] = pc.check([dict(family="flux", method=m, time=reps, heads=4, head_dim=64, side=48) for m in timed], world=2)
    data["load"] = [round(load0, 1), round(os.getloadavg()[0], 1)]  # 1-minute load average before / after the timing
    intro, body = render(data)
    write(out, "attnpatch under Ulysses context parallelism", intro, body, data)
    print(f"wrote {out}.md / .json")


if __name__ == "__main__":
    main()
