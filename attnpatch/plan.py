"""``Plan``: how to compute one attention call, in FlexAttention's vocabulary."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import torch

# mask_mod(b, h, q_idx, kv_idx) -> bool; score_mod(score, b, h, q_idx, kv_idx) -> score.
# Kernels call both with broadcastable integer index tensors (b: (B,1,1,1), h: (1,H,1,1),
# q_idx: (1,1,Sq,1), kv_idx: (1,1,1,Skv)), so they must be written with torch ops.
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ScoreMod = Callable[..., torch.Tensor]


@dataclass(frozen=True, eq=False)
class Lines:
    """A causal pattern of whole key columns and whole diagonals (VerticalSlash; SinkWindow is sink
    columns + window diagonals): ``keep[b, h, i, j] = j <= p_i & (j in cols[b, h] | p_i - j in diags[b, h])``
    with ``p_i = i + q_offset``. Both are long tensors (B, H_q, n), padded with -1 (no line); duplicates are
    allowed. ``block`` > 0: diagonals at the granularity of MInference's GPU kernel: the call's rows go in
    blocks of ``block`` (row i in block i // block, the last one shorter) and a row keeps every key j that a
    kept diagonal reaches in some row of its block, ``p_first - o <= j <= p_last - o`` (causal still applies),
    so a block's key ranges hold no holes. Kernels that know it (kernels/lines.py, lines_native.py) never build the (S_q, S_kv)
    mask; the plan's mask_mod must describe the same pattern (every other kernel runs that)."""

    cols: torch.Tensor  # (B, H_q, n_cols) key indices j
    diags: torch.Tensor  # (B, H_q, n_diags) offsets p_i - j >= 0
    block: int = 0  # 0: exact diagonals; else rows per block of block-granular diagonals
    cache: dict = field(default_factory=dict, repr=False)  # what kernels derive from it (one call's plan)

    @staticmethod
    def indices(keep: torch.Tensor) -> torch.Tensor:
        """The True positions of a boolean (B, H, n) table as (B, H, max count) indices, ascending, -1 padded."""
        n = max(1, int(keep.sum(-1).max()))
        idx = torch.arange(keep.shape[-1], device=keep.device).expand(keep.shape)
        big = keep.shape[-1]
        idx = torch.where(keep, idx, big).sort(-1).values[..., :n]  # (B, H, n)
        return idx.masked_fill_(idx == big, -1)


@dataclass(frozen=True, eq=False)
class Piece:
    """One piece of a bucketed call (``Buckets``): query rows ``q0 .. q0 + nq - 1`` of the call on keys
    ``k0 .. k0 + nk - 1``. ``order_q`` / ``order_k`` None: exact attention (``causal``: a causal square
    whose rows and keys start together). Else sorted blocks: ``order_q`` / ``order_k`` (B, H_q, n) map a
    sorted place to a row / key; the query at place p sits in block ``p * nb // nq``, the key at place p in
    block ``p // block``; a query sees its block's keys, and the sorted key places ``drawn`` (H_q, m), when
    outside its block, each with weight ``nk / m`` (score + log(nk / m); repeats add up)."""

    q0: int
    nq: int
    k0: int
    nk: int
    causal: bool = False
    order_q: torch.Tensor | None = None
    order_k: torch.Tensor | None = None
    block: int = 0
    drawn: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class Buckets:
    """A call as pieces whose results merge by their log-sum-exp into one softmax (HyperAttention's
    sorted LSH blocks, sampled residuals and causal recursion). Every row belongs to the pieces that
    name it; kernels/buckets.py runs them at the cost of what they hold, the plan's mask_mod /
    score_mod describe the same attention for every other kernel."""

    pieces: tuple


@dataclass(frozen=True)
class Plan:
    """``Plan()`` is plain dense attention. Every field narrows or transforms it.

    ``causal`` and ``q_offset`` come from the ``Site`` (``attend`` fills them in); a method
    describes only its own pattern through ``mask_mod`` / ``score_mod``.
    """

    mask_mod: MaskMod | None = None
    score_mod: ScoreMod | None = None
    causal: bool = False
    q_offset: int = 0
    blocks: Any = None  # BlockSparse: tile-order permutation + block structure (attnpatch.blocks)
    # (out, q, k, v, scale) -> out, applied after the kernel; a callback that also names
    # `mask` / `softcap` parameters gets the call's mask and logit soft-capping (SinkCalibration)
    output: Callable | None = None
    # (k_extra, v_extra) (B, H_kv, E, D), or a function (k, v) -> that pair: keys / values appended to
    # every row's own (shared attention); mask_mod sees them as kv_idx >= S_kv
    extra_kv: tuple | Callable | None = None
    transform: Callable | None = None  # (q, k, v) -> (q, k, v) before the kernel (AdaIN of shared attention)
    # (one naming a `mask` parameter gets the call's mask and returns (q, k, v, mask): a key selection, decode gathers)
    # Parts of the call computed with plans of their own and blended into this plan's output (PAG's
    # perturbed rows): each runs through the same steps and kernels as any plan (attnpatch.core)
    parts: tuple["Part", ...] = ()
    # a multiplicative score transform that every kernel runs at dense speed: scores of query row
    # (b, h, i) times q_scale, a float or a tensor broadcastable to (B, H_q, S_q, 1); applied by scaling
    # q (a float folds into the softmax scale: exact), before score_mod
    q_scale: float | torch.Tensor | None = None
    name: str = "dense"
    # True when mask_mod is a pure function of its index arguments (it reads no state that changes
    # between calls): kernels may then cache what they derive from it, keyed on the mask_mod object
    # (sdpa keeps the materialised mask). Static methods set it on the plans they cache and reuse.
    static: bool = False
    lines: Lines | None = None  # the same pattern as mask_mod, as columns and diagonals (kernels/lines.py)
    buckets: Buckets | None = None  # the same attention as pieces merged by LSE (kernels/buckets.py)
    # v -> the call's whole output (``output`` step included), from scores the method already computed for
    # every row (small calls: VerticalSlash when its estimate covered all queries, SinkCalibration when its
    # detection read every row): core uses it for a call without a named backend, mask, soft cap, transform,
    # extra keys, parts or scale other than 1/sqrt(D); otherwise the plan's other fields run as usual
    direct: Callable | None = None
    # one Plan per batch row (None: that row dense), for a data-dependent method whose rows estimate
    # apart (TopKBlocks on a batch of different prompts): core runs each row as a call of its own with
    # its plan, so every row gets the block structure of its own estimate; mask_mod says the same for
    # every other consumer (materialised masks, the reference kernel)
    rows: tuple | None = None

    def with_site(self, causal: bool, q_offset: int) -> "Plan":
        """This plan with the Site's causality; the derived plan is remembered on this (frozen) plan,
        so a plan a method caches and returns again costs no dataclass copy per call."""
        if self.causal == causal and self.q_offset == q_offset:
            return self
        return _derived(self, "_sited", (causal, q_offset), lambda: replace(self, causal=causal, q_offset=q_offset))


DIRECT_MAX = 1 << 18  # heads x queries x keys of the largest call a method answers through Plan.direct: above it a
# score pass over every row costs more than the flash kernel (3x at 256 tokens on the 2-core CPU)


_PLAN_FIELDS = tuple(f.name for f in fields(Plan))


def with_direct(plan: Plan, direct: Callable) -> Plan:
    """``dataclasses.replace(plan, direct=direct)`` without the dataclass __init__ (Plan has no __post_init__; a
    small call's per-call plan paid ~10-30 us for it): its fields copied, none of what kernels derived and
    remembered on it."""
    new = object.__new__(Plan)
    new.__dict__.update({name: plan.__dict__[name] for name in _PLAN_FIELDS})
    new.__dict__["direct"] = direct
    return new


def probs_direct(p: torch.Tensor, Hkv: int, dtype) -> Callable:
    """A ``Plan.direct`` from final probabilities p (B, H, Sq, Skv): v (B, Hkv, Skv, Dv) -> p @ v in ``dtype``,
    each KV head serving its group of query heads (GQA) without a repeated copy."""
    B, H, Sq, Skv = p.shape

    def direct(v):  # one bmm on 3-D views: a 4-D matmul's dispatch is a good part of a small call's
        out = torch.bmm(p.view(B * Hkv, H // Hkv * Sq, Skv), v.to(p.dtype).reshape(B * Hkv, Skv, v.shape[-1]))
        return out.view(B, H, Sq, -1).to(dtype)

    return direct


def _derived(plan: Plan, slot: str, key, make) -> Plan:
    """``make()``, remembered on ``plan`` under ``slot`` for ``key`` (the latest key only): a plan a
    method caches and returns on every call derives its variants once, not per call."""
    memo = plan.__dict__.get(slot)
    if memo is not None and memo[0] == key:
        return memo[1]
    out = make()
    object.__setattr__(plan, slot, (key, out))  # one tuple: a concurrent reader sees the old pair or this one
    return out


@dataclass(frozen=True)
class Part:
    """Batch rows ``rows`` (heads ``heads``, None: all) of a call computed with ``plan`` and blended
    into the main plan's output: ``out[rows, heads] = (1 - weight) * out + weight * attention(plan)``
    (``weight == 1``: replaced). The part's keys and values are the call's own rows (heads)."""

    rows: tuple[int, ...]
    plan: Plan
    heads: tuple[int, ...] | None = None
    weight: float = 1.0


def fold_q_scale(q: torch.Tensor, scale, plan: Plan):
    """``(q, scale, plan)`` with ``plan.q_scale`` applied and removed: a float multiplies the softmax
    scale (exact); a tensor multiplies q's rows in float32 or wider (one rounding to q's dtype)."""
    qs = plan.q_scale
    if qs is None:
        return q, scale, plan
    unscaled = _derived(plan, "_unscaled", None, lambda: replace(plan, q_scale=None))
    if not torch.is_tensor(qs):
        base = q.shape[-1] ** -0.5 if scale is None else scale
        return q, base * float(qs), unscaled
    return scale_rows(q, q_scale_as(plan, q)), scale, unscaled


def q_scale_as(plan: Plan, q: torch.Tensor) -> torch.Tensor:
    """The plan's per-row q scales on q's device in float32 or wider (float64 stays float64), cast once per plan."""
    work = torch.promote_types(q.dtype, torch.float32)
    return _derived(plan, "_q_scale_as", (q.device, work), lambda: plan.q_scale.to(q.device, work))


def scale_rows(q: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """q (B, H, Sq, D) times the scales ``q_scale_as`` gives (B|1, H|1, Sq|1, 1), in their dtype, one rounding to q's."""
    return q * qs if q.dtype == qs.dtype else (q.to(qs.dtype) * qs).to(q.dtype)


def q_scale_as_score_mod(plan: Plan, B: int, H: int, Sq: int) -> Plan:
    """The plan with its q_scale turned into a score_mod, for callers that must transform scores
    before it (soft-capping). Applied before the plan's own score_mod, as folding it into q is."""
    qs, inner = plan.q_scale, plan.score_mod
    if qs is None:
        return plan
    if torch.is_tensor(qs):
        qs = qs.expand(B, H, Sq, 1)

    def score_mod(score, b, h, q_idx, kv_idx):
        score = score * (qs[b, h, q_idx, 0] if torch.is_tensor(qs) else qs)
        return score if inner is None else inner(score, b, h, q_idx, kv_idx)

    return replace(plan, score_mod=score_mod, q_scale=None)


def index_grids(B: int, H: int, Sq: int, Skv: int, device, q_start: int = 0) -> tuple[torch.Tensor, ...]:
    """The four broadcastable index tensors a mask_mod / score_mod is called with (query rows
    from ``q_start``)."""
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    q = torch.arange(q_start, q_start + Sq, device=device).view(1, 1, Sq, 1)
    kv = torch.arange(Skv, device=device).view(1, 1, 1, Skv)
    return b, h, q, kv


def materialise_mask(plan: Plan, B: int, H: int, Sq: int, Skv: int, device, q_start: int = 0) -> torch.Tensor | None:
    """The boolean keep-mask of ``plan`` (causal and mask_mod), broadcastable to (B, H, Sq, Skv)
    (query rows from ``q_start``); None when nothing is masked."""
    if not plan.causal and plan.mask_mod is None:
        return None  # dense: no index grids to build
    b, h, q, kv = index_grids(B, H, Sq, Skv, device, q_start)
    keep = None
    if plan.causal:
        keep = kv <= q + plan.q_offset  # (1, 1, Sq, Skv)
    if plan.mask_mod is not None:
        m = plan.mask_mod(b, h, q, kv)
        keep = m if keep is None else keep & m
    return keep
