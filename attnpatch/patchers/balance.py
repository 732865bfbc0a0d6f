"""Head load balance under Ulysses context parallelism.

Ulysses deals a call's H heads to N ranks in order (rank r: heads [r H/N, (r+1) H/N)); the ranks
wait for the slowest at the next all-to-all. A static sparse plan's work per head is its
block-sparse density (``BlockSparse.density``: the fraction of the score matrix a block-sparse
kernel computes); dense heads, and heads a plan leaves dense, count 1. With a per-head profile the
heads differ, and dealing them in order can pile the dense ones on one rank: ``order`` then deals
them by work (largest first, each to the least loaded rank with room), H / N per rank, which is
exact (the heads are permuted before the exchange and the output permuted back).

Data-dependent plans (their density depends on the inputs) and guidance are not estimated: every
head counts 1 for them and the order stays as it is.
"""
from __future__ import annotations

import torch


def head_work(method, site, H: int, S_q: int, S_kv: int, D: int = 64) -> torch.Tensor | None:
    """(H,) fraction of the S_q x S_kv scores each head's plan computes at ``site``, from the plans
    ``method`` builds for all H heads (zero-stride stand-in tensors: static plans read only shapes);
    None where a plan is data-dependent (not static) or the method raises on stand-ins."""
    q = torch.zeros(1, 1, 1, D).expand(1, H, S_q, D)
    k = torch.zeros(1, 1, 1, D).expand(1, H, S_kv, D)
    try:
        groups = method.head_plans(q, k, site)
    except Exception:  # noqa: BLE001 - a method that needs real values: no estimate, no reorder
        return None
    work = torch.ones(H)
    for heads, plan in groups:
        if plan is None or (plan.mask_mod is None and plan.blocks is None):
            continue  # dense
        if not plan.static or plan.blocks is None:
            return None
        idx = slice(None) if heads is None else heads
        work[idx] = plan.blocks.density()
    return work


def deal(work: torch.Tensor, N: int) -> list[list[int]]:
    """Heads per rank, H / N each: largest work first, each to the least loaded rank with room
    (ties: the lower rank, then the lower head)."""
    H = work.numel()
    per = H // N
    ranks: list[list[int]] = [[] for _ in range(N)]
    load = [0.0] * N
    for h in sorted(range(H), key=lambda h: (-float(work[h]), h)):
        r = min((r for r in range(N) if len(ranks[r]) < per), key=lambda r: (load[r], r))
        ranks[r].append(h)
        load[r] += float(work[h])
    return [sorted(hs) for hs in ranks]


def imbalance(work: torch.Tensor, ranks: list[list[int]]) -> float:
    """max / mean of the ranks' summed work (1 = balanced)."""
    loads = torch.tensor([float(work[hs].sum()) for hs in ranks])
    return float(loads.max() / loads.mean()) if float(loads.mean()) > 0 else 1.0


def in_order(H: int, N: int) -> list[list[int]]:
    per = H // N
    return [list(range(r * per, (r + 1) * per)) for r in range(N)]


def order(work: torch.Tensor | None, N: int, threshold: float = 1.02) -> torch.Tensor | None:
    """The heads in rank order when dealing by work beats dealing in order by more than
    ``threshold`` (max / mean); None: keep Ulysses' own order."""
    if work is None:
        return None
    H = work.numel()
    dealt = deal(work, N)
    if imbalance(work, in_order(H, N)) <= threshold * imbalance(work, dealt):
        return None
    return torch.tensor([h for hs in dealt for h in hs])
