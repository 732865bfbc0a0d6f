"""``classes``: a static masked plan whose query rows fall into a few classes of identical kept keys, as
one SDPA call per class with no per-score mask.

Radial's video pattern keeps 0.9-0.95 of the scores on short clips (Wan 4 x 32 x 32: 0.945), and every
query of a frame at the same window position keeps the same keys: 9 classes at 4 x 32 x 32. Masked SDPA
reads a bias for every score (1.1-1.3x stock there) and ``tiles`` merges many 64-row calls by their LSE
(1.24-1.5x); one call per class over its own rows computes only what the class keeps, at the dense
kernel's rate (1.04-1.06x stock measured at 4 x 32 x 32, 1 thread). A class's keys are read as a view
when they are contiguous, under a key bias broadcast over its rows when it keeps most of them (a gather
of nearly every key costs more than the few scores it skips), else gathered side by side; its rows are
a view when contiguous, else gathered, and written back in place.

Classes are found once per plan and shape from the materialised mask: a random float64 projection of
each row names its class, then every row is compared with its class's first row (exact: a collision
cannot merge two different rows). Capable for static plans without score_mod or a model mask, the same
mask for every batch row and head, every row keeping a key, and at most ``MAX_CLASSES`` classes averaging
``MIN_ROWS`` rows or more (smaller classes run below the dense kernel's rate: 64-row classes at Wan
4 x 16 x 16 ran 1.2-1.3x stock). Whether it beats the other exact kernels is measured by ``tune``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.bias import additive
from ..plan import Plan, fold_q_scale
from .base import Kernel, core_step_why_not
from .gather import _capable, _keep, static_mask_why_not

MAX_CLASSES = 64
MIN_ROWS = 32  # mean query rows per class
BIAS_FRAC = 0.97  # a class keeping more of the keys than this reads them all under a key bias (gathering 0.89 of
# them ran 1.00-1.03x stock at Wan 4 x 32 x 32, a bias over all 1.08-1.10x)


def _runs(idx: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of a sorted index tensor."""
    cut = (torch.nonzero(idx[1:] - idx[:-1] != 1).flatten() + 1).tolist()
    bounds = [0, *cut, idx.numel()]
    return [(int(idx[a]), int(idx[b - 1]) + 1) for a, b in zip(bounds, bounds[1:])]


def find(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(class of each row (Sq,), first row of each class (n,)) of a (Sq, Skv) boolean mask, or why not."""
    Sq, Skv = keep.shape
    w = torch.rand(Skv, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(keep.device)
    step = max(1, (1 << 22) // max(Skv, 1))  # rows per chunk: a float64 copy of 4M elements (32 MB) at a time
    proj = torch.cat([keep[i:i + step].to(torch.float64) @ w for i in range(0, Sq, step)])
    names, cls = torch.unique(proj, return_inverse=True)
    n = names.numel()
    if n > MAX_CLASSES or Sq < MIN_ROWS * n:
        return f"{n} query classes of distinct kept keys in {Sq} rows (at most {MAX_CLASSES}, {MIN_ROWS}+ rows each on average)"
    first = torch.full((n,), Sq, dtype=torch.long, device=keep.device).scatter_reduce_(
        0, cls, torch.arange(Sq, device=keep.device), "amin")
    rep = first.index_select(0, cls)  # each row's class representative
    if not all(bool((keep[i:i + step] == keep.index_select(0, rep[i:i + step])).all()) for i in range(0, Sq, step)):
        return "rows of one projection differ (a float64 collision): no exact classes"
    return cls, first


def layout(plan: Plan, Sq: int, Skv: int, device) -> dict | str:
    """Cached on the plan per shape: the classes with their rows and keys, or why the plan has none."""
    memo = plan.__dict__.setdefault("_classes", {})
    key = (Sq, Skv, str(device), MAX_CLASSES, MIN_ROWS)  # the limits: a test may lower them
    if key not in memo:
        keep = _keep(plan, Sq, Skv, device)
        found = find(keep)
        if isinstance(found, str):
            memo[key] = found
        else:
            cls, first = found
            parts = []
            for c, r in enumerate(first.tolist()):
                rows = (cls == c).nonzero().flatten()
                keys = keep[r].nonzero().flatten()
                rr, kr = _runs(rows), _runs(keys)
                part = dict(rows=rows, row_run=rr[0] if len(rr) == 1 else None, n=rows.numel(), keys=None, key_run=None, bias=None)
                if len(kr) == 1:  # contiguous keys (the whole sequence included): a view
                    part["key_run"] = kr[0]
                elif keys.numel() > BIAS_FRAC * Skv:
                    part["bias"] = additive(keep[r], torch.float32).view(1, 1, 1, Skv)
                else:
                    part["keys"] = keys
                parts.append(part)
            memo[key] = dict(parts=parts)
    return memo[key]


class Classes(Kernel):
    name = "classes"

    def why_not(self, q, k, v, plan: Plan, mask=None):
        reason = static_mask_why_not(q, k, plan, mask, "the classes") or core_step_why_not(plan)
        if reason:
            return reason
        Sq, Skv = q.shape[2], k.shape[2]
        verdict = plan.__dict__.setdefault("_classes_ok", {})
        key = (q.shape[0], q.shape[1], Sq, Skv, str(q.device), MAX_CLASSES, MIN_ROWS)
        if key not in verdict:
            reason = _capable(plan, q.shape[0], q.shape[1], Sq, Skv, q.device)
            if reason is None:
                lay = layout(plan, Sq, Skv, q.device)
                reason = lay if isinstance(lay, str) else None
            plan.__dict__.pop("_gather_keep", None)  # the whole mask was needed only to find the classes
            verdict[key] = reason
        return verdict[key]

    def run(self, q, k, v, plan: Plan, *, mask=None, scale=None):
        B, Hq, Sq, D = q.shape
        lay = layout(plan, Sq, k.shape[2], q.device)
        plan.__dict__.pop("_gather_keep", None)
        if isinstance(lay, str):
            raise RuntimeError(f"kernel 'classes' cannot run plan {plan.name!r}: {lay}")
        q, scale, _ = fold_q_scale(q, scale, plan)  # 16-bit q stays 16-bit (a float32 q_scale would widen it)
        gqa = Hq != k.shape[1]
        out = q.new_empty(B, Hq, Sq, v.shape[3])
        for p in lay["parts"]:
            a, b = p["row_run"] or (None, None)
            qc = q[:, :, a:b] if a is not None else q.index_select(2, p["rows"])
            kc, vc, bias = k, v, None
            if p["key_run"] is not None:
                ka, kb = p["key_run"]
                kc, vc = k[:, :, ka:kb], v[:, :, ka:kb]
            elif p["keys"] is not None:
                kc, vc = k.index_select(2, p["keys"]), v.index_select(2, p["keys"])
            else:
                bias = p["bias"] if p["bias"].dtype == q.dtype else p.setdefault(q.dtype, p["bias"].to(q.dtype))
                bias = bias.expand(1, 1, p["n"], k.shape[2])  # one key bias, stride 0 over the class's rows
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=bias, scale=scale, enable_gqa=gqa)
            if a is not None:
                out[:, :, a:b] = o
            else:
                out.index_copy_(2, p["rows"], o)
        return out
