"""Dense attention that also returns the log-sum-exp of each row, so partial results over
disjoint key ranges can be merged exactly (``merge``)."""
from __future__ import annotations

import math

import torch

from .._log import debug_once


def sdpa_lse(q, k, v, bias=None, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, H, Lq, D), lse (B, H, Lq) float32)``; ``bias`` is additive (-inf = masked),
    in q's dtype, broadcastable to (B, H, Lq, Lk). Rows with no key get lse = -inf when
    ``bias`` marks them so (callers pass the row mask); the CPU flash kernel reports 0."""
    if q.device.type == "cpu" and v.shape[-1] == q.shape[-1]:  # the flash kernel needs one head size
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    if q.device.type == "cuda":
        try:
            b = None if bias is None else bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, b, True, 0.0, False, scale=scale)
            return out, lse[..., : q.shape[2]]  # the efficient kernel may pad lse to a multiple of 32
        except RuntimeError as e:  # e.g. unsupported head_dim or bias alignment: the explicit path is exact
            debug_once(f"efficient attention with LSE unavailable ({e}); using the explicit path")
    return sdpa_lse_math(q, k, v, bias, scale)


def sdpa_lse_math(q, k, v, bias=None, scale=None):
    """The explicit version, for devices without a fused LSE-returning kernel and for autograd
    (differentiable in its LSE too; rows with no key give lse -inf and zeros, with no NaN in
    the forward or the backward)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    work = torch.promote_types(q.dtype, torch.float32)  # float64 inputs stay float64
    s = (q.to(work) @ k.to(work).transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if bias is not None:
        s = s + bias.to(work)
    dead = ~(s > float("-inf")).any(-1, keepdim=True)  # (B, H, Lq, 1)
    s = s.masked_fill(dead, 0.0)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse).masked_fill(dead, 0.0)
    return (p @ v.to(work)).to(q.dtype), lse.masked_fill(dead, float("-inf")).squeeze(-1)


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Exact softmax over the union of the parts' key ranges, in float32 (float64 for float64
    parts; rows with no key anywhere get weight 0, without NaN in the backward)."""
    work = torch.promote_types(parts[0][0].dtype, torch.float32)
    lse = torch.stack([l.to(work) for _, l in parts])  # (R, B, H, Lq)
    dead = ~(lse > float("-inf")).any(0, keepdim=True)  # (1, B, H, Lq)
    lse = lse.masked_fill(dead, 0.0)
    total = torch.logsumexp(lse, dim=0, keepdim=True)
    w = torch.exp(lse - total).masked_fill(dead, 0.0)
    out = sum(o.to(work) * w[r, ..., None] for r, (o, _) in enumerate(parts))
    return out
