"""``Quest``: query-aware page selection for LLM decode (Tang et al. 2024, "Quest: Query-Aware Sparsity
for Efficient Long-Context LLM Inference").

The KV cache is cut into pages of ``page`` keys. Per page and head dimension d the elementwise maximum
M_d and minimum m_d of its keys bound any key's logit against a query q: ``q . k <= sum_d max(q_d M_d,
q_d m_d)``. A decode query reads the first page (attention sink), its own (last, maybe partial) page and
the pages with the largest bound, ``budget // page`` pages in all, chosen per KV head (GQA: a page's
bound is the largest over the query heads of its group, so a page any of them may need is a candidate).
The kept keys are gathered (one copy of ~budget keys) and attended with plain SDPA: decode reads the
bounds (2 / page of the keys) and the budget, not the whole cache. Prefill and multi-token chunks stay
dense, as in the paper; so do ``dense_layers`` (the paper leaves the first two dense). Under left padding
(``Site.kv_shift``) each row's pages are cut from its first real key, so a padded row reads what it reads alone
(bounds then come from its keys, at dense read cost).

``pooled`` (0.5 by default; 0: the paper's rule, by bound only) picks that share of the chosen pages by the mean-pooled key score
``q . mean(k)`` instead (the largest over the group's query heads; "pooled keys", as InfLLM's / HiP's page
representatives), among the pages the bound did not pick. Why: the bound is an upper bound, exact only when
one key holds every channel's extreme; on SmolLM2 it is loose by 4-6x (layer 18, 4K needle prompt: the needle's
page takes 0.95 of a head's attention, its true best score 69 against a bound of 335, ranked 174th of 254 pages
by bound), so at budget 1024 of 4K a decoding copy head loses the needle's page and the number is cut short. Half
the pages by bound, half by mean (``pooled=0.5``) kept every needle on the prompts that failed (benchmarks/results/
llm_quality.md: 8K niah_single 0.98 at budget 512 and 1024, dense 0.98, against 0.38 / 0.52 by bound only), so it is
the default. The mean costs one more (B, H_kv, pages, D) table beside the bounds (3 / page of the keys; decode
tokens/s within ~5 % of the bound-only rule in benchmarks/results/decode.md).

Under ``attnpatch.patch`` the bounds are kept incrementally beside the cache (``kv_policy()``: a
``PageBounds`` per patch; the transformers patcher makes each cache layer update them as pages fill),
so a decode step computes bounds only for pages completed since the last one. Without such a cache
(``attnpatch.attend``) they are computed from the keys given: the same numbers, at dense read cost.
Those cache layers also append in place (buffers with room), so a step no longer copies the whole
cache as DynamicLayer's cat does. The policy covers every layer: choose dense layers with
``dense_layers``, not ``patch(..., layers=...)``.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from ..plan import Plan
from ..site import Site
from .base import Method, check_indices, check_int, check_number


class PageBounds:
    """The KV-cache policy of ``Quest``: every layer keeps all its keys (``evicts = False``) and,
    beside them, the elementwise max / min of each full page (``observe``, called by the cache layer
    after each update with a state dict of its own). ``bounds(layer, keys)`` hands a decode call the
    bounds of exactly the keys it was given (the cache layer's latest keys, checked by identity), or
    None. One object per patch; it registers itself with its method's ``registry``."""

    evicts = False

    def __init__(self, page: int, registry: weakref.WeakSet, means: bool = False):
        self.page, self.registry, self.means = page, registry, means  # means: keep each page's mean key too
        self.local = threading.local()  # layer -> (weakref of the keys handed out, max, min) per thread
        self._lock = threading.Lock()
        self._layers: dict = {}  # layer -> (tokens, bound bytes, bytes per token)
        registry.add(self)

    def retain(self, keys, values):
        return keys, values  # nothing is evicted: Quest reads a subset per step, the cache keeps all

    def observe(self, layer: int, state: dict, keys: torch.Tensor) -> None:
        """Extend ``state``'s bounds (and mean keys, when kept) to every full page of ``keys`` (B, H_kv, S, D),
        computing only the pages completed since the last call, and note them for this thread's attention call."""
        P, full = self.page, keys.shape[2] // self.page
        mx, n = state.get("max"), state.get("n", 0)
        if mx is None or mx.shape[:2] != keys.shape[:2] or mx.shape[3] != keys.shape[3] or mx.device != keys.device \
                or mx.dtype != keys.dtype or n > full or (self.means and "mean" not in state):
            mx, n = None, 0  # a new batch, device or a cropped cache: start over
        if full > n:
            names = ("max", "min", "mean") if self.means else ("max", "min")
            if mx is None or mx.shape[2] < full:  # capacity doubles: amortised O(1) per page
                cap = max(full, 2 * (0 if mx is None else mx.shape[2]), 64)
                # the mean in float32 (bounds are keys, exact in the keys' dtype; a bfloat16 mean would round)
                grown = [keys.detach().new_empty(*keys.shape[:2], cap, keys.shape[3],
                                                 dtype=torch.float32 if name == "mean" else keys.dtype) for name in names]
                for g, name in zip(grown, names):
                    if mx is not None:
                        g[:, :, :n] = state[name][:, :, :n]
                    state[name] = g
            new = keys.detach()[:, :, n * P:full * P].unflatten(2, (full - n, P))  # (B, H_kv, pages, P, D)
            torch.amax(new, 3, out=state["max"][:, :, n:full])  # an estimate: no gradient flows through a selection
            torch.amin(new, 3, out=state["min"][:, :, n:full])
            if self.means:
                torch.mean(new, 3, dtype=torch.float32, out=state["mean"][:, :, n:full])
        state["n"] = full
        notes = self.local.__dict__.setdefault("notes", {})
        notes[layer] = (weakref.ref(keys), state["max"][:, :, :full], state["min"][:, :, :full],
                        state["mean"][:, :, :full] if self.means else None)

    def bounds(self, layer: int, keys: torch.Tensor):
        """(max, min, mean or None) (B, H_kv, full pages, D) of ``keys`` when they are the keys a cache layer
        under this policy just handed to ``layer`` in this thread, else None."""
        got = self.local.__dict__.get("notes", {}).get(layer)
        return None if got is None or got[0]() is not keys else got[1:]

    def record(self, layer: int, seen: int, held: int, token_bytes: int) -> None:
        with self._lock:
            self._layers[layer] = (seen, token_bytes)

    def stats(self) -> dict:
        """``{"evicted": 0, "before": bytes, "after": bytes, "bounds": bytes}``: the cache is kept
        whole; ``bounds`` is what the page tables add (2 / page of the keys, 3 / page with mean keys)."""
        with self._lock:
            rows = list(self._layers.values())
        kv, tables = sum(seen * b for seen, b in rows), (3 if self.means else 2)
        return {"evicted": 0, "before": kv, "after": kv,
                "bounds": sum(seen // self.page * b * tables // 2 for seen, b in rows)}  # b: a token's key + value

    def __deepcopy__(self, memo):  # a deep copy of a patched model keeps bounds of its own caches
        new = PageBounds(self.page, self.registry, self.means)
        memo[id(self)] = new
        return new

    def __repr__(self) -> str:
        return f"PageBounds(page={self.page}{', means' if self.means else ''})"


@dataclass
class Quest(Method):
    """Decode reads the sink page, its own page and the pages whose key bounds score highest."""

    source = "Quest (Tang et al. 2024, arXiv:2406.10774)"

    budget: int = 1024  # keys a decode query reads (whole pages, the sink and own page included)
    page: int = 16  # keys per page
    dense_layers: tuple = (0, 1)  # layers left dense (the paper's first two)
    pooled: float = 0.5  # share of the chosen pages picked by the mean-pooled key score (0: by bound only, the paper)

    def __post_init__(self):
        self.page = check_int("Quest", "page", self.page, 1, example=16)
        self.budget = check_int("Quest", "budget", self.budget, 2 * self.page, example=1024,
                                expected=f"an integer >= 2 * page = {2 * self.page} (the sink page and the query's own)")
        self.dense_layers = check_indices("Quest", "dense_layers", self.dense_layers, example=(0, 1))
        check_number("Quest", "pooled", self.pooled, low=0, high=1, example=0.5)
        self._policies = weakref.WeakSet()  # PageBounds of the patches using this method

    def kv_policy(self) -> PageBounds:
        return PageBounds(self.page, self._policies, means=self.pooled > 0)

    def plan(self, q, k, site: Site) -> Plan | None:
        if not site.causal:
            raise ValueError(f"Quest selects pages of an LLM's KV cache at decode, but {site.name or 'this site'} is "
                             "not causal; for image / video models use TopKBlocks")
        P, Skv = self.page, k.shape[2]
        last = (Skv - 1) // P  # the query's own page (the newest, maybe partial)
        if q.shape[2] != 1 or site.layer in self.dense_layers or last + 1 <= self.budget // P:
            return None  # prefill / chunks / dense layers, or the budget holds every page: dense, exactly
        pads = None if site.kv_shift is None else (-site.kv_shift).clamp_min(0)
        if pads is not None and bool(pads.any()):
            tok, valid = self._select_rows(q, k, site, pads.tolist())
        else:
            tok, valid = self.select(q, k, site), None  # (B, H_kv, n) key indices, ascending

        def gather(q, k, v, mask=None):
            """The kept keys / values (B, H_kv, n, D) and the call's mask at them (B, H_q, 1, n)."""
            idx = tok.to(k.device)
            k, v = _take(k, idx), _take(v, idx)
            B, H = q.shape[:2]
            if mask is not None:
                mi = idx.repeat_interleave(H // idx.shape[1], 1)[:, :, None]  # (B, H_q, 1, n): each query head's KV head
                mask = mask.expand(B, H, q.shape[2], Skv).gather(3, mi)
            if valid is not None:  # a padded row's repeated filler slots are hidden
                keep = valid.to(k.device).repeat_interleave(H // idx.shape[1], 1)[:, :, None]
                mask = keep if mask is None else (mask & keep if mask.dtype == torch.bool
                                                  else mask.masked_fill(~keep, float("-inf")))
            return q, k, v, mask

        return Plan(transform=gather, name=repr(self))

    def select(self, q, k, site: Site) -> torch.Tensor:
        """(B, H_kv, n) ascending indices of the keys a decode query reads: page 0, the top pages by
        bound among 1 .. last - 1 (a ``pooled`` share of them by mean key score instead), and the own page
        [last * page, Skv)."""
        P, Skv = self.page, k.shape[2]
        last = (Skv - 1) // P
        mx, mn, mu = self._bounds(k, site, last)  # (B, H_kv, last - 1, D) of pages 1 .. last - 1
        B, Hkv, D = k.shape[0], k.shape[1], k.shape[3]
        qg = q.float().view(B, Hkv, -1, D)  # (B, H_kv, group, D): the query heads of each KV head
        # sum_d max(q_d M_d, q_d m_d) = q+ . M + q- . m: two matmuls instead of a (group, pages, D) product
        bound = (qg.clamp(min=0) @ mx.float().transpose(-1, -2) + qg.clamp(max=0) @ mn.float().transpose(-1, -2)).amax(2)
        kept = self.budget // P - 2
        by_mean = round(kept * self.pooled)
        if by_mean:  # the bound's top pages, then the best mean scores among the others
            top = bound.topk(kept - by_mean, -1).indices
            mean = (qg @ mu.float().transpose(-1, -2)).amax(2).scatter_(-1, top, float("inf"))
            top = mean.topk(kept, -1).indices + 1  # (B, H_kv, kept) page numbers: the bound's (inf) first
        else:
            top = bound.topk(kept, -1).indices + 1  # (B, H_kv, kept) page numbers
        ar = torch.arange(P, device=k.device)
        pages = (top.sort(-1).values[..., None] * P + ar).flatten(-2)  # (B, H_kv, kept * P)
        own = torch.arange(last * P, Skv, device=k.device).expand(B, Hkv, -1)
        return torch.cat([ar.expand(B, Hkv, -1), pages, own], -1)

    def _select_rows(self, q, k, site: Site, pads: list) -> tuple:
        """Left padding: each row's pages cut from its first real key, as the row alone would be (its sink page is
        its first real tokens): the keys of each row selected on its own (bounds read from its keys, at dense read
        cost), in slot indices, padded to one width by repeating a kept key; (indices (B, H_kv, n), valid (B, H_kv, n))."""
        P, Skv = self.page, k.shape[2]
        rows = []
        for b, pad in enumerate(pads):
            real = Skv - pad
            if (real - 1) // P + 1 <= self.budget // P:  # the budget holds every page of this row: all its keys
                idx = torch.arange(pad, Skv, device=k.device).expand(1, k.shape[1], -1)
            else:
                alone = Site(causal=True, q_offset=real - 1, layer=site.layer, decode=True)
                idx = self.select(q[b:b + 1], k[b:b + 1, :, pad:], alone) + pad
            rows.append(idx)
        n = max(r.shape[-1] for r in rows)
        valid = torch.zeros(len(pads), k.shape[1], n, dtype=torch.bool, device=k.device)
        out = torch.empty(len(pads), k.shape[1], n, dtype=torch.long, device=k.device)
        for b, idx in enumerate(rows):
            w = idx.shape[-1]
            out[b, :, :w], valid[b, :, :w] = idx[0], True
            out[b, :, w:] = idx[0, :, :1]  # filler: a kept key, hidden by valid
        return out, valid

    def _bounds(self, k, site: Site, last: int):
        """(max, min, mean or None (``pooled`` 0)) of pages 1 .. last - 1: from this thread's cache layer when it
        keeps them, else from k."""
        for policy in list(self._policies):
            got = policy.bounds(site.layer, k)
            if got is not None and got[0].shape[2] >= last and (got[2] is not None or not self.pooled):
                return tuple(None if t is None else t[:, :, 1:last] for t in got)
        pages = k[:, :, self.page:last * self.page].unflatten(2, (last - 1, self.page))  # (B, H_kv, last - 1, P, D)
        return pages.amax(3), pages.amin(3), pages.mean(3, dtype=torch.float32) if self.pooled else None

def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x`` (B, H, S, D) at the key indices ``idx`` (B, H, n): (B, H, n, D). Row copies by index_select per
    (batch row, head), ~3x torch.gather's speed on the CPU (which reads an index per element); gather
    where autograd records (index_select with out= has no backward)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[3]))
    out = x.new_empty(*idx.shape, x.shape[3])
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            torch.index_select(x[b, h], 0, idx[b, h], out=out[b, h])
    return out


if __name__ == "__main__":
    torch.manual_seed(0)
    m = Quest(budget=16, page=4, dense_layers=())
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 40, 8)
    k[:, :, 21] = 3 * q[0, 0, 0]  # one key close to the query: its page should be kept
    tok = m.select(q, k, Site(causal=True, q_offset=39, decode=True))[0, 0]
    print(f"{m} on random keys (40 keys, pages of 4; key 21 aligned with the query):")
    print("".join("#" if j in set(tok.tolist()) else "." for j in range(40)))
