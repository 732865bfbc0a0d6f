"""Float64 goldens of data-dependent sparse methods (TopKBlocks, VerticalSlash): each selects its
own blocks / columns / diagonals from q and k with plain loops, from the documented rule."""
from __future__ import annotations

import math

import torch

from goldens import NEG, causal, coords, per_axis


def top_blocks(est_row, forced_row, keep=None, mass=None, allowed=None):
    """Kept key blocks of one query block: the forced ones, then by estimated mass, either until
    ``ceil(keep * allowed)`` blocks in all or while the mass taken so far is below ``mass``."""
    cand = [j for j in range(len(est_row)) if allowed is None or allowed[j]]
    kept = [j for j in cand if forced_row[j]]
    rest = sorted((j for j in cand if not forced_row[j]), key=lambda j: -est_row[j])
    if mass is not None:
        acc = sum(est_row[j] for j in kept)
        for j in rest:
            if acc >= mass:
                break
            kept.append(j)
            acc += est_row[j]
    else:
        budget = max(1, math.ceil(keep * len(cand) - 1e-9))
        kept += rest[:max(0, budget - len(kept))]
    return set(kept)


def block_estimate(q, k, q_groups, k_groups, allowed=None):
    """(nq, nk) estimated attention share per block pair, averaged over batch and heads: softmax over
    key blocks of mean(q) . mean(k) * scale + log |key block|."""
    B, H, _, D = q.shape
    rep = H // k.shape[1]
    nq, nk = len(q_groups), len(k_groups)
    est = torch.zeros(nq, nk, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            pq = torch.stack([q[b, h, g].double().mean(0) for g in q_groups])
            pk = torch.stack([k[b, h // rep, g].double().mean(0) for g in k_groups])
            logit = pq @ pk.T * D ** -0.5 + torch.tensor([math.log(len(g)) for g in k_groups], dtype=torch.float64)
            if allowed is not None:
                logit = logit.masked_fill(~allowed, NEG)
            est += torch.softmax(logit, -1)
    return est / (B * H)


def topk_grid_keep(q, k, site, keep=None, mass=None, block=None, local=0, score="mean", stride=8, scope="query",
                   partition=None):
    """TopKBlocks on a grid: tiles of ``block`` per axis (default ~256 tokens; with ``partition``, the
    tiling of the site's layer), estimate by ``score``, keep per query tile or over the whole map."""
    S = q.shape[2]
    cs, grid = coords(site, S)
    base = {1: (256,), 2: (16, 16), 3: (2, 8, 16)}[len(grid)]
    tile = tuple(per_axis(block, a) if block else min(n, base[a]) for a, n in enumerate(grid))
    tile = layer_tile(grid, tile, partition, site.layer)
    tiles = sorted({tuple(c[a] // tile[a] for a in range(len(grid))) for c in cs if c is not None})
    tid = {t: n for n, t in enumerate(tiles)}
    of = [None if c is None else tid[tuple(c[a] // tile[a] for a in range(len(grid)))] for c in cs]
    groups = [[i for i in range(S) if of[i] == t] for t in range(len(tiles))]  # each tile's tokens, row-major
    if score == "antidiagonal":
        est = antidiagonal_estimate(q, k, groups, stride)
    elif score == "similarity":
        est = similarity_estimate(q, k, groups, scope)
    else:
        est = block_estimate(q, k, groups, groups)
    forced = [[max(abs(x - y) for x, y in zip(ta, tb)) <= local for tb in tiles] for ta in tiles]
    if scope == "global":
        pairs = top_pairs_global(est.tolist(), forced, keep, mass)
        kept = [{j for (i, j) in pairs if i == t} for t in range(len(tiles))]
    else:
        kept = [top_blocks(est[t].tolist(), forced[t], keep, mass) for t in range(len(tiles))]
    return lambda b, h, i, j: of[i] is None or of[j] is None or of[j] in kept[of[i]]


def layer_tile(grid, tile, partition, layer):
    """VMoBA's layer-wise recurrent partition: ``"cycle"`` tiles along the first axis only, the other
    axes only, then every axis (layer % 3; a 1-D grid has one tiling); a tuple of tiles cycles as given."""
    if partition is None:
        return tile
    tiles = ([tile] if len(grid) == 1 else [(tile[0], *grid[1:]), (grid[0], *tile[1:]), tile]) if partition == "cycle" \
        else partition
    return tuple(min(n, b) for n, b in zip(grid, tiles[layer % len(tiles)]))


def antidiagonal_estimate(q, k, groups, stride):
    """XAttention: each tile's tokens (row-major) cut into groups of ``stride`` (the last one short: zero
    padding); a query group scores a key group by sum_t q[a][S-1-t] . k[c][t] / (sqrt(D) S); softmax over
    all key groups; a tile pair sums its groups' shares, divided by the query tile's group count;
    averaged over batch and heads."""
    B, H, _, D = q.shape
    rep = H // k.shape[1]
    chunks = [(t, g[i:i + stride]) for t, g in enumerate(groups) for i in range(0, len(g), stride)]
    count = [sum(1 for t, _ in chunks if t == u) for u in range(len(groups))]
    est = torch.zeros(len(groups), len(groups), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            Q, K = q[b, h].double(), k[b, h // rep].double()
            logit = torch.tensor([[sum(float(Q[a[stride - 1 - t]] @ K[c[t]]) for t in range(stride)
                                       if stride - 1 - t < len(a) and t < len(c)) for _, c in chunks] for _, a in chunks],
                                 dtype=torch.float64)
            p = torch.softmax(logit / (math.sqrt(D) * stride), -1)
            for x, (ta, _) in enumerate(chunks):
                for y, (tc, _) in enumerate(chunks):
                    est[ta, tc] += p[x, y] / count[ta]
    return est / (B * H)


def similarity_estimate(q, k, groups, scope):
    """VMoBA's gate mean(q_tile) . mean(k_tile), min-max normalised per row ("query") or per map
    ("global") for each (batch, head) (a range <= 1e-6 is left unscaled), averaged, then scaled so each
    row (query) or the whole map (global) sums to 1."""
    B, H, _, D = q.shape
    rep = H // k.shape[1]
    est = torch.zeros(len(groups), len(groups), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            pq = torch.stack([q[b, h, g].double().mean(0) for g in groups])
            pk = torch.stack([k[b, h // rep, g].double().mean(0) for g in groups])
            s = pq @ pk.T
            lo = s.amin(-1, keepdim=True) if scope == "query" else s.min()
            hi = s.amax(-1, keepdim=True) if scope == "query" else s.max()
            span = hi - lo
            est += (s - lo) / torch.where(span <= 1e-6, torch.ones_like(span), span)
    est /= B * H
    return est / (est.sum(-1, keepdim=True) if scope == "query" else est.sum())


def top_pairs_global(est, forced, keep=None, mass=None):
    """VMoBA's global selection: forced pairs, then every other pair of the map by estimate, either
    until ``ceil(keep * n^2)`` pairs in all or while the share of the map's total taken is below ``mass``."""
    n = len(est)
    kept = {(i, j) for i in range(n) for j in range(n) if forced[i][j]}
    rest = sorted(((i, j) for i in range(n) for j in range(n) if not forced[i][j]), key=lambda p: -est[p[0]][p[1]])
    if mass is not None:
        total = sum(map(sum, est))
        acc = sum(est[i][j] for i, j in kept) / total
        for i, j in rest:
            if acc >= mass:
                break
            kept.add((i, j))
            acc += est[i][j] / total
    else:
        kept |= set(rest[:max(0, math.ceil(keep * n * n - 1e-9) - len(kept))])
    return kept


def topk_causal_keep(q, k, off, keep=None, mass=None, block=256, local=0):
    """TopKBlocks causal: key blocks of ``block``; query rows grouped by the block of their own
    position; the first block and the max(1, local) blocks before the own one always kept."""
    Sq, Skv = q.shape[2], k.shape[2]
    nk = math.ceil(Skv / block)
    qb_of = [(i + off) // block for i in range(Sq)]
    qbs = sorted(set(qb_of))
    q_groups = [[i for i in range(Sq) if qb_of[i] == g] for g in qbs]
    k_groups = [list(range(c * block, min(Skv, (c + 1) * block))) for c in range(nk)]
    allowed = torch.tensor([[c <= g for c in range(nk)] for g in qbs])
    est = block_estimate(q, k, q_groups, k_groups, allowed)
    kept = {}
    for r, g in enumerate(qbs):
        forced = [c == 0 or c >= g - max(1, local) for c in range(nk)]
        kept[g] = top_blocks(est[r].tolist(), forced, keep, mass, allowed[r].tolist())
    return causal(lambda p, j: j // block in kept[p // block], off)


def vertical_slash_keep(q, k, off, verticals, slashes, last_q, sink, window, forced_in_budget=False, block=None):
    """MInference vertical-slash: per (row, head), softmax of the last ``last_q`` queries (causal);
    vertical score = column sum, slash score = sum along each diagonal offset p - j; keep the top
    ``verticals`` columns, top ``slashes`` offsets, sink and local window (causal).
    ``block``: MInference's kernel granularity: rows in blocks of ``block`` positions; a row keeps every key
    one of the kept offsets (top slashes, window) reaches in some row of its block (within the call).
    ``forced_in_budget``: the authors' code (``vertical[..., :30] = inf``, ``slash[..., -100:] = inf``
    before ``topk``): the sink columns and window diagonals count inside the two budgets."""
    B, H, Sq, D = q.shape
    Skv, rep = k.shape[2], H // k.shape[1]
    L = min(last_q, Sq)
    tables = {}
    for b in range(B):
        for h in range(H):
            vert, slash = [0.0] * Skv, [0.0] * Skv
            for i in range(Sq - L, Sq):
                p = i + off
                s = torch.tensor([float(q[b, h, i].detach().double() @ k[b, h // rep, j].detach().double()) * D ** -0.5 for j in range(p + 1)])
                a = torch.softmax(s, 0).tolist()
                for j in range(p + 1):
                    vert[j] += a[j]
                    slash[p - j] += a[j]
            if forced_in_budget:
                vert = [math.inf if j < sink else x for j, x in enumerate(vert)]
                slash = [math.inf if o < window else x for o, x in enumerate(slash)]
            top_v = set(sorted(range(Skv), key=lambda j: -vert[j])[:verticals])
            top_s = set(sorted(range(Skv), key=lambda o: -slash[o])[:slashes])
            tables[b, h] = top_v, top_s

    def keep(b, h, i, j):
        p = i + off
        top_v, top_s = tables[b, h]
        if block:  # blocks of positions, cut at the call's first and last rows
            first, last = max(p - p % block, off), min(p - p % block + block - 1, Sq - 1 + off)
            diag = any(first - o <= j <= last - o for o in top_s | set(range(window)))
        else:
            diag = (p - j) in top_s or p - j < window
        return j <= p and (j in top_v or diag or j < sink)
    return keep
