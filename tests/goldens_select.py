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


def topk_grid_keep(q, k, site, keep=None, mass=None, block=None, local=0):
    """TopKBlocks on a grid: tiles of ``block`` per axis (default ~256 tokens), estimate, keep."""
    S = q.shape[2]
    cs, grid = coords(site, S)
    base = {1: (256,), 2: (16, 16), 3: (2, 8, 16)}[len(grid)]
    tile = tuple(per_axis(block, a) if block else min(n, base[a]) for a, n in enumerate(grid))
    tiles = sorted({tuple(c[a] // tile[a] for a in range(len(grid))) for c in cs if c is not None})
    tid = {t: n for n, t in enumerate(tiles)}
    of = [None if c is None else tid[tuple(c[a] // tile[a] for a in range(len(grid)))] for c in cs]
    groups = [[i for i in range(S) if of[i] == t] for t in range(len(tiles))]
    est = block_estimate(q, k, groups, groups)
    forced = [[max(abs(x - y) for x, y in zip(ta, tb)) <= local for tb in tiles] for ta in tiles]
    kept = [top_blocks(est[t].tolist(), forced[t], keep, mass) for t in range(len(tiles))]
    return lambda b, h, i, j: of[i] is None or of[j] is None or of[j] in kept[of[i]]


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


def vertical_slash_keep(q, k, off, verticals, slashes, last_q, sink, window, forced_in_budget=False):
    """MInference vertical-slash: per (row, head), softmax of the last ``last_q`` queries (causal);
    vertical score = column sum, slash score = sum along each diagonal offset p - j; keep the top
    ``verticals`` columns, top ``slashes`` offsets, sink and local window (causal).
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
        return j <= p and (j in top_v or (p - j) in top_s or j < sink or p - j < window)
    return keep
