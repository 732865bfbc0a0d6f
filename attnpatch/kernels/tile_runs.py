"""How the ``tiles`` kernel calls SDPA for a block structure: its runs (``BlockSparse.runs``) as call
groups (consecutive query ranges whose runs move by one stride run as one call), refined by the plan's
mask where that makes them cheaper (causal diagonal blocks, partial runs trimmed to their kept keys,
a causal plan's short runs gathered side by side for one call). Everything here is evaluated once per
block structure and cached on it; tiles.py executes the groups."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blocks import BlockSparse
from ..ops.bias import additive
from ..plan import Plan


@dataclass
class Group:
    """``n`` query ranges ``[q0 + i*dq, q0 + i*dq + L)``; run r of range i is
    ``[k0_r + i*dk_r, k0_r + i*dk_r + Lk_r)``, of kind False (partial), True (full) or CAUSAL;
    ``gather``: the runs' keys are concatenated for one masked call instead of merged parts."""

    n: int
    q0: int
    dq: int
    L: int
    runs: list  # [(k0, dk, Lk, kind)]
    gather: bool = False


def groups(bs: BlockSparse, plan: Plan | None = None, device=None, work: tuple | None = None) -> list[Group]:
    """``bs.runs()`` as call groups (cached on the block structure); with ``plan``, partial runs
    are first refined by the plan's mask (``refine``; evaluated on ``device``, the inputs' device:
    a data-dependent mask_mod holds tensors there) and partial runs join groups too where their
    mask is the same in every range (one bias for the group). ``work`` (batch x query heads, head dim,
    value dim, element bytes, cost constants: ``kernels.cost.work_of``) lets a grid structure's groups gather
    (``_grid_gathers``)."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    key = "tile_groups" if plan is None or not REFINE else ("tile_groups_refined", GATHER_FACTOR, SPLIT_ROWS)
    if plan is not None and REFINE and not bs.causal and work is not None and GRID_GATHER:
        key = (*key, work, dev.type)  # grid gathers are decided by the call's shape and the device's constants
    if key in bs.cache:
        return bs.cache[key]
    out: list[Group] = []
    for qs, qe, runs in (_ranges(plan, bs, dev) if plan is not None and REFINE else bs.runs()):
        g = out[-1] if out else None
        # ranges with the same run lengths and kinds as the group's (and the same masks) join it
        if g is not None and g.L == qe - qs and len(g.runs) == len(runs) \
                and all(r[3] == f and r[2] == ke - ks for r, (ks, ke, f) in zip(g.runs, runs)) \
                and (all(f for _, _, f in runs) or _same_masks(plan, bs, g, qs, runs, dev)):
            if g.n == 1:
                dq, dks = qs - g.q0, [ks - r[0] for r, (ks, _, _) in zip(g.runs, runs)]
                if dq > 0 and min(dks) >= 0:
                    g.dq, g.runs, g.n = dq, [(r[0], d, r[2], r[3]) for r, d in zip(g.runs, dks)], 2
                    continue
            elif qs == g.q0 + g.n * g.dq and all(ks == r[0] + g.n * r[1] for r, (ks, _, _) in zip(g.runs, runs)):
                g.n += 1
                continue
        out.append(Group(1, qs, 0, qe - qs, [(ks, 0, ke - ks, f) for ks, ke, f in runs]))
    if plan is not None and REFINE and bs.causal:
        for g in out:
            g.gather = _gathers(plan, bs, g, dev)
    elif plan is not None and REFINE and work is not None and GRID_GATHER:
        for g in out:
            g.gather = _grid_gathers(plan, bs, g, dev, work)
    bs.cache[key] = out
    return out


# Run kinds: False partial (an additive bias), True full (no mask), CAUSAL a square diagonal block whose
# mask is exactly lower-triangular: one SDPA call with is_causal, no mask tensor (a causal LLM plan's
# diagonal blocks: SinkWindow with window >= block, TopKBlocks' forced diagonal, Power with local >= block).
# On the CPU this saves the mask's read (~10 % of a 256-token block; PyTorch 2.13's flash kernel computes
# nearly the whole block either way); GPU kernels skip the tiles above the diagonal.
CAUSAL = 2
REFINE = True  # module switch: benchmarks compare refined runs with the block runs as stored
MIN_GAP = 64  # masked key columns that split a partial run in two: an LSE part costs about this much work


SPLIT_ROWS = 64  # a causal structure's partial ranges split into ranges of this many rows where that ...
SPLIT_GAIN = 0.6  # ... leaves at most this fraction of the score elements to compute (e.g. Power's scattered keys)


def _ranges(plan, bs: BlockSparse, device):
    """``bs.runs()`` refined (``refine``); in a causal structure a range with partial runs is cut
    into ranges of SPLIT_ROWS rows, each with its own trimmed key runs (keys after its last row are
    masked: causal), where they compute at most SPLIT_GAIN of the range's score elements."""
    for qs, qe, runs in bs.runs():
        whole = refine(plan, bs, qs, qe, runs, device)
        if not (bs.causal and SPLIT_ROWS and qe - qs > SPLIT_ROWS and not all(f for _, _, f in runs)):
            yield qs, qe, whole
            continue
        subs = []
        for a in range(qs, qe, SPLIT_ROWS):
            b = min(qe, a + SPLIT_ROWS)
            clipped = [(ks, min(ke, b), f if ke <= b else False) for ks, ke, f in runs if ks < b]
            subs.append((a, b, refine(plan, bs, a, b, clipped, device)))
        area = lambda rs, L: L * sum(ke - ks for ks, ke, _ in rs)  # noqa: E731
        if sum(area(r, b - a) for a, b, r in subs) <= SPLIT_GAIN * area(whole, qe - qs):
            yield from subs
        else:
            yield qs, qe, whole


