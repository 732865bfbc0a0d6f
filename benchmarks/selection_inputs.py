"""Inputs of benchmarks/selection.py: q / k captured from the trained fixtures under stock attention, and
synthetic DiT-like q / k at real layer shapes (no trained weights at those shapes are available offline)."""
from __future__ import annotations

import math

import torch

import attnpatch as ap
from attnpatch import Site
from attnpatch.methods.observe import Observed

CAPTURE = {  # name: (fixture, pipeline kwargs, steps, captured steps, block, stride)
    "flux-16x16": ("flux", {}, 20, (5, 14), (4, 4), 4),
    "flux-64x64": ("flux", dict(height=256, width=256), 8, (2, 5), (8, 8), 8),
    "wan-5x8x8": ("wan", {}, 20, (5, 14), (1, 4, 4), 4),
    "wan-4x32x32": ("wan", dict(num_frames=7, height=128, width=128), 8, (2, 5), (1, 8, 8), 8),
}
CAPTION = {"flux": "a large red circle at the top left", "wan": "a large blue circle moving left"}


def capture(kind: str, kw: dict, steps: int, at: tuple) -> list:
    """(q, k, site) of every self / joint call at the denoising steps ``at`` under stock attention."""
    from attnpatch.models import fixtures

    pipe = (fixtures.flux_shapes if kind == "flux" else fixtures.wan_shapes)()
    pipe.set_progress_bar_config(disable=True)
    calls = []

    def watch(q, k, site, groups):
        if site.kind != "cross" and site.step in at:
            calls.append((q.detach().float().clone(), k.detach().float().clone(), site))

    with torch.no_grad(), ap.patch(pipe, Observed(ap.Dense(), watch)):
        pipe(CAPTION[kind], generator=torch.Generator().manual_seed(0), num_inference_steps=steps, output_type="latent", **kw)
    return calls


LOGIT = 16.0  # synthetic heads: a strength-1 direction adds this to a matching pair's logit (median top probability ~0.08 at 1K keys)
SYNTH = {  # name: (grid, text tokens, heads, RoPE channels per axis (FLUX: text axis first), block, stride)
    "synthetic FLUX-1024": ((64, 64), 512, 24, (16, 56, 56), (8, 8), 8),
    "synthetic Wan 4x32x32": ((4, 32, 32), 0, 12, (44, 42, 42), (1, 8, 8), 8),
}


def _blobs(grid, n, g) -> torch.Tensor:
    """Object id (0: background) of every visual token, row-major: ``n`` discs (moving ones on video)."""
    *T, H, W = grid
    t = torch.arange(T[0] if T else 1).view(-1, 1, 1).float()
    y, x = torch.arange(H).view(1, -1, 1).float(), torch.arange(W).view(1, 1, -1).float()
    obj = torch.zeros(t.shape[0], H, W, dtype=torch.long)
    for i in range(n, 0, -1):
        cy, cx, r, vy, vx = (torch.rand(5, generator=g) * torch.tensor([H, W, 0.2 * min(H, W), 4, 4])).tolist()
        obj[((y - cy - (vy - 2) * t) ** 2 + (x - cx - (vx - 2) * t) ** 2) < (r + 2) ** 2] = i
    return obj.flatten()


def synthetic(grid, text, heads, axes, layers=3, D=128) -> list:
    """q / k of a DiT-like layer at real shapes, no trained weights: each head mixes a shared direction
    (with RoPE: attention to nearby tokens), an object direction per disc (long-range attention inside
    objects) and unit noise, with per-head strengths; RoPE over the grid axes as FLUX / Wan apply it;
    text tokens (FLUX) plain noise at position 0. One seeded set per layer."""
    n = math.prod(grid)
    coords = torch.stack(torch.meshgrid(*[torch.arange(a) for a in grid], indexing="ij"), -1).view(n, -1).float()
    coords = torch.cat([torch.zeros(n, len(axes) - len(grid)), coords], 1)  # FLUX: image tokens at text axis 0
    ang = torch.cat([coords[:, i:i + 1] * 1e4 ** (-torch.arange(0, d, 2) / d) for i, d in enumerate(axes)], 1)  # (n, D/2)
    cos, sin = ang.cos(), ang.sin()
    calls = []
    for layer in range(layers):
        g = torch.Generator().manual_seed(layer)
        obj = _blobs(grid, 8, g)
        scale = (LOGIT * D ** 0.5) ** 0.5  # a strength-1 direction adds LOGIT to the logit of a matching pair
        alpha, beta = (0.3 + 0.7 * torch.rand(2, heads, 1, 1, generator=g)).unbind(0)
        shared = torch.nn.functional.normalize(torch.randn(heads, 1, D, generator=g), dim=-1) * scale
        objs = torch.nn.functional.normalize(torch.randn(heads, 9, D, generator=g), dim=-1) * scale
        base = alpha[0] * shared + beta[0] * objs[:, obj]  # (heads, n, D)

        def rope(x):
            x2 = x.view(*x.shape[:-1], -1, 2)
            return torch.stack([x2[..., 0] * cos - x2[..., 1] * sin, x2[..., 0] * sin + x2[..., 1] * cos], -1).flatten(-2)

        q, k = (torch.cat([torch.randn(1, heads, text, D, generator=g), rope(base + torch.randn(heads, n, D, generator=g))[None]], 2)
                for _ in range(2))
        calls.append((q, k, Site(grid=grid, text_len=text, kind="joint" if text else "self", layer=layer)))
    return calls
