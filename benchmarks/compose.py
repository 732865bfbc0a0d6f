"""attnpatch composed with torch.compile, offloading and caches under context parallelism (issue 19),
each measured in one process against stock eager (ratios of interleaved repeats, median and spread).

    python benchmarks/compose.py            # writes benchmarks/results/compose.{md,json}
    python benchmarks/compose.py --quick    # a smaller grid and fewer repeats, to the scratch folder

- compile: the trained FLUX fixture's transformer (``builtin:flux-shapes``, 2 + 4 blocks, 4 heads of
  24) on a ``--grid`` of image tokens + 16 text tokens; stock and each method eager and under
  ``torch.compile`` (default inductor), with the compile time of the first call, dynamo's graph /
  break counts (``torch._dynamo.explain``), recompiles during the timed calls, and compiled - eager.
- offload: the fixture's pipeline with diffusers' group offloading and model CPU offload (CPU to
  CPU: the hooks' cost, not transfers), and a transformers Llama with accelerate ``device_map``
  (one layer offloaded to disk); what does not run on CPU is listed with diffusers' own message.
- cache + Ulysses: FirstBlockCache with a method under Ulysses-2 (gloo, 2 processes) vs one
  process, and cached vs uncached time of the parallel loop (``compose_cp.py``).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnpatch as ap  # noqa: E402
from attnpatch.tools.timing import interleave  # noqa: E402
from common import machine, out_stem, table, write  # noqa: E402
import compose_offload  # noqa: E402
import compose_cp  # noqa: E402


def methods(grid) -> dict:
    w = max(3, grid[0] // 4) | 1  # a window of about a quarter of the grid side (odd)
    return {f"Neighborhood(window={w})": ap.Neighborhood(window=w, dense_steps=0),
            "TopKBlocks(keep=0.25)": ap.TopKBlocks(keep=0.25, dense_steps=0), "Temperature(tau=0.8)": ap.Temperature(tau=0.8)}


def flux_inputs(grid, T: int = 16) -> dict:
    H, W = grid
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(H * W, 3)
    ids[:, 1], ids[:, 2] = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
    return dict(hidden_states=torch.randn(1, H * W, 16, generator=g), encoder_hidden_states=torch.randn(1, T, 64, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.75]), img_ids=ids,
                txt_ids=torch.zeros(T, 3), return_dict=False)


def ratios(times: dict, ref: str) -> dict:
    """Per setting: median ms, and the median / min / max of its per-repeat ratio to ``ref``."""
    out = {}
    for name, ts in times.items():
        r = [t / b for t, b in zip(ts, times[ref])]
        out[name] = dict(ms=1e3 * statistics.median(ts), ratio=statistics.median(r), lo=min(r), hi=max(r))
    return out


def timed(fn):
    """A run for ``interleave``: calls ``fn`` and returns its seconds."""
    import time

    def run():
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    return run


def _graphs(model, args, kw) -> tuple[int, int]:
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model)(*args, **kw)
    return ex.graph_count, ex.graph_break_count


def _first_call(fn):
    import time

    t = time.perf_counter()
    with torch.no_grad():
        out = fn()
    return out, time.perf_counter() - t


def _patched(base, method, run, inputs, stock_out):
    """Copies of ``base`` patched with ``method``: eager, compiled (first call made), and their rows."""
    eager, g, c = (copy.deepcopy(base) for _ in range(3))
    for m in (eager, g, c):
        ap.patch(m, copy.deepcopy(method))
    with torch.no_grad():
        ref = run(eager)
    graphs = _graphs(g, *inputs)
    c = torch.compile(c)
    out, first = _first_call(lambda: run(c))
    return eager, c, {"eager": dict(vs_stock=float((ref - stock_out).abs().max())),
                      "compiled": dict(compile_s=first, diff_eager=f"{float((out - ref).abs().max()):.1e}",
                                       graphs=graphs[0], breaks=graphs[1])}


def compile_rows(base, inputs, methods: dict, repeats: int) -> list[dict]:
    """Two phases, each interleaved with stock eager: stock compiled alone (before any patch: a live
    patch routes every model's attention module, so the stock graph would break there too), then
    every method eager and compiled. ``inputs``: (args, kwargs) of one forward."""
    from torch._dynamo.utils import counters

    args, kw = inputs
    run = lambda m: (lambda o: o[0] if isinstance(o, tuple) else o.logits)(m(*args, **kw))  # noqa: E731
    call = lambda m: timed(lambda: run(m))  # noqa: E731
    diff = lambda a, b: f"{float((a - b).abs().max()):.1e}"  # noqa: E731
    with torch.no_grad():
        stock_out = run(base)
    rows = [dict(setting="stock", mode="eager", graphs=1, breaks=0)]
    stock_graphs = _graphs(copy.deepcopy(base), args, kw)
    compiled = torch.compile(copy.deepcopy(base))
    out, first = _first_call(lambda: run(compiled))
    rows.append(dict(setting="stock", mode="compiled", compile_s=first, diff_eager=diff(out, stock_out),
                     graphs=stock_graphs[0], breaks=stock_graphs[1]))
    with torch.no_grad():
        phase1 = ratios(interleave({"stock eager": call(base), "stock compiled": call(compiled)}, repeats), "stock eager")
    rows[1].update(phase1["stock compiled"], ms_stock_eager_phase1=phase1["stock eager"]["ms"])
    runs = {"stock eager": call(base)}
    for name, method in methods.items():
        eager, c, new = _patched(base, method, run, inputs, stock_out)
        rows += [dict(setting=name, mode=k, **v) for k, v in new.items()]
        runs[f"{name} eager"], runs[f"{name} compiled"] = call(eager), call(c)
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        phase2 = ratios(interleave(runs, repeats), "stock eager")
    recompiled = counters["stats"]["unique_graphs"] - before
    rows[0].update(phase2["stock eager"])
    for r in rows[2:]:
        r.update(phase2[f"{r['setting']} {r['mode']}"])
        r["recompiled_graphs"] = recompiled if r["mode"] == "compiled" else None
    return rows


def compile_section(grid, repeats: int) -> tuple[list[dict], list[dict]]:
    """The FLUX fixture's transformer on ``grid``, and a random Llama (4 layers) on a 1024-token prefill."""
    from attnpatch.models import fixtures

    torch._dynamo.config.recompile_limit = 64  # several compiled copies of one class must not fall back to eager
    flux = compile_rows(fixtures.flux_shapes().transformer.eval(), ((), flux_inputs(grid)), methods(grid), repeats)
    llm, ids = compose_offload.llama()
    llm_methods = {"SinkWindow(sink=4, window=256)": ap.SinkWindow(sink=4, window=256, block=64),
                   "TopKBlocks(keep=0.25)": ap.TopKBlocks(keep=0.25, block=64)}
    return flux, compile_rows(llm, ((ids,), {}), llm_methods, repeats)


def family_rows() -> list[dict]:
    """Every tiny diffusers family patched with Neighborhood(window=3), compiled with no eager call
    first: max |compiled - eager| and |compiled - stock| (0 where the window covers the tiny grid)."""
    from attnpatch.models import tiny

    rows = []
    for fam, case in tiny.CASES.items():
        kw = case.inputs()
        torch.manual_seed(0)
        model = case.build().eval()
        with torch.no_grad():
            stock = model(**kw)[0]
            with ap.patch(model, ap.Neighborhood(window=3)):
                ref = model(**kw)[0]
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = case.build().eval()
        with ap.patch(model, ap.Neighborhood(window=3)) as handle:
            out, first = _first_call(lambda: torch.compile(model)(**kw)[0])
            routed = handle.stats()["routed"]
        rows.append(dict(family=fam, grid=str(case.grid), diff_eager=f"{float((out - ref).abs().max()):.1e}",
                         diff_stock=f"{float((out - stock).abs().max()):.1e}", routed=routed, compile_s=first))
    return rows


def cache_cp_section(grid, repeats: int) -> list[dict]:
    nb = max(3, grid[0] // 4) | 1
    jobs = [dict(family="flux", method=ap.Neighborhood(window=nb, dense_steps=0), grid=grid,
                 layers=dict(num_layers=2, num_single_layers=4), repeats=repeats),
            dict(family="flux", method=ap.TopKBlocks(keep=0.25, block=2)), dict(family="wan", method=ap.Neighborhood(window=3)),
            dict(family="ltx", method=ap.Neighborhood(window=3), layers=dict(num_layers=2))]
    jobs += [dict(family=f, method=m, order="cache_after", layers=dict(num_layers=2) if f == "ltx" else None)
             for f in ("flux", "wan", "ltx") for m in (None, ap.Neighborhood(window=3))]
    rows = compose_cp.check(jobs, world=2)
    for r in rows:
        r["method"] = "stock attention" if r["method"] == "None" else r["method"]
        if "par_vs_single" in r:
            r["max_par_vs_single"] = f"{max(r['par_vs_single']):.1e}"
            r["skips"] = f"{''.join('s' if s else 'c' for s in r['skipped_single'])} / " \
                         f"{''.join('s' if s else 'c' for s in r['skipped_par'])}"
        if r.get("cached_s"):
            rr = [c / u for c, u in zip(r["cached_s"], r["uncached_s"])]
            r.update(cached_ratio=statistics.median(rr), cached_lo=min(rr), cached_hi=max(rr))
        r["result"] = r.get("error", "ran").split("\n")[0][:160]
    return rows


COMPILE_COLS = [("setting", "setting"), ("mode", "mode"), ("ms", "ms / call"), ("ratio", "x stock eager (median)"),
                ("lo", "min"), ("hi", "max"), ("compile_s", "first call s"), ("graphs", "graphs"), ("breaks", "breaks"),
                ("recompiled_graphs", "graphs compiled while timed"), ("diff_eager", "max |compiled - eager|")]
FAMILY_COLS = [("family", "family"), ("grid", "grid"), ("diff_eager", "max |compiled - eager|"),
               ("diff_stock", "max |compiled - stock|"), ("routed", "calls routed"), ("compile_s", "first call s")]
CP_COLS = [("family", "family"), ("method", "method"), ("order", "cache enabled"), ("result", "result"),
           ("max_par_vs_single", "max |Ulysses-2 - one process|"), ("skips", "steps (one process / Ulysses): c computed, s cached"),
           ("cached_ratio", "cached / uncached time (median)"), ("cached_lo", "min"), ("cached_hi", "max")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", type=int, default=48, help="image tokens per side of the FLUX fixture's calls (default 48)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 15; quick 3)")
    p.add_argument("--quick", action="store_true", help="grid 24, 3 repeats, to the scratch folder")
    p.add_argument("--only", choices=["compile", "offload", "cache"], help="one section (a partial run)")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/compose)")
    a = p.parse_args(argv)
    grid = (24, 24) if a.quick else (a.grid, a.grid)
    reps = a.repeats or (3 if a.quick else 15)
    torch.set_num_threads(1)  # a shared 2-core machine; the Ulysses section runs 2 processes of 1 thread
    stem = out_stem("compose", a.out, "quick" if a.quick else ("partial" if a.only else None))
    data = dict(machine=machine(), grid=grid, repeats=reps)
    body = []
    if a.only in (None, "compile"):
        data["compile"], data["compile_llm"] = flux, llm = compile_section(grid, reps)
        body += [f"## torch.compile: FLUX fixture transformer, {grid[0]}x{grid[1]} image + 16 text tokens\n",
                 table(flux, COMPILE_COLS), "", "## torch.compile: Llama, 4 layers (random weights), 1024-token prefill\n",
                 table(llm, COMPILE_COLS), ""]
        data["compile_families"] = fams = family_rows()
        body += ["## torch.compile: every tiny diffusers family, Neighborhood(window=3)\n", table(fams, FAMILY_COLS), ""]
    if a.only in (None, "offload"):
        data["offload"] = rows = compose_offload.section(reps)
        body += ["## Offloading\n", table(rows, compose_offload.COLUMNS), ""]
    if a.only in (None, "cache"):
        data["cache_cp"] = rows = cache_cp_section((32, 32) if not a.quick else (16, 16), reps)
        body += ["## FirstBlockCache under Ulysses-2 (2 gloo processes)\n", table(rows, CP_COLS), ""]
    intro = ("Ratios are per repeat to a reference measured in the same interleaved loop (rotating order); median "
             "with min / max over the repeats. torch.compile: the reference is stock eager; stock compiled is timed in a "
             "loop of its own with stock eager, before any patch exists in the process (a live patch routes the attention "
             "modules of every model of that class, which would add graph breaks to the stock model too); its ms / call is "
             "that loop's. Offloading: the reference is the plainly loaded patched model.")
    write(stem, "Composition: torch.compile, offloading, caches with context parallelism", intro, "\n".join(body), data)
    print(f"wrote {stem}.md / .json")


if __name__ == "__main__":
    main()
