"""Per-head plans as one call where that is cheaper.

A method with per-head parameters (``head_plans``: StreamingHeads' full and streaming heads, a
per-head profile) runs one kernel call per group of heads, with the heads gathered before each call
and scattered after. At small sizes those gathers and the extra calls cost more than the attention
(StreamingHeads at 64 tokens: 2.6x a stock call), while one SDPA call with a (H, S_q, S_kv) mask that
holds every group's pattern costs a masked call. When every group's plan is static (or dense) and the
cost model says the one masked call is cheaper than the split, ``core.run`` runs that call instead:
exact (the same mask, head by head), and the mask is built once per shape and cached by ``sdpa``.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from . import kernels
from .kernels import cost
from .plan import Plan, materialise_mask

_MAX_MASK_BYTES = 8 << 20  # a merged mask beyond this is not worth caching: large calls split anyway
_MEMO: OrderedDict = OrderedDict()  # key -> (merged Plan or None, the group plans it holds alive)
_MEMO_MAX = 64
_BY_ID: dict = {}  # id(groups) -> (groups, call signature, plan): the memo without reading the head indices
_LOCK = threading.Lock()


def _simple(plan) -> bool:
    """A plan the merged mask can stand for: static mask only, no step beside the kernel."""
    return plan is None or (plan.static and plan.score_mod is None and plan.output is None and plan.transform is None
                            and plan.extra_kv is None and not plan.parts and plan.q_scale is None)


def merged(groups, q, k, v, site, mask, backend):
    """One static Plan covering every head of ``groups`` (a ``head_plans`` result), or None: run the
    groups one by one (not all static, a mask or a named backend, too large, or not cheaper)."""
    if backend is not None or mask is not None or len(groups) < 2 or not all(_simple(p) for _, p in groups):
        return None
    B, H, Sq, _ = q.shape
    if B * H * Sq * k.shape[2] * q.element_size() > _MAX_MASK_BYTES:
        return None
    fast = _BY_ID.get(id(groups))  # a method that returns the same list for a static call (StreamingHeads)
    if fast is not None and fast[0] is groups and fast[1] == (q.shape, k.shape, q.dtype, q.device, site.causal,
                                                                site.q_offset, torch.get_num_threads()):
        return fast[2]
    heads = tuple(tuple(h.tolist()) for h, _ in groups)
    key = (heads, tuple(id(p) for _, p in groups), q.shape, k.shape, v.shape[3], q.dtype, q.device,
           site.causal, site.q_offset, torch.get_num_threads())
    with _LOCK:
        hit = _MEMO.get(key)
        if hit is not None:
            _MEMO.move_to_end(key)
            return hit[0]
    plan = _merge(groups, heads, q, k, v, site) if _cheaper(groups, heads, q, k, v, site) else None
    with _LOCK:
        if len(_BY_ID) > _MEMO_MAX:
            _BY_ID.clear()
        _BY_ID[id(groups)] = (groups, (q.shape, k.shape, q.dtype, q.device, site.causal, site.q_offset,
                                       torch.get_num_threads()), plan)
        _MEMO[key] = (plan, [p for _, p in groups])  # the group plans stay alive: their ids are in the key
        while len(_MEMO) > _MEMO_MAX:
            _MEMO.popitem(last=False)
    return plan


def _cheaper(groups, heads, q, k, v, site) -> bool:
    """The cost model's verdict: one masked SDPA call over all heads vs each group's cheapest kernel
    plus the head gathers and scatters (four copies of the group's q / k / v / out bytes)."""
    c = cost.constants(q.device.type, torch.get_num_threads())
    if c is None:
        return False  # uncalibrated device: keep the split (each group's own best kernel)
    one = Plan(mask_mod=lambda b, h, i, j: i >= 0, static=True, name="merged").with_site(site.causal, site.q_offset)
    whole = cost.estimate("sdpa", c, q, k, v, one)
    split = 0.0
    rep = q.shape[1] // k.shape[1]
    for idx, (_, plan) in zip(heads, groups):
        n = len(idx)
        qg, kg, vg = q[:, :n], k[:, :max(1, n // rep)], v[:, :max(1, n // rep)]
        p = (plan or Plan()).with_site(site.causal, site.q_offset)
        names = [kr.name for kr in kernels.preference(q.device.type, p)]
        split += min(cost.estimate(name, c, qg, kg, vg, p) for name in names)
        split += c["gather_s_per_byte"] * 4 * qg.numel() * qg.element_size() + 4 * c["call_s"]
    return whole < split


def _merge(groups, heads, q, k, v, site) -> Plan:
    """The static plan whose mask is each head's group's mask (dense groups: every key the site allows)."""
    B, H, Sq, _ = q.shape
    Skv = k.shape[2]
    table = torch.ones(B, H, Sq, Skv, dtype=torch.bool, device=q.device)
    for idx, (_, plan) in zip(heads, groups):
        if plan is None:
            continue  # dense: the site's causality is applied by the merged plan itself
        keep = materialise_mask(plan.with_site(site.causal, site.q_offset), B, len(idx), Sq, Skv, q.device)
        if keep is not None:
            table[:, list(idx)] = keep.expand(B, len(idx), Sq, Skv)
    names = " | ".join(f"heads {list(i)}: {p.name if p is not None else 'dense'}" for i, (_, p) in zip(heads, groups))

    def mask_mod(b, h, q_idx, kv_idx):
        return table[b, h, q_idx, kv_idx]

    return Plan(mask_mod=mask_mod, static=True, name=f"merged({names})")
