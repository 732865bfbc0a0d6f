"""Dense attention that also returns the log-sum-exp of each row, so partial results over
disjoint key ranges can be merged exactly (``merge``)."""
from __future__ import annotations

import math

import torch

from .._log import debug_once
from .bias import additive


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


_CPU_FLASH = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def dense_lse(q, k, v, *, mask=None, scale=None, causal=False, q_offset=0):
    """``(out, lse (B, H, Sq))`` of dense attention from a fused kernel, at the cost of plain SDPA, or
    None where none fits (autograd: the fused kernels give no gradient through the LSE; a shape or
    device they refuse): the caller then recomputes. GQA allowed. ``mask``: boolean (True = keep) or
    additive, broadcastable to (B, H, Sq, Skv); causality is attnpatch's (row i sees keys
    j <= i + q_offset), not SDPA's top-left ``is_causal``. Rows that see no key: out 0 and lse 0 on CPU."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    Sq, Skv = q.shape[2], k.shape[2]
    if causal and q_offset >= Skv - 1:
        causal = False  # row 0 already sees every key
    cpu_flash = q.device.type == "cpu" and q.dtype in _CPU_FLASH and v.shape[-1] == q.shape[-1]
    # not SDPA's top-left causal, or a mask beside it: fold it into the mask (the CPU flash kernel takes a top-left
    # causal call and a mask together, and skips the key blocks above the diagonal)
    if causal and (q_offset != 0 or (mask is not None and not cpu_flash)):
        keep = torch.arange(Skv, device=q.device) <= torch.arange(q_offset, q_offset + Sq, device=q.device)[:, None]
        mask, causal = (keep if mask is None else mask & keep if mask.dtype == torch.bool
                        else mask + additive(keep, mask.dtype)), False
    bias = mask
    if mask is not None and mask.dtype == torch.bool:  # the fused kernels take additive masks only
        bias = additive(mask, q.dtype)
    elif mask is not None:
        bias = mask.to(q.dtype)
    if cpu_flash:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        return out, lse
    if q.device.type == "cuda":
        rep = q.shape[1] // k.shape[1]
        if rep > 1:  # the efficient kernel has no GQA: each query head gets its KV head's copy
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        try:
            b = None if bias is None else bias.expand(q.shape[0], q.shape[1], Sq, Skv)
            out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, b, True, 0.0, causal, scale=scale)
            return out, lse[..., :Sq]  # the efficient kernel may pad lse to a multiple of 32
        except RuntimeError as e:  # e.g. unsupported head_dim or bias alignment
            debug_once(f"efficient attention with LSE unavailable ({e}); recomputing the LSE")
    return None


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


def merge_into(o_acc, l_acc, o_new, l_new) -> None:
    """(o_acc, l_acc) <- the exact softmax over both parts' keys, in place (views allowed: the lines and buckets
    kernels merge into row ranges of a call's result): weights per row, two passes over
    the outputs (``merge`` stacks and allocates: ~5 passes over full-size tensors, each page-faulted
    fresh). Rows with no key in a part have lse -inf and output 0; in both parts they stay 0, -inf."""
    m = torch.maximum(l_acc, l_new)
    m.masked_fill_(m == float("-inf"), 0.0)
    w_acc, w_new = (l_acc - m).exp_(), (l_new - m).exp_()
    tot = w_acc + w_new
    l_acc.copy_(tot.log().add_(m))
    tot.masked_fill_(tot == 0, 1.0)
    o_acc.mul_(w_acc.div_(tot)[..., None])
    o_acc.addcmul_(o_new, w_new.div_(tot)[..., None])
