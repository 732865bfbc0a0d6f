"""Find the retrieval heads of a causal LM (Retrieval Head, Wu et al. 2024) and save them as a
``StreamingHeads`` profile.

A head's retrieval score is the fraction of copy steps at which its top-attended key is a needle
token equal to the token being copied. Prompts are seeded copy tasks: a haystack with a needle of
random words at a random depth, then a question and the needle again, teacher-forced, so every
answer position is a copy step with a known source span (one forward per prompt, no generation).
Scores come from the post-RoPE queries / keys the model's own attention sees (an ``Observed``
watcher over dense attention), for the copy rows only.

    python -m attnpatch.tools.retrieval_heads --out heads.safetensors          # SmolLM2-135M
    from attnpatch.tools.retrieval_heads import score_heads, top_heads
"""
from __future__ import annotations

import argparse
import random

import torch

from .. import api
from ..methods.base import Dense
from ..methods.duo import save_heads
from ..methods.observe import Observed
from . import ruler

QUESTION = " What are the special magic words mentioned in the text above? The special magic words are:"


def copy_prompt(tok, length: int, rng: random.Random, words: int = 8) -> tuple[list[int], tuple[int, int], int]:
    """(token ids, needle span [a, b), answer start) of one copy prompt of about ``length`` tokens:
    haystack sentences, the needle `` w1 ... wn`` at a random depth, more haystack, the question and
    the needle copied. Pieces are tokenized apart, so both needle copies are the same ids."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    needle = enc(" " + " ".join(rng.sample(ruler.vocabulary(), words)) + ".")
    intro, question = enc(" The special magic words are:"), enc(QUESTION)
    hay = rng.sample(ruler._essay(), min(len(ruler._essay()), 4 * length // 20))
    hay_ids = [t for s in hay for t in enc(" " + s)][: max(0, length - 2 * len(needle) - len(intro) - len(question))]
    cut = int(rng.uniform(0.1, 0.8) * len(hay_ids))
    ids = hay_ids[:cut] + intro + needle + hay_ids[cut:] + question
    a = cut + len(intro)
    return ids + needle, (a, a + len(needle)), len(ids)


class _Scorer:
    """Watcher: per (layer, query head), copy steps whose top key is a source of the copied token."""

    def __init__(self):
        self.hits: dict[int, torch.Tensor] = {}
        self.steps: dict[int, int] = {}
        self.task = None  # (ids tensor, needle span, answer start) of the prompt now running

    def __call__(self, q, k, site, groups):
        if self.task is None or q.shape[2] == 1:
            return
        ids, (a, b), start = self.task
        rows = torch.arange(start - 1, ids.numel() - 1)  # row r predicts ids[r + 1], a needle token
        target = ids[rows + 1]
        kk = k.repeat_interleave(q.shape[1] // k.shape[1], 1)  # GQA: each query head's keys
        s = q[0, :, rows].float() @ kk[0].float().transpose(1, 2)  # (H, rows, S); the scale keeps the argmax
        s = s.masked_fill(torch.arange(k.shape[2])[None, None] > rows[None, :, None], float("-inf"))
        top = s.argmax(-1)  # (H, rows)
        hit = (top >= a) & (top < b) & (ids[top] == target[None])
        self.hits[site.layer] = self.hits.get(site.layer, 0) + hit.sum(1).cpu()
        self.steps[site.layer] = self.steps.get(site.layer, 0) + rows.numel()


@torch.inference_mode()
def score_heads(model, tok, n: int = 8, length: int = 2048, seed: int = 1000) -> torch.Tensor:
    """(layers, query heads) retrieval scores in [0, 1] over ``n`` seeded copy prompts."""
    rng, scorer = random.Random(seed), _Scorer()
    with api.patch(model, Observed(Dense(), scorer)):
        for _ in range(n):
            ids, span, start = copy_prompt(tok, length, rng)
            scorer.task = (torch.tensor(ids), span, start)
            model(torch.tensor([ids]))
    scorer.task = None
    layers = sorted(scorer.hits)
    return torch.stack([scorer.hits[l].float() / scorer.steps[l] for l in layers])


def top_heads(scores: torch.Tensor, top: float | int, kv_heads: int | None = None) -> list[tuple[int, int]]:
    """The highest-scoring (layer, head) pairs: ``top`` of them (an int) or that fraction of all.
    With ``kv_heads``, whole GQA groups are picked by their best query head's score (a KV cache is
    per KV head: a group with one retrieval head keeps its whole cache anyway)."""
    L, H = scores.shape
    rep = H // kv_heads if kv_heads else 1
    units = scores.reshape(L, H // rep, rep).amax(-1)  # (layers, groups)
    count = top if isinstance(top, int) else max(1, round(top * units.numel()))
    picked = units.flatten().topk(count).indices.tolist()
    return sorted((p // units.shape[1], g * rep + r) for p in picked for g in [p % units.shape[1]] for r in range(rep))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="safetensors profile for StreamingHeads(heads=...)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--top", type=float, default=0.1, help="fraction (< 1) or count of heads / KV groups kept full")
    p.add_argument("--per-query-head", action="store_true", help="pick query heads, not whole KV groups")
    p.add_argument("--seed", type=int, default=1000)
    a = p.parse_args(argv)
    from ..models import smollm2

    model, tok = smollm2()
    scores = score_heads(model, tok, a.prompts, a.length, a.seed)
    kv = None if a.per_query_head else model.config.num_key_value_heads
    heads = top_heads(scores, int(a.top) if a.top >= 1 else a.top, kv)
    save_heads(a.out, heads, scores, prompts=a.prompts, length=a.length, seed=a.seed, top=a.top, model="SmolLM2-135M")
    print(f"{len(heads)} retrieval heads -> {a.out}: {heads}")


if __name__ == "__main__":
    main()
