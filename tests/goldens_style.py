"""Float64 golden of StyleInjection (Style Injection in Diffusion, Chung et al. 2024), from the paper
and its authors' code (StyleID): in one self / joint attention call of the transfer pass, the visual
tokens' keys and values are the style pass's (recorded at the same step), their queries
q_hat = gamma * q_content + (1 - gamma) * q (gamma weighs the content pass's recorded query), and their
scores are multiplied by the temperature T (the authors scale the query: query * T). Text tokens keep
their own query, key and value."""
from __future__ import annotations

import torch

from goldens import attention, coords


def features(seed: int, B: int, H: int, Hkv: int, N: int, D: int):
    """Recorded features (q_content (B, H, N, D), k_style, v_style (B, Hkv, N, D)) of a row,
    exactly representable in bfloat16 (float32 / bfloat16 runs see what the golden saw)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, N, D, generator=g, dtype=torch.float64).bfloat16().double() for h in (H, Hkv, Hkv))


def style_injection(q, k, v, site, q_c, k_s, v_s, gamma: float, T: float):
    """Softmax(T * q_hat k'^T / sqrt(D)) v' on the visual rows, with k', v' the call's keys / values whose
    visual part is the style's; text rows attend with their own query to the same k', v'."""
    q, k, v = q.double().clone(), k.double().clone(), v.double().clone()
    B, S = q.shape[0], q.shape[2]
    cs, _ = coords(site, S)
    vis = [i for i in range(S) if cs[i] is not None]
    for n, i in enumerate(vis):  # token by token, in the grid's order
        q[:, :, i] = T * (gamma * q_c[:, :, n] + (1 - gamma) * q[:, :, i])
        k[:, :, i] = k_s[:, :, n].expand(B, -1, -1)
        v[:, :, i] = v_s[:, :, n].expand(B, -1, -1)
    return attention(q, k, v, lambda b, h, i, j: True)
