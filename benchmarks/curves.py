"""Speed curves: per-call speedup over stock SDPA vs sequence length for every sparse and calibrated
method (1-D LLM, 2-D FLUX-shaped, 3-D Wan-shaped), the crossover where each starts to pay, and the
whole-model speedup of a small FLUX / Wan transformer at growing grids.

    python benchmarks/curves.py               # full run: benchmarks/results/curves.{md,json,png}
    python benchmarks/curves.py --quick       # up to ~1K tokens per call, small grids (under the temp folder)
    python benchmarks/curves.py --device cuda # on a GPU: benchmarks/results/gpu/curves_cuda.*

Per call: the same measurement as ``percall.py`` (``attnpatch.core.run`` with automatic kernel choice
vs ``F.scaled_dot_product_attention``, interleaved, ratio per repeat, median); speedup = stock / patched.
Crossover: the token count where the speedup first rises through 1.0, interpolated log-linearly.
End to end: the model's forward with the method patched vs stock, interleaved the same way.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _speed as sp  # noqa: E402
import attnpatch as ap  # noqa: E402
from common import machine, out_stem, table, write  # noqa: E402

CURVES = {  # family: sizes, 256 to 64K tokens
    "smollm2": [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536],
    "flux": [(s, s) for s in (16, 24, 32, 48, 64, 96, 128, 192, 256)],  # + 512 text tokens
    "wan": [(4, 8, 8), (4, 12, 12), (4, 16, 16), (8, 16, 16), (4, 32, 32), (8, 32, 32), (16, 32, 32), (8, 64, 64), (16, 64, 64)],
}
E2E = {"flux": [(16, 16), (32, 32), (64, 64)], "wan": [(5, 8, 8), (5, 16, 16), (5, 32, 32)]}  # token grids
QUICK_TOKENS = 1100
CPU_CALL_S, ROW_S = 0.3, 8.0  # as percall.py: heads narrowed above this stock-call time; row time bound


def per_call(a, rate) -> tuple[list[dict], list[str]]:
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    rows, skipped = [], []
    deadline = time.monotonic() + a.budget_s
    for fam in a.families.split(","):
        for size in CURVES[fam]:
            c = sp.case(fam, size)
            if a.quick and c.S > QUICK_TOKENS:
                continue
            heads = sp.fit_heads(c, rate, a.max_call_s)
            if heads == 0 or time.monotonic() > deadline:
                skipped.append(f"{fam} {c.shape} ({c.S} tokens): " + ("time budget spent" if heads != 0 else
                                                                      f"stock call > {a.max_call_s} s even with one KV group"))
                continue
            qkv = sp.tensors(c, a.device, dtype, heads)
            for m in sp.methods_for(c):
                r = sp.measure(c, m, a.reps, a.device, dtype, tensors_=qkv, row_s=ROW_S)
                rows.append(r)
                print(f"{fam} {c.shape} {r['name']:<15} {r['kernel']:<10} {r['speedup']:.2f}x", flush=True)
    return rows, skipped


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
        model = _model(kind).to(a.device).eval()
        for grid in E2E[kind][: 2 if a.quick else None]:
            latent = (2 * grid[0], 2 * grid[1]) if kind == "flux" else (grid[0], 2 * grid[1], 2 * grid[2])
            inputs = flux_inputs(model, latent, 16) if kind == "flux" else wan_inputs(model, latent, 16)
            inputs = {k: v.to(a.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
            c = sp.case("fixture", grid) if kind == "flux" else sp.Case("wan", 4, 4, 24, grid=grid)
            for m in sp.methods_for(c):
                rows.append(_e2e_row(model, inputs, m, kind, c, a.reps))
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
    return dict(model=kind, shape=c.shape, tokens=c.S, method=repr(m), name=type(m).__name__,
                stock_ms=1e3 * statistics.median(stock), patched_ms=1e3 * statistics.median(patched), speedup=1 / r,
                spread=f"{1 / max(ratios):.2f}-{1 / min(ratios):.2f}")


def plot(rows, e2e, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(dict.fromkeys(r["family"] for r in rows))
    fig, axes = plt.subplots(1, len(fams) + 1, figsize=(5 * (len(fams) + 1), 4.2), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        for name in dict.fromkeys(r["name"] for r in rows if r["family"] == fam):
            pts = sorted((r["tokens"], r["speedup"]) for r in rows if r["family"] == fam and r["name"] == name)
            ax.plot(*zip(*pts), marker="o", ms=3, label=name)
        ax.set_title(f"per call: {fam}")
    ax = axes[0][-1]
    for key in dict.fromkeys((r["model"], r["name"]) for r in e2e):
        pts = sorted((r["tokens"], r["speedup"]) for r in e2e if (r["model"], r["name"]) == key)
        ax.plot(*zip(*pts), marker="s", ms=3, ls="--" if key[0] == "wan" else "-", label=" ".join(key))
    ax.set_title("end to end: small FLUX / Wan forward")
    for ax in axes[0]:
        ax.set_xscale("log"), ax.set_yscale("log"), ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlabel("tokens per call"), ax.set_ylabel("speedup over stock"), ax.legend(fontsize=6)
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
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False)")
    torch.set_num_threads(a.threads)
    a.reps = a.reps or (5 if a.device == "cpu" else 10)
    a.max_call_s = (None if a.device == "cuda" else CPU_CALL_S) if a.max_call_s is None else (a.max_call_s or None)
    partial = "--quick" if a.quick else None if a.families == ",".join(CURVES) and not a.no_e2e else "a partial"
    name = "curves" if a.device == "cpu" else f"gpu/curves_{a.device}"
    rate = sp.sdpa_rate(a.device, torch.float32 if a.device == "cpu" else torch.bfloat16)
    rows, skipped = per_call(a, rate)
    e2e = [] if a.no_e2e else end_to_end(a)
    if partial is None and any("time budget" in s for s in skipped):
        partial = "a budget-cut"
    out = out_stem(name, a.out, partial)
    cross = crossovers(rows)
    data = dict(machine=machine(), args=dict(quick=a.quick, reps=a.reps, threads=a.threads, device=a.device,
                                             max_call_s=a.max_call_s), crossover=cross, rows=rows, e2e=e2e, skipped=skipped)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, e2e, out.with_suffix(".png"), f"attnpatch speed curves ({data['machine']['cpu']}, {a.threads} thread(s), "
         f"{data['machine'].get('gpu', a.device)})")
    intro = (f"Speedup = stock time / patched time (above 1: the method pays), median of {a.reps} interleaved repeats; "
             f"parameters as a user would pick them at each size (`benchmarks/_speed.py: methods_for`). Plot: "
             f"[{out.name}.png]({out.name}.png).")
    if a.max_call_s is not None:
        intro += (f" CPU size cap: a stock call estimated above {a.max_call_s} s is timed with fewer heads (column H); "
                  "sizes where one KV group exceeds it are skipped (listed below), so the CPU curves stop near 8K tokens.")
    body = "## Crossover: where each method starts to pay (per call)\n\n" + table(cross, [
        ("family", "family"), ("method", "method"), ("pays", "pays"), ("best", "best speedup"), ("best_at", "at tokens"),
        ("largest", "largest size"), ("at_largest", "speedup there")])
    body += "\n\n## End to end (small FLUX / Wan transformer, fixture width: 4 heads x 24)\n\n" + table(e2e, [
        ("model", "model"), ("shape", "grid"), ("tokens", "tokens"), ("method", "method"), ("stock_ms", "stock ms"),
        ("patched_ms", "patched ms"), ("speedup", "speedup"), ("spread", "spread")])
    body += "\n\n## Per call\n\n" + table(rows, [("family", "family"), ("shape", "shape"), ("tokens", "tokens"), ("heads", "H"),
                                              ("method", "method"), ("kernel", "kernel"), ("stock_ms", "stock ms"),
                                              ("patched_ms", "patched ms"), ("speedup", "speedup")])
    if skipped:
        body += "\n\n## Skipped sizes\n\n" + "\n".join(f"- {s}" for s in skipped)
    write(out, "Speed curves: where each method pays", intro, body, data)
    print(f"wrote {out}.md / .json / .png")


if __name__ == "__main__":
    main()
