"""Shared machinery of the locality methods (Neighborhood, SlidingTile, Radial).

A pattern over a visual grid is built from per-axis 1-D keep tables (``na_keep``), so both the
exact token mask (``mask_mod``, table look-ups) and the block structure (per-axis tile states
combined by ``min``) are vectorised and cheap even for 128K-token videos. Text tokens are one
dense block, both ways.
"""
from __future__ import annotations

import math
import threading
from typing import Callable

import torch

from ..blocks import BlockSparse, from_states, grid_layout, visual_layout  # noqa: F401 (visual_layout: TopKBlocks)
from ..site import Site


def na_keep(n: int, window: int, stride: int = 1, dilation: int = 1, causal: bool = False) -> torch.Tensor:
    """(n, n) keep table of 1-D generalized neighborhood attention, as NATTEN defines it.

    Positions split into ``dilation`` interleaved groups; within a group, queries form stride
    groups that share the window of a leader (the centre, or the last for causal), shifted
    inward at the borders so every window is full. A window >= the group length is dense.
    """
    i = torch.arange(n)
    g, idx = i % dilation, i // dilation  # dilation group and index inside it
    n_g = (n - g + dilation - 1) // dilation
    if causal:
        leader = torch.minimum((idx // stride) * stride + stride - 1, n_g - 1)
        start, end = (leader - window + 1).clamp_min(0), leader
    else:
        leader = (idx // stride) * stride + stride // 2
        start = torch.minimum((leader - window // 2).clamp_min(0), (n_g - window).clamp_min(0))
        end = start + window - 1
    j = idx[None, :]  # key index inside its group, (1, n)
    keep = (g[:, None] == g[None, :]) & (j >= start[:, None]) & (j <= end[:, None])  # (n, n)
    if causal:
        keep &= j <= idx[:, None]
    return keep


def tile_keep(n: int, tile: int, window: int, causal: bool = False) -> torch.Tensor:
    """(n, n) keep table of a tile-level window: tokens in tiles of ``tile``; a query tile sees
    the ``window`` tiles centred on it (shifted inward at borders), as Sliding Tile Attention."""
    t = torch.arange(n) // tile
    return na_keep(math.ceil(n / tile), window, causal=causal)[t][:, t]


def axis_tiling(n: int, tile: int, dilation: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, tile id per ordered position): positions ordered by dilation group, then cut
    into tiles of ``tile`` that never straddle two groups."""
    i = torch.arange(n)
    order = torch.argsort(i % dilation * n + i // dilation)
    g = order % dilation
    pos = order // dilation  # index inside the group
    n_g = (n - torch.arange(dilation) + dilation - 1) // dilation  # group lengths
    tiles_per_group = (n_g + tile - 1) // tile
    offset = torch.cat([torch.zeros(1, dtype=torch.long), tiles_per_group.cumsum(0)[:-1]])
    return order, offset[g] + pos // tile


def tile_states(keep: torch.Tensor, order: torch.Tensor, tile_of: torch.Tensor) -> torch.Tensor:
    """(nt, nt) states of tile pairs on one axis: 0 nothing kept, 1 partly, 2 entirely."""
    nt = int(tile_of.max()) + 1
    onehot = torch.nn.functional.one_hot(tile_of, nt).double()  # (n, nt), ordered positions
    kept = onehot.T @ keep[order][:, order].double() @ onehot  # (nt, nt) kept counts
    size = onehot.sum(0)
    return torch.where(kept == 0, 0, torch.where(kept == size[:, None] * size[None, :], 2, 1)).to(torch.uint8)


def separable_state(states: list[torch.Tensor], tile_axes: list[torch.Tensor]) -> torch.Tensor:
    """(nT, nT) block states of a product pattern: the minimum of the per-axis tile states
    (empty if any axis is empty, full if every axis is full)."""
    return torch.stack([st[ta[:, None], ta[None, :]] for st, ta in zip(states, tile_axes)]).amin(0)


def assemble(site: Site, S: int, vis_perm: torch.Tensor, sizes: torch.Tensor, vis_state: torch.Tensor) -> BlockSparse:
    """Add the text segment (one block, dense both ways) and shift visual indices into the
    sequence: the full BlockSparse of a self / joint call of length S."""
    n = site.visual_len
    if vis_perm is None:
        vis_perm = torch.arange(n)
    T = site.text_len
    if T + n != S:
        raise ValueError(f"site says {T} text + {n} visual tokens but the call has {S}")
    if T == 0:
        identity = torch.equal(vis_perm, torch.arange(n))
        return from_states(vis_state, torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]), None if identity else vis_perm)
    nt = sizes.numel()
    state = torch.full((nt + 1, nt + 1), 2, dtype=torch.uint8)
    text = torch.arange(T)
    if site.text_first:
        state[1:, 1:] = vis_state
        perm, sizes = torch.cat([text, vis_perm + T]), torch.cat([torch.tensor([T]), sizes])
    else:
        state[:-1, :-1] = vis_state
        perm, sizes = torch.cat([vis_perm, text + n]), torch.cat([sizes, torch.tensor([T])])
    return from_states(state, torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]), perm)


def grid_mask_mod(site: Site, keep_fn: Callable) -> Callable:
    """A mask_mod on sequence indices from ``keep_fn(q_coords, kv_coords)`` on visual
    coordinates; text tokens are kept both ways."""
    grid, vs, n = site.grid, site.visual_start, site.visual_len
    strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]

    def coords(x):
        return [(x // s) % g for s, g in zip(strides, grid)]

    def mask_mod(b, h, q_idx, kv_idx):
        qv, kv = q_idx - vs, kv_idx - vs
        text = (qv < 0) | (qv >= n) | (kv < 0) | (kv >= n)
        keep = keep_fn(coords(qv.clamp(0, n - 1)), coords(kv.clamp(0, n - 1)))
        return keep | text

    return mask_mod


def separable_plan(site: Site, S: int, keeps: list, axes: list, device, name: str):
    """The Plan of a product pattern: per-axis keep tables (exact mask) and tilings (blocks)."""
    from ..plan import Plan

    states = [tile_states(kp, o, t) for kp, (o, t) in zip(keeps, axes)]
    perm, sizes, vis = grid_layout(site.grid, axes, lambda tas: separable_state(states, tas))
    tables = [kp.to(device) for kp in keeps]

    def keep_fn(qc, kc):
        keep = tables[0][qc[0], kc[0]]
        for t, qa, ka in zip(tables[1:], qc[1:], kc[1:]):
            keep = keep & t[qa, ka]
        return keep

    return Plan(mask_mod=grid_mask_mod(site, keep_fn), blocks=assemble(site, S, perm, sizes, vis), name=name, static=True)


def per_axis(value, nd: int, name: str, method: str) -> tuple:
    """Broadcast an int parameter to every grid axis or check a tuple's length."""
    vals = tuple(value) if isinstance(value, (tuple, list)) else (value,) * nd
    if len(vals) != nd:
        raise ValueError(f"{method}({name}={value!r}) has {len(vals)} entries but the grid has {nd} axes")
    return vals


def site_grid(site: Site, q, k, method: str) -> Site | None:
    """The site a locality pattern applies to: self / joint calls; a grid-less self call is
    treated as one 1-D axis. None for cross attention (dense); ValueError for unequal query
    and key lengths (LLM decode)."""
    Sq, Skv = q.shape[2], k.shape[2]
    if site.kind == "cross":
        return None
    if Sq != Skv:
        raise ValueError(f"{method} needs self / joint attention (query and key lengths {Sq} != {Skv}); "
                         "for LLM decode use SinkWindow")
    if site.grid is None:
        from dataclasses import replace

        return replace(site, grid=(Sq - site.text_len,))
    return site


class Memo:
    """A small LRU of built values (plans) by key. Safe under concurrent calls: lookups, evictions and
    inserts hold a lock, and a caller returns the value it built or read (never re-reads a key another
    thread may have evicted). A build runs outside the lock, so two threads may build the same value
    once each; both are equal, and the first one stored is what every later call gets (the same
    object, so kernels' caches keyed on it hit)."""

    def __init__(self, maxsize: int = 64):
        self.maxsize, self.store = maxsize, {}
        self._lock = threading.Lock()

    def get(self, key, build: Callable):
        value = self.store.get(key)  # one dict read is atomic: the lock guards only the mutations
        if value is None:
            value = build()
            with self._lock:
                while len(self.store) >= self.maxsize and key not in self.store:
                    self.store.pop(next(iter(self.store)))
                value = self.store.setdefault(key, value)
        return value

    def __getstate__(self):  # copies (deepcopy of a patched model, pickling) get a lock of their own
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class PlanCache(Memo):
    """Plans per (layout, length, device): built once, reused across layers and steps (a static
    plan depends on none of them), as one Plan object."""

    def __init__(self, build: Callable, maxsize: int = 64):
        super().__init__(maxsize)
        self.build = build

    def get(self, site: Site, Sq: int, device):
        # the device object, not str(device): its __str__ costs ~0.5 us, a tenth of a 64-token call's routing
        key = (site.grid, site.text_len, site.text_first, site.causal, site.q_offset, Sq, device)
        return super().get(key, lambda: self.build(site, Sq, device))


def shared_blocks(memo: dict, pattern, make):
    """The BlockSparse of a data-dependent plan's kept pattern (``pattern``: hashable), built once per memo:
    its cache then keeps what the kernels derive from it (refined runs, biases) across calls and layers."""
    if pattern not in memo:
        if len(memo) >= 32:
            memo.pop(next(iter(memo)))
        memo[pattern] = make()
    return memo[pattern]
