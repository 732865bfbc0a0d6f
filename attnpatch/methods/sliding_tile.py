"""``SlidingTile``: Sliding Tile Attention (FastVideo). Tokens are grouped into tiles of
``tile`` per axis; a query tile attends the ``window`` tiles per axis centred on it (odd counts,
shifted inward at the borders). Block aligned by construction; on grids divisible by the tile
it equals ``Neighborhood(window=tile * window, stride=tile)``. Text stays dense."""
from __future__ import annotations

from dataclasses import dataclass

from ..plan import Plan
from ..site import Site
from . import _grid
from .base import check_ints
from .schedule import Sparse


@dataclass
class SlidingTile(Sparse):
    """Tile-granular sliding window: ``window`` tiles of ``tile`` tokens per axis."""

    source = "Fast Video Generation with Sliding Tile Attention (FastVideo, Zhang et al. 2025)"
    plans_by_site = True  # a pure function of parameters, Site and shapes (core remembers its kernel calls)
    llm = False  # needs a visual token grid: the transformers patcher refuses it at patch time

    tile: int | tuple = 8
    window: int | tuple = 3

    def __post_init__(self):
        self.tile = check_ints("SlidingTile", "tile", self.tile, 1, example=8)
        self.window = check_ints("SlidingTile", "window", self.window, 1, odd=True, example=3,
                                 expected="odd: an odd integer >= 1 or one per grid axis (tiles centred on the query tile)")
        if isinstance(self.tile, tuple) and isinstance(self.window, tuple) and len(self.tile) != len(self.window):
            raise ValueError(f"SlidingTile(tile={self.tile!r}, window={self.window!r}): per-axis tuples must have the "
                             "same length (one entry per grid axis); e.g. SlidingTile(tile=(1, 8, 8), window=(1, 3, 3))")
        super().__post_init__()  # after the parameters: a profile's values are checked against them
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
