"""``tiles``: block-sparse attention executed by the dense SDPA kernel.

Tokens are permuted into tile order once; every query range then attends a few contiguous key
ranges (runs), each one SDPA call on slice *views* (no gathering: copies cost more than call
overhead), merged by their log-sum-exp in float32. Fully kept runs need no mask; partial runs
get the plan's exact mask_mod as an additive mask (cached per plan). Query blocks with the same
runs are merged into one call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..blocks import BlockSparse
from ..plan import Plan
from .base import Kernel
from .lse import merge, sdpa_lse


def _partial_bias(plan: Plan, bs: BlockSparse, qs, qe, ks, ke, dtype, device):
    """(additive bias (1|B, 1|H, Lq, Lk), rows with any key (…, Lq)) for one partial run."""
    key = ("bias", qs, qe, ks, ke, dtype, str(device))
    if key not in bs.cache:
        perm = bs.perm.to(device) if bs.perm is not None else None
        qi = torch.arange(qs, qe, device=device) if perm is None else perm[qs:qe]
        ki = torch.arange(ks, ke, device=device) if perm is None else perm[ks:ke]
        z = torch.zeros(1, dtype=torch.long, device=device).view(1, 1, 1, 1)
        keep = plan.mask_mod(z, z, qi.view(1, 1, -1, 1), ki.view(1, 1, 1, -1))  # original indices
        keep = keep.expand(*keep.shape[:2], qe - qs, ke - ks)
        bias = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, float("-inf"))
        bs.cache[key] = (bias, keep.any(-1))
    return bs.cache[key]


class Tiles(Kernel):
    name = "tiles"

    def why_not(self, q, k, v, plan, mask=None):
        bs = plan.blocks
        if bs is None:
            return "plan has no block structure"
        if mask is not None:
            return "an external attention mask (e.g. text padding) is not supported"
        for f in ("score_mod", "output", "extra_kv"):
            if getattr(plan, f) is not None:
                return f"plan.{f} is not supported"
        if plan.causal:
            return "causal plans need a causal block structure"
        if not (q.shape[2] == k.shape[2] == bs.seq_len):
            return f"sequence lengths ({q.shape[2]}, {k.shape[2]}) differ from the block layout ({bs.seq_len})"
        if bs.perm is not None and not bs.kv_full.all() and plan.mask_mod is None:
            return "partial blocks need the plan's mask_mod"
        return None

    def priority(self, q, plan) -> int:
        return 10 if q.device.type == "cpu" else 30

    def run(self, q, k, v, plan: Plan, *, mask=None, scale=None):
        bs = plan.blocks
        rep = q.shape[1] // k.shape[1]
        if bs.perm is not None:
            perm = bs.perm.to(q.device)
            q, k, v = (t.index_select(2, perm) for t in (q, k, v))  # (B, H, S, D) in tile order
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, Hq, S, D)
        out = torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device)
        for qs, qe, runs in bs.runs():
            qv = q[:, :, qs:qe]
            if len(runs) == 1 and runs[0][2]:
                ks, ke, _ = runs[0]
                out[:, :, qs:qe] = F.scaled_dot_product_attention(qv, k[:, :, ks:ke], v[:, :, ks:ke], scale=scale)
                continue
            parts = []
            for ks, ke, full in runs:
                if full:
                    parts.append(sdpa_lse(qv, k[:, :, ks:ke], v[:, :, ks:ke], None, scale))
                else:
                    bias, rows = _partial_bias(plan, bs, qs, qe, ks, ke, q.dtype, q.device)
                    o, lse = sdpa_lse(qv, k[:, :, ks:ke], v[:, :, ks:ke], bias, scale)
                    parts.append((o, lse.masked_fill(~rows, float("-inf"))))
            out[:, :, qs:qe] = merge(parts).to(q.dtype)
        inv = bs.inverse_perm()
        return out if inv is None else out.index_select(2, inv.to(q.device))
