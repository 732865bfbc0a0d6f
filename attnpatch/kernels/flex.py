"""``flex``: PyTorch FlexAttention, compiled once per shape (torch.compile caches by shape),
with the plan's mask_mod / score_mod and a BlockMask built once per (plan, shape) and cached.
Tokens go into the plan's tile order first, so FlexAttention's 128-token blocks follow the
tiles and skip what the pattern skips."""
from __future__ import annotations

import os
import shutil
from collections import OrderedDict

import torch

from .base import Kernel

_BLOCK_MASKS: "OrderedDict[tuple, tuple]" = OrderedDict()
_COMPILED = None


def _flex():
    global _COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if os.environ.get("ATTNPATCH_FLEX_COMPILE", "1") == "0":
        return flex_attention  # unfused, for debugging
    if _COMPILED is None:
        # each plan's mask_mod is a new closure that dynamo guards on: allow one compiled graph
        # per (plan, shape) for many plans instead of falling back to eager after 8
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(getattr(cfg, "recompile_limit", 8), 256)
        cfg.cache_size_limit = max(getattr(cfg, "cache_size_limit", 8), 256)
        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


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
    if key not in _BLOCK_MASKS:
        mm = _mask_mod(plan, perm)
        bm = None if mm is None else create_block_mask(mm, B, H, Sq, Skv, device=device)
        if len(_BLOCK_MASKS) >= 64:
            _BLOCK_MASKS.popitem(last=False)
        _BLOCK_MASKS[key] = (plan.mask_mod, plan.blocks, bm)  # holding refs keeps the ids unique
    return _BLOCK_MASKS[key][2]


class Flex(Kernel):
    name = "flex"

    def why_not(self, q, k, v, plan, mask=None):
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            return "this torch has no FlexAttention (torch >= 2.5 needed)"
        if mask is not None:
            return "an external attention mask (e.g. text padding) is not supported"
        if plan.output is not None or plan.extra_kv is not None:
            return "plan.output / plan.extra_kv are not supported"
        if q.device.type == "cpu" and os.environ.get("ATTNPATCH_FLEX_COMPILE", "1") != "0" and not shutil.which("g++"):
            return "compiling FlexAttention on CPU needs a C++ compiler (g++)"
        d = q.shape[-1]
        if d < 16 or d & (d - 1):
            return f"head_dim {d} is not a power of two >= 16"
        return None

    def priority(self, q, plan) -> int:
        return 20 if q.device.type == "cuda" else 60  # on CPU, tiles and masked SDPA are faster

    def run(self, q, k, v, plan, *, mask=None, scale=None):
        B, H, Sq, _ = q.shape
        Skv = k.shape[2]
        perm = None if plan.blocks is None else plan.blocks.perm_on(q.device)
        if perm is not None:
            q, k, v = (t.index_select(2, perm) for t in (q, k, v))  # (B, H, S, D) in tile order
        bm = _block_mask(plan, perm, B, None, Sq, Skv, q.device)  # per batch row (padding); heads share it
        score_mod = _in_tile_order(plan.score_mod, perm)
        out = _flex()(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        if perm is not None:
            out = out.index_select(2, plan.blocks.inverse_perm_on(q.device))
        return out
