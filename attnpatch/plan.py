"""``Plan``: how to compute one attention call, in FlexAttention's vocabulary."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

# mask_mod(b, h, q_idx, kv_idx) -> bool; score_mod(score, b, h, q_idx, kv_idx) -> score.
# Kernels call both with broadcastable integer index tensors (b: (B,1,1,1), h: (1,H,1,1),
# q_idx: (1,1,Sq,1), kv_idx: (1,1,1,Skv)), so they must be written with torch ops.
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ScoreMod = Callable[..., torch.Tensor]


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
    output: Callable | None = None  # (out, q, k, v, scale) -> out, applied after the kernel (PAG identity)
    # (k_extra, v_extra) (B, H_kv, E, D), or a function (k, v) -> that pair: keys / values appended to
    # every row's own (shared attention); mask_mod sees them as kv_idx >= S_kv
    extra_kv: tuple | Callable | None = None
    transform: Callable | None = None  # (q, k, v) -> (q, k, v) before the kernel (AdaIN of shared attention)
    name: str = "dense"

    @property
    def is_dense(self) -> bool:
        """True when the plan is unmasked, unbiased attention (causality aside)."""
        return all(
            f is None
            for f in (self.mask_mod, self.score_mod, self.blocks, self.output, self.extra_kv, self.transform)
        )

    def with_site(self, causal: bool, q_offset: int) -> "Plan":
        return replace(self, causal=causal, q_offset=q_offset)


def index_grids(B: int, H: int, Sq: int, Skv: int, device) -> tuple[torch.Tensor, ...]:
    """The four broadcastable index tensors a mask_mod / score_mod is called with."""
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    q = torch.arange(Sq, device=device).view(1, 1, Sq, 1)
    kv = torch.arange(Skv, device=device).view(1, 1, 1, Skv)
    return b, h, q, kv


def materialise_mask(plan: Plan, B: int, H: int, Sq: int, Skv: int, device) -> torch.Tensor | None:
    """The boolean keep-mask of ``plan`` (causal and mask_mod), broadcastable to (B, H, Sq, Skv);
    None when nothing is masked."""
    b, h, q, kv = index_grids(B, H, Sq, Skv, device)
    keep = None
    if plan.causal:
        keep = kv <= q + plan.q_offset  # (1, 1, Sq, Skv)
    if plan.mask_mod is not None:
        m = plan.mask_mod(b, h, q, kv)
        keep = m if keep is None else keep & m
    return keep
