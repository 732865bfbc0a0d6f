"""Float64 goldens: every public method's attention written from its documented definition
(the method docstrings, the papers), with plain loops over positions and grid coordinates.
Nothing here reads a plan or a ``mask_mod``: each golden builds its own keep mask (and, for
data-dependent methods, its own selection) and runs softmax attention in float64.
Tensors are (B, H, S, D); GQA keys / values are shared by H_q / H_kv consecutive query heads.

This file: softmax attention, the token layout and the static (data-independent) patterns;
goldens_select.py: data-dependent selection; goldens_guided.py: guided and calibrated methods."""
from __future__ import annotations

import math

import torch

NEG = float("-inf")


def attention(q, k, v, keep, scale=None, bias=None, mask=None, cap=None):
    """Softmax attention in float64. ``keep(b, h, i, j) -> bool``, a (B, H, Sq, Skv) or an (Sq, Skv)
    bool tensor (the same for every row and head: see ``static``); ``bias`` an optional additive
    (B, H, Sq, Skv) score term; ``mask`` an optional model mask broadcasting to (B, H, Sq, Skv):
    boolean (False: hidden) or additive float; ``cap``: scores soft-capped to cap * tanh(s / cap)."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, Sq, D = q.shape
    rep, Skv = H // k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, H, Sq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            s = q[b, h] @ k[b, h // rep].T * scale  # (Sq, Skv)
            s = s if cap is None else cap * torch.tanh(s / cap)
            if bias is not None:
                s = s + bias[b, h]
            if torch.is_tensor(keep):
                m = keep if keep.dim() == 2 else keep[b, h]
            else:
                m = torch.tensor([[bool(keep(b, h, i, j)) for j in range(Skv)] for i in range(Sq)])
            if mask is not None:
                mb = mask.expand(B, H, Sq, Skv)[b, h]
                m = m & mb if mb.dtype == torch.bool else m
                s = s if mb.dtype == torch.bool else s + mb.double()
            out[b, h] = torch.softmax(s.masked_fill(~m, NEG), -1) @ v[b, h // rep]
    return out


def static(keep, Sq, Skv):
    """(Sq, Skv) bool tensor of a ``keep(b, h, i, j)`` that depends on neither row nor head: built
    once instead of once per (row, head)."""
    return torch.tensor([[bool(keep(0, 0, i, j)) for j in range(Skv)] for i in range(Sq)])


def causal(rule, off):
    """keep(b, h, i, j) of a causal rule on absolute query position p = i + off."""
    return lambda b, h, i, j: j <= i + off and rule(i + off, j)


# ---- token layout: text tokens and row-major visual grid coordinates -----------------------

def coords(site, S):
    """Per token: None for text, else its grid coordinate tuple (row-major over the grid)."""
    grid = site.grid or (S - site.text_len,)
    v0 = site.text_len if site.text_first else 0
    out = [None] * S
    for t in range(math.prod(grid)):
        c, r = [], t
        for n in reversed(grid):
            r, x = divmod(r, n)
            c.append(x)
        out[v0 + t] = tuple(reversed(c))
    return out, grid


def grid_keep(site, S, axis_rule):
    """keep over a self / joint call: text dense both ways, visual pairs by ``axis_rule(a, n, ci, cj)``
    on every axis a (a product pattern)."""
    cs, grid = coords(site, S)

    def keep(b, h, i, j):
        if cs[i] is None or cs[j] is None:
            return True
        return all(axis_rule(a, n, cs[i][a], cs[j][a]) for a, n in enumerate(grid))
    return keep


def window_start(centre, w, n):
    """First index of a ``w``-wide window centred on ``centre``, shifted inward to fit in [0, n)."""
    return max(0, min(centre - w // 2, n - w))


def per_axis(x, a):
    return x[a] if isinstance(x, tuple) else x


# ---- sparse: static patterns ----------------------------------------------------------------

def sink_window(sink, window):
    return lambda p, j: j < sink or p - j < window


def power(local, sink):
    """PowerAttention: local window, every power-of-two distance, and the sink tokens."""
    def rule(p, j):
        d = p - j
        return d < local or j < sink or (d > 0 and 2 ** round(math.log2(d)) == d)
    return rule


def neighborhood(window, stride=1, dilation=1):
    """NATTEN GNA per axis: same dilation group; the window of the stride group's centre query,
    shifted inward at the borders; a window covering the whole group is dense."""
    def rule(a, n, ci, cj):
        w, s, d = per_axis(window, a), per_axis(stride, a), per_axis(dilation, a)
        if ci % d != cj % d:
            return False
        n_g = len(range(ci % d, n, d))
        x, y = ci // d, cj // d
        if w >= n_g:
            return True
        leader = (x // s) * s + s // 2
        start = window_start(leader, w, n_g)
        return start <= y < start + w
    return rule


def tile_window(ti, tj, w, nt):
    """Key tile tj inside the ``w`` tiles centred on query tile ti (shifted inward), of nt tiles."""
    if w <= 0:
        return False
    if w >= nt:
        return True
    start = window_start(ti, w, nt)
    return start <= tj < start + w


def sliding_tile(tile, window):
    """STA: tiles of ``tile`` tokens per axis; the ``window`` tiles centred on the query's tile."""
    def rule(a, n, ci, cj):
        t, w = per_axis(tile, a), per_axis(window, a)
        return tile_window(ci // t, cj // t, w, math.ceil(n / t))
    return rule


def radial_keep(site, S, window, decay, dense_frames, tile, sink_queries=True):
    """Radial (documented form): sink frames dense both ways; else band r = floor(log2 d) of the
    frame distance d (0 for d <= 1); per spatial axis a tile window of width largest-odd <=
    w0 / decay**r (w0 = window, or the whole frame), none below 1. ``sink_queries=False`` is the
    authors' code (radial_attn/attn_mask.py: ``if j == 0`` on the key frame only): queries of the
    sink frame follow the decay pattern like any other."""
    cs, grid = coords(site, S)

    def width(nt, w0, r):
        w0 = 2 * nt - 1 if w0 is None else w0
        w = math.floor(w0 / decay ** r + 1e-9)
        return w if w % 2 else w - 1

    def keep(b, h, i, j):
        if cs[i] is None or cs[j] is None:
            return True
        (fi, yi, xi), (fj, yj, xj) = cs[i], cs[j]
        if fj < dense_frames or (sink_queries and fi < dense_frames):
            return True
        d, r = abs(fi - fj), 0
        while 2 ** (r + 1) <= d:
            r += 1
        for a, (ci, cj) in enumerate(((yi, yj), (xi, xj))):
            t, n = per_axis(tile, a), grid[1 + a]
            w0 = None if window is None else per_axis(window, a)
            if not tile_window(ci // t, cj // t, width(math.ceil(n / t), w0, r), math.ceil(n / t)):
                return False
        return True
    return keep


def inward_window(site, S, train):
    """InwardWindow (FreeSwim's ``init_mask_flex``): with d = train // 2, query row r of n sees key
    rows [r - d - d_u, r + d + d_b], d_b = max(0, d - r), d_u = max(0, d + r - n + 1); the same on
    each spatial axis (the last two; a video's time axis stays dense); text dense both ways. An int
    ``train`` sets every spatial axis."""
    cs, grid = coords(site, S)
    spatial = range(len(grid) - 2 if len(grid) == 3 else 0, len(grid))

    def keep(b, h, i, j):
        if cs[i] is None or cs[j] is None:
            return True
        for a in spatial:
            d, r, n = per_axis(train, a) // 2, cs[i][a], grid[a]
            if not r - d - max(0, d + r - n + 1) <= cs[j][a] <= r + d + max(0, d - r):
                return False
        return True
    return keep


def streaming_heads(full, sink, window, off):
    """StreamingHeads: query heads in ``full`` causal dense, every other head the sink + window rule."""
    rule = sink_window(sink, window)
    return lambda b, h, i, j: j <= i + off and (h in full or rule(i + off, j))
