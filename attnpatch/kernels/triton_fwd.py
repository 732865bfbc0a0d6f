"""The Triton block-sparse flash-attention forward (GPU; runs on CPU under TRITON_INTERPRET=1).

One program per (query block, batch x head) walks its list of KV blocks (``kv_idx``), with an
online softmax; partial blocks apply a precomputed bit mask; optional additive per-row and
per-column score biases are fused. Returns the output and the log-sum-exp of every row.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Imported lazily by the ``triton`` kernel: TRITON_INTERPRET must be set before this import
# for the CPU interpreter to take over.


@triton.jit
def _fwd(Q, K, V, O, LSE, KV_PTR, KV_IDX, MASK_ID, MASKS, RB, CB, scale, S, H, REP,
         sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
         HAS_RB: tl.constexpr, HAS_CB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         D: tl.constexpr, PRECISION: tl.constexpr):
    mb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: batch x head strides of a long video can pass 2**31 elements
    b = bh // H
    h = bh % H
    hk = h // REP  # GQA: the key / value head of this query head
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < S
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)  # tl.zeros is a nested jit fn the interpreter cannot run
    acc = tl.full([BLOCK_M, D], 0.0, tl.float32)
    if HAS_RB:
        rb = tl.load(RB + bh * S + offs_m, mask=row_ok, other=0.0).to(tl.float32)
    start = tl.load(KV_PTR + mb)
    end = tl.load(KV_PTR + mb + 1)
    for i in range(start, end):
        nb = tl.load(KV_IDX + i)
        mid = tl.load(MASK_ID + i)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < S
        k = tl.load(K + b * skb + hk * skh + offs_n[None, :] * sks + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION).to(tl.float32) * scale  # (BLOCK_M, BLOCK_N)
        if HAS_RB:
            s += rb[:, None]
        if HAS_CB:
            s += tl.load(CB + bh * S + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        ok = col_ok[None, :] & row_ok[:, None]
        if mid >= 0:
            bits = tl.load(MASKS + mid.to(tl.int64) * BLOCK_M * BLOCK_N + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N
                           + tl.arange(0, BLOCK_N)[None, :])
            ok = ok & (bits != 0)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svs + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh * S + offs_m, lse, mask=row_ok)


def uniform_layout(bs, block: int, mask_mod, device) -> dict:
    """Re-cut a BlockSparse (variable blocks, tile order) into uniform ``block``-token blocks:
    CSR over query blocks, and a bit mask for every partial pair (from the exact mask_mod)."""
    key = ("triton", block, str(device))
    if key in bs.cache:
        return bs.cache[key]
    nb, S = bs.num_blocks, bs.seq_len
    state = torch.zeros(nb, nb, dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(nb), bs.kv_ptr.diff())
    state[rows, bs.kv_idx] = torch.where(bs.kv_full, 2, 1)
    nu = math.ceil(S / block)
    starts = torch.arange(nu) * block
    first = torch.searchsorted(bs.bounds, starts, right=True) - 1  # variable block of each uniform start
    last = torch.searchsorted(bs.bounds, (starts + block).clamp_max(S), right=False) - 1
    nz = _box_sum((state > 0).long(), first, last)  # (nu, nu) non-empty overlapping pairs
    partial = _box_sum((state == 1).long(), first, last)
    empty_pairs = _box_sum((state == 0).long(), first, last)
    ustate = torch.where(nz == 0, 0, torch.where((partial == 0) & (empty_pairs == 0), 2, 1))
    ptr = torch.zeros(nu + 1, dtype=torch.long)
    ptr[1:] = (ustate > 0).sum(1).cumsum(0)
    r, c = (ustate > 0).nonzero(as_tuple=True)
    pr = ustate[r, c] == 1
    mask_id = torch.full_like(r, -1)
    mask_id[pr] = torch.arange(int(pr.sum()))
    perm = torch.arange(S) if bs.perm is None else bs.perm
    tok = torch.arange(nu * block).clamp_max(S - 1)
    qi, ki = perm[tok].view(nu, block)[r[pr]], perm[tok].view(nu, block)[c[pr]]  # (P, block) original indices
    z = torch.zeros(1, dtype=torch.long).view(1, 1, 1)
    masks = mask_mod(z, z, qi[:, :, None], ki[:, None, :]).expand(len(qi), block, block).to(torch.uint8)
    out = dict(block=block, kv_ptr=ptr.to(device, torch.int32), kv_idx=c.to(device, torch.int32),
               mask_id=mask_id.to(device, torch.int32), masks=masks.contiguous().to(device), nu=nu)
    bs.cache[key] = out
    return out


def _box_sum(x: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """sum of x[first[u]..last[u], first[w]..last[w]] for every (u, w), by a summed-area table."""
    sat = torch.zeros(x.shape[0] + 1, x.shape[1] + 1, dtype=torch.long)
    sat[1:, 1:] = x.cumsum(0).cumsum(1)
    a, b = first[:, None], last[:, None] + 1
    c, d = first[None, :], last[None, :] + 1
    return sat[b, d] - sat[a, d] - sat[b, c] + sat[a, c]


def block_sparse_attention(q, k, v, layout: dict, scale=None, row_bias=None, col_bias=None):
    """(out (B, H, S, D), lse (B, H, S) float32) over tile-ordered q, k, v (B, H, S, D), GQA allowed.
    ``row_bias`` / ``col_bias``: additive (B, H, S) score biases per query row / key column."""
    B, H, S, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    o = torch.empty_like(q)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    blk = layout["block"]
    rb = row_bias.float().contiguous() if row_bias is not None else lse  # placeholder pointer when unused
    cb = col_bias.float().contiguous() if col_bias is not None else lse
    _fwd[(layout["nu"], B * H)](
        q, k, v, o, lse, layout["kv_ptr"], layout["kv_idx"], layout["mask_id"], layout["masks"], rb, cb, scale, S, H,
        H // k.shape[1], q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        HAS_RB=row_bias is not None, HAS_CB=col_bias is not None, BLOCK_M=blk, BLOCK_N=blk, D=D,
        PRECISION=dot_precision(q.dtype))
    return o, lse


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: float32 inputs get true float32 products ("ieee"), as PyTorch's own
    attention kernels compute them, unless the user allowed TF32 for matmuls
    (``torch.set_float32_matmul_precision("high")``, or ``torch.backends.cuda.matmul.allow_tf32``, which
    sets the same flag); Triton's default for float32 would be TF32 (~1e-3 error)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored for 16-bit inputs
