"""``BlockSparse``: the block structure of a plan, the acceleration structure kernels share.

Tokens are first permuted into tile order (``perm``), so every block is a contiguous range
``[bounds[i], bounds[i+1])`` of the permuted sequence. For each query block, ``kv_idx`` (CSR
over ``kv_ptr``) lists the KV blocks with any kept element, ascending, and ``kv_full`` says
which of them are kept entirely. The exact pattern stays the plan's ``mask_mod`` (in original
token indices): partial blocks evaluate it, empty blocks are never touched.

How a grid pattern is laid out for the kernels is decided here, not by the methods: a method
describes its pattern in grid terms (per-axis tilings and the block state of any tile pair,
``grid_layout``), and this module picks the tile order (and, where a method leaves it open, the
tile size: ``default_tiles``) by what the kernels pay for.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(eq=False)
class BlockSparse:
    perm: torch.Tensor | None  # (S,) permuted position -> original token index; None: identity
    bounds: torch.Tensor  # (nb + 1,) block boundaries in the permuted sequence
    kv_ptr: torch.Tensor  # (nb + 1,) CSR row pointers over query blocks
    kv_idx: torch.Tensor  # (nnz,) KV block ids, ascending within a row
    kv_full: torch.Tensor  # (nnz,) True where the block pair is kept entirely
    cache: dict = field(default_factory=dict, repr=False)  # per-kernel derived data
    causal: bool = False  # the states and the plan's mask_mod already include causality (prefill, no cache)

    @property
    def num_blocks(self) -> int:
        return self.bounds.numel() - 1

    @property
    def seq_len(self) -> int:
        return int(self.bounds[-1])

    def pair_sizes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(query block size, kv block size) of every stored pair."""
        sizes = self.bounds.diff()
        rows = torch.repeat_interleave(torch.arange(self.num_blocks), self.kv_ptr.diff())
        return sizes[rows], sizes[self.kv_idx]

    def density(self) -> float:
        """Fraction of the S x S score matrix inside non-empty blocks: what a block-sparse
        kernel computes, so 1 / density is its ideal speedup over dense attention."""
        qs, ks = self.pair_sizes()
        return float((qs * ks).sum()) / self.seq_len**2

    def perm_on(self, device) -> torch.Tensor | None:
        """The permutation on ``device`` (cached: kernels need it on every call)."""
        return self._on("perm", self.perm, device)

    def inverse_perm_on(self, device) -> torch.Tensor | None:
        """Tile-order position of every original token, on ``device`` (cached)."""
        if self.perm is None:
            return None
        if "inv" not in self.cache:
            inv = torch.empty_like(self.perm)
            inv[self.perm] = torch.arange(self.perm.numel())
            self.cache["inv"] = inv
        return self._on("inv", self.cache["inv"], device)

    def _on(self, name: str, t: torch.Tensor | None, device) -> torch.Tensor | None:
        if t is None:
            return None
        key = (name, str(device))
        if key not in self.cache:
            self.cache[key] = t.to(device)
        return self.cache[key]

    def runs(self) -> list[tuple[int, int, list[tuple[int, int, bool]]]]:
        """``[(q_start, q_end, [(kv_start, kv_end, full), ...]), ...]`` in permuted token
        positions: adjacent KV blocks of one kind merge into one contiguous run, and adjacent
        query blocks with identical runs merge into one query range (fewer, larger calls)."""
        if "runs" in self.cache:
            return self.cache["runs"]
        b = self.bounds.tolist()
        ptr, idx, full = self.kv_ptr.tolist(), self.kv_idx.tolist(), self.kv_full.tolist()
        out: list = []
        for i in range(self.num_blocks):
            runs: list[list] = []
            for j, f in zip(idx[ptr[i]:ptr[i + 1]], full[ptr[i]:ptr[i + 1]]):
                if runs and runs[-1][1] == b[j] and runs[-1][2] == f:
                    runs[-1][1] = b[j + 1]
                else:
                    runs.append([b[j], b[j + 1], f])
            runs_t = [tuple(r) for r in runs]
            if out and out[-1][1] == b[i] and out[-1][2] == runs_t and all(r[2] for r in runs_t):
                out[-1] = (out[-1][0], b[i + 1], runs_t)  # merge only fully kept rows: masks are per row
            else:
                out.append((b[i], b[i + 1], runs_t))
        self.cache["runs"] = out
        return out


def causal_states(keep_count, bounds: torch.Tensor) -> torch.Tensor:
    """(nb, nb) states of a causal 1-D pattern from ``keep_count(rows (R,), a, b) -> (R, nb)``, the
    number of kept keys of each query row in every key block [a_j, b_j): 0 empty, 1 partial, 2 full."""
    S = int(bounds[-1])
    a, b = bounds[:-1], bounds[1:]
    rows = torch.arange(S)
    counts = keep_count(rows, a, b)  # (S, nb)
    block_of = torch.repeat_interleave(torch.arange(len(a)), b - a)
    kept = torch.zeros(len(a), len(a), dtype=torch.long).index_add_(0, block_of, counts)  # (nb, nb)
    size = (b - a)[:, None] * (b - a)[None, :]
    return torch.where(kept == 0, 0, torch.where(kept == size, 2, 1)).to(torch.uint8)


