"""Image / video quality against a reference output: PSNR and SSIM (Wang et al. 2004: 11-tap
Gaussian window, sigma 1.5, K1 0.01, K2 0.03, on each channel, averaged)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements; inf for identical inputs."""
    mse = (x.double() - ref.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def _window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=dtype) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # (1, 1, size, size)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM of images (..., C, H, W) in [0, data_range]; leading dims (batch, frames) are
    flattened. Windows are 'valid' (no padding), as in the paper's reference code."""
    if x.shape != ref.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(x.shape)} and {tuple(ref.shape)}")
    H, W = x.shape[-2:]
    size = min(11, H, W) | 1  # odd, fits the image
    w = _window(size)
    a = x.double().reshape(-1, 1, H, W)  # every channel of every image separately
    b = ref.double().reshape(-1, 1, H, W)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a**2
    var_b = F.conv2d(b * b, w) - mu_b**2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean().item()
