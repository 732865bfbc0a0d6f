"""``SharedAttention``: style-consistent batches (StyleAligned, AlignedGen, FreeCus). In every
self / joint attention call, each image of the batch also attends to the visual keys and values
of the reference image (``reference``-th image of its classifier-free-guidance half), with
AdaIN of its visual queries and keys toward the reference's statistics (per head and channel,
over tokens). For FLUX, whose RoPE would give the reference's keys the same positions as the
image's own, ``shift_pe`` rotates the reference's keys as if the reference stood one image
width to the right (RoPE rotations compose: R(p + d) = R(d) R(p)). The reference row itself
and a batch of one are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import Plan
from ..site import Site
from .base import Method, check_bool, check_int


def _adain(x: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x (R, H, N, D) renormalised to ref's (1 | R, H, N, D) mean / std over tokens."""
    mu, sd = x.mean(2, keepdim=True), x.std(2, keepdim=True) + eps
    rmu, rsd = ref.mean(2, keepdim=True), ref.std(2, keepdim=True) + eps
    return (x - mu) / sd * rsd + rmu


@dataclass
class SharedAttention(Method):
    """Every image attends to the reference image's keys / values too (StyleAligned-style)."""

    source = "StyleAligned (Hertz et al. 2024); AlignedGen; FreeCus"
    llm = False  # needs a denoiser's batch roles: the transformers patcher refuses it at patch time
    needs_roles = True  # the patchers wrap the denoiser so calls know their CFG halves

    reference: int = 0
    adain: bool = True
    shift_pe: bool = True

    def __post_init__(self):
        self.reference = check_int("SharedAttention", "reference", self.reference, 0, example=0,
                                   expected="an integer >= 0 (the reference image's index within its prompt half)")
        self.adain = check_bool("SharedAttention", "adain", self.adain)
        self.shift_pe = check_bool("SharedAttention", "shift_pe", self.shift_pe)

    def _groups(self, site: Site, B: int) -> list[tuple[int, list[int]]]:
        """(reference row, other rows) per CFG half."""
        roles = site.roles or ("cond",) * B
        out = []
        for role in dict.fromkeys(roles):
            rows = [i for i, r in enumerate(roles) if r == role]
            if len(rows) < 2:
                continue  # a batch of one: nothing to share
            if self.reference >= len(rows):
                raise ValueError(f"SharedAttention(reference={self.reference}) but the batch has {len(rows)} images per prompt half")
            ref = rows[self.reference]
            out.append((ref, [r for r in rows if r != ref]))
        return out

    def _shift(self, k_ref: torch.Tensor, site: Site) -> torch.Tensor:
        """Rotate keys (E, H, N, D) by one grid width along the image's width axis, with the RoPE the
        patcher's family row provides (``Site.rope``; FLUX): without it the keys stay as they are."""
        if not self.shift_pe or site.rope is None or len(site.grid) != 2:
            return k_ref
        return site.rope(k_ref, (0.0, 0.0, float(site.grid[1])))  # (frame, row, col) offset

    def plan(self, q, k, site: Site) -> Plan | None:
        B, S = q.shape[0], q.shape[2]
        if site.kind == "cross" or k.shape[2] != S:
            return None
        groups = self._groups(site, B)
        if not groups:
            return None
        v0, n = (site.visual_start, site.visual_len) if site.grid else (0, S)
        ref_of = torch.arange(B)
        for ref, rows in groups:
            ref_of[rows] = ref
        is_ref = ref_of == torch.arange(B)  # rows that see no extra keys
        hidden = is_ref.to(q.device)

        def transform(q, k, v):
            if not self.adain:
                return q, k, v
            # read from the inputs, write into copies: autograd keeps the inputs it saved unmodified
            qn, kn = q.clone(), k.clone()
            for ref, rows in groups:
                vis = slice(v0, v0 + n)
                qn[rows, :, vis] = _adain(q[rows, :, vis], q[ref:ref + 1, :, vis])
                kn[rows, :, vis] = _adain(k[rows, :, vis], k[ref:ref + 1, :, vis])
            return qn, kn, v

        def extra(k, v):
            idx = ref_of.to(k.device)
            return self._shift(k[idx, :, v0:v0 + n], site), v[idx, :, v0:v0 + n]

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx < S) | ~hidden[b]

        return Plan(mask_mod=mask_mod, transform=transform, extra_kv=extra, name=repr(self))
