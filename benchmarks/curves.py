"""Speed curves: per-call speedup over stock SDPA vs sequence length for every sparse and calibrated
method (1-D LLM, 2-D FLUX-shaped, 3-D Wan-shaped), the crossover where each starts to pay, and the
whole-model speedup of a small FLUX / Wan transformer at growing grids.

    python benchmarks/curves.py               # full run: benchmarks/results/curves.{md,json,png}
    python benchmarks/curves.py --quick       # up to ~1K tokens per call, small grids (under the temp folder)
    python benchmarks/curves.py --device cuda # on a GPU: benchmarks/results/gpu/curves_cuda.*
    python benchmarks/curves.py --extend benchmarks/results/curves.json --from-tokens 9000 --to-tokens 17000 \
        --max-call-s 2.5 --reps 3   # sizes the committed run skipped, measured now (on one KV group or head, the
                                    # cap fits one) and added to it, its rows kept as they are
    python benchmarks/curves.py --render benchmarks/results/curves.json   # .md / .png again from the json

Per call: the same measurement as ``percall.py`` (``attnpatch.core.run`` with automatic kernel choice
vs ``F.scaled_dot_product_attention``, interleaved, ratio per repeat, median); speedup = stock / patched.
Crossover: the token count where the speedup first rises through 1.0, interpolated log-linearly.
End to end: the model's forward with the method patched vs stock, interleaved the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _speed as sp  # noqa: E402
import attnpatch as ap  # noqa: E402
from common import bench_dtype, machine, out_stem, pick_device, table, to_device, write  # noqa: E402

CURVES = {  # family: sizes, 256 to 64K tokens
    "smollm2": [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536],
    "flux": [(s, s) for s in (16, 24, 32, 48, 64, 96, 128, 192, 256)],  # + 512 text tokens
    "wan": [(4, 8, 8), (4, 12, 12), (4, 16, 16), (8, 16, 16), (4, 32, 32), (8, 32, 32), (16, 32, 32), (8, 64, 64), (16, 64, 64)],
}
E2E = {"flux": [(16, 16), (32, 32), (64, 64)], "wan": [(5, 8, 8), (5, 16, 16), (5, 32, 32)]}  # token grids
QUICK_TOKENS = 1100
CPU_CALL_S = 0.3  # as percall.py: heads narrowed above this stock-call time


def per_call(a, rate, data: dict, save) -> None:
    """Per-call rows (and skipped sizes) added to ``data``; ``save()`` after every size."""
    dtype = bench_dtype(a.device)
    deadline = time.monotonic() + a.budget_s
    # rung by rung of the size ladders, every family at each: a budget cut drops the largest sizes of all, not a family
    ladder = sorted((i, n, fam, size) for n, fam in enumerate(a.families.split(",")) for i, size in enumerate(CURVES[fam]))
    cases = [(fam, c) for _, _, fam, size in ladder for c in [sp.case(fam, size)]
             if not (a.quick and c.S > QUICK_TOKENS) and _in_span(a, c.S)]
    for r in sp.sweep(cases, a, dtype, rate, deadline, data, save):
        data["rows"].append(r)
        print(f"{r['family']} {r['shape']} {r['name']:<15} {r['kernel']:<10} {r['speedup']:.2f}x", flush=True)


def _in_span(a, tokens: int) -> bool:
    """Whether a size lies within ``--from-tokens`` / ``--to-tokens`` (0: no bound)."""
    return a.from_tokens <= tokens <= (a.to_tokens or tokens)


def crossovers(rows: list[dict]) -> list[dict]:
    out = []
    for fam in dict.fromkeys(r["family"] for r in rows):
        for name in dict.fromkeys(r["name"] for r in rows if r["family"] == fam):
            pts = [(r["tokens"], r["speedup"]) for r in rows if r["family"] == fam and r["name"] == name]
            x = sp.crossover(pts)
            best = max(pts, key=lambda p: p[1])
            out.append(dict(family=fam, method=name, crossover=None if x is None else round(x),
                            pays="from the smallest size" if x == pts[0][0] and pts[0][1] >= 1 else
                            "never (in range)" if x is None else f"from ~{round(x)} tokens",
                            best=best[1], best_at=best[0], largest=max(pts)[0], at_largest=max(pts)[1]))
    return out


def _model(kind: str):
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    torch.manual_seed(0)
    if kind == "flux":  # the FLUX fixture's width (4 heads x 24), one double + one single block
        return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=24,
                                      num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
                                      axes_dims_rope=(8, 8, 8), guidance_embeds=True)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=24, in_channels=16,
                                 out_channels=16, num_layers=2, ffn_dim=192, text_dim=64, freq_dim=32,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads")


def end_to_end(a) -> list[dict]:
    from pipelines import flux_inputs, wan_inputs

    rows = []
    for kind in ("flux", "wan"):
        model = _model(kind).to(a.device, bench_dtype(a.device)).eval()
        for grid in E2E[kind][: 2 if a.quick else None]:
            latent = (2 * grid[0], 2 * grid[1]) if kind == "flux" else (grid[0], 2 * grid[1], 2 * grid[2])
            inputs = flux_inputs(model, latent, 16) if kind == "flux" else wan_inputs(model, latent, 16)
            inputs = to_device(inputs, a.device, bench_dtype(a.device))
            c = sp.case("fixture", grid) if kind == "flux" else sp.Case("wan", 4, 4, 24, grid=grid)
            share = _attention_share(model, inputs, kind, c, a.device, a.reps)
            for m in sp.methods_for(c):
                # a model patched on its own runs a fractional dense_steps sparse anyway: say so, without the log line
                m = dataclasses.replace(m, dense_steps=0) if hasattr(m, "dense_steps") else m
                rows.append(dict(_e2e_row(model, inputs, m, kind, c, a.reps), attention_share=share, ceiling=1 / (1 - share)))
                r = rows[-1]
                print(f"e2e {kind} {c.shape} {r['name']:<15} {r['speedup']:.2f}x", flush=True)
    return rows


def _e2e_row(model, inputs, m, kind, c, reps) -> dict:
    """Stock and patched forward in turn per repeat (patching and undoing it are not timed)."""
    ratios, stock, patched = [], [], []
    with torch.inference_mode():
        for i in range(reps + 1):  # the first repeat warms plans and caches, not counted
            t = sp.interleaved({"stock": lambda: model(**inputs)}, 1, 0)["stock"][0]
            with ap.patch(model, m):
                p = sp.interleaved({"patched": lambda: model(**inputs)}, 1, 0)["patched"][0]
            if i:
                ratios.append(p / t), stock.append(t), patched.append(p)
    r = statistics.median(ratios)
    return dict(model=kind, shape=c.shape, tokens=c.S, method=sp.label(m), name=type(m).__name__,
                stock_ms=1e3 * statistics.median(stock), patched_ms=1e3 * statistics.median(patched), speedup=1 / r,
                spread=f"{1 / max(ratios):.2f}-{1 / min(ratios):.2f}")


def _attention_share(model, inputs, kind, c, device, reps) -> float:
    """Fraction of the stock forward spent in the attention calls a method replaces (FLUX: every block's
    joint call; Wan: self-attention, not cross): 1 / (1 - share) is the most any method can gain."""
    cfg = model.config
    calls = cfg.num_layers + cfg.num_single_layers if kind == "flux" else cfg.num_layers
    q, k, v = sp.tensors(c, device, next(model.parameters()).dtype)
    with torch.inference_mode():
        t = sp.interleaved({"forward": lambda: model(**inputs), "attention": sp.stock_fn(c, q, k, v)}, reps)
    return min(0.99, calls * statistics.median(t["attention"]) / statistics.median(t["forward"]))


def plot(rows, e2e, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator, ScalarFormatter

    fams = list(dict.fromkeys(r["family"] for r in rows))
    names = list(dict.fromkeys([r["name"] for r in rows] + [r["name"] for r in e2e]))
    # one colour and marker per method in every panel (tab10 repeated its colours past ten methods)
    color = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}
    marker = {n: "os^vDP*Xph"[i % 10] for i, n in enumerate(names)}
    n = len(fams) + bool(e2e)
    fig, axes = plt.subplots((n + 1) // 2, 2, figsize=(11, 4 * ((n + 1) // 2)), squeeze=False)
    axes = axes.ravel()
    for ax, fam in zip(axes, fams):
        for name in dict.fromkeys(r["name"] for r in rows if r["family"] == fam):
            pts = sorted((r["tokens"], r["speedup"]) for r in rows if r["family"] == fam and r["name"] == name)
            ax.plot(*zip(*pts), marker=marker[name], ms=3, color=color[name], label=name)
        c = sp.case(fam, CURVES[fam][0])
        ax.set_title(f"per call: {fam} ({c.dims}, H={c.H}, D={c.D}{f', {c.text} text tokens' if c.text else ''})", fontsize=9)
    ax = axes[len(fams)] if e2e else None
    for key in dict.fromkeys((r["model"], r["name"]) for r in e2e):
        pts = sorted((r["tokens"], r["speedup"]) for r in e2e if (r["model"], r["name"]) == key)
        ax.plot(*zip(*pts), marker=marker[key[1]], ms=3, color=color[key[1]], ls="--" if key[0] == "wan" else "-",
                label=" ".join(key))
    if e2e:
        ax.set_title("end to end: small FLUX (solid) / Wan (dashed) forward", fontsize=9)
    for ax in axes[:n]:
        ax.set_xscale("log"), ax.set_yscale("log"), ax.axhline(1.0, color="k", lw=0.8)
        # tokens: labelled at powers of two (minor labels at every 100-900 ran into each other); speedup: plain numbers
        ticks = [t for t in (2 ** e for e in range(6, 18)) if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        ax.xaxis.set_major_locator(FixedLocator(ticks)), ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda t, _: f"{t / 1024:g}K" if t >= 1024 else f"{t:g}"))
        ax.yaxis.set_major_formatter(ScalarFormatter()), ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(which="minor", labelsize=6)
        ax.set_xlabel("tokens per call"), ax.set_ylabel("speedup over stock (log)"), ax.legend(fontsize=6, ncol=2)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"per-call sizes up to {QUICK_TOKENS} tokens, two grids end to end")
    p.add_argument("--families", default=",".join(CURVES), help=f"subset of {','.join(CURVES)}")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--reps", type=int, default=None, help="default 5 (CPU), 10 (GPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--max-call-s", type=float, default=None, help=f"CPU size cap (default {CPU_CALL_S}; 0: none)")
    p.add_argument("--budget-s", type=float, default=720.0, help="per-call part: larger sizes are skipped after this")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end part")
    p.add_argument("--methods", default=None, help="comma-separated method class names (a partial run; default all)")
    p.add_argument("--row-s", type=float, default=None, help=f"seconds a row may take before its repeats are cut "
                                                             f"(never under 2; default {sp.ROW_S:.0f})")
    p.add_argument("--from-tokens", type=int, default=0, help="per-call sizes from this many tokens only (a partial run)")
    p.add_argument("--to-tokens", type=int, default=0, help="per-call sizes up to this many tokens only (0: all)")
    p.add_argument("--extend", default=None, metavar="JSON",
                   help="a committed curves.json to add this run's per-call sizes to: its rows, end-to-end rows and "
                        "settings kept, the sizes measured now leave its skipped list; written back to JSON's stem "
                        "unless --out names another place (implies --no-e2e)")
    p.add_argument("--render", default=None, metavar="JSON", help="write JSON's .md and .png again from it, measuring nothing")
    p.add_argument("--note", default="", help="with --extend: what this run was (kept under the tables)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.render:
        data = json.loads(Path(a.render).read_text())
        a = argparse.Namespace(**{**vars(a), **{k: data["args"][k] for k in ("reps", "max_call_s", "threads")}})
        out = Path(a.render).with_suffix("")
        data["crossover"] = crossovers(data["rows"])
        write(out, "Speed curves: where each method pays", *render(a, out, data), data)
        plot(data["rows"], data["e2e"], out.with_suffix(".png"), f"attnpatch speed curves ({data['machine']['cpu']}, "
             f"{a.threads} thread(s), {data['machine'].get('gpu', data['args']['device'])})")
        return print(f"wrote {out}.md / .png from {a.render}")
    if a.extend:
        if not Path(a.extend).is_file():
            p.error(f"--extend {a.extend}: no such file (the curves.json of a full run)")
        if a.quick:
            p.error("--extend adds measured sizes to a full run; --quick runs would mix in smoke-test rows")
        a.no_e2e = True
    a.device = pick_device(p, a.device)
    torch.set_num_threads(a.threads)
    a.reps = a.reps or (5 if a.device == "cpu" else 10)
    if a.methods:
        names = {type(m).__name__ for f in CURVES for m in sp.methods_for(sp.case(f, CURVES[f][0]))}
        a.methods = [x.strip() for x in a.methods.split(",") if x.strip()]
        if set(a.methods) - names:
            p.error(f"--methods: unknown {sorted(set(a.methods) - names)}; the curves' methods are {sorted(names)}")
    a.max_call_s = (None if a.device == "cuda" else CPU_CALL_S) if a.max_call_s is None else (a.max_call_s or None)
    partial = "--quick" if a.quick else None if a.families == ",".join(CURVES) and not a.no_e2e \
        and not (a.from_tokens or a.to_tokens or a.methods) else "a partial"
    stem = "curves" if a.device == "cpu" else f"gpu/curves_{a.device}"
    out = Path(a.out) if a.out else Path(a.extend).with_suffix("") if a.extend else out_stem(stem, a.out, partial)
    rate = sp.sdpa_rate(a.device, bench_dtype(a.device))
    args = dict(quick=a.quick, reps=a.reps, threads=a.threads, device=a.device, max_call_s=a.max_call_s,
                row_s=a.row_s or sp.ROW_S, methods=a.methods)
    data = dict(machine=machine(), args=args, crossover=[], rows=[], e2e=[], skipped=[])
    if a.extend:
        data = _extended(a, json.loads(Path(a.extend).read_text()), args)

    def save():
        data["crossover"] = crossovers(data["rows"])
        write(out, "Speed curves: where each method pays", *render(a, out, data), data)

    per_call(a, rate, data, save)
    if not a.no_e2e:
        data["e2e"] = end_to_end(a)
    save()
    plot(data["rows"], data["e2e"], out.with_suffix(".png"), f"attnpatch speed curves ({data['machine']['cpu']}, "
         f"{a.threads} thread(s), {data['machine'].get('gpu', a.device)})")  # --extend checked: the first run's threads
    print(f"wrote {out}.md / .json / .png")


def _extended(a, old: dict, args: dict) -> dict:
    """``old`` (a committed run) ready to take this run's sizes: the same machine and device, its rows kept,
    the sizes this run will measure taken off its skipped list, this run's settings and note recorded."""
    if old.get("args", {}).get("device", "cpu") != a.device or old["machine"].get("cpu") != machine()["cpu"]:
        sys.exit(f"--extend: {a.extend} was measured on {old['machine'].get('cpu')} ({old['args'].get('device')}), this "
                 f"run is on {machine()['cpu']} ({a.device}): one table holds one machine's numbers; use --out")
    if old["args"].get("threads") != a.threads:
        sys.exit(f"--extend: {a.extend} ran at {old['args'].get('threads')} torch thread(s); run with --threads "
                 f"{old['args'].get('threads')} so its rows and these compare")
    now = [(fam, c) for fam in a.families.split(",") for size in CURVES[fam] for c in [sp.case(fam, size)]
           if _in_span(a, c.S)]  # the sizes this run measures
    measured = {(r["family"], r["tokens"]) for r in old["rows"]}
    for fam, c in now:
        if (fam, c.S) in measured:
            sys.exit(f"--extend: {a.extend} already has {fam} at {c.S} tokens; choose --from-tokens / --to-tokens "
                     "past the sizes it measured (it is not rewritten row by row)")
    gone = [f"{fam} {c.shape} ({c.S} tokens)" for fam, c in now]
    old["skipped"] = [s for s in old["skipped"] if not any(s.startswith(g) for g in gone)]
    old.setdefault("extensions", []).append(dict(args, families=a.families, from_tokens=a.from_tokens,
                                                 to_tokens=a.to_tokens, date=time.strftime("%Y-%m-%d"), note=a.note))
    return old


