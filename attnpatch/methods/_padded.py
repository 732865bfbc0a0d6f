"""Left-padded batches for methods whose pattern depends on the row's own tokens (block boundaries counted from
its first token, estimates pooled over its keys): each row is planned alone on its real tokens, in positions,
and the rows' patterns become one per-row mask. A padded row then attends exactly as it would alone (the
estimate never mixes rows, and no block straddles padding), at the cost of a mask the kernels materialise
(no shared block structure: rows' blocks differ)."""
from __future__ import annotations

import dataclasses

import torch

from ..plan import Plan, materialise_mask
from ..site import Site


def per_row(plan_alone, q, k, site: Site, name: str) -> Plan | None:
    """``plan_alone(q_b, k_b, site_b)`` for every batch row on its real tokens (``Site.kv_shift``: key j of row b
    holds position j + shift[b]; causal calls whose queries are the last keys), combined into one Plan; None when
    every row's plan is None (each row dense: plain causal attention is the plan, exactly)."""
    B, Sq, Skv, off = q.shape[0], q.shape[2], k.shape[2], site.q_offset
    pads = (-site.kv_shift).clamp_min(0).tolist()
    rows = []
    for b, pad in enumerate(pads):
        pad = min(int(pad), Skv)
        r0 = min(Sq, max(0, pad - off))  # the row's first real query
        alone = dataclasses.replace(site, kv_shift=None, q_offset=off + r0 - pad)
        plan = None if r0 == Sq or pad == Skv else plan_alone(q[b:b + 1, :, r0:], k[b:b + 1, :, pad:], alone)
        rows.append((pad, r0, alone.q_offset, plan))
    if all(p is None for *_, p in rows):
        return None
    table: list = []

    def build() -> torch.Tensor:
        keep = torch.ones(B, 1, Sq, Skv, dtype=torch.bool, device=q.device)  # pad query rows: anything (masked out)
        for b, (pad, r0, q_off, plan) in enumerate(rows):
            keep[b, :, r0:, :pad] = False  # a real query never sees padding
            if plan is not None:
                m = materialise_mask(plan.with_site(site.causal, q_off), 1, 1, Sq - r0, Skv - pad, q.device)
                if m is not None:
                    keep[b, :, r0:, pad:] = m[0]
        return keep

    def mask_mod(b, h, q_idx, kv_idx):
        if not table:
            table.append(build())
        return table[0][b, 0, q_idx, kv_idx]

    return Plan(mask_mod=mask_mod, name=f"{name} (per row: left padding)")
