"""Block scores and selection rules of ``TopKBlocks`` beyond its default mean pooling.

- ``antidiagonal`` (XAttention, Xu et al. 2025): visual tokens in tile order are cut, tile by tile, into
  groups of ``stride`` (the last group of a tile zero-padded). A query group ``a`` scores a key group
  ``b`` by the sum of its ``stride`` antidiagonal products ``sum_t q[a, S-1-t] . k[b, t]`` scaled by
  ``1 / (sqrt(D) * S)``; a softmax over all key groups turns each query group's row into shares, and a
  tile pair's estimate is the sum of its groups' shares divided by the query tile's group count (so
  each row sums to 1, like the mean estimate). Cost: ``1 / stride`` of the dense ``q k^T`` FLOPs.
- ``similarity`` (VMoBA's training-free threshold, Wu et al. 2025): the gate ``mean(q_tile) .
  mean(k_tile)``, min-max normalised per query tile (``scope="query"``) or over the whole tile map
  (``scope="global"``), per head, then averaged over heads; ``mass`` is then VMoBA's cumulative
  similarity threshold.
- ``select_global``: VMoBA's global block selection: every tile pair of the map competes for one
  budget (``keep``: a fraction of all pairs; ``mass``: a share of the whole map), rather than a
  budget per query tile; forced pairs are kept and counted first.
- ``partition_tiles``: VMoBA's layer-wise recurrent 1-D / 2-D / 3-D partition: layer ``l`` tiles the
  grid along the first axis only, the other axes only, or all axes (``l % 3``).
"""
from __future__ import annotations

import math

import torch

SCORES = ("mean", "antidiagonal", "similarity")
SCOPES = ("query", "global")
EPS = 1e-6  # VMoBA's floor on a min-max range (a flat row is left as is)
CHUNK = 1 << 25  # at most this many group-pair scores at once (one (G, G) map per head otherwise)


def partition_tiles(grid: tuple, tile: tuple) -> list[tuple]:
    """VMoBA's cycle of tilings of ``grid`` from the full tile: along the first axis only (temporal for
    video), the other axes only (spatial), every axis (spatio-temporal). A 1-D grid has one tiling."""
    if len(grid) == 1:
        return [tuple(tile)]
    first = (tile[0], *grid[1:])
    rest = (grid[0], *tile[1:])
    return [first, rest, tuple(tile)]


