"""``TopKBlocks``: data-dependent block sparsity for DiTs and LLM prefill. Tokens are grouped in grid
tiles (about 256 tokens; causal calls: key blocks of about 1/16 of the keys, 32-256 tokens, ``causal_block``); the block logits are the mean-pooled queries times the mean-pooled keys,
``q_blk @ k_blk^T * scale + log |k_blk|`` (the log-size term makes a block's softmax share
estimate its total attention mass). Each query tile keeps the ``keep`` fraction of tiles with
the largest estimated mass, or the smallest set reaching ``mass``, plus its own tile (and its
``local`` tile neighbourhood) and the text, both ways. On grids the estimate is averaged over batch and
heads, so one block structure serves the whole call (what block-sparse kernels run; a DiT batch is one
image's guidance branches, or images of one prompt). Causal (LLM) calls estimate per batch row, averaged
over heads: a batch of different prompts gives each what it gets alone, each row then its own call
(``Plan.rows``) when their blocks differ.
Estimation is O(S * D + tiles^2 * D): well under 1 % of dense attention at 16K tokens.

Options from the block-selection papers (grids only; ``_block_scores`` has the definitions):
``score="antidiagonal", stride=8`` (XAttention: strided antidiagonal sums; with ``mass`` its threshold),
``score="similarity"`` (VMoBA's min-max normalised gate; with ``mass`` its cumulative-similarity threshold),
``scope="global"`` (VMoBA: tile pairs compete over the whole map, not per query tile) and
``partition="cycle"`` (VMoBA: layer ``l`` tiles along the first axis, the other axes, or all, by ``l % 3``;
or a tuple of per-axis tiles cycled over layers).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..blocks import from_states
from ..plan import Plan
from ..site import Site
from ._padded import per_row
from . import _block_scores as _bs
from . import _grid
from .base import check_int, check_ints, check_number
from .schedule import Sparse

BASE_TILE = {1: (256,), 2: (16, 16), 3: (2, 8, 16)}


@dataclass
class TopKBlocks(Sparse):
    """Keep, per query tile (or over the whole tile map), the key tiles with the largest estimated attention mass."""

    source = "VMoBA (Wu et al. 2025, training-free), XAttention (Xu et al. 2025), SpargeAttn, DHSA, SEA, HiP"

    keep: float | None = 0.25  # fraction of key tiles per query tile (ignored when mass is set)
    mass: float | None = None  # or: the smallest set of tiles whose estimated mass reaches this
    block: int | tuple | None = None  # tile per grid axis; default about 256 tokens (causal: causal_block(keys))
    local: int = 0  # also keep tiles within this Chebyshev tile distance (0: own tile only)
    score: str = "mean"  # block estimate: "mean" pooling, "antidiagonal" (XAttention), "similarity" (VMoBA)
    stride: int = 8  # antidiagonal: tokens per group (the estimate costs 1 / stride of dense q k^T)
    scope: str = "query"  # "query": a budget per query tile; "global": all tile pairs compete (VMoBA)
    partition: str | tuple | None = None  # "cycle" (VMoBA 1-D / 2-D / 3-D by layer) or a tuple of tiles to cycle

    def __post_init__(self):
        t = "TopKBlocks"
        if self.mass is not None:
            self.mass = check_number(t, "mass", self.mass, low=0, high=1, low_open=True, example=0.9)
        elif self.keep is None:
            raise ValueError("TopKBlocks(keep=None, mass=None): keep must be in (0, 1] (or pass mass=...); "
                             "e.g. TopKBlocks(keep=0.25) or TopKBlocks(mass=0.9)")
        if self.keep is not None:
            self.keep = check_number(t, "keep", self.keep, low=0, high=1, low_open=True, example=0.25)
        if self.block is not None:
            self.block = check_ints(t, "block", self.block, 1, example=16)
        self.local = check_int(t, "local", self.local, 0, example=1)
        self._check_options()
        super().__post_init__()  # after the parameters: a profile's values are checked against them
        self._layouts = _Layouts(self)
        self._causal_layouts: dict = {}  # (Sq, Skv, q_offset, device) -> index tensors of a causal call
        self._causal_blocks: dict = {}  # (Sq, Skv, q_offset, kept pattern) -> its BlockSparse (with the kernels' cache)

    def _check_options(self) -> None:
        t = "TopKBlocks"
        for name, allowed in (("score", _bs.SCORES), ("scope", _bs.SCOPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{t}({name}={getattr(self, name)!r}): {name} must be one of {allowed}; "
                                 f"e.g. {t}({name}={allowed[1]!r})")
        self.stride = check_int(t, "stride", self.stride, 1, example=8)
        p = self.partition
        if p is not None and p != "cycle":
            if not isinstance(p, (tuple, list)) or not p or not all(isinstance(x, (tuple, list)) for x in p):
                raise ValueError(f"{t}(partition={p!r}): partition must be None, 'cycle' or a tuple of per-axis "
                                 "tiles cycled over layers; e.g. TopKBlocks(partition=((1, 8, 8), (4, 2, 2)))")
            self.partition = tuple(check_ints(t, "partition", x, 1, example=(2, 8, 8)) for x in p)

    def __repr__(self) -> str:  # the options show only when set: reprs of the plain method stay as they were
        shown = [f for f in dataclasses.fields(self) if f.repr and (f.name not in _OPTIONS or getattr(self, f.name) != f.default)]
        return f"TopKBlocks({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in shown)})"

    def layer_free(self) -> bool:
        return super().layer_free() and self.partition is None  # a partition picks each layer's tile

    def static_at(self, q, k, site: Site) -> bool:
        """Dense steps and layers, a prefill whose always-kept blocks are every block it sees (calls of at most
        512 keys) and a grid call whose layout is one tile or keeps every tile: no estimate in any of them.
        Decode steps are not (each key length is seen once)."""
        if super().static_at(q, k, site):
            return True
        if site.causal:
            return q.shape[2] > 1 and site.kv_shift is None and bool(
                self._causal_layout(q.shape[2], k.shape[2], site.q_offset, q.device)["dense"])
        if site.grid is None:
            return False
        grid_site = _grid.site_grid(site, q, k, self.name)
        return grid_site is not None and bool(self._layouts.get(grid_site, q.shape[2], q.device)["dense"])

    def _tile(self, site: Site) -> tuple:
        """This call's tile per grid axis: ``block`` (default about 256 tokens), or the partition of
        the call's layer."""
        grid = site.grid
        tile = (_grid.per_axis(self.block, len(grid), "block", "TopKBlocks") if self.block
                else tuple(min(n, b) for n, b in zip(grid, BASE_TILE[len(grid)])))
        if self.partition is None:
            return tile
        tiles = _bs.partition_tiles(grid, tile) if self.partition == "cycle" else self.partition
        pick = tuple(tiles[site.layer % len(tiles)])
        if len(pick) != len(grid):
            raise ValueError(f"TopKBlocks(partition={self.partition!r}): a tile of {len(pick)} axes for a grid of "
                             f"{len(grid)} axes {grid}")
        return tuple(min(n, b) for n, b in zip(grid, pick))

    def _layout(self, site: Site, S: int, device, tile: tuple) -> dict:
        """Tile order of the grid (cached per layout and tile): permutation, sizes, tile of every visual
        token (row-major), per-axis tile coordinates, and the always-kept tile pairs."""
        grid = site.grid
        axes = [_grid.axis_tiling(n, t) for n, t in zip(grid, tile)]
        perm, sizes, tile_axes = _grid.visual_layout(grid, axes)
        n = site.visual_len
        tile_of = torch.empty(n, dtype=torch.long)
        order = torch.arange(n) if perm is None else perm
        tile_of[order] = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)  # row-major token -> tile
        ta = torch.stack(tile_axes, 1)  # (nT, axes)
        forced = (ta[:, None] - ta[None, :]).abs().amax(-1) <= self.local  # (nT, nT)
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        nT = sizes.numel()  # dense: no selection can drop a tile (one tile, or keep takes them all)
        if self.scope == "global":
            takes_all = self.mass is None and math.ceil(self.keep * nT * nT - 1e-9) >= nT * nT
        else:
            takes_all = self.mass is None and math.ceil(self.keep * nT) >= nT
        dense = bool(forced.all()) or takes_all
        groups = _bs.stride_groups(order, sizes, n, self.stride) if self.score == "antidiagonal" else None
        return dict(perm=perm, sizes=sizes, tile_of=tile_of.to(device), forced=forced.to(device), order=order.to(device),
                    bounds=bounds.to(device), dense=dense, groups=groups)

    def estimate(self, q, k, site: Site, lay: dict) -> torch.Tensor:
        """(nT, nT) estimated share of each query tile's attention mass per key tile."""
        D = q.shape[3]
        v0, n = site.visual_start, site.visual_len
        sizes = lay["sizes"].to(q.device)

        def pool(x):  # (B, h, n, D) -> (B, h, nT, D) tile means
            if x.device.type == "cuda" and D >= 16 and not D & (D - 1) and x.shape[1]:  # 0 heads: a rank lacking a group
                from ..ops.triton_pool import tile_means  # fused on the GPU: no permuted copy

                return tile_means(x[:, :, v0:v0 + n], lay["order"], lay["bounds"])
            return _pool(x[:, :, v0:v0 + n], lay["tile_of"], sizes)

        if self.score == "antidiagonal":
            return _bs.antidiagonal(q, k, v0, n, lay["groups"], self.stride, site.head_mean)
        if self.score == "similarity":
            return _bs.similarity(pool(q), pool(k), self.scope, site.head_mean)
        return site.head_mean(torch.softmax(_block_logits(pool(q), pool(k), sizes), -1))  # every rank's heads

    def select(self, est: torch.Tensor, forced: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """(nq, nk) boolean blocks kept: forced ones, then by estimated mass (``keep`` counts a
        fraction of the ``allowed`` blocks of each row, all of them by default; ``scope="global"``: of the
        whole map)."""
        if self.scope == "global" and allowed is None:
            return _bs.select_global(est, forced, self.keep, self.mass)
        nT = est.shape[1]
        score = est.masked_fill(forced, float("inf"))
        order = score.argsort(-1, descending=True)
        if self.mass is not None:
            sorted_mass = est.gather(-1, order).masked_fill(forced.gather(-1, order), 0.0)
            before = sorted_mass.cumsum(-1) - sorted_mass + est.masked_fill(~forced, 0.0).sum(-1, keepdim=True)
            take = before < self.mass  # a tile is taken while the mass before it falls short
        else:
            avail = torch.full((est.shape[0], 1), nT, device=est.device) if allowed is None else allowed.sum(-1, keepdim=True)
            k = (self.keep * avail).ceil().clamp_min(1)  # (nq, 1) per row
            take = torch.arange(nT, device=est.device)[None, :] < k
        keep = torch.zeros_like(forced).scatter_(-1, order, take)
        return keep | forced

    def _causal_layout(self, Sq: int, Skv: int, off: int, device) -> dict:
        """Index tensors of a causal call's block structure (cached per shape and offset): key
        block bounds and block of every key, query groups (rows sharing the block of their own
        position), the causal and forced block pairs, and ``dense`` when the selection cannot
        drop any allowed block (every allowed block forced, or ``keep`` takes them all)."""
        key = (Sq, Skv, off, device)
        lay = self._causal_layouts.get(key)
        if lay is not None:
            return lay
        bsz = self.block or causal_block(Skv)
        bounds = torch.cat([torch.arange(0, Skv, bsz), torch.tensor([Skv])])
        nk = bounds.numel() - 1
        qblock = (torch.arange(Sq) + off) // bsz  # key block of each query's own position
        groups, qgroup = torch.unique(qblock, return_inverse=True)  # query rows grouped by their block
        j = torch.arange(nk)[None, :]
        allowed = j <= groups[:, None]  # (nq, nk) causal at block level
        forced = allowed & ((j == 0) | (j >= groups[:, None] - max(1, self.local)))
        free = allowed & ~forced
        take = None if self.mass is not None else (self.keep * allowed.sum(-1)).ceil().clamp_min(1)
        dense = not free.any() or (take is not None and bool((take >= allowed.sum(-1)).all()))
        lay = dict(bounds=bounds.to(device), kblock=(torch.arange(Skv) // bsz).to(device), qgroup=qgroup.to(device),
                   groups=groups.to(device), qcount=torch.bincount(qgroup, minlength=len(groups)).to(device),
                   sizes=bounds.diff().to(device), allowed=allowed.to(device), forced=forced.to(device), dense=dense,
                   bounds_cpu=bounds, block_rows=Sq == Skv and off == 0 and nk > 1)
        if len(self._causal_layouts) >= 64:
            self._causal_layouts.pop(next(iter(self._causal_layouts)), None)
        return self._causal_layouts.setdefault(key, lay)

    def _causal_plan(self, q, k, site: Site) -> Plan | None:
        """LLM prefill / decode: 1-D key blocks of ``block`` tokens (default ``causal_block``), causal; the
        first block (attention sink), the query's own block and max(1, ``local``) blocks before
        it are always kept (a query early in its block still sees a full block of recent
        context). Prefill gets a causal block structure for the block-sparse kernels. None
        (plain causal attention, exact) when the rule keeps every block the call can see."""
        if isinstance(self.block, (tuple, list)):
            raise ValueError(f"TopKBlocks(block={self.block!r}) must be one int for causal (LLM) attention")
        if (self.score, self.scope, self.partition) != ("mean", "query", None):
            raise ValueError(f"{self!r}: score / scope / partition options are for grids (DiT self / joint "
                             "attention); causal (LLM) calls use TopKBlocks(keep=...) or TopKBlocks(mass=...)")
        if site.kv_shift is not None and bool((site.kv_shift < 0).any()):  # left padding: blocks from each row's
            return per_row(self._causal_plan, q, k, site, repr(self))  # first real token, estimates per row
        B, H, Sq, D = q.shape
        Skv, off = k.shape[2], site.q_offset
        lay = self._causal_layout(Sq, Skv, off, q.device)
        if lay["dense"]:
            return None
        allowed, qgroup, kblock = lay["allowed"], lay["qgroup"], lay["kblock"]
        pq = _pool(q, qgroup, lay["qcount"])
        pk = _pool(k, kblock, lay["sizes"])
        probs = torch.softmax(_block_logits(pq, pk, lay["sizes"]).masked_fill(~allowed, float("-inf")), -1)
        # each batch row estimates on its own (a row of a batch of prompts gets what it gets alone: averaged over
        # ten different RULER prompts at 4K, the blocks of each one's needle were dropped and every answer lost);
        # over its heads, and every rank's heads under tensor parallelism
        est = site.head_mean(probs.transpose(0, 1)[None])  # (B, nq, nk): one reduction over heads for every row
        keeps = [self.select(est[b], lay["forced"], allowed) & allowed for b in range(B)]
        if any(not torch.equal(keeps[0], kb) for kb in keeps[1:]):
            return self._rows_plan(keeps, q, k, site, lay)
        return self._keep_plan(keeps[0], Sq, Skv, off, site, lay)

    def _rows_plan(self, keeps, q, k, site: Site, lay) -> Plan:
        """Rows whose estimates differ: one plan per row (core runs each row as its own call) and a mask_mod
        holding every row's blocks for the other consumers."""
        Sq, Skv, off = q.shape[2], k.shape[2], site.q_offset
        rows = tuple(self._keep_plan(kb, Sq, Skv, off, site, lay) for kb in keeps)
        return Plan(mask_mod=_causal_mask_mod(torch.stack(keeps), lay, Sq, Skv, off), rows=rows, name=repr(self))

    def _keep_plan(self, keep, Sq: int, Skv: int, off: int, site: Site, lay) -> Plan | None:
        """The plan of one kept block table (nq, nk) shared by the call's rows; None when it keeps all it can see."""
        if bool(keep.eq(lay["allowed"]).all()):
            return None  # everything the call can see is kept: plain causal attention is this plan, exactly
        blocks = None
        if lay["block_rows"] and site.kv_shift is None:
            state = keep.cpu().to(torch.uint8) * 2
            state.diagonal().fill_(1)  # the causal diagonal block is partial
            # the mask is keep's blocks & causal: one BlockSparse per kept pattern, whose cache then keeps what the
            # kernels derive from it (refined runs, diagonal checks, biases: ~a third of a 1K call) across calls
            blocks = _grid.shared_blocks(self._causal_blocks, (Sq, Skv, off, state.numpy().tobytes()),
                             lambda: from_states(state, lay["bounds_cpu"], None, causal=True))
        return Plan(mask_mod=_causal_mask_mod(keep, lay, Sq, Skv, off), blocks=blocks, name=repr(self))

    def plan(self, q, k, site: Site) -> Plan | None:
        if site.causal:
            return self._causal_plan(q, k, site)
        site = _grid.site_grid(site, q, k, self.name)
        if site is None:
            return None
        lay = self._layouts.get(site, q.shape[2], q.device)
        if lay["dense"]:
            return None  # one tile, or keep takes every tile: dense attention is this plan, exactly (no estimate)
        keep = self.select(self.estimate(q, k, site, lay), lay["forced"])
        keep_cpu = keep.cpu()
        if bool(keep_cpu.all()):
            return None  # the estimate kept every tile (mass): plain SDPA, no mask tensor
        blocks = _grid.shared_blocks(lay.setdefault("blocks_by_pattern", {}), keep_cpu.numpy().tobytes(),  # as _causal_plan's
                         lambda: _grid.assemble(site, q.shape[2], lay["perm"], lay["sizes"], keep_cpu.to(torch.uint8) * 2))
        v0, n, tile_of = site.visual_start, site.visual_len, lay["tile_of"]

        def mask_mod(b, h, q_idx, kv_idx):
            qv, kv = q_idx - v0, kv_idx - v0
            text = (qv < 0) | (qv >= n) | (kv < 0) | (kv >= n)
            return keep[tile_of[qv.clamp(0, n - 1)], tile_of[kv.clamp(0, n - 1)]] | text

        return Plan(mask_mod=mask_mod, blocks=blocks, name=repr(self))


_OPTIONS = ("score", "stride", "scope", "partition")  # shown in the repr only when not the default


class _Layouts(_grid.Memo):
    """Grid layouts by (tile of the call's layer, grid, text, length, device)."""

    def __init__(self, method: TopKBlocks):
        super().__init__()
        self.method = method

    def get(self, site: Site, S: int, device) -> dict:
        tile = self.method._tile(site)
        key = (tile, site.grid, site.text_len, site.text_first, S, device)
        return super().get(key, lambda: self.method._layout(site, S, device, tile))


def causal_block(Skv: int) -> int:
    """Default key block of a causal call with ``Skv`` keys: about 16 blocks (Skv / 16 rounded down to a
    power of two) between 32 and 256 tokens; 256 from 4K keys on, and for calls of at most 512 keys, which
    stay dense by the always-kept rule as they did with 256-token blocks. Fixed 256-token blocks left a
    1K call 4 blocks, of which the first, the own and the previous one are always kept: 8 of the 10
    causal block pairs, near dense and slower than stock (1.2-1.3x per call); 64-token blocks there keep
    what ``keep`` asks and run at 0.7x (benchmarks/results/percall.md)."""
    if Skv <= 512:
        return 256
    return max(32, min(256, 1 << (Skv // 16).bit_length() - 1))


def _causal_mask_mod(keep, lay, Sq: int, Skv: int, off: int):
    """The mask_mod of kept key blocks ``keep``: (nq, nk) shared by the call's rows, or (B, nq, nk) one per row; causal."""
    qgroup, kblock = lay["qgroup"], lay["kblock"]

    def mask_mod(b, h, q_idx, kv_idx):
        qg, kb = qgroup[q_idx.clamp(0, Sq - 1)], kblock[kv_idx.clamp(0, Skv - 1)]
        return (keep[qg, kb] if keep.dim() == 2 else keep[b, qg, kb]) & (kv_idx <= q_idx + off)

    return mask_mod


def _pool(x, idx, counts):
    """(B, h, L, D) -> (B, h, n, D) float32 means of the rows with each group id (``counts`` per group)."""
    out = torch.zeros(*x.shape[:2], counts.numel(), x.shape[3], device=x.device).index_add_(2, idx, x.float())
    return out / counts.clamp_min(1).to(out.dtype)[:, None]


def _block_logits(pq, pk, sizes):
    """(B, H, nq, nk) block logits ``pq pk^T / sqrt(D) + log |k_blk|``; pk may have fewer (GQA) heads:
    the query heads of one KV head share its pooled keys (no repeated copy)."""
    B, H, nq, D = pq.shape
    Hkv, nk = pk.shape[1], pk.shape[2]
    s = pq.view(B, Hkv, H // max(Hkv, 1) * nq, D) @ pk.transpose(-1, -2)  # Hkv = 0: a rank holding none of a group
    return s.view(B, H, nq, nk) * D**-0.5 + sizes.to(s.dtype).log()


if __name__ == "__main__":
    from ..plan import materialise_mask

    torch.manual_seed(0)
    site, m = Site(grid=(4, 8)), TopKBlocks(keep=0.25, block=2)
    q = torch.randn(1, 1, 32, 8)
    k = q + 0.5 * torch.randn(1, 1, 32, 8)  # keys near their queries: the estimate should find the diagonal
    keep = materialise_mask(m.plan(q, k, site), 1, 1, 32, 32, "cpu")[0, 0]
    print(f"{m} on random q, k at a 4x8 grid (tiles of 2x2):")
    print("\n".join("".join("#" if x else "." for x in row.tolist()) for row in keep))
