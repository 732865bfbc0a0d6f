"""``reference``: materialised mask and scores in float32 / float64. The oracle for every test."""
from __future__ import annotations

import math

import torch

from ..plan import Plan, index_grids, materialise_mask
from .base import Kernel

_UNSUPPORTED = ("output", "extra_kv")
_MAX_ELEMENTS = 2**31  # scores beyond this would need tens of GB


def attention(q, k, v, plan: Plan, *, mask=None, scale=None, dtype: torch.dtype | None = None):
    """Exact attention for ``plan``: scores in ``dtype`` (float64 for float64 input, else
    float32 unless given), fully masked rows return zeros (the flash-attention convention)."""
    if dtype is None:
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, Sq, D = q.shape
    rep = Hq // k.shape[1]
    Skv = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kr = k.to(dtype).repeat_interleave(rep, dim=1)  # (B, Hq, Skv, D)
    vr = v.to(dtype).repeat_interleave(rep, dim=1)  # (B, Hq, Skv, Dv)
    s = (q.to(dtype) @ kr.transpose(-1, -2)) * scale  # (B, Hq, Sq, Skv)
    if plan.score_mod is not None:
        s = plan.score_mod(s, *index_grids(B, Hq, Sq, Skv, q.device))
    keep = materialise_mask(plan, B, Hq, Sq, Skv, q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask if keep is None else keep & mask
        else:
            s = s + mask.to(dtype)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(nan=0.0)  # rows with no key at all -> 0
    return (p @ vr).to(q.dtype)


class Reference(Kernel):
    name = "reference"

    def why_not(self, q, k, v, plan, mask=None):
        for f in _UNSUPPORTED:
            if getattr(plan, f) is not None:
                return f"plan.{f} is not supported by the reference kernel yet"
        n = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
        if n > _MAX_ELEMENTS:
            return f"would materialise {n:,} scores (> {_MAX_ELEMENTS:,}); use a block-sparse kernel"
        return None

    def priority(self, q, plan) -> int:
        return 100  # the oracle: always capable, never fast

    def run(self, q, k, v, plan, *, mask=None, scale=None):
        return attention(q, k, v, plan, mask=mask, scale=scale)