def stride_groups(order: torch.Tensor, sizes: torch.Tensor, n: int, stride: int) -> dict:
    """Index tensors of the antidiagonal estimate: ``src`` (P,) the visual token of every slot of the
    tile-ordered sequence padded per tile to a multiple of ``stride`` (``n``: a zero row), ``gtile`` (G,)
    the tile of each group, ``gcount`` (nT,) groups per tile."""
    nT = sizes.numel()
    padded = (sizes + stride - 1) // stride * stride
    start = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
    pstart = torch.cat([torch.zeros(1, dtype=torch.long), padded.cumsum(0)[:-1]])
    slot_tile = torch.repeat_interleave(torch.arange(nT), padded)  # (P,)
    off = torch.arange(slot_tile.numel()) - pstart[slot_tile]
    real = off < sizes[slot_tile]
    src = torch.where(real, order.cpu()[(start[slot_tile] + off).clamp_max(max(n - 1, 0))], n)
    return dict(src=src, gtile=slot_tile[::stride].contiguous(), gcount=padded // stride)


def _grouped(x: torch.Tensor, src: torch.Tensor, stride: int, flip: bool) -> torch.Tensor:
    """(B, h, n, D) visual rows -> (B, h, G, stride * D): each group's rows side by side (reversed
    for queries, so the product of a query group and a key group sums an antidiagonal)."""
    B, h, _, D = x.shape
    x = torch.cat([x.float(), x.new_zeros(B, h, 1, D, dtype=torch.float32)], 2)[:, :, src]  # (B, h, P, D)
    x = x.view(B, h, -1, stride, D)
    return (x.flip(3) if flip else x).reshape(B, h, -1, stride * D)


def antidiagonal(q: torch.Tensor, k: torch.Tensor, v0: int, n: int, groups: dict, stride: int, head_mean) -> torch.Tensor:
    """(nT, nT) XAttention estimate (see the module doc), averaged over batch and heads by ``head_mean``."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    src, gtile, gcount = (groups[name].to(q.device) for name in ("src", "gtile", "gcount"))
    G, nT = gtile.numel(), gcount.numel()
    qg = _grouped(q[:, :, v0:v0 + n], src, stride, True)  # (B, H, G, S*D)
    kg = _grouped(k[:, :, v0:v0 + n], src, stride, False)  # (B, Hkv, G, S*D)
    rep = H // max(Hkv, 1)
    out = torch.zeros(B, H, nT, nT, device=q.device)
    step = max(1, CHUNK // max(G * G, 1))  # query heads per chunk
    for h0 in range(0, H, step):
        hs = slice(h0, min(H, h0 + step))
        kh = torch.arange(hs.start, hs.stop, device=q.device) // rep
        p = torch.softmax(qg[:, hs] @ kg[:, kh].transpose(-1, -2) * (D ** -0.5 / stride), -1)  # (B, h, G, G)
        cols = p.new_zeros(*p.shape[:3], nT).index_add_(3, gtile, p)  # (B, h, G, nT)
        out[:, hs] = cols.new_zeros(*p.shape[:2], nT, nT).index_add_(2, gtile, cols)
    return head_mean(out / gcount.to(out.dtype)[:, None])


def similarity(pq: torch.Tensor, pk: torch.Tensor, scope: str, head_mean) -> torch.Tensor:
    """(nT, nT) VMoBA estimate from pooled (B, H, nT, D) queries and (B, Hkv, nT, D) keys: the gate
    ``pq . pk`` min-max normalised per row (query scope) or per map (global), averaged over heads, and
    scaled to shares (each row sums to 1 for the query scope; the map sums to 1 for the global one)."""
    B, H, nq, D = pq.shape
    Hkv, nk = pk.shape[1], pk.shape[2]
    s = (pq.view(B, Hkv, H // max(Hkv, 1) * nq, D) @ pk.transpose(-1, -2)).view(B, H, nq, nk)
    dims = (-1,) if scope == "query" else (-2, -1)
    lo, hi = s.amin(dims, keepdim=True), s.amax(dims, keepdim=True)
    span = hi - lo
    est = head_mean((s - lo) / torch.where(span <= EPS, torch.ones_like(span), span))
    total = est.sum(dims, keepdim=True)
    return est / total.clamp_min(torch.finfo(est.dtype).tiny)


def select_global(est: torch.Tensor, forced: torch.Tensor, keep: float | None, mass: float | None) -> torch.Tensor:
    """(nT, nT) kept pairs when every pair of the map competes: forced ones, then the largest
    estimates, ``ceil(keep * nT^2)`` pairs in all, or while the share taken so far is below ``mass``."""
    flat, f = est.flatten(), forced.flatten()
    N = flat.numel()
    order = flat.masked_fill(f, -math.inf).argsort(descending=True, stable=True)  # free pairs first, by estimate
    free = ~f[order]
    if mass is not None:
        share = flat / flat.sum().clamp_min(torch.finfo(flat.dtype).tiny)
        s = share[order].masked_fill(~free, 0.0)
        take = s.cumsum(0) - s + share[f].sum() < mass  # a pair is taken while the share before it falls short
    else:
        budget = max(0, math.ceil(keep * N - 1e-9) - int(f.sum()))
        take = torch.arange(N, device=est.device) < budget
    kept = torch.zeros_like(f).scatter_(0, order, take & free)
    return (kept | f).view_as(forced)
