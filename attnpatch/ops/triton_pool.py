"""Fused tile pooling for ``TopKBlocks``' block-score estimator on CUDA: one Triton program per
(batch x head, tile) averages the tile's query (or key) vectors, reading tokens through the
tile-order permutation, so no permuted copy of q / k is made. The torch path in
``methods/topk_blocks.py`` computes the same means with ``index_add_``; tests compare the two
under ``TRITON_INTERPRET=1``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pool(x_ptr, order_ptr, start_ptr, out_ptr, S, D: tl.constexpr, CHUNK: tl.constexpr):
    bh, t = tl.program_id(0), tl.program_id(1)
    lo = tl.load(start_ptr + t)
    hi = tl.load(start_ptr + t + 1)
    base = x_ptr + bh.to(tl.int64) * S * D  # 64-bit: B * H * S * D can pass 2**31
    d = tl.arange(0, D)
    acc = tl.full([D], 0.0, tl.float32)
    for r0 in range(lo, hi, CHUNK):  # CHUNK rows at a time: a whole tile of hundreds of tokens would spill registers
        rows = r0 + tl.arange(0, CHUNK)
        ok = rows < hi
        tok = tl.load(order_ptr + rows, mask=ok, other=0)  # token index of each tile position
        x = tl.load(base + tok[:, None] * D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        acc += tl.sum(x, axis=0)
    mean = acc / (hi - lo).to(tl.float32)
    tl.store(out_ptr + (bh.to(tl.int64) * tl.num_programs(1) + t) * D + d, mean)


def tile_means(x: torch.Tensor, order: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D) -> (B, H, nT, D) float32 means of the tokens ``order[bounds[t]:bounds[t+1]]``."""
    B, H, S, D = x.shape
    nT = bounds.numel() - 1
    if D & (D - 1):
        raise ValueError(f"tile_means needs a power-of-two head_dim, got {D}")
    out = torch.empty(B, H, nT, D, device=x.device, dtype=torch.float32)
    _pool[(B * H, nT)](x.contiguous(), order.to(x.device, torch.int64), bounds.to(x.device, torch.int64), out, S, D=D, CHUNK=32)
    return out
