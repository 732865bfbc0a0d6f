"""Multi-axis rotary position embedding (FLUX's RoPE) applied as a position shift, in plain torch:
the patcher's family row hands it to methods through ``Site.rope`` (SharedAttention moves the
reference image's keys one image width to the right)."""
from __future__ import annotations

import torch


def rope_shift(x: torch.Tensor, axes: tuple[int, ...], theta: float, shift: tuple[float, ...]) -> torch.Tensor:
    """x (..., N, D) rotated by FLUX-style multi-axis RoPE at position ``shift`` (one offset per axis).

    FLUX's RoPE gives axis i the channels of its ``axes[i]`` block; within a block, channel pair
    (2j, 2j+1) turns by angle p * theta ** (-2j / d). Rotations compose, so rotating keys that
    already carry position p by this shift puts them at p + shift."""
    angles = [p * (1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)) for p, d in zip(shift, axes)]
    ang = torch.cat(angles).repeat_interleave(2).to(x.device)  # (D,) float64: one angle per channel pair, twice
    cos, sin = ang.cos().float(), ang.sin().float()
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., N, D/2, 2): interleaved (real, imaginary) channels
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)  # (..., N, D): i * x
    return (x.float() * cos + rotated * sin).to(x.dtype)
