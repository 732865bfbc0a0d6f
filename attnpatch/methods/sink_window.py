"""``SinkWindow``: causal A-shape attention (StreamingLLM; When Attention Sink Emerges).

Query at absolute position i sees key j iff j <= i and (j < sink or i - j < window): the
first ``sink`` tokens plus the last ``window`` tokens, the query itself included. Positions are
absolute (``Site.kv_shift``): under left padding the sink is the first *real* tokens, and a
rolling cache that has dropped them keeps no sink. ``evict=True`` gives the method a KV-cache
policy (``kv_policy()``, a ``SinkEviction``): a cache layer under it holds [sink keys | a run of
keys ending at the query]; the transformers patcher describes those calls in slot coordinates
(``kv_shift`` None), where this same mask is exact. A decode query (one row, no ``kv_shift``) reads
only its sink and window keys, sliced from the cache (``_decode``): no length-S mask, and a cost that
stops growing with the context.

``profile=`` (``Sparse``'s per-layer / per-head tables, e.g. ``{"window": (layers, heads)}`` from
``attnpatch.tools.profile_search``) gives each head its own sink / window; heads with equal values
run as one group (``Sparse.head_plans``). LLM calls carry no denoising step, so ``dense_steps``
defaults to 0 and never applies there; ``dense_layers`` keeps whole layers dense.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import threading

import torch

from ..blocks import causal_states, from_states, overlap
from ..plan import Plan
from ..site import Site
from ._grid import Memo
from .base import check_bool, check_int
from .schedule import Sparse


class SinkEviction:
    """The KV-cache policy of ``SinkWindow(evict=True)``: after each update a layer keeps the first
    ``sink`` keys and the last ``window - 1`` (the next query makes ``window``), which is all the
    mask can reach, so the logits equal the full cache's. Framework-free: the transformers patcher
    turns it into a cache layer. One object per patch (``kv_policy()`` makes a new one), so its
    statistics (``stats()``, read through ``Handle.stats()``) are that patch's, never the method's.

    ``full`` ({layer: query heads}, StreamingHeads' retrieval heads) keeps those heads' keys whole: once
    ``bind(q_heads, kv_heads)`` has told the model's head counts, a layer where every KV head serves a
    full query head stays whole, and a layer where some do is split per KV head (``split(layer)``: the
    KV heads kept whole; the cache layer holds the others' sink + window - 1 keys beside them)."""

    evicts = True  # the cache layer holds slots, not positions (see kv_cache.KVCache.note)

    def __init__(self, sink: int, window: int, full: dict | None = None):
        self.sink, self.window, self.full = sink, window, dict(full or {})
        self.keep = sink + window - 1  # keys a layer holds between forwards
        self.skip: frozenset = frozenset(self.full)  # layers whose cache stays whole (until bind splits them)
        self._split: dict = {}  # layer -> KV heads kept whole (the layer's other KV heads are trimmed)
        self._lock = threading.Lock()
        self._layers: dict = {}  # layer -> (tokens seen, tokens held, bytes per token) of its latest update

    def bind(self, q_heads: int, kv_heads: int) -> None:
        """The model's head counts: a KV head serving any full query head keeps its keys whole."""
        rep = max(1, q_heads // kv_heads)
        kv = {layer: tuple(sorted({h // rep for h in heads})) for layer, heads in self.full.items() if heads}
        self.skip = frozenset(layer for layer, hs in kv.items() if len(hs) >= kv_heads)
        self._split = {layer: hs for layer, hs in kv.items() if layer not in self.skip}

    def applies(self, layer: int) -> bool:
        """Whether this policy trims ``layer``'s cache (StreamingHeads: not the layers whose KV heads all serve a
        retrieval head)."""
        return layer not in self.skip

    def split(self, layer: int) -> tuple | None:
        """The KV heads of ``layer`` whose keys stay whole while the others are trimmed, or None (all trimmed)."""
        return self._split.get(layer)

    def retain(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a layer keeps of its (B, H_kv, S, D) keys / values once this forward has used them."""
        S = keys.shape[2]
        if S <= self.keep:
            return keys, values
        tail = S - (self.window - 1)
        return tuple(torch.cat([t[:, :, :self.sink], t[:, :, tail:]], 2) for t in (keys, values))

    def observe(self, layer: int, state: dict, keys: torch.Tensor) -> None:
        """Called by the cache layer after each update (a policy may keep per-layer data beside the
        cache, as Quest's page bounds): eviction needs none."""

    def record(self, layer: int, seen: int, held: float, token_bytes: int) -> None:
        """``held``: tokens held per KV head (a split layer's average over its KV heads)."""
        with self._lock:
            self._layers[layer] = (seen, held, token_bytes)

    def stats(self) -> dict:
        """``{"evicted": tokens, "before": bytes, "after": bytes}`` of the latest cache: tokens its
        layers no longer hold (the most of any KV head), and the bytes those layers would hold without
        eviction and do hold."""
        with self._lock:
            rows = list(self._layers.values())
        return {"evicted": max((seen - min(seen, self.keep) if held < seen else 0 for seen, held, _ in rows), default=0),
                "before": sum(seen * b for seen, _, b in rows), "after": int(round(sum(held * b for _, held, b in rows)))}

    def __deepcopy__(self, memo):  # a deep copy of a patched model counts its own cache from zero
        new = SinkEviction(self.sink, self.window, self.full)
        new.skip, new._split = self.skip, dict(self._split)
        memo[id(self)] = new
        return new

    def __repr__(self) -> str:
        full = f", full={ {k: sorted(v) for k, v in sorted(self.full.items())} }" if self.full else ""
        return f"SinkEviction(sink={self.sink}, window={self.window}{full})"


@dataclass
class SinkWindow(Sparse):
    """Causal: the first ``sink`` tokens plus the last ``window`` tokens (A-shape)."""

    source = "StreamingLLM; When Attention Sink Emerges (Gu et al. 2025); MInference A-shape"
    plans_by_site = True  # a pure function of parameters, Site and shapes (core remembers its kernel calls)

    sink: int = 4
    window: int = 2048
    block: int = 256  # block size of the block-sparse prefill structure
    # transformers: each full-attention layer's KV cache keeps the first sink and last window - 1 keys
    # (kv_policy); the logits equal evict=False (unpadded batches, the default DynamicCache)
    evict: bool = False
    dense_steps: int | float = field(default=0, kw_only=True, repr=False)  # LLM calls have no steps to schedule

    def __post_init__(self):
        check_int("SinkWindow", "sink", self.sink, 0)
        check_int("SinkWindow", "window", self.window, 1)
        check_int("SinkWindow", "block", self.block, 16)
        self.evict = check_bool("SinkWindow", "evict", self.evict)
        if self.evict and self.profile is not None:  # one cache per layer holds one run of keys for all its heads
            raise ValueError("SinkWindow(evict=True, profile=...): KV eviction keeps one sink + window run per layer, "
                             "but a per-head profile gives heads different windows; use evict=False with the profile "
                             "(exact masks, full cache), or evict=True with one uniform window (e.g. the profile's largest)")
        super().__post_init__()  # after the parameters: a profile's values are checked against them
        self._blocks: tuple = (None, None)  # (S, structure) of the latest prefill length
        self._plans = Memo()  # static plans per (parameters, shape, q_offset, device); see plan()

    def kv_policy(self) -> SinkEviction | None:
        """``evict=True``: a new ``SinkEviction`` for the patch that asks (its statistics are that patch's);
        else None: the patcher's default (``KeepAll``, every key appended in place: decode reads the window only)."""
        return SinkEviction(self.sink, self.window) if self.evict else None

    def blocks(self, S: int):
        """Causal block structure of a prefill of S tokens (the latest length cached). Threads
        share the method: the cache is read once and replaced whole, never emptied in between."""
        cached_S, cached = self._blocks
        if cached_S == S:
            return cached
        bounds = torch.cat([torch.arange(0, S, self.block), torch.tensor([S])])
        sink, window = self.sink, self.window

        def count(rows, a, b):  # keys of row i: [0, min(sink, i + 1)) and [max(0, i - window + 1), i + 1)
            r = rows[:, None]
            s_hi = torch.clamp(r + 1, max=sink)
            w_lo = (r - window + 1).clamp_min(0)
            both = overlap(w_lo, torch.minimum(s_hi, r + 1), a, b)  # counted twice where the two overlap
            return overlap(torch.zeros_like(r), s_hi, a, b) + overlap(w_lo, r + 1, a, b) - both

        structure = from_states(causal_states(count, bounds), bounds, None, causal=True)
        self._blocks = (S, structure)  # one assignment: a concurrent reader sees the old pair or this one
        return structure

    def plan(self, q, k, site: Site) -> Plan:
        if not site.causal:
            raise ValueError(
                f"SinkWindow is causal (LLM) attention but {site.name or 'this site'} is not causal; "
                "for image / video models use a locality method such as Neighborhood"
            )
        if q is not None and q.shape[2] + site.q_offset <= self.window:
            # every query's distance to any key it may see is < window: the A-shape keeps every causal key,
            # so plain causal attention is exact (a per-head profile's widest windows at short contexts;
            # a masked block kernel there cost 1.26x stock SDPA at SmolLM2 1K)
            return None
        if q is not None and q.shape[2] == 1 and site.kv_shift is None:
            return self._decode(site.q_offset, k.shape[2])
        if site.kv_shift is not None or q is None:
            return self._plan(q, k, site)
        # without kv_shift the plan depends only on these: one Plan object per key (for every layer and
        # step), so kernels' caches keyed on its mask_mod (sdpa's materialised mask) hit on every call
        key = (self.sink, self.window, self.block, q.shape[2], k.shape[2], site.q_offset, q.device)
        return self._plans.get(key, lambda: self._plan(q, k, site))

    def _decode(self, p: int, Skv: int) -> Plan | None:
        """One query at position ``p`` reads only its keys, [0, sink) and [p - window + 1, p], sliced
        from the cache (a view, or one copy of sink + window keys when the two runs are apart): decode
        cost stops growing with the context. None when those are all the keys: plain attention, exactly."""
        sink, lo = min(self.sink, p + 1), max(0, p - self.window + 1)
        runs = [(0, p + 1)] if lo <= sink else [(0, sink), (lo, p + 1)] if sink else [(lo, p + 1)]
        if runs == [(0, Skv)]:
            return None

        def read(q, k, v, mask=None):
            """The call's kept keys / values (B, H_kv, n, D), and its mask at them."""
            k, v = _runs(k, runs, 2), _runs(v, runs, 2)
            if mask is not None and mask.shape[-1] == Skv:
                mask = _runs(mask, runs, mask.dim() - 1)
            return q, k, v, mask

        return Plan(transform=read, name=f"SinkWindow(sink={self.sink}, window={self.window})")

    def _plan(self, q, k, site: Site) -> Plan:
        sink, window, offset, shift = self.sink, self.window, site.q_offset, site.kv_shift

        def mask_mod(b, h, q_idx, kv_idx):
            kv_pos = kv_idx + shift[b] if shift is not None else kv_idx  # absolute key position
            sunk = (kv_pos < sink) & (kv_pos >= 0)  # negative positions are left padding
            # causality is repeated here so block kernels can evaluate partial blocks from mask_mod alone
            return (sunk | (q_idx + offset - kv_idx < window)) & (kv_idx <= q_idx + offset)

        S = None if q is None else q.shape[2]
        prefill = S is not None and S == k.shape[2] and offset == 0 and shift is None and S > self.block
        return Plan(mask_mod=mask_mod, blocks=self.blocks(S) if prefill else None,
                    name=f"SinkWindow(sink={sink}, window={window})", static=shift is None)


def _runs(x: torch.Tensor, runs: list, dim: int) -> torch.Tensor:
    """``x`` narrowed to the index runs [a, b) along ``dim``: a view for one run, else one cat."""
    parts = [x.narrow(dim, a, b - a) for a, b in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


if __name__ == "__main__":
    from .base import ascii_mask

    print(ascii_mask(SinkWindow(sink=2, window=4), Site(causal=True), 16))
