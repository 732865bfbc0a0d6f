"""``buckets``: a plan given as pieces (``Plan.buckets``: HyperAttention's sorted LSH blocks, sampled
residual and causal recursion) run at the cost of what the pieces hold, never building the
(S_q, S_kv) score table the plan's mask_mod / score_mod describe for the other kernels.

Per piece, an exact one is one fused attention call that returns each row's log-sum-exp (causal
squares run as ``is_causal``); a sorted one gathers its queries into block order (``nb`` blocks side by side
in the batch axis, the uneven query counts padded) and, per block, its block's keys followed by the drawn keys
(weight nk / m each, masked in their own block; the short last key block's padding masked) for one fused call:
no separate residual pass and no merge. Its rows go back to their order by one gather, and merge by the LSE with
the other pieces of the same rows, in place. float32 accumulation.
"""
from __future__ import annotations

import math

import torch

from ..ops.bias import additive
from ..ops.lse import dense_lse, merge_into, sdpa_lse, sdpa_lse_math
from ..plan import Piece, Plan
from .base import Kernel


class Buckets(Kernel):
    name = "buckets"

    def why_not(self, q, k, v, plan: Plan, mask=None):
        if plan.buckets is None:
            return "plan has no bucket structure (Plan.buckets)"
        if mask is not None:
            return "a model mask (the pieces are the call's whole pattern)"
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return "autograd (the fused LSE kernels give no gradient through the LSE)"
        return None

    def run(self, q, k, v, plan: Plan, *, mask=None, scale=None):
        B, Hq, Sq, D = q.shape
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        if plan.q_scale is not None:
            q = q * plan.q_scale  # a q_scale left on the plan (core folds it first; direct callers may not)
        rep = Hq // k.shape[1]  # GQA: k / v keep their heads; pieces read a query head's KV head (no repeated copy)
        work = torch.promote_types(q.dtype, torch.float32)
        dtype = q.dtype
        if dtype != work:  # half / bfloat16: every piece in float32 (each piece's rounding would add up over the merges)
            q, k, v = q.to(work), k.to(work), v.to(work)
        out = torch.empty(B, Hq, Sq, v.shape[3], dtype=work, device=q.device)
        lse = torch.empty(B, Hq, Sq, dtype=work, device=q.device)
        seen = [False] * Sq  # rows some piece has written (the recursion's row ranges nest: all or none)
        for piece in plan.buckets.pieces:
            rows = slice(piece.q0, piece.q0 + piece.nq)
            qs, ks, vs = q[:, :, rows], k[:, :, piece.k0:piece.k0 + piece.nk], v[:, :, piece.k0:piece.k0 + piece.nk]
            o, l = _exact(qs, ks, vs, piece.causal, scale) if piece.order_q is None else _sorted(qs, ks, vs, piece, scale, rep)
            if not any(seen[rows]):
                out[:, :, rows], lse[:, :, rows] = o, l
            else:  # merged into the rows' running result in place (views of out / lse: no copies back)
                merge_into(out[:, :, rows], lse[:, :, rows], o, l)
            seen[rows] = [True] * piece.nq
        return out.to(dtype)


