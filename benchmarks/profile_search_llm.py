"""Searched per-head SinkWindow windows vs one uniform window at equal density, on SmolLM2-135M-Instruct.

The search (attnpatch.tools.profile_search: recall of the dense attention mass per (layer, head) and
candidate window, multiple-choice knapsack under a mean-density budget) runs on ``--calib`` tokens of
Python's pydoc text (benchmarks/llm_tasks.doc_text); the budget is the density of the uniform window
(``--uniform``) at that length. SinkWindow's density depends only on the length, never on the text, so
the two settings have equal density on every held-out prompt of the calibration length. Held out:
perplexity on later segments of the same text, passkey (llm_tasks.passkey_prompt) and RULER niah_single
(attnpatch.tools.ruler) accuracy with 95 % intervals, and per-call speed of every layer's call at SmolLM2
shapes (interleaved with stock SDPA, one thread).

    python benchmarks/profile_search_llm.py                        # -> benchmarks/results/analysis/profile_smollm2.{md,json}
    python benchmarks/profile_search_llm.py --stages speed         # rerun one stage (the json keeps the others)
    python benchmarks/profile_search_llm.py --stages ""            # re-render the page from the json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402
from llm_tasks import doc_text, passkey_prompt  # noqa: E402
import _speed  # noqa: E402
from _profile_llm_page import render  # noqa: E402

import attnpatch as ap  # noqa: E402
from attnpatch import core  # noqa: E402
from attnpatch.plan import Plan  # noqa: E402
from attnpatch.tools import ruler  # noqa: E402
from attnpatch.tools.profile_search import choose, measure, uniform_at  # noqa: E402

OUT = RESULTS / "analysis" / "profile_smollm2"
SINK = 4

HELD_OUT_START = 40_000  # held-out perplexity segments start here (the calibration text is the first tokens)


def density(S: int, sink: int, window) -> float:
    """Kept / causally visible pairs of SinkWindow(sink, window) on a prefill of S tokens (mean over heads
    when ``window`` is a tensor of per-head windows): data-independent."""
    i = torch.arange(S, dtype=torch.float64)
    w = torch.as_tensor(window, dtype=torch.float64).reshape(-1, 1)
    kept = torch.minimum(i + 1, w) + (torch.clamp(i + 1 - w, min=0)).clamp(max=sink)  # window + sink keys not in it
    return (kept.sum(1) / (S * (S + 1) / 2)).mean().item()


def search_stage(model, ids, a) -> dict:
    values = [int(v) for v in a.values.split(",")]
    calib = [ids[:, i * a.calib:(i + 1) * a.calib] for i in range(a.calib_segments)]
    t0 = time.perf_counter()
    m = measure(model, lambda mod: [mod(x) for x in calib], ap.SinkWindow(sink=SINK), "window", values)
    seconds = time.perf_counter() - t0
    budget = density(a.calib, SINK, a.uniform)
    idx = choose(m["recall"], m["density"], budget + 1e-9)
    table = torch.tensor(values)[idx]  # (layers, heads)
    got = lambda t: t.gather(0, idx[None])[0].mean().item()  # noqa: E731
    u = values.index(a.uniform)
    assert uniform_at(m["recall"], m["density"], budget + 1e-9) == u
    per_layer = [sorted(set(r)) for r in table.tolist()]
    log_w = table.double().log2()
    within = log_w.var(1, unbiased=False).mean().item()  # spread of the choice inside a layer
    total = log_w.var(unbiased=False).item()
    return dict(values=values, calib_tokens=a.calib, calib_segments=a.calib_segments, seconds=seconds, budget=budget,
                table=table.tolist(), recall=got(m["recall"]), density=got(m["density"]),
                uniform=dict(window=a.uniform, recall=m["recall"][u].mean().item(), density=m["density"][u].mean().item()),
                recall_table=m["recall"].tolist(),
                whole_layers=sum(len(v) == 1 for v in per_layer), layers=len(per_layer),
                within_layer_share=within / total if total else 0.0,
                counts={v: int((table == v).sum()) for v in values})


class _ErrorProbe(ap.Method):
    """Dense attention whose output step adds, per (layer, head), each candidate window's squared output
    error against the dense output (and the dense output's squared norm): the output-error criterion."""

    def __init__(self, values: list):
        self.values, self.err, self.norm = values, {}, {}

    def plan(self, q, k, site: ap.Site):
        if q.shape[2] != k.shape[2]:  # prefill calls only (the calibration run has no decode)
            return None

        def output(out, q, k, v, scale):
            ref = out.double()
            self.norm[site.layer] = self.norm.get(site.layer, 0) + ref.square().sum((0, 2, 3))
            errs = torch.stack([(core.run(q, k, v, ap.SinkWindow(sink=SINK, window=w), site).double() - ref).square()
                                .sum((0, 2, 3)) for w in self.values])  # (values, heads)
            self.err[site.layer] = self.err.get(site.layer, 0) + errs
            return out

        return Plan(output=output, name="output-error probe")


def error_stage(model, ids, res: dict, a) -> dict:
    """The search by output error: per cell, -||patched - dense||^2 / ||dense||^2 on the calibration
    prompts in place of recall, the same knapsack and budget."""
    s = res["search"]
    values = s["values"]
    probe = _ErrorProbe(values)
    t0 = time.perf_counter()
    with torch.no_grad(), ap.patch(model, probe):
        for i in range(a.calib_segments):
            model(ids[:, i * a.calib:(i + 1) * a.calib])
    layers = sorted(probe.err)
    rel = torch.stack([probe.err[l] / probe.norm[l] for l in layers], 1)  # (values, layers, heads)
    dens = torch.tensor([density(a.calib, SINK, w) for w in values], dtype=torch.float64)[:, None, None].expand_as(rel)
    idx = choose(-rel, dens, s["budget"] + 1e-9)
    table = torch.tensor(values)[idx]
    u = values.index(s["uniform"]["window"])
    per_layer = [sorted(set(r)) for r in table.tolist()]
    return dict(seconds=time.perf_counter() - t0, table=table.tolist(), density=dens.gather(0, idx[None]).mean().item(),
                error=rel.gather(0, idx[None]).mean().item(), uniform_error=rel[u].mean().item(),
                recall=torch.tensor(s["recall_table"]).gather(0, idx[None]).mean().item(),
                whole_layers=sum(len(v) == 1 for v in per_layer), counts={v: int((table == v).sum()) for v in values})


def settings(res: dict) -> dict:
    s = res["search"]
    out = {"dense": None, f"uniform SinkWindow({SINK}, {s['uniform']['window']})": ap.SinkWindow(sink=SINK, window=s["uniform"]["window"]),
           "searched per-head windows": ap.SinkWindow(sink=SINK, profile={"window": torch.tensor(s["table"])})}
    if "error_search" in res:
        out["searched by output error"] = ap.SinkWindow(sink=SINK, profile={"window": torch.tensor(res["error_search"]["table"])})
    return out


def _patched(model, method):
    return ap.patch(model, method) if method is not None else contextlib.nullcontext()


@torch.no_grad()
def perplexity_stage(model, ids, res: dict, a) -> list[dict]:
    rows = list(res.get("perplexity", []))  # a rerun measures only the settings not in the json yet
    done = {(r["tokens"], r["setting"]) for r in rows}
    for n, count in ((a.calib, a.ppl_segments), (2 * a.calib, max(1, a.ppl_segments // 2))):
        segs = [ids[:, HELD_OUT_START + i * n:HELD_OUT_START + (i + 1) * n] for i in range(count)]
        for label, m in settings(res).items():
            if (n, label) in done:
                continue
            with _patched(model, m):
                losses = [model(x, labels=x).loss.item() for x in segs]
            lo, hi = ruler.interval(losses)
            rows.append(dict(tokens=n, setting=label, segments=count, perplexity=math.exp(statistics.mean(losses)),
                             ci=[math.exp(lo), math.exp(hi)], losses=losses,
                             density=1.0 if m is None else _density_of(m, n)))
            print(rows[-1]["setting"], n, rows[-1]["perplexity"], flush=True)
    return rows


def _density_of(m, S: int) -> float:
    """Density of a uniform or per-head SinkWindow on a prefill of S tokens."""
    if m._tables is None:
        return density(S, m.sink, m.window)
    return density(S, m.sink, m._tables["window"].flatten())


def _prompts(tok, a) -> dict:
    n, L = a.samples, a.calib
    count = lambda t: len(tok(t).input_ids)  # noqa: E731
    passkey = [(passkey_prompt(tok, L, 0.05 + 0.9 * i / (n - 1), key := 10000 + (7919 * (L + i)) % 89999), [str(key)], 8)
               for i in range(n)]
    niah = [(s.prompt, s.answers, s.max_new_tokens) for s in ruler.generate("niah_single", L, n, count, seed=0)]
    return {"passkey": passkey, "niah_single": niah}


@torch.no_grad()
def retrieval_stage(model, tok, res: dict, a) -> list[dict]:
    rows = list(res.get("retrieval", []))
    done = {(r["task"], r["setting"]) for r in rows}
    for task, prompts in _prompts(tok, a).items():
        for label, m in settings(res).items():
            if (task, label) in done:
                continue
            scores = []
            with _patched(model, m):
                for prompt, answers, new in prompts:
                    x = tok(prompt, return_tensors="pt").input_ids
                    out = model.generate(x, max_new_tokens=new, do_sample=False)
                    scores.append(ruler.score(tok.decode(out[0, x.shape[1]:]), answers))
            lo, hi = ruler.interval(scores)
            rows.append(dict(task=task, tokens=a.calib, setting=label, n=len(scores), accuracy=statistics.mean(scores),
                             ci=[lo, hi], scores=scores))
            print(task, label, rows[-1]["accuracy"], flush=True)
    return rows


def _equal_uniform(S: int, target: float) -> int:
    """The uniform window whose density at S is closest to ``target`` (density grows with the window)."""
    lo, hi = 1, S
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if density(S, SINK, mid) < target else (lo, mid)
    return min((lo - 1, lo), key=lambda w: abs(density(S, SINK, max(w, 1)) - target)) or 1


def speed_stage(res: dict, a) -> list[dict]:
    """Every layer's call at SmolLM2 shapes: stock SDPA, the uniform window, each searched profile and the
    uniform window of that profile's density at the length, in turn in every repeat; per-layer medians summed."""
    torch.set_num_threads(1)
    profiles = {n: m for n, m in settings(res).items() if n.startswith("searched")}
    uniform = res["search"]["uniform"]["window"]
    rows = []
    for S, reps in ((1024, a.reps), (4096, max(2, a.reps // 2))):
        c = _speed.case("smollm2", S)
        q, k, v = _speed.tensors(c)
        methods = {f"uniform window {uniform}": ap.SinkWindow(sink=SINK, window=uniform)}
        for n, m in profiles.items():
            eq = _equal_uniform(S, _density_of(m, S))
            methods[n], methods[f"uniform window {eq} (= density of {n})"] = m, ap.SinkWindow(sink=SINK, window=eq)
        total = {n: 0.0 for n in ["stock", *methods]}
        for layer in range(len(res["search"]["table"])):
            site = ap.Site(causal=True, layer=layer, family="llama", kind="self")
            fns = {"stock": _speed.stock_fn(c, q, k, v), **{n: (lambda m=m: core.run(q, k, v, m, site)) for n, m in methods.items()}}
            t = _speed.interleaved(fns, reps, warmup=1)
            for n in total:
                total[n] += statistics.median(t[n])
        rows.append(dict(tokens=S, heads=c.H, kv_heads=c.Hkv, head_dim=c.D, reps=reps,
                         density={n: _density_of(m, S) for n, m in methods.items()},
                         ms={n: 1e3 * x for n, x in total.items()}, ratio={n: total[n] / total["stock"] for n in methods}))
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--values", default="64,128,256,512,1024,2048", help="candidate windows")
    p.add_argument("--uniform", type=int, default=256, help="the uniform window whose density is the budget")
    p.add_argument("--calib", type=int, default=2048, help="calibration / held-out prompt length (tokens)")
    p.add_argument("--calib-segments", type=int, default=2)
    p.add_argument("--ppl-segments", type=int, default=8)
    p.add_argument("--samples", type=int, default=24, help="prompts per retrieval task")
    p.add_argument("--reps", type=int, default=6, help="speed repeats per layer at 1K (half at 4K)")
    p.add_argument("--stages", default="search,perplexity,retrieval,speed")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    res = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    res["machine"] = machine()
    stages = [x for x in a.stages.split(",") if x]  # --stages "": re-render the page from the json

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        order = list(settings(res)) if res.get("search") else []
        out.with_suffix(".md").write_text(render(res, order, __doc__.split("\n\n")[1].replace("\n", " "), SINK))

    if {"search", "error", "perplexity", "retrieval"} & set(stages):
        from attnpatch.models import smollm2

        model, tok = smollm2()
        ids = tok(doc_text(), return_tensors="pt").input_ids
    for stage in stages:
        t0 = time.perf_counter()
        if stage == "search":
            res["search"] = search_stage(model, ids, a)
        elif stage == "error":
            res["error_search"] = error_stage(model, ids, res, a)
        elif stage == "perplexity":
            res["perplexity"] = perplexity_stage(model, ids, res, a)
        elif stage == "retrieval":
            res["retrieval"] = retrieval_stage(model, tok, res, a)
        elif stage == "speed":
            res["speed"] = speed_stage(res, a)
        res.setdefault("stage_seconds", {})[stage] = time.perf_counter() - t0
        save()
        print(f"{stage}: {time.perf_counter() - t0:.0f} s", flush=True)
    if not stages:
        save()


if __name__ == "__main__":
    main()