def overlap(lo: torch.Tensor, hi: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|[lo, hi) n [a, b)| for rows (R, 1) against blocks (nb,): (R, nb)."""
    return (torch.minimum(hi, b) - torch.maximum(lo, a)).clamp_min(0)


def from_states(state: torch.Tensor, bounds: torch.Tensor, perm: torch.Tensor | None, causal: bool = False) -> BlockSparse:
    """Build the CSR structure from a (nb, nb) block-state matrix: 0 empty, 1 partial, 2 full."""
    nz = state > 0
    kv_ptr = torch.zeros(state.shape[0] + 1, dtype=torch.long)
    kv_ptr[1:] = nz.sum(1).cumsum(0)
    rows, cols = nz.nonzero(as_tuple=True)  # row-major, so columns ascend within a row
    return BlockSparse(perm=perm, bounds=bounds.long(), kv_ptr=kv_ptr, kv_idx=cols, kv_full=state[rows, cols] == 2, causal=causal)


# ---- grid layouts: the executor's choice of tile order and size -----------------------------------

# Tokens per tile when a method leaves the tile size open, per grid rank: about 256 tokens. PyTorch's
# CPU flash kernel runs calls under ~768 queries at ~0.87 of its rate (DESIGN.md), and smaller tiles
# multiply the tiles kernel's calls; larger ones keep more of the score matrix in partial blocks.
DEFAULT_TILE = {1: (256,), 2: (16, 16), 3: (2, 8, 16)}


def default_tiles(grid: tuple, required: tuple) -> tuple:
    """Tile size per axis of ``grid``: ``required[a]`` where the pattern fixes it (e.g. its stride
    groups), else ``DEFAULT_TILE``; never more than the axis."""
    base = DEFAULT_TILE[len(grid)]
    return tuple(min(n, b if r is None else r) for n, r, b in zip(grid, required, base))


def visual_layout(grid, axes, order=None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Tile order of a visual grid from per-axis ``(order, tile_of)``: the permutation (N,)
    from tiled position to row-major visual index (None when it is the identity), the tile
    sizes (nT,), and each axis's tile index per tile. Tiles are enumerated row-major over the
    tile grid with the axes taken in ``order`` (outermost first; default: grid order)."""
    nd = len(grid)
    order = tuple(range(nd)) if order is None else tuple(order)
    nts = [int(t.max()) + 1 for _, t in axes]
    rank = [torch.empty_like(o) for o, _ in axes]
    tile = [torch.empty_like(o) for o, _ in axes]
    for a, (o, t) in enumerate(axes):
        rank[a][o] = torch.arange(o.numel())  # coordinate -> position in the axis order
        tile[a][o] = t  # coordinate -> tile id
    coords = torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij")  # row-major visual tokens
    tile_lin = torch.zeros(grid, dtype=torch.long)
    rank_lin = torch.zeros(grid, dtype=torch.long)
    for a in order:
        tile_lin = tile_lin * nts[a] + tile[a][coords[a]]
    for a in range(nd):
        rank_lin = rank_lin * grid[a] + rank[a][coords[a]]
    n = math.prod(grid)
    perm = torch.argsort(tile_lin.flatten() * n + rank_lin.flatten())
    if torch.equal(perm, torch.arange(n)):
        perm = None  # tiles already contiguous in row-major order (e.g. full-width bands): no gather
    sizes = torch.bincount(tile_lin.flatten(), minlength=math.prod(nts))
    in_order = torch.meshgrid(*[torch.arange(nts[a]) for a in order], indexing="ij")
    tile_axes = [None] * nd
    for pos, a in enumerate(order):
        tile_axes[a] = in_order[pos].flatten()
    return perm, sizes, tile_axes


def count_runs(state: torch.Tensor) -> int:
    """Contiguous runs of one kind (partial / full) over all rows of a block-state matrix: the
    number of SDPA calls the tiles kernel makes, and of KV ranges the other block kernels walk."""
    prev = torch.cat([torch.zeros_like(state[:, :1]), state[:, :-1]], dim=1)
    return int(((state > 0) & (state != prev)).sum())


def grid_layout(grid, axes, state_fn: Callable):
    """The tile order of a grid pattern: ``axes`` per-axis ``(order, tile_of)`` tilings (the
    method's), ``state_fn(tile_axes)`` the (nT, nT) block states of the tiles for any enumeration
    (0 empty, 1 partial, 2 full). Picks, over all orders of the axes, the one whose block rows have
    the fewest runs (e.g. a temporal window over one spatial tile is one run when time is the inner
    axis; ties: the first order, grid order first). Returns (perm, sizes, visual block states)."""
    best = None
    for order in itertools.permutations(range(len(grid))):
        perm, sizes, tile_axes = visual_layout(grid, axes, order)
        state = state_fn(tile_axes)
        runs = count_runs(state)
        if best is None or runs < best[0]:
            best = (runs, perm, sizes, state)
    return best[1:]
