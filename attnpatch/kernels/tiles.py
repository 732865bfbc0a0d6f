"""``tiles``: block-sparse attention executed by the dense SDPA kernel.

Tokens are permuted into tile order once; every query range then attends a few contiguous key
ranges (runs), each one SDPA call on slice *views* (no gathering: copies cost more than call
overhead), merged by their log-sum-exp in float32. Fully kept runs need no mask; partial runs
get the plan's exact mask_mod as an additive mask (cached per plan). Query blocks with the same
runs are merged into one call.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ..blocks import BlockSparse
from ..plan import Plan
from .base import Kernel, block_sparse_why_not
from .lse import merge, sdpa_lse


def _partial_bias(plan: Plan, bs: BlockSparse, qs, qe, ks, ke, dtype, device):
    """(additive bias (1|B, 1|H, Lq, Lk), rows with any key (…, Lq)) for one partial run."""
    key = ("bias", qs, qe, ks, ke, dtype, str(device))
    if key not in bs.cache:
        perm = bs.perm_on(device)
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
        return block_sparse_why_not(q, k, v, plan, mask)

    def priority(self, q, plan) -> int:
        return 10 if q.device.type == "cpu" else 30

    def run(self, q, k, v, plan: Plan, *, mask=None, scale=None):
        bs = plan.blocks
        B, Hq, S, _ = q.shape
        rep = Hq // k.shape[1]
        perm = bs.perm_on(q.device)
        if perm is not None or rep > 1:
            q, k, v = _gather(q, perm, 1, "q"), _gather(k, perm, rep, "k"), _gather(v, perm, rep, "v")
        out = torch.empty(B, Hq, S, v.shape[3], dtype=q.dtype, device=q.device)  # original token order
        for qs, qe, runs in bs.runs():
            qv = q[:, :, qs:qe]
            if len(runs) == 1 and runs[0][2]:
                ks, ke, _ = runs[0]
                o = F.scaled_dot_product_attention(qv, k[:, :, ks:ke], v[:, :, ks:ke], scale=scale)
            else:
                parts = []
                for ks, ke, full in runs:
                    if full:
                        parts.append(sdpa_lse(qv, k[:, :, ks:ke], v[:, :, ks:ke], None, scale))
                    else:
                        bias, rows = _partial_bias(plan, bs, qs, qe, ks, ke, q.dtype, q.device)
                        o, lse = sdpa_lse(qv, k[:, :, ks:ke], v[:, :, ks:ke], bias, scale)
                        parts.append((o, lse.masked_fill(~rows, float("-inf"))))
                o = merge(parts).to(q.dtype)
            if perm is None:
                out[:, :, qs:qe] = o
            else:
                out.index_copy_(2, perm[qs:qe], o)  # straight back to the original positions
        return out


_WORKSPACE = threading.local()


def _gather(x: torch.Tensor, perm, rep: int, slot: str) -> torch.Tensor:
    """x (B, H, S, D) in tile order with heads repeated ``rep`` times, written into a reused
    per-thread buffer: fresh allocations of this size cost more in page faults than the copy."""
    B, H, S, D = x.shape
    shape = (B, H * rep, S, D)
    key = (slot, shape, x.dtype, str(x.device))
    ws = _WORKSPACE.__dict__
    if key not in ws:
        for old in [k for k in ws if k[0] == slot]:
            del ws[old]  # one buffer per slot: keep only the latest shape
        ws[key] = torch.empty(shape, dtype=x.dtype, device=x.device)
    buf = ws[key]
    src = x if rep == 1 else x[:, :, None].expand(B, H, rep, S, D).reshape(shape)  # (B, H*rep, S, D)
    if perm is None:
        buf.copy_(src)
    else:
        torch.index_select(src, 2, perm, out=buf)
    return buf
