"""``SlidingTile``: Sliding Tile Attention (FastVideo). Tokens are grouped into tiles of
``tile`` per axis; a query tile attends the ``window`` tiles per axis centred on it (odd counts,
shifted inward at the borders). Block aligned by construction; on grids divisible by the tile
it equals ``Neighborhood(window=tile * window, stride=tile)``. Text stays dense."""
from __future__ import annotations

from dataclasses import dataclass

from ..plan import Plan
from ..site import Site
from . import _grid
from .base import check_int
from .schedule import Sparse


@dataclass
class SlidingTile(Sparse):
    """Tile-granular sliding window: ``window`` tiles of ``tile`` tokens per axis."""

    source = "Fast Video Generation with Sliding Tile Attention (FastVideo, Zhang et al. 2025)"

    tile: int | tuple = 8
    window: int | tuple = 3

    def __post_init__(self):
        super().__post_init__()
        for name in ("tile", "window"):
            v = getattr(self, name)
            for x in v if isinstance(v, (tuple, list)) else (v,):
                check_int("SlidingTile", name, x, 1)
        for x in self.window if isinstance(self.window, (tuple, list)) else (self.window,):
            if x % 2 == 0:
                raise ValueError(f"SlidingTile(window={self.window!r}) must be odd tile counts (centred on the query tile)")
        self._plans = _grid.PlanCache(self._build)

    def _build(self, site: Site, S: int, device) -> Plan:
        grid = site.grid
        tile = _grid.per_axis(self.tile, len(grid), "tile", "SlidingTile")
        window = _grid.per_axis(self.window, len(grid), "window", "SlidingTile")
        keeps = [_grid.tile_keep(n, t, w) for n, t, w in zip(grid, tile, window)]
        axes = [_grid.axis_tiling(n, t) for n, t in zip(grid, tile)]
        return _grid.separable_plan(site, S, keeps, axes, device, repr(self))

    def plan(self, q, k, site: Site) -> Plan | None:
        site = _grid.site_grid(site, q, k, self.name)
        return None if site is None else self._plans.get(site, q.shape[2], q.device)


if __name__ == "__main__":
    from .base import ascii_mask

    print(ascii_mask(SlidingTile(tile=2, window=3), Site(grid=(12,)), 12))
    print(ascii_mask(SlidingTile(tile=(2, 2), window=(1, 3)), Site(grid=(4, 6), text_len=2, kind="joint"), 26))
