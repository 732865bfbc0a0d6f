"""HyperAttention (sorted LSH blocks + a sampled residual, Han et al. 2023) on a Llama-style model:
perplexity of a long text, stock vs HyperAttention vs a SinkWindow that keeps about as many keys.

    python examples/hyper_attention.py                    # SmolLM2-135M-Instruct, offline, ~1500 tokens
    python examples/hyper_attention.py --tokens 3000 --block 256 --samples 256 --min-len 512

The paper's defaults (block 256, 256 samples, min_len 4096) only start sampling past 8192 tokens (the
causal recursion is exact until its lower-left block has min_len rows); smaller values show it here.
"""
import argparse

import torch

import attnpatch as ap
from attnpatch import Site


def kept(method, S: int) -> float:
    """Fraction of the causal keys the method's pattern keeps at S tokens (random q, k; one head)."""
    q, k = torch.randn(1, 1, S, 64), torch.randn(1, 1, S, 64)
    table = method.table(q, k, Site(causal=True)) if isinstance(method, ap.HyperAttention) else None
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    if table is None:  # SinkWindow: sink columns and the window band
        i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
        keep = causal & ((j < method.sink) | (i - j < method.window))
    else:
        keep = (table[0, 0] > float("-inf")) & causal
    return keep.sum().item() / causal.sum().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1500, help="approximate text length")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--min-len", type=int, default=256)
    a = p.parse_args()
    from attnpatch.models import smollm2

    model, tok = smollm2()
    para = ("The history of the city begins with a small settlement by the river, where traders met to exchange "
            "grain, salt and cloth. Over the centuries the market grew, walls were built, and the old bridge was "
            "replaced by a stone one that still stands today. ")
    ids = tok(para * max(1, a.tokens // len(tok(para).input_ids)), return_tensors="pt").input_ids
    S = ids.shape[1]
    hyper = ap.HyperAttention(block=a.block, samples=a.samples, min_len=a.min_len)
    share = kept(hyper, S)
    window = ap.SinkWindow(sink=4, window=max(1, round(share * S / 2)))  # a band of ~ the same causal share
    print(f"text: {S} tokens")
    for method in (None, hyper, window):
        # a HyperAttention plan is a score table: the reference kernel runs it (flex would compile per shape)
        backend = "reference" if isinstance(method, ap.HyperAttention) else None
        with torch.inference_mode(), (ap.patch(model, method, backend=backend) if method else _nothing()):
            ppl = model(ids, labels=ids).loss.exp().item()
        share_m = 1.0 if method is None else kept(method, S)
        print(f"{'stock' if method is None else method}: perplexity {ppl:.3f}, causal keys kept {share_m:.1%}")


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
