"""``gather``: a static masked plan as one SDPA call over each query block's own keys.

Block-sparse tiles skip whole (query tile, key tile) blocks, so a fine pattern on a small grid (a
9 x 9 neighbourhood on 32 x 32 tokens) keeps 60-90 % of the blocks and runs no faster than masked
dense SDPA, which itself costs 10-25 % more than stock. Here the queries are cut into blocks of T
consecutive rows; each block attends to the union of the keys its rows keep (gathered side by side,
padded to the widest block) under an additive bias for the exact pattern, all blocks in one SDPA
call (blocks on the head axis, query heads folded into the batch, so one (blocks, T, keys) bias
serves every head and batch row). The layout (T chosen by the cost model, key indices, bias) is
derived once from the plan's materialised mask and cached on the (static) plan per shape.

Capable for static plans whose mask is the same for every batch row and head and in which every
row keeps a key, without score_mod or a model mask, up to ``MAX_ELEMS`` mask elements (the layout
reads the whole mask once).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.bias import additive
from ..plan import Plan, fold_q_scale, materialise_mask
from .base import Kernel

MAX_ELEMS = 1 << 25  # 32M mask elements (e.g. 5.6K x 5.6K): the one-off layout reads the whole mask
ROWS = (32, 64, 128)  # query block heights tried (the CPU flash kernel runs 16-row blocks at a third of its rate)
BLOCK_OVERHEAD = 8.0  # a block of T rows costs (1 + BLOCK_OVERHEAD / T) x its scores (fitted: 2-core CPU, D 24)
GATHER_WEIGHT = 1.0  # gathered k / v bytes at the calibrated gather_s_per_byte (a quarter chose gather at D 128, 2x slower)


def layout(plan: Plan, Sq: int, Skv: int, device, rows: int | None) -> dict:
    """Cached on the plan: the queries in blocks (``rows`` consecutive rows each, or None: the plan's own
    tile blocks, ``plan.blocks``, in its tile order: a tile's queries share their keys, raster rows do not),
    ``qidx`` (nb * T,) the query row of each slot (short blocks repeat their last row; those outputs are
    dropped) and ``slot`` (Sq,) each row's slot, None when slots are rows 0 .. Sq - 1 in order. The blocks
    fall in at most two groups by width (a few wide blocks, such as joint attention's text rows that see
    every key, must not pad every other block to their width), each with its ``blocks``, ``cols`` (n, K)
    key indices (padding repeats a kept key) and additive ``bias`` (1, n, T, K); ``cost``: scores computed."""
    memo = plan.__dict__.setdefault("_gather", {})
    key = (Sq, Skv, str(device), rows)
    if key in memo:
        return memo[key]
    keep = _keep(plan, Sq, Skv, device)
    qidx, T = _slots(plan, Sq, device, rows)
    nb = qidx.numel() // T
    blocks = keep.index_select(0, qidx).view(nb, T, Skv)
    used = blocks.any(1)  # (nb, Skv) keys some row of the block keeps
    width = used.sum(-1)
    order = width.argsort(descending=True)
    w = width[order].tolist()
    # split after the i widest blocks: scores i * w[0] + (nb - i) * w[i] (one group when i = 0 is best)
    split = min(range(nb), key=lambda i: i * w[0] + (nb - i) * w[i] + (nb * Skv // 50 if i else 0))  # 2 %: a call
    groups = []
    for part in ([order[:split], order[split:]] if split else [order]):
        part = part.sort().values
        groups.append(_group(blocks[part], used[part], part, Skv, device))
    slot = None
    if not torch.equal(qidx[:Sq], torch.arange(Sq, device=device)):
        slot = torch.empty(Sq, dtype=torch.long, device=device)
        slot[qidx.flip(0)] = torch.arange(qidx.numel() - 1, -1, -1, device=device)  # a row's first slot wins
    memo[key] = dict(groups=groups, nb=nb, rows=T, qidx=qidx, slot=slot, cost=T * sum(len(g["blocks"]) * g["K"] for g in groups))
    return memo[key]


def _slots(plan: Plan, Sq: int, device, rows: int | None) -> tuple[torch.Tensor, int]:
    """(query row of each slot (nb * T,), T): raster blocks of ``rows``, or the plan's tile blocks."""
    if rows is not None:
        nb = -(-Sq // rows)
        return torch.arange(nb * rows, device=device).clamp_max(Sq - 1), rows
    bounds = plan.blocks.bounds.tolist()
    T = max(b - a for a, b in zip(bounds, bounds[1:]))
    start = torch.tensor(bounds[:-1], device=device)[:, None]
    end = torch.tensor(bounds[1:], device=device)[:, None]
    pos = torch.minimum(start + torch.arange(T, device=device), end - 1).reshape(-1)  # permuted positions
    perm = plan.blocks.perm_on(device)
    return (pos if perm is None else perm[pos]), T


def _group(blocks, used, which, Skv: int, device) -> dict:
    n, rows, _ = blocks.shape
    K = int(used.sum(-1).max())
    idx = torch.arange(Skv, device=device).expand(n, Skv)
    cols = torch.where(used, idx, Skv).sort(-1).values[:, :K]  # kept keys first, ascending
    pad = cols == Skv
    cols = torch.where(pad, cols[:, :1], cols)  # padding points at a kept key, masked below
    kept = blocks.gather(2, cols[:, None, :].expand(n, rows, K)) & ~pad[:, None, :]
    bias = additive(kept, torch.float32)
    return dict(blocks=which, cols=cols, bias=bias[None], K=K)


def _keep(plan: Plan, Sq: int, Skv: int, device) -> torch.Tensor:
    memo = plan.__dict__.setdefault("_gather_keep", {})
    key = (Sq, Skv, str(device))
    if key not in memo:
        memo.clear()  # one shape at a time: the full mask is only needed to derive layouts
        memo[key] = materialise_mask(plan, 1, 1, Sq, Skv, device).expand(1, 1, Sq, Skv)[0, 0]
    return memo[key]


class Gather(Kernel):
    name = "gather"

    def why_not(self, q, k, v, plan: Plan, mask=None):
        reason = static_mask_why_not(q, k, plan, mask, "the layout")
        if reason:
            return reason
        Sq, Skv = q.shape[2], k.shape[2]
        verdict = plan.__dict__.setdefault("_gather_ok", {})
        key = (Sq, Skv, str(q.device))
        if key not in verdict:
            verdict[key] = _capable(plan, q.shape[0], q.shape[1], Sq, Skv, q.device)
        return verdict[key]

    def run(self, q, k, v, plan: Plan, *, mask=None, scale=None):
        B, Hq, Sq, D = q.shape
        Hkv, Skv, Dv = k.shape[1], k.shape[2], v.shape[3]
        lay = layout(plan, Sq, Skv, q.device, best_rows(plan, q, k))
        plan.__dict__.pop("_gather_keep", None)  # the whole mask was needed only to derive the layout
        nb, T = lay["nb"], lay["rows"]
        if lay["slot"] is not None or nb * T != Sq:
            q = q.index_select(2, lay["qidx"])
        q, scale, _ = fold_q_scale(q, scale, plan)  # 16-bit q stays 16-bit (a float32 q_scale would widen it)
        qb = q.reshape(B * Hq, nb, T, D)
        out = None if len(lay["groups"]) == 1 else q.new_empty(B * Hq, nb, T, Dv)
        for g in lay["groups"]:
            n, K = len(g["blocks"]), g["K"]
            idx = _flat(g, B, Hq, Hkv, Skv, q.device)
            kg = k.reshape(-1, D).index_select(0, idx).view(B * Hq, n, K, D)
            vg = v.reshape(-1, Dv).index_select(0, idx).view(B * Hq, n, K, Dv)
            bias = g["bias"] if g["bias"].dtype == q.dtype else g.setdefault(q.dtype, g["bias"].to(q.dtype))
            qg = qb if out is None else qb.index_select(1, g["blocks"])
            o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=bias, scale=scale)
            if out is None:
                out = o
            else:
                out.index_copy_(1, g["blocks"], o)
        out = out.view(B, Hq, nb * T, Dv)
        return out[:, :, :Sq] if lay["slot"] is None else out.index_select(2, lay["slot"])


def _flat(g: dict, B: int, Hq: int, Hkv: int, Skv: int, device) -> torch.Tensor:
    """Flat row indices into k.reshape(B * Hkv * Skv, D) for every (batch, query head, block, slot)."""
    flat = g.setdefault("flat", {})
    key = (B, Hq, Hkv)
    if key not in flat:
        kv_head = torch.arange(B * Hq, device=device) // Hq * Hkv + torch.arange(Hq, device=device).repeat(B) // (Hq // Hkv)
        flat[key] = (kv_head.view(-1, 1, 1) * Skv + g["cols"][None]).reshape(-1)
    return flat[key]


def static_mask_why_not(q, k, plan: Plan, mask, what: str) -> str | None:
    """Why a kernel that derives ``what`` once from a static plan's materialised mask cannot run the call."""
    if plan.mask_mod is None:
        return "plan has no mask_mod (plain SDPA runs it exactly)"
    if not plan.static:
        return f"data-dependent plan ({what} is derived once per static plan)"
    if plan.score_mod is not None or mask is not None:
        return "score_mod or a model mask"
    Sq, Skv = q.shape[2], k.shape[2]
    if Sq * Skv > MAX_ELEMS:
        return f"{Sq} x {Skv} mask elements exceed the layout's limit ({MAX_ELEMS})"
    return None


def _capable(plan: Plan, B: int, H: int, Sq: int, Skv: int, device) -> str | None:
    probe = materialise_mask(plan, B, H, min(Sq, 64), Skv, device)  # the first rows, every batch row and head
    if not bool((probe == probe[:1, :1]).all()):
        return "the mask differs by batch row or head"
    keep = _keep(plan, Sq, Skv, device)
    if not bool(keep.any(-1).all()):
        return "a row keeps no key"
    return None


def best_rows(plan: Plan, q, k) -> int | None:
    """The block height (None: the plan's tile blocks) with the fewest computed scores plus gathered
    keys (a short block gathers its keys for few queries) and per-block overhead; cached per shape."""
    memo = plan.__dict__.setdefault("_gather_rows", {})
    key = (q.shape[2], k.shape[2], str(q.device))
    if key not in memo:
        Sq, Skv = key[:2]
        options = [r for r in ROWS if r <= max(ROWS[0], Sq)]
        if plan.blocks is not None and int(plan.blocks.bounds[-1]) == Sq:
            options.append(None)

        def cost(r):
            lay = layout(plan, Sq, Skv, q.device, r)
            return lay["cost"] * (1 + BLOCK_OVERHEAD / lay["rows"]) + (Sq * q.shape[3] if lay["slot"] is not None else 0)
        memo[key] = best = min(options, key=cost)
        lays = plan.__dict__["_gather"]  # keep only the chosen layout of this shape (the others' biases are large)
        for r in options:
            if r != best:
                lays.pop((Sq, Skv, str(q.device), r), None)
    return memo[key]
