"""``Neighborhood``: generalized neighborhood attention (GNA / NATTEN) on 1-D, 2-D, 3-D grids.

Each visual query attends the ``window`` neighbourhood (per axis) around the leader of its
stride group, shifted inward at the borders so every window is full; ``stride == window`` is
blocked attention, ``stride == 1`` a sliding window; ``dilation`` spreads the window;
``causal`` (per axis) keeps only the past. Text tokens stay dense both ways. Matches NATTEN's
``na1d / na2d / na3d``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..plan import Plan
from ..site import Site
from ..blocks import default_tiles
from . import _grid
from .base import check_bool, check_ints
from .schedule import Sparse


def default_tile(grid: tuple, window: tuple, stride: tuple) -> tuple:
    """The executor's tile size (attnpatch.blocks.default_tiles), except that a blocked axis
    (stride == window) or a stride > 1 sets that axis's tile, so blocks follow the stride groups."""
    return default_tiles(grid, tuple(s if (s > 1 or s == w) else None for w, s in zip(window, stride)))


@dataclass
class Neighborhood(Sparse):
    """Sliding / strided / dilated neighbourhood attention per grid axis (NATTEN semantics)."""

    source = "Generalized Neighborhood Attention (NATTEN); Faster Neighborhood Attention; DiNAT"
    plans_by_site = True  # a pure function of parameters, Site and shapes (core remembers its kernel calls)
    llm = False  # needs a visual token grid: the transformers patcher refuses it at patch time

    window: int | tuple = 7
    stride: int | tuple = 1
    dilation: int | tuple = 1
    causal: bool | tuple = False
    tile: int | tuple | None = None  # executor tile per axis; default: default_tile()

    def __post_init__(self):
        n = "Neighborhood"
        self.window = check_ints(n, "window", self.window, 1, example=7)
        self.stride = check_ints(n, "stride", self.stride, 1, example=1)
        self.dilation = check_ints(n, "dilation", self.dilation, 1, example=1)
        self.causal = check_bool(n, "causal", self.causal, axes=3, example=False)
        if self.tile is not None:
            self.tile = check_ints(n, "tile", self.tile, 1, example=16)
        per_axis = {f: v for f in ("window", "stride", "dilation", "causal", "tile") if isinstance(v := getattr(self, f), tuple)}
        if len({len(v) for v in per_axis.values()}) > 1:  # no grid has two numbers of axes
            raise ValueError(f"{self!r}: the per-axis tuples {per_axis} must have one entry per grid axis, all the same "
                             "length; e.g. Neighborhood(window=(3, 7, 7), stride=(1, 1, 1))")
        w, s = (v if isinstance(v, tuple) else (v,) * 3 for v in (self.window, self.stride))
        if any(a > b for a, b in zip(s, w)):
            raise ValueError(f"Neighborhood(stride={self.stride!r}): stride must not exceed window={self.window!r} on any "
                             "axis (stride == window is blocked attention, 1 a sliding window); e.g. "
                             "Neighborhood(window=8, stride=8)")
        super().__post_init__()  # after the parameters: a profile's values are checked against them
        self._plans = _grid.PlanCache(self._build)

    def axes(self, grid: tuple):
        """Per-axis (window, stride, dilation, causal), validated against ``grid``."""
        nd = len(grid)
        w, s, d = (_grid.per_axis(getattr(self, f), nd, f, "Neighborhood") for f in ("window", "stride", "dilation"))
        c = _grid.per_axis(self.causal, nd, "causal", "Neighborhood")
        for a in range(nd):
            if s[a] > w[a]:
                raise ValueError(f"Neighborhood(stride={self.stride!r}) must not exceed window={self.window!r} on axis {a}")
        return w, s, d, c

    def _build(self, site: Site, S: int, device) -> Plan:
        grid = site.grid
        w, s, d, c = self.axes(grid)
        keeps = [_grid.na_keep(n, *p) for n, p in zip(grid, zip(w, s, d, c))]
        tile = _grid.per_axis(self.tile, len(grid), "tile", "Neighborhood") if self.tile else default_tile(grid, w, s)
        axes = [_grid.axis_tiling(n, t, dd) for n, t, dd in zip(grid, tile, d)]
        return _grid.separable_plan(site, S, keeps, axes, device, repr(self))

    def plan(self, q, k, site: Site) -> Plan | None:
        site = _grid.site_grid(site, q, k, self.name)
        return None if site is None else self._plans.get(site, q.shape[2], q.device)


if __name__ == "__main__":
    from .base import ascii_mask

    print(ascii_mask(Neighborhood(window=(3, 3), stride=1), Site(grid=(4, 6)), 24))
    print(ascii_mask(Neighborhood(window=3, dilation=2), Site(grid=(11,)), 11))
