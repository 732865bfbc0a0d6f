"""The results page of benchmarks/profile_search_llm.py (searched per-head SinkWindow windows on SmolLM2):
the outcome note, the tables, the paired perplexity differences and the shape of the chosen windows."""
from __future__ import annotations

import statistics

import torch

from common import table as md_table
from attnpatch.tools import ruler

NOTE = """On SmolLM2 the searched per-head windows do not beat one uniform window at equal density. Searching on
recall (the MoA-style criterion of attnpatch.tools.profile_search) keeps more of the dense mass on the calibration
text (0.857 vs 0.817) but does worse on held-out text: perplexity 12.95 vs 12.59 at 2K tokens (paired loss +0.028,
95 % interval +0.023 .. +0.033) and 12.83 vs 12.33 at 4K, where it is also denser. It spends the budget on layers
3-8 (24 heads at window 2048) and leaves layers 9-29 at 64-256: little mass is left outside a short window there,
but what is left matters for the output. Searching on output error instead halves the calibration error
(0.053 vs 0.106) and ties on held-out perplexity (12.56 vs 12.59 at 2K, 12.23 vs 12.33 at 4K; both paired intervals
include 0). Passkey is 2/24 for uniform and both profiles, niah_single 2/24, 2/24 and 5/24 (error search; the
intervals overlap), against 24/24 dense: a density-0.24 budget spread over windows does not buy whole-context
heads in the layers that retrieve (full retrieval heads, StreamingHeads, or content-based selection do that). The
knapsack does not prefer whole layers (no layer gives all 9 heads one window; the heads of one KV group agree in
about a quarter of the cells), but the choice is layer-structured: both criteria give layers 3-8 the wide windows.
Speed: a profile runs one kernel call per group of equal windows (about 5 per layer), so at 4K it costs
0.58-0.61x stock against 0.41-0.42x for the uniform window of the same density, and at 1K 1.12-1.13x against
0.98x."""


def _shape_note(table: list, whole: int) -> str:
    t = torch.tensor(table)
    groups = t.view(t.shape[0], 3, -1)  # SmolLM2: 3 KV groups of 3 query heads
    same = (groups == groups[..., :1]).all(-1).float().mean().item()
    return (f"{whole} of {t.shape[0]} layers give every head one window; {same:.0%} of (layer, KV group) cells give "
            f"the group's 3 query heads one window; mean window by layer: "
            + ", ".join(f"{int(x)}" for x in t.double().mean(1).round().tolist()))


def _paired(rows: list, r: dict) -> str | None:
    """Mean per-segment loss difference of row ``r`` against the uniform window's row of its length."""
    base = next((b for b in rows if b["tokens"] == r["tokens"] and b["setting"].startswith("uniform")), None)
    if base is None or base is r:
        return None
    d = [x - y for x, y in zip(r["losses"], base["losses"])]
    lo, hi = ruler.interval(d)
    return f"{statistics.mean(d):+.3f} ({lo:+.3f} .. {hi:+.3f})"


def render(res: dict, order: list, intro: str, sink: int) -> str:
    """The results page of ``res`` (settings in ``order``; ``intro``: the script's method paragraph)."""
    m, s = res["machine"], res.get("search")
    lines = [f"# Searched per-head SinkWindow windows on SmolLM2-135M-Instruct (equal density)\n",
             f"Measured on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch thread), torch {m['torch']}, by "
             "`python benchmarks/profile_search_llm.py`.\n", intro + "\n"]
    if NOTE:
        lines += ["## Outcome\n", NOTE + "\n"]
    if s:
        lines += ["## Search\n", f"Candidates window in {s['values']} (sink {sink}); calibration {s['calib_segments']} x "
                  f"{s['calib_tokens']} tokens ({s['seconds']:.0f} s); budget = density of uniform window "
                  f"{s['uniform']['window']} at {s['calib_tokens']} tokens = {s['budget']:.4f}.\n",
                  md_table([dict(setting=f"uniform window {s['uniform']['window']}", density=s["uniform"]["density"],
                              recall=s["uniform"]["recall"], error=res.get("error_search", {}).get("uniform_error")),
                         dict(setting="searched (recall)", density=s["density"], recall=s["recall"]),
                         *([dict(setting="searched (output error)", density=res["error_search"]["density"],
                                 recall=res["error_search"]["recall"], error=res["error_search"]["error"])]
                           if "error_search" in res else [])],
                        [("setting", "setting"), ("density", "density"), ("recall", "recall of dense mass"),
                         ("error", "relative output error")]) + "\n",
                  f"Recall search: windows chosen {s['counts']}. " + _shape_note(s["table"], s["whole_layers"]) + ".\n"]
        if "error_search" in res:
            e = res["error_search"]
            lines += [f"Output-error search ({e['seconds']:.0f} s): windows chosen {e['counts']}. "
                      + _shape_note(e["table"], e["whole_layers"]) + ".\n"]
    if res.get("perplexity"):
        lines += ["## Held-out perplexity (pydoc text from token 40 000; 95 % bootstrap intervals over segments)\n",
                  "The last column is the paired difference of mean loss against the uniform window on the same "
                  "segments (negative: better than uniform).\n",
                  md_table([dict(r, ci=f"{r['ci'][0]:.2f} - {r['ci'][1]:.2f}", diff=_paired(res["perplexity"], r))
                            for r in sorted(res["perplexity"], key=lambda r: (r["tokens"], order.index(r["setting"])))],
                           [("tokens", "tokens"), ("setting", "setting"), ("density", "density"), ("segments", "segments"),
                            ("perplexity", "perplexity"), ("ci", "95 % interval"), ("diff", "loss - uniform (95 %)")]) + "\n"]
    if res.get("retrieval"):
        lines += ["## Retrieval (greedy generate; 95 % Wilson interval)\n",
                  md_table([dict(r, ci=f"{r['ci'][0]:.2f} - {r['ci'][1]:.2f}")
                            for r in sorted(res["retrieval"], key=lambda r: (r["task"], order.index(r["setting"])))],
                        [("task", "task"), ("tokens", "tokens"), ("setting", "setting"), ("n", "n"),
                         ("accuracy", "accuracy"), ("ci", "95 % interval")]) + "\n"]
    if res.get("speed"):
        rows = [dict(tokens=r["tokens"], setting=n, density=r["density"][n], ms=r["ms"][n], ratio=r["ratio"][n])
                for r in res["speed"] for n in r["ratio"]]
        lines += ["## Speed at SmolLM2 shapes (9 query / 3 KV heads, head dim 64, batch 1, causal prefill)\n",
                  "Per-call time of every one of the 30 layers' calls (each layer its own profile row), medians "
                  "summed over layers; stock SDPA, the uniform window, the searched profile and the uniform window "
                  "of the searched profile's density at that length run in turn in every repeat (one thread).\n",
                  md_table(rows, [("tokens", "tokens"), ("setting", "setting"), ("density", "density"),
                               ("ms", "ms (30 calls)"), ("ratio", "x stock")]) + "\n"]
    return "\n".join(lines)
