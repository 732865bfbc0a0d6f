"""``flex``: PyTorch FlexAttention, compiled once per shape (torch.compile caches by shape),
with the plan's mask_mod / score_mod and a BlockMask built once per (plan, shape) and cached.
Tokens go into the plan's tile order first, so FlexAttention's 128-token blocks follow the
tiles and skip what the pattern skips.

Compiled, it refuses calls whose shape changes every call (decode, chunked prefill: query and
key lengths differ), on every device. On CPU, where a compile costs tens of seconds and there is
no backward, it also refuses score-only plans (nothing to skip: the eager path is faster than a
compile per length) and inputs that require grad.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections import OrderedDict

import torch

from ..plan import fold_q_scale
from .base import Kernel, core_step_why_not, needs_grad

_BLOCK_MASKS: "OrderedDict[tuple, tuple]" = OrderedDict()
_LOCK = threading.Lock()
_COMPILED = None


def _flex():
    global _COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if os.environ.get("ATTNPATCH_FLEX_COMPILE", "1") == "0":
        return flex_attention  # unfused, for debugging
    if _COMPILED is None:
        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


_LIMITS = {"depth": 0, "saved": None}
_LIMITS_LOCK = threading.Lock()


@contextlib.contextmanager
def _recompile_room(limit: int = 256):
    """Raise dynamo's recompile limit only while flex calls run, then restore the user's value.

    Each plan's mask_mod is a new closure that dynamo guards on: one compiled graph per (plan,
    shape) for many plans, instead of falling back to eager after 8. Nested and concurrent calls
    share one raise (counted), so the first to enter saves and the last to leave restores."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.6: the old name
    with _LIMITS_LOCK:
        if _LIMITS["depth"] == 0:
            _LIMITS["saved"] = getattr(cfg, name)
            setattr(cfg, name, max(getattr(cfg, name), limit))
        _LIMITS["depth"] += 1
    try:
        yield
    finally:
        with _LIMITS_LOCK:
            _LIMITS["depth"] -= 1
            if _LIMITS["depth"] == 0:
                setattr(cfg, name, _LIMITS["saved"])


def _in_tile_order(fn, perm):
    """A score_mod on original indices -> the same score_mod on permuted positions."""
    if fn is None or perm is None:
        return fn

    def wrapped(*args):
        *head, q_idx, kv_idx = args
        return fn(*head, perm[q_idx], perm[kv_idx])

    return wrapped


def _mask_mod(plan, perm):
    base = plan.mask_mod
    causal, off = plan.causal, plan.q_offset

    def mask_mod(b, h, q_idx, kv_idx):
        keep = base(b, h, perm[q_idx], perm[kv_idx]) if perm is not None else base(b, h, q_idx, kv_idx)
        if causal:
            keep = keep & (kv_idx <= q_idx + off)
        return keep

    if base is None:
        return (lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + off) if causal else None
    return mask_mod


def _block_mask(plan, perm, B, H, Sq, Skv, device):
    from torch.nn.attention.flex_attention import create_block_mask

    key = (id(plan.mask_mod), id(plan.blocks), plan.causal, plan.q_offset, B, H, Sq, Skv, str(device))
    with _LOCK:  # concurrent calls: never read a key another thread may evict in between
        hit = _BLOCK_MASKS.get(key)
    if hit is not None:
        return hit[2]
    mm = _mask_mod(plan, perm)
    bm = None if mm is None else create_block_mask(mm, B, H, Sq, Skv, device=device)
    with _LOCK:
        while len(_BLOCK_MASKS) >= 64:
            _BLOCK_MASKS.popitem(last=False)
        _BLOCK_MASKS[key] = (plan.mask_mod, plan.blocks, bm)  # holding refs keeps the ids unique
    return bm


def _cpu_why_not(q, k, v, plan) -> str | None:
    """FlexAttention's limits on CPU, where it compiles once per shape (tens of seconds each)."""
    if needs_grad(q, k, v):
        return "FlexAttention has no backward on CPU (inputs require grad)"
    if os.environ.get("ATTNPATCH_FLEX_COMPILE", "1") == "0":
        return None  # eager (debugging): no compile per shape
    if not shutil.which("g++"):
        return "compiling FlexAttention on CPU needs a C++ compiler (g++)"
    if q.dtype == torch.float64:  # inductor's CPU flex template raises on float64 (torch 2.13)
        return "compiled FlexAttention on CPU runs float32 / float16 / bfloat16 only"
    if plan.mask_mod is None and plan.blocks is None:
        return "a score-only plan skips nothing: compiling per shape costs more than the eager path saves"
    return None


class Flex(Kernel):
    name = "flex"

    def why_not(self, q, k, v, plan, mask=None):
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            return "this torch has no FlexAttention (torch >= 2.5 needed)"
        if mask is not None:
            return "an external attention mask (e.g. text padding) is not supported"
        reason = core_step_why_not(plan)
        if reason:
            return reason
        if q.device.type == "cpu":
            reason = _cpu_why_not(q, k, v, plan)
            if reason:
                return reason
        if q.shape[2] != k.shape[2] and os.environ.get("ATTNPATCH_FLEX_COMPILE", "1") != "0":
            return "query and key lengths differ (decode / chunked prefill: a new key length every call, a compile each)"
        d = q.shape[-1]
        if d < 16 or d & (d - 1):
            return f"head_dim {d} is not a power of two >= 16"
        return None


    def run(self, q, k, v, plan, *, mask=None, scale=None):
        q, scale, plan = fold_q_scale(q, scale, plan)  # a no-op after core.run folded it
        B, H, Sq, _ = q.shape
        Skv = k.shape[2]
        perm = None if plan.blocks is None else plan.blocks.perm_on(q.device)
        if perm is not None:
            q, k, v = (t.index_select(2, perm) for t in (q, k, v))  # (B, H, S, D) in tile order
        bm = _block_mask(plan, perm, B, None, Sq, Skv, q.device)  # per batch row (padding); heads share it
        score_mod = _in_tile_order(plan.score_mod, perm)
        dtype = q.dtype
        if os.environ.get("ATTNPATCH_FLEX_COMPILE", "1") == "0" and q.element_size() < 4:
            q, k, v = q.float(), k.float(), v.float()  # the unfused path rounds 16-bit scores: twice the fused error
        with _recompile_room():
            out = _flex()(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        out = out.to(dtype)
        if perm is not None:
            out = out.index_select(2, plan.blocks.inverse_perm_on(q.device))
        return out