def refine(plan: Plan, bs: BlockSparse, qs: int, qe: int, runs: list, device) -> list:
    """The runs of query range [qs, qe) as the plan's mask (evaluated once, so exact for any
    mask_mod) lets them be cheaper: a diagonal block whose mask is exactly causal becomes a CAUSAL
    run; the rest of a partial run keeps only its kept key columns, in a causal structure split at
    gaps of MIN_GAP or more, each piece full where every row keeps all of it (e.g. 4 sink keys out
    of a 256-key block)."""
    out = []
    for ks, ke, f in runs:
        if f:
            out.append((ks, ke, f))
            continue
        diag = ke == qe and ks <= qs and _is_tril(plan, bs, qs, qe, device)
        end = qs if diag else ke
        if end > ks:
            keep = _keep(plan, bs, qs, qe, ks, end, device)[0, 0].cpu()  # (Lq, Lk)
            cols = keep.any(0).nonzero().flatten().tolist()
            gap = MIN_GAP if bs.causal else len(cols) + ke  # split only where the pieces can be gathered again
            starts = [0] + [i for i in range(1, len(cols)) if cols[i] - cols[i - 1] > gap]
            for a, b in zip(starts, starts[1:] + [len(cols)]) if cols else ():  # (no kept key: nothing to run)
                lo, hi = cols[a], cols[b - 1] + 1
                out.append((ks + lo, ks + hi, bool(keep[:, lo:hi].all())))
        if diag:
            out.append((qs, qe, CAUSAL))
    return out


# gather a range's runs when their keys are at most this many times its rows per run. Measured at 1 thread:
# 1024-2048-token SinkWindow runs at ~0.9 of stock gathered against ~1.1 merged; at 4096 (a 4-block
# window: keys 1.25x rows per run) merging the 4 parts is cheaper (0.84 against 0.91, Llama-8B heads).
GATHER_FACTOR = 1
GATHER_MIN_ROWS = 128  # shorter ranges (SPLIT_ROWS) count as this many rows: their parts' fixed costs weigh more


def _gathers(plan, bs, g: Group, device) -> bool:
    """Whether ``g`` runs as one call on its runs' keys concatenated (``_gathered_mask``): where the
    copy (two passes over the keys) costs less than merging its parts (several float32 passes over
    each part's output: LSE weights, widening, the weighted sum; measured, benchmarks in the report),
    and every row keeps some key (a masked SDPA row with none would be NaN, not the merge's zero)."""
    if len(g.runs) < 2 or sum(r[2] for r in g.runs) > GATHER_FACTOR * max(g.L, GATHER_MIN_ROWS) * len(g.runs):
        return False
    return bool(_gathered_mask(plan, bs, g, device).any(-1).all())


GRID_GATHER = True  # module switch: grid (non-causal) groups may gather (benchmarks compare both)


