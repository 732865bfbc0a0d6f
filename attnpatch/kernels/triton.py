"""``triton``: our block-sparse flash-attention forward on CUDA (``triton_fwd.py``).

On CPU it runs only under ``TRITON_INTERPRET=1`` and only when named (``backend="triton"``):
that is how its tests run without a GPU.
"""
from __future__ import annotations

import os

import torch

from ..plan import fold_q_scale
from .base import Kernel, block_sparse_why_not, needs_grad

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
        if needs_grad(q, k, v):
            return "forward only (inputs require grad)"
        if _interpreting() and q.dtype != torch.float32:
            return (f"{q.dtype} under Triton's CPU interpreter: only float32 is supported there (bf16 errors "
                    "reach ~1e8, a known interpreter limitation)")
        d = q.shape[-1]
        if d < 16 or d > 256 or d & (d - 1) or v.shape[-1] != d:
            return f"head_dim {d} must be a power of two in [16, 256] (and equal for k and v)"
        return block_sparse_why_not(q, k, v, plan, mask)


    def run(self, q, k, v, plan, *, mask=None, scale=None):
        q, scale, plan = fold_q_scale(q, scale, plan)  # a no-op after core.run folded it
        from .triton_fwd import block_sparse_attention, uniform_layout

        bs = plan.blocks
        layout = uniform_layout(bs, BLOCK, plan.mask_mod, q.device)
        perm = bs.perm_on(q.device)
        if perm is not None:
            q, k, v = (t.index_select(2, perm) for t in (q, k, v))  # (B, H, S, D) in tile order
        out, _ = block_sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), layout, scale)
        return out if perm is None else out.index_select(2, bs.inverse_perm_on(q.device))
