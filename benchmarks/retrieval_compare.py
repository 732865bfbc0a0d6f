"""Retrieval heads two ways on SmolLM2-135M-Instruct: from copy-paste scoring (attnpatch.tools.retrieval_heads,
the profile benchmarks/duo.py uses) and from captured attention (attnpatch.tools.capture: the share of a
head's attention on keys farther than the streaming window, sink keys excluded). Do they agree, and which
profile keeps more needle accuracy at the same KV budget?

1. Scores: copy-paste from ``benchmarks/results/duo_heads.safetensors`` ('scores', 30 x 9); captured on
   ``--capture-prompts`` RULER niah_single prompts of ``--length`` tokens (seed 7, not the test seed), every
   query row: far share = (mass at token distance >= window) - (mass on the first ``sink`` keys), per row.
2. Agreement: Spearman rank correlation over the 270 query heads and over the 90 KV groups (a group's best
   head), and the overlap of the top ``--groups`` KV groups each picks.
3. Accuracy at equal KV budget: StreamingHeads(sink, window) with each profile's top groups full (the same
   number of groups, so the same KV tokens), uniform SinkWindow at that budget, and dense, on RULER
   niah_single (seed 0), teacher-forced as benchmarks/duo.py (every answer digit the argmax at its row).

    python benchmarks/retrieval_compare.py                 # -> benchmarks/results/retrieval_compare.{md,json}
    python benchmarks/retrieval_compare.py --samples 4 --out /tmp/rc   # a quick look
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnpatch as ap  # noqa: E402
from attnpatch.tools import retrieval_heads, ruler  # noqa: E402
from attnpatch.tools.capture import TOKEN_EDGES, capture  # noqa: E402
from common import RESULTS, machine, out_stem, table, write  # noqa: E402
from duo import PROFILE, settings  # noqa: E402


def far_share(cap, layers: int, heads: int, window: int, sink: int) -> torch.Tensor:
    """(layers, heads) mean share of a query row's attention on keys at token distance >= ``window``, less
    every row's mass on the first ``sink`` keys (attention sinks are not retrieval; the rows before the
    window, which see the sinks near, are window / length of the rows: a slight undercount there)."""
    out = torch.zeros(layers, heads, dtype=torch.float64)
    for layer, acc in cap.layers.items():
        mass = acc["dist_token_mass"].double()  # (H, bins) by the lower edges TOKEN_EDGES
        far = mass[:, (TOKEN_EDGES[:mass.shape[1]] >= window)].sum(-1)
        out[layer] = (far - acc["key_mass"].double()[:, :sink].sum(-1)) / acc["rows"].double()
    return out.clamp(min=0)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (x.flatten().argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def groups_of(heads, rep: int) -> set:
    return {(l, h // rep) for l, h in heads}


@torch.inference_mode()
def accuracy(model, tok, profiles: dict, a, rows: list, save=lambda: None) -> None:
    """Settings in turn on every sample; ``rows`` rewritten and ``save()`` called after each sample (a run
    cut short keeps what it measured)."""
    count = lambda s: len(tok(s)["input_ids"])  # noqa: E731
    shape = (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads)
    hits: dict = {}
    for s in ruler.generate("niah_single", a.length, a.samples, count, seed=0):
        ids = tok(s.prompt, return_tensors="pt")["input_ids"]
        ans = tok(" " + s.answers[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
        full, n = torch.cat([ids, ans], 1), ans.shape[1]
        skip = int(tok.decode(ans[0, :1]).strip() == "")
        cells = {}
        for pname, heads in profiles.items():
            for name, (method, kv) in settings(heads, a.sink, a.window, ids.shape[1], shape).items():
                if name != "dense" and not name.startswith("StreamingHeads"):
                    name = f"{name} (window {method.window})"
                key = name if not name.startswith("StreamingHeads") else f"{name}, {pname} profile"
                if key in cells or (name == "dense" and "dense" in cells):
                    continue
                with ap.patch(model, method) if method is not None else contextlib.nullcontext():
                    pred = model(full, logits_to_keep=n + 1).logits[0, :-1].argmax(-1)
                cells[key] = (int(bool((pred == ans[0])[skip:].all())), kv)
        for key, (hit, kv) in cells.items():
            h = hits.setdefault(key.split(" (window")[0], [0, 0, 0.0])
            h[0], h[1], h[2] = h[0] + hit, h[1] + 1, h[2] + kv
        print(s.index, {k: v[0] for k, v in hits.items()}, flush=True)
        rows.clear()
        for key, (h, n, kv) in hits.items():
            lo, hi = ruler.wilson(h, n)
            rows.append(dict(setting=key, n=n, accuracy=h / n, ci=f"{lo:.2f}-{hi:.2f}", kv_tokens=kv / n))
        save()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--capture-prompts", type=int, default=2)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--groups", type=int, default=9, help="KV groups kept full (duo.py's profile keeps 9 of 90)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    stem = out_stem("retrieval_compare", a.out, None if a.samples >= 30 else "quick")  # --out: a partial run, named n
    from attnpatch.models import smollm2
    from safetensors.torch import load_file

    model, tok = smollm2()
    L, H, Hkv = model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads
    rep = H // Hkv
    copy_scores = load_file(str(PROFILE))["scores"].double()
    count = lambda s: len(tok(s)["input_ids"])  # noqa: E731
    prompts = [s.prompt for s in ruler.generate("niah_single", a.length, a.capture_prompts, count, seed=7)]

    def run(m):
        for text in prompts:
            m(tok(text, return_tensors="pt")["input_ids"])

    with torch.inference_mode():
        cap = capture(model, run)
    cap_scores = far_share(cap, L, H, a.window, a.sink)
    summary = cap.summary()
    focus = torch.tensor([[1.0 - e for e in summary[l]["entropy_norm"]] for l in range(L)], dtype=torch.float64)
    focused = cap_scores * focus  # far and concentrated: a head that looks far at a few keys, not everywhere
    by_copy = retrieval_heads.top_heads(copy_scores, a.groups, Hkv)
    by_cap = retrieval_heads.top_heads(cap_scores, a.groups, Hkv)
    by_focus = retrieval_heads.top_heads(focused, a.groups, Hkv)
    group = lambda s: s.reshape(L, Hkv, rep).amax(-1)  # noqa: E731
    agree = dict(spearman_heads=spearman(copy_scores, cap_scores), spearman_groups=spearman(group(copy_scores), group(cap_scores)),
                 top_overlap=len(groups_of(by_copy, rep) & groups_of(by_cap, rep)), groups=a.groups,
                 copy_layers=sorted({l for l, _ in by_copy}), capture_layers=sorted({l for l, _ in by_cap}),
                 focused_spearman_heads=spearman(copy_scores, focused),
                 focused_top_overlap=len(groups_of(by_copy, rep) & groups_of(by_focus, rep)),
                 focused_layers=sorted({l for l, _ in by_focus}))
    print(agree, flush=True)
    rows: list = []
    data = dict(machine=machine(), args=vars(a), agreement=agree, accuracy=rows,
                capture_scores=cap_scores.tolist(), focused_scores=focused.tolist(), capture_cost_calls=cap.calls)

    def save():
        body = (f"## Agreement\n\nSpearman over {L * H} query heads: {agree['spearman_heads']:.3f}; over {L * Hkv} KV groups: "
                f"{agree['spearman_groups']:.3f}. Top {a.groups} KV groups: {agree['top_overlap']} in common (copy-paste in layers "
                f"{agree['copy_layers']}, captured in layers {agree['capture_layers']}). Far share x focus (1 - normalised "
                f"entropy): Spearman {agree['focused_spearman_heads']:.3f}, top-{a.groups} overlap {agree['focused_top_overlap']} "
                f"(layers {agree['focused_layers']}).\n\n"
                f"## Needle accuracy at equal KV budget (niah_single, {a.length} tokens, teacher-forced)\n\n"
                + table(rows, [("setting", "setting"), ("n", "n"), ("accuracy", "accuracy"), ("ci", "Wilson 95 %"),
                               ("kv_tokens", "KV tokens / (layer, KV head)")]))
        write(stem, "Retrieval heads: copy-paste scoring vs captured attention (SmolLM2-135M)", __doc__.split("\n\n")[0],
              body, data)

    accuracy(model, tok, {"copy-paste": by_copy, "captured far share": by_cap, "captured far x focus": by_focus}, a, rows,
             save)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
