"""Per attention call: a patched call vs stock ``F.scaled_dot_product_attention`` on the same tensors,
for every sparse and calibrated method, 64 tokens to 64K, 1-D / 2-D / 3-D, at 1 and 2 torch threads.

    python benchmarks/percall.py                  # full run: benchmarks/results/percall.{md,json}
    python benchmarks/percall.py --quick          # sizes up to ~1K tokens, 1 thread (under the temp folder)
    python benchmarks/percall.py --device cuda    # on a GPU (bf16, no size cap): percall_cuda.{md,json}

The patched call is ``attnpatch.core.run(q, k, v, method, site)`` with the Site a patcher builds and
the kernel chosen automatically (exactly what a patched model runs); stock and patched alternate
within every repeat and the ratio patched / stock is taken per repeat (median, min-max spread).
Rows with a median ratio above 1.1 are flagged. Guidance methods (PAG, SharedAttention) add work by
design and are not measured here.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _speed as sp  # noqa: E402
from common import bench_dtype, machine, out_stem, pick_device, table, write  # noqa: E402

FAMILIES = {"smollm2": sp.LADDER_1D, "llama8b": sp.LADDER_1D, "flux": sp.LADDER_2D, "fixture": sp.LADDER_2D,
            "wan": sp.LADDER_3D}
QUICK_TOKENS = 1100  # --quick: sizes up to this many tokens
CPU_CALL_S = 0.3  # full CPU run: a stock call above this many seconds times fewer heads (or skips the size)
ROW_S = sp.ROW_S


def sizes(family: str, quick: bool) -> list:
    out = [s for s in FAMILIES[family]]
    return [s for s in out if not quick or sp.case(family, s).S <= QUICK_TOKENS]


def run_threads(a, threads: int, rate: float, data: dict, save) -> None:
    """Rows, per-call overhead and the sizes skipped (with why) at ``threads`` torch threads, added to
    ``data``; ``save()`` after every size, so a run cut short by a timeout keeps what it measured."""
    torch.set_num_threads(threads)
    dtype = bench_dtype(a.device)
    rate_t = rate * (threads if a.device == "cpu" else 1)  # the cap scales with the cores in use
    deadline = time.monotonic() + a.budget_s
    data["overhead"] += [dict(threads=threads, **r) for r in sp.overhead(device=a.device, dtype=dtype)]
    # rung by rung of the size ladders, every family at each: a budget cut drops the largest sizes of all, not a family
    ladder = sorted((i, n, fam, size) for n, fam in enumerate(a.families.split(",")) for i, size in enumerate(sizes(fam, a.quick)))
    cases = [(fam, sp.case(fam, size)) for _, _, fam, size in ladder]
    for r in sp.sweep(cases, a, dtype, rate_t, deadline, data, save, where=f" at {threads} thread(s)"):
        r["threads"] = threads
        data["rows"].append(r)
        print(f"[{threads}t] {r['family']} {r['shape']} H={r['heads']} {r['name']:<15} {r['kernel']:<12} "
              f"{r['ratio']:.2f}x stock ({r['stock_ms']:.2f} ms){'  SLOW' if r['slow'] else ''}", flush=True)


def render(data: dict) -> tuple[str, str]:
    fams = list(FAMILIES)
    rows, over, a = data["rows"], data["overhead"], data["args"]
    rows.sort(key=lambda r: (r["threads"], fams.index(r["family"]) if r["family"] in fams else 99, r["tokens"]))
    slow = [r for r in rows if r["slow"]]
    for r in rows:
        r["flag"] = f"**{r['ratio']:.2f}x > {sp.SLOW}x**" if r["slow"] else ""
        r["spread"] = f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}"
    intro = (
        f"Patched call = `attnpatch.core.run(q, k, v, method, site)` with the Site a patcher builds (LLM: causal prefill; "
        f"FLUX: joint, 512 text tokens first; fixture: 16 text tokens; Wan: video self-attention; diffusion sites at step "
        f"10 of 20, past any `dense_steps`) and the kernel chosen automatically (column *kernel*: what `kernels.select` "
        f"picked); stock = `F.scaled_dot_product_attention` on the same tensors (causal with GQA for the LLM rows). "
        f"Interleaved over {a['reps']} repeats in one process (order reversed every other repeat) after an untimed call "
        f"that builds plans and caches, the calls in which a static plan measures its candidate kernels "
        f"(`attnpatch/kernels/tune.py`: the first calls of a pipeline or model do the same) and one warm-up pair "
        f"(column *reps*: up to {sp.MANY} for calls under {sp.TINY_S} s a pair, whose ratios are noisier; fewer, never "
        f"under 2, where a row would take over {ROW_S:.0f} s); *ratio* = patched / stock per repeat, median, with the "
        f"min-max spread; > {sp.SLOW}x is flagged. "
        f"{a['dtype']} tensors, batch 1. Repeated calls reuse one Site, so a static plan's cache is warm, as on every "
        f"step after the first of a pipeline call.\n\n"
        f"**{len(slow)} of {len(rows)} rows above {sp.SLOW}x stock.**")
    if a["max_call_s"] is not None:
        intro += (f"\n\nSize cap on this CPU: a stock call estimated above {a['max_call_s']} s (from this machine's SDPA "
                  f"rate) is timed with fewer heads (column *H*; attention cost is linear in heads, so the per-head ratio "
                  f"holds, though the fixed per-call overhead weighs more); a size where even one KV group exceeds it is "
                  f"skipped (listed below): dense attention at 16K-64K tokens with head dim 128 takes seconds to minutes "
                  f"per call on a CPU, and a full run at 1 and 2 threads must finish in under 20 minutes on 2 cores.")
    if a["quick"]:
        intro += f"\n\n`--quick`: sizes up to {QUICK_TOKENS} tokens only; indicative (a smoke test, maybe on a loaded machine)."
    body = "## Per-call overhead (Dense through attnpatch minus stock SDPA)\n\n" + table(over, [
        ("threads", "threads"), ("call", "call (H=9, D=64)"), ("stock_us", "stock us"), ("patched_us", "patched us"),
        ("overhead_us", "overhead us (median)"), ("overhead_p10_us", "p10"), ("overhead_p90_us", "p90")])
    body += "\n\n## By method\n\n" + table(by_method(rows), [
        ("method", "method"), ("rows", "rows"), ("slow", f"> {sp.SLOW}x"), ("worst", "worst ratio"), ("worst_at", "at"),
        ("best", "best ratio"), ("best_at", "at"), ("kernels", "kernels")])
    body += f"\n\n## Rows above {sp.SLOW}x stock\n\n" + (table(slow, COLS) if slow else "none")
    flagged = {r["name"]: sum(x["slow"] for x in slow if x["name"] == r["name"]) for r in slow}
    if flagged:
        body += (f"\n\n## Why the flagged rows stay above {sp.SLOW}x\n\n"
                 + "\n".join(f"- **{n}** ({c} rows): {WHY.get(n, 'not analysed yet.')}" for n, c in flagged.items()))
    body += "\n\n## All rows\n\n" + table(rows, COLS)
    if data["skipped"]:
        body += ("\n\n## Skipped sizes\n\nOver the size cap, or after the run's time budget (`--budget-s` per thread "
                 "count, so a full CPU run stays under 20 minutes) was spent:\n\n" + "\n".join(f"- {s}" for s in data["skipped"]))
    return intro, body


def by_method(rows: list[dict]) -> list[dict]:
    """Per method: rows, rows flagged, worst and best median ratio (where), kernels seen."""
    out = []
    for name in dict.fromkeys(r["name"] for r in rows):
        rs = [r for r in rows if r["name"] == name]
        worst, best = max(rs, key=lambda r: r["ratio"]), min(rs, key=lambda r: r["ratio"])
        where = lambda r: f"{r['family']} {r['shape']} {r['threads']}t"  # noqa: E731
        out.append(dict(method=name, rows=len(rs), slow=sum(r["slow"] for r in rs), worst=worst["ratio"], worst_at=where(worst),
                        best=best["ratio"], best_at=where(best), kernels=", ".join(sorted({r["kernel"] for r in rs}))))
    return out


# Why each method's flagged rows stay above the line: what was measured on this CPU (sessions of issue 18; the
# numbers in benchmarks/results/*.md and the closing notes), and what would remove the cost.
WHY = {
    "SinkCalibration": "ACT's detection needs attention probabilities, which no fused SDPA kernel exposes: after the "
                       "kernel it re-reads the scores of `detect_rows` (64) query rows against every key. A call of at most "
                       "2^18 scores (64 tokens x 64 heads) instead runs one score pass over every row and takes the "
                       "detection and the calibrated output from it (kernel column 'direct': 25-35 % faster than the "
                       "kernel plus a second pass, measured interleaved; since 12-03 scores, scale and causality in one "
                       "baddbmm and fewer small ops: SmolLM2 64 tokens 2.35x -> 1.54x, Llama-8B 64 1.72x -> 1.16x, the "
                       "fixture's 80 tokens 2.95x -> 1.89x, the ~10 ops left being the floor of a 0.05-0.6 ms call); above that a pass over every row costs more than the flash kernel (3x at 256 tokens), so "
                       "the kernel's LSE and the re-read stay: at 256 tokens a quarter of the scores, at 1K 6 % (~1.5-2 "
                       "ms, a long causal call's earlier rows against the keys they see only). Fewer rows were tried and change which sinks are "
                       "found (on SmolLM2 at 256 tokens 560 columns the exact mean does not flag, against 13 with 64 rows). "
                       "A kernel that sums column probabilities while it runs (a GPU kernel) would remove the pass. "
                       "Tried on 12-04 (19th session, 1 thread, interleaved, the background run paused) and not kept: "
                       "(a) the flash kernel on every row but the detection rows, whose output then comes from their own "
                       "scores (exact: the same rows, no second pass): fixture 272 tokens 1.58x as before, Wan 4x8x8 "
                       "1.35x (1.31x before), FLUX 576 1.11x (1.14x): 64 rows fewer in the kernel save about what those "
                       "rows' softmax and P V cost as separate ops, plus the row gathers; (b) fewer detection rows: with "
                       "16 rows the 256-token rows are still 1.13-1.41x (64 rows: 1.25-1.57x), so at these sizes the "
                       "floor is the ~15 small ops of detection and correction, not the rows' scores.",
    "SinkRedistribution": "the same detection as SinkCalibration (magnets found by ACT's rule) when no magnet positions "
                          "are given; with `magnets=[...]` it needs no detection.",
    "VerticalSlash": "since 12-05 (this run) the 256-token-and-up rows run on `lines_native` (C, one key per row for "
                     "a lone diagonal, kernels/lines_native.py) where the cost model picks it: 1K-4K rows 0.48-0.80x "
                     "stock (the run before, on the `lines` kernel: 1.05-1.64x, every one flagged), llama8b 256 at one "
                     "thread 0.83x (1.44x). Still flagged: 64 tokens (2.9x / 1.5-1.7x), where the output comes from the "
                     "estimate's own scores (kernel column 'direct') and its ~15 small ops are the floor on a 0.1-0.2 ms "
                     "call, and 256 tokens wherever the model picked masked SDPA (1.6-2.1x): it estimated a "
                     "data-dependent mask as if built once for every head and run with is_causal, where SDPA builds one "
                     "per head and computes every score (mended after this run in kernels/cost.py, with lines_native's "
                     "constants refitted: measured alone at 256 tokens the native kernel took 1.1 ms against masked "
                     "SDPA's 2.8 on SmolLM2's shapes, one thread). On random q, k the estimate's top diagonals spread "
                     "over every offset, so these rows keep more than a real layer does (llm.md: SmolLM2's layers at "
                     "8K-32K).",
    "HyperAttention": "`min_len=256` forces the sorted path at 1K, below its default: at 2 threads the four causal "
                      "256-row squares on the CPU flash kernel (which gains little from causality at 256 rows and splits "
                      "9 heads unevenly over 2 threads) and the serial plan (LSH ranks and sorts, ~2.5 ms) weigh on an "
                      "18 ms call; at 1 thread the row is 0.96x, at 4K 0.51-0.63x. Since 12-03 (in this run) the buckets "
                      "kernel reads a query head's KV head in its gathers (no repeated k / v), runs each sorted piece's "
                      "blocks and drawn keys in one fused call (no residual pass over every row, no merge) and merges "
                      "pieces in place, and the plan hashes each token once per call: SmolLM2 1K 1.69x / 1.94x -> 0.96x "
                      "/ 1.38x (1 / 2 threads), Llama-8B 1K 1.80x / 1.60x -> 0.83x / 0.99x.",
    "TopKBlocks": "the fixture's 80-token calls: per-call work on a 30-50 us call (since 12-04 a call whose layout is "
                  "one tile or keeps every tile, and a prefill of at most 512 keys, is remembered as static by core: "
                  "1.26x -> 1.07x on the fixture's 80 tokens in a full run); 64-token LLM calls within the noise "
                  "of tiny calls. (Causal calls now default to key blocks of about 1/16 of the keys: 1K LLM calls, "
                  "1.19-1.32x with the fixed 256-token blocks that kept 8 of 10 causal block pairs, run at ~0.7x.)",
    "Radial": "at Wan 4x16x16 / 4x32x32 (4 frames) the pattern keeps 0.906 / 0.945 of the scores: the sparse kernels "
              "cost about what the 5-10 % they skip saves. Since 12-04 the `classes` kernel runs the pattern as one "
              "unmasked call per class of queries keeping the same keys (9 classes at 4x32x32): 1.02-1.08x there "
              "measured alone, 1.24-1.38x on tiles before; measured choice keeps tiles when the trials put them within "
              "3 %, which on a loaded 2-thread run can come out 1.1-1.2x.",
    "Neighborhood": "fixture calls (D = 24, 4 heads) of 30-350 us, where the per-call Python work (~5-10 us) and the "
                    "mask (a float bias read per head: +26 % on plain SDPA at 1,040 tokens) outweigh what is skipped; "
                    "FLUX 512+16x16 / 32x32 (1.12-1.17x) the same mask cost where the text rows see every key; Wan "
                    "4x16x16 with window 3x5x5 keeps 7 % of the keys, yet masked SDPA (1.13x) and tiles (1.10x) measured "
                    "alike there (12-03, 1 thread, interleaved: ~75 keys per query leave too little work per block for "
                    "tiles' calls, and gather ran 1.37x), so the trials' pick between them is noise (this run: tiles 1.27x).",
    "SlidingTile": "(since 12-04 most sizes from 1K tokens run on the `classes` kernel, a tile's queries keeping the "
                   "same window: Wan 4x32x32 0.63-0.69x -> 0.47-0.52x, the fixture's 1,040 tokens 0.83-1.01x -> "
                   "0.67-0.79x, FLUX 512+64x64 0.79-0.81x -> 0.69-0.70x) as Neighborhood on the fixture (at 1,040 tokens it keeps 57 % of the keys; the mask costs +26 %; "
                   "tiles now copies a window's key runs side by side for one call where the cost constants say so, "
                   "1.38x -> ~1.0x there); FLUX 512+32x32 at 1.10-1.17 is the same near-dense case.",
    "InwardWindow": "as SlidingTile: small fixture calls and near-dense windows at 1-1.5K tokens.",
    "Temperature": "per-call Python work (~5 us) on 30-120 us calls; spreads straddle 1.1.",
    "EntropyScale": "per-call Python work plus the per-row rescaling of q on 30-120 us calls; spreads straddle 1.1. "
                    "Since 12-03 core.run remembers the call with its per-row scales; the multiply itself (~110 us for "
                    "Llama-8B's 64-token q on one thread) is the rest.",
    "Power": "from 256 tokens on `lines_native` since 12-05 (this run: 0.16-0.37x stock at 256-4K, the run before "
             "0.24-1.05x on gather / lines / sdpa); 64-token calls (0.2-1 ms) within the noise of tiny calls: a masked "
             "SDPA call (the mask cached) where stock runs is_causal, plus the Python of a call (since 12-03 repeated "
             "calls skip the plan lookup and kernel selection, `plans_by_site`).",
    "SinkWindow": "64-256-token calls at 1.10-1.16x in earlier runs, spreads straddling 1.1. Since 12-04 a causal plan's "
                  "mask over at most 512 keys (one key block of the CPU flash kernel, where its causal skip has nothing "
                  "to skip) runs on SDPA with the mask alone, 1-5 % faster than the kernel called with is_causal and the "
                  "mask (64 tokens: 189 -> 179 us against stock's 177; SinkWindow / Power at 64 tokens 1.10-1.11x -> "
                  "1.04-1.06x measured old and new in turn); the rest is core's ~5 us per call.",
    "Quest": "prefill is dense SDPA by definition: a 64-token row within the noise of tiny calls.",
    "StreamingHeads": "a mixed layer at 64-256 tokens: its full and streaming heads run as one SDPA call with a per-head "
                      "mask (merge_heads: cheaper than a call per head group there), a masked call where stock runs "
                      "is_causal (1.15-1.27x); spreads straddle 1.1-1.5. Since 12-03 core.run remembers that merged "
                      "call per layer (64 tokens 1.10x, 256 tokens 1.11-1.15x in this run).",
}


COLS = [("threads", "thr"), ("family", "family"), ("dims", "grid"), ("shape", "shape"), ("tokens", "tokens"),
        ("heads", "H"), ("head_dim", "D"), ("method", "method"), ("kernel", "kernel"), ("stock_ms", "stock ms"),
        ("patched_ms", "patched ms"), ("ratio", "ratio"), ("spread", "spread"), ("reps", "reps"), ("flag", "flag")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"sizes up to {QUICK_TOKENS} tokens, 1 thread (under the temp folder)")
    p.add_argument("--threads", default=None, help="comma-separated torch thread counts; default 1,2 (--quick: 1)")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"subset of {','.join(FAMILIES)}")
    p.add_argument("--methods", default=None, help="comma-separated method class names (a partial run; default all)")
    p.add_argument("--reps", type=int, default=None, help="default 5 (CPU), 10 (GPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--max-call-s", type=float, default=None, help=f"CPU size cap (default {CPU_CALL_S}; 0: none)")
    p.add_argument("--budget-s", type=float, default=540.0, help="per thread count: larger sizes are skipped after this")
    p.add_argument("--render", action="store_true", help="rewrite the .md from the run's .json (nothing measured)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    a.device = pick_device(p, a.device)
    default_threads = "1" if a.quick or a.device == "cuda" else "1,2"
    threads = [int(t) for t in (a.threads or default_threads).split(",")]
    a.reps = a.reps or (5 if a.device == "cpu" else 10)
    a.max_call_s = (None if a.device == "cuda" else CPU_CALL_S) if a.max_call_s is None else (a.max_call_s or None)
    a.methods = a.methods.split(",") if a.methods else None
    default = a.families == ",".join(FAMILIES) and a.threads in (None, default_threads) and not a.methods
    out = out_stem("percall" if a.device == "cpu" else f"gpu/percall_{a.device}", a.out,
                   "--quick" if a.quick else None if default else "a partial")
    per_thread = sp.sdpa_rate(a.device, bench_dtype(a.device)) / (torch.get_num_threads() if a.device == "cpu" else 1)
    args = dict(quick=a.quick, reps=a.reps, max_call_s=a.max_call_s, threads=threads, device=a.device,
                dtype=str(bench_dtype(a.device)).replace("torch.", ""))
    data = dict(machine={**machine(), "torch_threads": ", ".join(map(str, threads))}, args=args, rows=[], overhead=[],
                skipped=[])

    def save():
        intro, body = render(data)
        write(out, "Per-call speed: patched vs stock attention", intro, body, data)

    if a.render:
        data = json.loads(out.with_suffix(".json").read_text())
        return save()

    for t in threads:
        run_threads(a, t, per_thread, data, save)
    save()
    rows = data["rows"]
    print(f"wrote {out}.md / .json: {sum(r['slow'] for r in rows)} of {len(rows)} rows above {sp.SLOW}x stock")


if __name__ == "__main__":
    main()