def render(a, out: Path, data: dict) -> tuple[str, str]:
    cross, e2e, rows, skipped = data["crossover"], data["e2e"], data["rows"], data["skipped"]
    rows.sort(key=lambda r: (list(CURVES).index(r["family"]), r["tokens"]))
    if data.get("extensions"):  # the first run's settings head the page; each extension says its own below
        a = argparse.Namespace(**{**vars(a), "reps": data["args"]["reps"], "max_call_s": data["args"]["max_call_s"]})
    intro = (f"Speedup = stock time / patched time (above 1: the method pays), median of {a.reps} interleaved repeats; "
             f"parameters as a user would pick them at each size (`benchmarks/_speed.py: methods_for`). Plot: "
             f"[{out.name}.png]({out.name}.png). Inputs are seeded standard-normal q, k, v: a static plan costs the same "
             "on any input, but the data-dependent methods see no structure in them. VerticalSlash's top diagonals then "
             "scatter over every offset, so its `lines` kernel computes about the whole causal triangle in 64-row pieces "
             "and falls behind stock as the size grows; on SmolLM2's real layers its diagonals cluster near the main one "
             "and its prefill is level with dense at 8K tokens and 1.5-1.8x faster at 16K-32K ([llm.md](llm.md)).")
    if a.max_call_s is not None:
        intro += (f" CPU size cap: a stock call estimated above {a.max_call_s} s is timed with fewer heads (column H); "
                  "sizes where one KV group exceeds it are skipped (listed below; the largest size measured per family is in "
                  "the crossover table): dense attention at 16K-64K tokens with head dim 128 takes seconds to minutes per "
                  "call on a CPU; the GPU run (benchmarks/gpu.sh) covers them.")
    body = "## Crossover: where each method starts to pay (per call)\n\n" + table(cross, [
        ("family", "family"), ("method", "method"), ("pays", "pays"), ("best", "best speedup"), ("best_at", "at tokens"),
        ("largest", "largest size"), ("at_largest", "speedup there")])
    body += ("\n\n## End to end (small FLUX / Wan transformer, fixture width: 4 heads x 24)\n\n"
             "`ap.patch(model, method)` (sparse methods with dense_steps=0: every call sparse) vs the stock forward, in turn "
             "per repeat; FLUX: 1 double + 1 single block, 16 text tokens; Wan: 2 blocks. *attention share*: stock SDPA time "
             "of the calls a method replaces / stock forward time; the ceiling 1 / (1 - share) bounds any method's gain.\n\n"
             + table(e2e, [
        ("model", "model"), ("shape", "grid"), ("tokens", "tokens"), ("method", "method"), ("stock_ms", "stock ms"),
        ("patched_ms", "patched ms"), ("speedup", "speedup"), ("spread", "spread"), ("attention_share", "attention share"),
        ("ceiling", "ceiling 1/(1-share)")]))
    for r in rows:  # the speedup's range over the repeats (rows of older runs may lack the per-repeat ratios)
        r.setdefault("spread", f"{1 / r['ratio_max']:.2f}-{1 / r['ratio_min']:.2f}" if "ratio_max" in r else "")
    body += "\n\n## Per call\n\n" + table(rows, [("family", "family"), ("shape", "shape"), ("tokens", "tokens"), ("heads", "H"),
                                              ("method", "method"), ("kernel", "kernel"), ("stock_ms", "stock ms"),
                                              ("patched_ms", "patched ms"), ("speedup", "speedup"), ("spread", "spread"),
                                              ("reps", "reps")])
    for x in data.get("extensions", []):
        cap = "no size cap" if not x["max_call_s"] else f"size cap {x['max_call_s']} s"
        span = f"{x['from_tokens']}-{x['to_tokens'] or 'max'} tokens"
        which = ", ".join(x["methods"]) if x.get("methods") else "every method"
        intro += (f"\n\nAdded {x['date']} (`--extend`): {x['families']} at {span}, {which}, {x['reps']} interleaved "
                  f"repeats (fewer, never under 2, where a row would take over {x.get('row_s', sp.ROW_S):.0f} s), {cap}, "
                  f"{x['threads']} thread(s)"
                  + (f": {x['note']}" if x.get("note") else "."))
    if skipped:
        body += "\n\n## Skipped sizes\n\n" + "\n".join(f"- {s}" for s in skipped)
    return intro, body


if __name__ == "__main__":
    main()
