"""``triton``: our block-sparse flash-attention forward on CUDA (``triton_fwd.py``).

On CPU it runs only under ``TRITON_INTERPRET=1`` and only when named (``backend="triton"``):
that is how its tests run without a GPU.
"""
from __future__ import annotations

import os

from .base import Kernel

BLOCK = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class Triton(Kernel):
    name = "triton"

    def why_not(self, q, k, v, plan, mask=None):
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (pip install attnpatch[triton])"
        if q.device.type != "cuda" and not _interpreting():
            return "needs a CUDA GPU (or TRITON_INTERPRET=1 for the CPU interpreter)"
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
        d = q.shape[-1]
        if d < 16 or d > 256 or d & (d - 1) or v.shape[-1] != d:
            return f"head_dim {d} must be a power of two in [16, 256] (and equal for k and v)"
        if not (q.shape[2] == k.shape[2] == bs.seq_len):
            return f"sequence lengths ({q.shape[2]}, {k.shape[2]}) differ from the block layout ({bs.seq_len})"
        if not bs.kv_full.all() and plan.mask_mod is None:
            return "partial blocks need the plan's mask_mod"
        return None

    def priority(self, q, plan) -> int:
        return 5 if q.device.type == "cuda" else 90

    def run(self, q, k, v, plan, *, mask=None, scale=None):
        from .triton_fwd import block_sparse_attention, uniform_layout

        bs = plan.blocks
        layout = uniform_layout(bs, BLOCK, plan.mask_mod, q.device)
        perm = None if bs.perm is None else bs.perm.to(q.device)
        if perm is not None:
            q, k, v = (t.index_select(2, perm) for t in (q, k, v))  # (B, H, S, D) in tile order
        out, _ = block_sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), layout, scale)
        return out if perm is None else out.index_select(2, bs.inverse_perm().to(q.device))