def _grid_gathers(plan, bs, g: Group, device, work: tuple) -> bool:
    """Whether a grid group (a 2-D / 3-D window's query ranges: each a few key runs, one per tile row)
    runs as one call on its runs' keys copied side by side rather than one LSE part per run merged, by
    the device's cost constants (kernels/cost.py): the copy of keys and values (plus the bias a mixed
    group's full runs then read) against the parts' fixed costs and merges. Measured on the 2-core CPU:
    the fixture's SlidingTile(tile=8, window=3) at 48 x 48 tokens (D 24) 0.68x -> 0.50x stock per call,
    at 32 x 32 1.38x -> 0.93x; at head dim 128 the copy costs what the merges save and the rule keeps
    merging (FLUX / Wan shapes within noise, Radial's mixed groups slower gathered)."""
    BH, D, Dv, size, costs = work  # kernels/cost.work_of: the device's constants at this head dim
    if len(g.runs) < 2 or costs is None:
        return False
    call_s, lse_s, merge_s, gather_s, mask_s = costs
    rows = BH * g.n * g.L
    keys = sum(r[2] for r in g.runs)
    merged = (len(g.runs) - 1) * call_s + len(g.runs) * lse_s + merge_s * rows * len(g.runs) * Dv
    full = sum(r[2] for r in g.runs if r[3] is True)
    bias = mask_s * rows * full if full < keys else 0.0  # one bias over every key once any run is partial
    copied = gather_s * BH * g.n * keys * (D + Dv) * size + bias
    return copied < merged and bool(_gathered_mask(plan, bs, g, device).any(-1).all())


def _gathered_mask(plan, bs, g: Group, device) -> torch.Tensor:
    """Keep mask (L, sum Lk) of ``g``'s first range over its runs' keys concatenated (every range of
    a group has the same: groups checks), cached."""
    key = ("gathered", g.q0, g.L, tuple((r[0], r[2]) for r in g.runs), str(device))
    if key not in bs.cache:
        parts = [torch.ones(g.L, lk, dtype=torch.bool, device=device) if f is True else
                 torch.ones(g.L, lk, dtype=torch.bool, device=device).tril() if f == CAUSAL else
                 _keep(plan, bs, g.q0, g.q0 + g.L, k0, k0 + lk, device)[0, 0] for k0, _, lk, f in g.runs]
        bs.cache[key] = torch.cat(parts, dim=1)
    return bs.cache[key]


def _gathered_bias(plan, bs, g: Group, dtype, device) -> torch.Tensor:
    key = ("gathered_bias", g.q0, g.L, tuple((r[0], r[2]) for r in g.runs), dtype, str(device))
    if key not in bs.cache:
        keep = _gathered_mask(plan, bs, g, device)
        bs.cache[key] = additive(keep, dtype)
    return bs.cache[key]


def _same_masks(plan, bs, g: Group, qs: int, runs: list, device) -> bool:
    """Whether every partial run of range ``qs`` has the mask of the group's first range's run."""
    if plan is None:
        return False
    L = g.L
    return all(f or torch.equal(_keep(plan, bs, qs, qs + L, ks, ke, device),
                                _keep(plan, bs, g.q0, g.q0 + L, r[0], r[0] + r[2], device))
               for r, (ks, ke, f) in zip(g.runs, runs))


def _keep(plan: Plan, bs: BlockSparse, qs, qe, ks, ke, device) -> torch.Tensor:
    """The plan's keep mask of tile-order rows [qs, qe) x keys [ks, ke): (1|B, 1|H, Lq, Lk) bool."""
    perm = bs.perm_on(device)
    qi = torch.arange(qs, qe, device=device) if perm is None else perm[qs:qe]
    ki = torch.arange(ks, ke, device=device) if perm is None else perm[ks:ke]
    z = torch.zeros(1, dtype=torch.long, device=device).view(1, 1, 1, 1)
    keep = plan.mask_mod(z, z, qi.view(1, 1, -1, 1), ki.view(1, 1, 1, -1))  # original indices
    return keep.expand(*keep.shape[:2], qe - qs, ke - ks)


def _is_tril(plan: Plan, bs: BlockSparse, s: int, e: int, device) -> bool:
    key = ("tril", s, e)
    if key not in bs.cache:
        tril = torch.ones(e - s, e - s, dtype=torch.bool, device=device).tril()
        bs.cache[key] = bool((_keep(plan, bs, s, e, s, e, device) == tril).all())
    return bs.cache[key]


def _tril_bias(bs: BlockSparse, L: int, dtype, device) -> torch.Tensor:
    """The additive causal mask of an L x L diagonal block (for LSE paths without is_causal)."""
    key = ("tril_bias", L, dtype, str(device))
    if key not in bs.cache:
        keep = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        bs.cache[key] = additive(keep, dtype)
    return bs.cache[key]
