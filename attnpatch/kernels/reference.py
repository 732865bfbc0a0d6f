"""``reference``: materialised mask and scores in float32 / float64. The oracle for every test."""
from __future__ import annotations

import math

import torch

from ..plan import Plan, index_grids, materialise_mask
from .base import Kernel, core_step_why_not

_MAX_ELEMENTS = 2**34  # query rows run in chunks (bounded memory), but beyond this the eager path takes minutes
_CHUNK_ELEMENTS = 2**25  # scores per chunk of query rows (128 MB in float32)


def attention(q, k, v, plan: Plan, *, mask=None, scale=None, dtype: torch.dtype | None = None):
    """Exact attention for ``plan``: scores in ``dtype`` (float64 for float64 input, else
    float32 unless given), fully masked rows return zeros (the flash-attention convention).
    Differentiable; query rows run in chunks of at most ``_CHUNK_ELEMENTS`` scores."""
    if dtype is None:
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, Sq, D = q.shape
    rep = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kr = k.to(dtype).repeat_interleave(rep, dim=1)  # (B, Hq, Skv, D)
    vr = v.to(dtype).repeat_interleave(rep, dim=1)  # (B, Hq, Skv, Dv)
    qs = plan.q_scale
    if torch.is_tensor(qs):
        qs = qs.to(q.device, dtype).expand(B, Hq, Sq, 1)
    rows = max(1, _CHUNK_ELEMENTS // max(1, B * Hq * k.shape[2]))
    outs = []
    for a in range(0, Sq, rows):
        b = min(Sq, a + rows)
        m = mask[..., a:b, :] if mask is not None and mask.dim() >= 2 and mask.shape[-2] == Sq else mask
        part_qs = qs[:, :, a:b] if torch.is_tensor(qs) else qs
        outs.append(_rows(q[:, :, a:b].to(dtype), kr, vr, plan, a, m, scale, part_qs))
    return torch.cat(outs, 2).to(q.dtype)


def _rows(q, kr, vr, plan: Plan, q_start: int, mask, scale, qs):
    """Attention of the query rows from ``q_start`` (q already in the score dtype)."""
    B, Hq, Sq, _ = q.shape
    Skv = kr.shape[2]
    s = (q @ kr.transpose(-1, -2)) * scale  # (B, Hq, Sq, Skv)
    if qs is not None:
        s = s * qs
    if plan.score_mod is not None:
        s = plan.score_mod(s, *index_grids(B, Hq, Sq, Skv, q.device, q_start))
    keep = materialise_mask(plan, B, Hq, Sq, Skv, q.device, q_start)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask if keep is None else keep & mask
        else:
            s = s + mask.to(s.dtype)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    # rows with no key at all -> 0; scored as zeros first so the softmax (and its gradient) has no NaN
    dead = ~(s > float("-inf")).any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return p @ vr


class Reference(Kernel):
    name = "reference"

    def why_not(self, q, k, v, plan, mask=None):
        reason = core_step_why_not(plan)
        if reason:
            return reason
        n = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
        if n > _MAX_ELEMENTS:
            return f"would compute {n:,} scores eagerly (> {_MAX_ELEMENTS:,}); use a block-sparse kernel"
        return None


    def run(self, q, k, v, plan, *, mask=None, scale=None):
        return attention(q, k, v, plan, mask=mask, scale=scale)
