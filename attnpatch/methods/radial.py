"""``Radial``: Radial Attention's static O(n log n) spatiotemporal-decay mask for video DiTs.

Tokens of a (T, H, W) grid are grouped per frame into spatial tiles of ``tile``. A query tile
attends, in a key frame at temporal distance d, the spatial tiles inside a window centred on
it (tile units, shifted inward at the borders) whose width starts at ``window`` tiles for
d <= 1 and divides by ``decay`` with each doubling of d (band r = floor(log2 d); width =
largest odd count <= window / decay**r; none once it drops below 1). The first
``dense_frames`` frames are a sink: every query attends them and they attend everything.
``window=None`` starts from the whole frame. Text stays dense. Block aligned by construction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..blocks import grid_layout
from ..plan import Plan
from ..site import Site
from . import _grid
from .base import check_int, check_ints, check_number
from .schedule import Sparse


def band_of(T: int) -> torch.Tensor:
    """(T,) band index of each temporal distance: 0 for d <= 1, floor(log2 d) beyond."""
    d = torch.arange(T).clamp_min(1)
    return torch.floor(torch.log2(d.double())).long()


@dataclass
class Radial(Sparse):
    """Spatial window shrinking with temporal distance, plus sink frames (video only)."""

    source = "Radial Attention: O(n log n) Sparse Attention with Energy Decay (Li et al. 2025)"
    llm = False  # needs a video grid (T, H, W): the transformers patcher refuses it at patch time
    plans_by_site = True  # a pure function of parameters, Site and shapes (core remembers its kernel calls)

    window: int | tuple | None = None  # spatial window in tiles per axis at distance <= 1 (odd)
    decay: float = 2.0
    dense_frames: int = 1
    tile: int | tuple = 8  # spatial tile per axis, in tokens

    def __post_init__(self):
        r = "Radial"
        if self.window is not None:  # odd: a window is centred on the query tile (2 would silently become 1)
            self.window = check_ints(r, "window", self.window, 1, axes=2, exact=True, odd=True, example=3,
                                     expected="None (the whole frame), an odd integer >= 1, or a pair of them, one "
                                              "per spatial axis (H, W): tiles centred on the query tile")
        self.decay = check_number(r, "decay", self.decay, low=1, example=2.0)
        self.dense_frames = check_int(r, "dense_frames", self.dense_frames, 0, example=1)
        self.tile = check_ints(r, "tile", self.tile, 1, axes=2, exact=True, example=8,
                               expected="an integer >= 1 or a pair of them, one per spatial axis (H, W): tokens per tile")
        super().__post_init__()  # after the parameters: a profile's values are checked against them
        self._plans = _grid.PlanCache(self._build)

    def widths(self, n_tiles: int, window: int | None, bands: int) -> list[int]:
        """Window width in tiles of each band (0: nothing at that distance)."""
        w0 = n_tiles * 2 - 1 if window is None else window  # covers the whole frame from any tile
        out = []
        for r in range(bands):
            w = math.floor(w0 / self.decay**r + 1e-9)
            out.append(w if w % 2 else w - 1)
        return [max(w, 0) for w in out]

    def _spatial(self, grid):
        """Per spatial axis: (R, n, n) keep tables by band, the tiling, and the (R, nt, nt) states."""
        T, spatial = grid[0], grid[1:]
        tile = _grid.per_axis(self.tile, 2, "tile", "Radial")
        window = (None, None) if self.window is None else _grid.per_axis(self.window, 2, "window", "Radial")
        bands = int(band_of(T).max()) + 1
        out = []
        for n, t, w in zip(spatial, tile, window):
            keep = torch.stack([_grid.tile_keep(n, t, wr) if wr else torch.zeros(n, n, dtype=torch.bool)
                                for wr in self.widths(math.ceil(n / t), w, bands)])  # (R, n, n)
            order, tile_of = _grid.axis_tiling(n, t)
            states = torch.stack([_grid.tile_states(kr, order, tile_of) for kr in keep])  # (R, nt, nt)
            out.append((keep, (order, tile_of), states))
        return out

    def _build(self, site: Site, S: int, device) -> Plan:
        grid = site.grid
        T = grid[0]
        sp = self._spatial(grid)
        time_axis = (torch.arange(T), torch.arange(T))  # one frame per tile
        def state(tile_axes):
            tt, th, tw = tile_axes
            band = band_of(T)[(tt[:, None] - tt[None, :]).abs()]  # (nT, nT)
            vis = torch.minimum(sp[0][2][band, th[:, None], th[None, :]], sp[1][2][band, tw[:, None], tw[None, :]])
            sink = (tt[:, None] < self.dense_frames) | (tt[None, :] < self.dense_frames)
            return torch.where(sink, 2, vis).to(torch.uint8)

        perm, sizes, vis = grid_layout(grid, [time_axis, sp[0][1], sp[1][1]], state)  # the executor picks the order
        kh, kw, bands, nd = sp[0][0].to(device), sp[1][0].to(device), band_of(T).to(device), self.dense_frames

        def keep_fn(qc, kc):
            r = bands[(qc[0] - kc[0]).abs()]
            return (qc[0] < nd) | (kc[0] < nd) | (kh[r, qc[1], kc[1]] & kw[r, qc[2], kc[2]])

        return Plan(mask_mod=_grid.grid_mask_mod(site, keep_fn), blocks=_grid.assemble(site, S, perm, sizes, vis), name=repr(self),
                    static=True)

    def plan(self, q, k, site: Site) -> Plan | None:
        if site.kind != "cross" and (site.grid is None or len(site.grid) != 3):
            raise ValueError(f"Radial needs a video grid (T, H, W); this site has grid {site.grid}")
        site = _grid.site_grid(site, q, k, self.name)
        return None if site is None else self._plans.get(site, q.shape[2], q.device)


if __name__ == "__main__":
    from .base import ascii_mask

    m = Radial(window=3, tile=2, dense_frames=1)
    print(ascii_mask(m, Site(grid=(6, 1, 6)), 36))
