"""Float64 golden of ``Quest`` (Tang et al. 2024) decode, written from the paper's rule with plain loops:
per page, the elementwise max / min of its keys; a page's criticality for query q is
sum_d max(q_d * max_d, q_d * min_d) (GQA: the largest over the query heads sharing the KV head); the first
page and the query's own (last) page are always read, plus the most critical others, budget // page
pages in all; attention over the keys of the read pages. ``pooled``: round(pooled x chosen) of the chosen pages
are instead those of largest mean-key score q . mean(keys) (GQA: the largest over the group) among the pages
the bound did not pick."""
from __future__ import annotations

import math


def quest_keep(q, k, off, budget, page, dense=False, pooled=0.0):
    """keep(b, h, i, j) of a Quest decode call (one query at position ``off``); ``dense``: every key."""
    B, H, Sq, D = q.shape
    Skv, rep = k.shape[2], H // k.shape[1]
    last = (Skv - 1) // page
    if dense or Sq != 1 or last + 1 <= budget // page:
        return lambda b, h, i, j: j <= i + off
    kept = {}
    for b in range(B):
        for g in range(k.shape[1]):
            score = {}
            for p in range(1, last):
                keys = k[b, g, p * page:(p + 1) * page].double()  # (page, D)
                mx, mn = keys.amax(0).tolist(), keys.amin(0).tolist()
                score[p] = max(sum(max(x * a, x * c) for x, a, c in zip(q[b, h, 0].double().tolist(), mx, mn))
                               for h in range(g * rep, (g + 1) * rep))
            chosen = budget // page - 2
            by_mean = round(chosen * pooled)
            top = sorted(score, key=lambda p: -score[p])[:chosen - by_mean]
            mean = {}
            for p in set(score) - set(top):
                mu = k[b, g, p * page:(p + 1) * page].double().mean(0).tolist()
                mean[p] = max(sum(x * m for x, m in zip(q[b, h, 0].double().tolist(), mu)) for h in range(g * rep, (g + 1) * rep))
            top += sorted(mean, key=lambda p: -mean[p])[:by_mean]
            kept[b, g] = {0, last, *top}
    return lambda b, h, i, j: j <= i + off and j // page in kept[b, h // rep]


def quest_pages(q, k, off, budget, page) -> int:
    """Pages a decode call reads (the budget, or all of them when they fit)."""
    return min(budget // page, math.ceil(k.shape[2] / page))
