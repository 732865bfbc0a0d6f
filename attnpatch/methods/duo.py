"""``StreamingHeads``: DuoAttention's split of heads without its training.

A few *retrieval heads* (the heads that copy from far context: Retrieval Head, Wu et al. 2024) keep
full causal attention; every other head is a *streaming head* with SinkWindow's A-shape (the first
``sink`` tokens and the last ``window``). DuoAttention (Xiao et al. 2024) learns the split with a
gate per head; here it comes from a scoring run (``attnpatch.tools.retrieval_heads``: the fraction
of copy steps where a head's top key is the needle token being copied), saved as a profile.

Heads are named in the model's numbering as query heads ``(layer, head)``. Under GQA a KV head whose
group holds any retrieval head must keep its whole cache, so KV memory is counted per KV head
(``kv_tokens``); ``retrieval_heads.top_heads(..., by_kv=True)`` picks whole groups so nothing is
kept for a single head. ``evict=True`` trims the KV cache of every KV head that serves no retrieval head to
its sink + window - 1 keys (SinkWindow's eviction, logits unchanged): a layer with retrieval heads holds a
per-head cache (the whole keys of the KV heads serving them, the trimmed keys of the others: kv_cache.py),
whose attention runs as two calls, one per part, so the cache holds ``kv_tokens`` tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import read_safetensors
from ..site import Site
from .base import Method, ParameterTypeError, check_bool, check_int, fail
from .sink_window import SinkEviction, SinkWindow

KIND = "retrieval-heads"
HOW = ("write one with attnpatch.tools.retrieval_heads (python -m attnpatch.tools.retrieval_heads --out heads.safetensors) "
       "or attnpatch.methods.duo.save_heads(path, [(layer, head), ...])")


def save_heads(path, heads, scores: torch.Tensor | None = None, **metadata) -> None:
    """Write retrieval heads [(layer, head), ...] (and optionally the (layers, heads) score table
    they came from) as a profile ``StreamingHeads(heads=path)`` loads."""
    from safetensors.torch import save_file

    tensors = {"heads": torch.tensor(sorted(heads), dtype=torch.long).reshape(-1, 2)}
    if scores is not None:
        tensors["scores"] = scores.float().contiguous()
    save_file(tensors, str(path), metadata={"kind": KIND, **{k: str(v) for k, v in metadata.items()}})


def load_heads(path) -> list[tuple[int, int]]:
    """The (layer, head) pairs of a profile written by ``save_heads``."""
    expected = f"a safetensors file with metadata kind={KIND!r} and a tensor 'heads' (n, 2) of (layer, head) pairs"
    tensors, meta = read_safetensors(path, f"StreamingHeads(heads={path!r})", expected, HOW)
    if meta.get("kind") != KIND or "heads" not in tensors:
        found = meta.get("kind") or (f"a {meta['method']} profile" if "method" in meta else "no attnpatch metadata")
        raise ValueError(f"{path} is not a retrieval-head profile (found: {found}); expected {expected}; {HOW}")
    return _pairs(tensors["heads"].tolist(), f"profile {path}")


def _pairs(heads, where: str) -> list[tuple[int, int]]:
    try:
        pairs = [(int(l), int(h)) for l, h in heads]
        ok = all(not isinstance(x, bool) and x >= 0 for p in heads for x in p) and all(
            float(a) == b for p, q in zip(heads, pairs) for a, b in zip(p, q))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        fail("StreamingHeads", "heads", heads, f"(layer, head) pairs of non-negative ints ({where}) or a profile path",
             "[(3, 1), (7, 4)]", ParameterTypeError)
    return sorted(set(pairs))


@dataclass
class StreamingHeads(Method):
    """Retrieval heads full; every other head SinkWindow(sink, window) (DuoAttention's split)."""

    source = "Retrieval Head (Wu et al. 2024) scoring; DuoAttention (Xiao et al. 2024) head split, training-free"
    plans_by_site = True  # head groups and plans a function of parameters, Site (its layer) and shapes

    heads: object = ()  # [(layer, head), ...] query heads kept full, or a profile path (save_heads)
    sink: int = 4
    window: int = 2048
    block: int = 256
    # transformers: the streaming KV heads' caches keep their first sink and last window - 1 keys (SinkEviction),
    # per KV head in the layers with retrieval heads; KV heads serving a retrieval head keep theirs whole; the
    # logits equal evict=False
    evict: bool = False

    def __post_init__(self):
        check_int("StreamingHeads", "sink", self.sink, 0)
        check_int("StreamingHeads", "window", self.window, 1)
        check_int("StreamingHeads", "block", self.block, 16)
        self.evict = check_bool("StreamingHeads", "evict", self.evict)
        if isinstance(self.heads, (str,)) or hasattr(self.heads, "__fspath__"):
            pairs = load_heads(self.heads)
        else:
            pairs = _pairs(list(self.heads), "a list")
        self._full: dict[int, frozenset] = {}
        for layer, head in pairs:
            self._full[layer] = self._full.get(layer, frozenset()) | {head}
        self._stream = SinkWindow(sink=self.sink, window=self.window, block=self.block)
        self._memo: dict = {}  # static head groups per (layer, shape, offset)

    def full_heads(self, layer: int) -> frozenset:
        """The model's query heads of ``layer`` that keep full attention."""
        return self._full.get(layer, frozenset())

    def plan(self, q, k, site: Site):
        """The streaming heads' plan (every head of a layer without retrieval heads)."""
        return self._stream.plan(q, k, site)

    def head_plans(self, q, k, site: Site) -> list:
        """Retrieval heads dense (plan None), the rest one SinkWindow group. GQA: a group's keys are
        gathered per query head by the caller, so a KV head may serve heads of both groups."""
        full = self.full_heads(site.layer)
        if not full:
            return [(None, self.plan(q, k, site))]
        if site.kv_shift is not None:
            return self._groups(q, k, site, full)
        # static: the same list object per (layer, shape, offset), so core's merged-call memo finds it by identity
        key = (site.layer, q.shape, k.shape, site.causal, site.q_offset, site.heads, q.device)
        got = self._memo.get(key)
        if got is None:
            if len(self._memo) > 256:
                self._memo.clear()
            got = self._memo[key] = self._groups(q, k, site, full)
        return got

    def _groups(self, q, k, site: Site, full: frozenset) -> list:
        idx, _ = site.model_heads(q.shape[1])
        dense = [i for i, h in enumerate(idx) if h in full]
        if len(dense) == q.shape[1]:
            return [(None, None)]
        if not dense:
            return [(None, self.plan(q, k, site))]
        rest = [i for i in range(q.shape[1]) if i not in set(dense)]
        rep = q.shape[1] // k.shape[1]
        d, r = (torch.tensor(x, dtype=torch.long, device=q.device) for x in (dense, rest))
        return [(d, None), (r, self._stream.plan(q[:, r], k[:, r // rep], site))]

    def kv_policy(self) -> SinkEviction | None:
        """``evict=True``: SinkWindow's eviction on every KV head that serves no retrieval head; in a layer
        with retrieval heads the cache is split per KV head (the patcher binds the model's head counts)."""
        return SinkEviction(self.sink, self.window, self._full) if self.evict else None

    def kv_tokens(self, layers: int, q_heads: int, kv_heads: int, context: int) -> int:
        """Cached tokens summed over (layer, KV head) after ``context`` tokens under ``evict=True``: a KV head
        serving any retrieval head keeps all, the others ``min(context, sink + window - 1)`` (SinkEviction's
        keep, per KV head). Computed (the cache's own size is measured by the benchmarks)."""
        rep, keep = q_heads // kv_heads, min(context, self.sink + self.window - 1)
        full = sum(len({h // rep for h in self.full_heads(l)}) for l in range(layers))
        return full * context + (layers * kv_heads - full) * keep

    def __repr__(self) -> str:
        n = sum(len(v) for v in self._full.values())
        return f"StreamingHeads({n} retrieval heads, sink={self.sink}, window={self.window}{', evict' if self.evict else ''})"


if __name__ == "__main__":
    from .base import ascii_mask

    print(ascii_mask(StreamingHeads([(0, 1)], sink=2, window=4), Site(causal=True), 16))