def _rows(x, idx, rep: int = 1):
    """Rows ``idx`` (B, H, n) per (batch, query head) of x (B, H / rep, S, D), query head h reading head h // rep
    (GQA), as (B, H, n, D): one index_select on the flattened rows (a 4-D gather with an expanded index costs ~3x
    as much on CPU; a repeated copy of k / v per query head cost ~0.12 of a 1K call)."""
    B, Hx, S, D = x.shape
    H = idx.shape[1]
    base = ((torch.arange(B, device=x.device)[:, None] * Hx + torch.arange(H, device=x.device) // rep) * S).view(B, H, 1)
    return x.reshape(B * Hx * S, D).index_select(0, (idx + base).reshape(-1)).view(B, H, idx.shape[-1], D)


def _exact(q, k, v, causal: bool, scale):
    got = dense_lse(q, k, v, scale=scale, causal=causal)
    if got is None:
        bias = None
        if causal:
            keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
            bias = additive(keep, q.dtype)
        rep = q.shape[1] // k.shape[1]  # the explicit path has no GQA: each query head gets its KV head's copy
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return sdpa_lse_math(q, k, v, bias, scale)
    return got


def _sorted(q, k, v, p: Piece, scale, rep: int = 1):
    """(out, lse) of one sorted piece: each query block on its block's keys and the drawn keys outside the block
    (weight nk / m each), one fused call for all blocks: a draw is a key of every block's call, masked in its own
    block (there it counts among the block's keys). k / v may hold fewer (GQA) heads than q (query head h reads
    KV head h // rep)."""
    B, H, nq, D = q.shape
    nk, block = p.nk, p.block
    nb = -(-nk // block)
    dev = q.device
    per = -(-nq // nb)  # queries per block at most (place p is in block p * nb // nq)
    place = torch.arange(nq, device=dev)
    q_blk_of_place = place * nb // nq
    first = torch.searchsorted(q_blk_of_place, torch.arange(nb, device=dev))  # first place of each block
    slot = first[:, None] + torch.arange(per, device=dev)  # (nb, per) places, padded past the block's end
    last = torch.cat([first[1:], first.new_tensor([nq])])
    valid = slot < last[:, None]  # (nb, per)
    slot = torch.where(valid, slot, first[:, None])  # padding rows repeat the block's first query (dropped)
    qi = p.order_q.gather(2, slot.reshape(1, 1, -1).expand(B, H, -1))  # (B, H, nb * per) row of each slot
    kslot = torch.arange(nb * block, device=dev).clamp_max(nk - 1)
    ki = p.order_k.gather(2, kslot.expand(B, H, -1)).view(B, H, nb, block)  # each block's keys
    bias = torch.zeros(nb, block, dtype=q.dtype, device=dev)
    if nb * block > nk:  # the last block is short: its padding keys are masked
        bias.masked_fill_(torch.arange(nb * block, device=dev).reshape(nb, block) >= nk, float("-inf"))
    bias = bias.expand(H, nb, block)
    if p.drawn is not None and nb > 1:  # the draws (H, m) are sorted key places, the same for every batch row
        m, drawn = p.drawn.shape[-1], p.drawn.to(dev)
        dk = p.order_k.gather(2, drawn.expand(B, H, m))  # (B, H, m) key of each draw
        ki = torch.cat([ki, dk[:, :, None, :].expand(B, H, nb, m)], 3)  # (B, H, nb, block + m)
        own = (drawn // block)[:, None, :] == torch.arange(nb, device=dev)[:, None]  # (H, nb, m): in that block
        bias = torch.cat([bias, torch.where(own, float("-inf"), math.log(nk / m)).to(q.dtype)], 2)
    width = ki.shape[3]
    qb = _rows(q, qi).view(B, H * nb, per, D)
    kb = _rows(k, ki.view(B, H, -1), rep).view(B, H * nb, width, D)
    vb = _rows(v, ki.view(B, H, -1), rep).view(B, H * nb, width, v.shape[3])
    masked = width > block or nb * block > nk  # draws or a short last block: else no bias (a masked call costs more)
    ob, lb = sdpa_lse(qb, kb, vb, bias.reshape(1, H * nb, 1, width) if masked else None, scale)
    # back to row order in one gather: row r sits at place order_q^-1[r], i.e. slot blk * per + (place - first[blk])
    at = q_blk_of_place * per + place - first[q_blk_of_place]  # (nq,) slot of each place
    slot_of_row = torch.empty_like(p.order_q).scatter_(2, p.order_q, at.expand(B, H, nq))  # (B, H, nq)
    return _rows(ob.reshape(B, H, nb * per, -1), slot_of_row), lb.reshape(B, H, nb * per).gather(2, slot_of_row)
