"""The test zoo: every method with the sites it applies to. A new method adds its entries here
and is then checked against the float64 reference through every kernel."""
from __future__ import annotations

import attnpatch as ap
from attnpatch import Site

# (id, method, site). Sites are plain by keyword, as users build them.
ZOO = [
    ("dense", ap.Dense(), Site()),
    ("dense-causal", ap.Dense(), Site(causal=True)),
    ("dense-joint", ap.Dense(), Site(grid=(3, 5), text_len=4, kind="joint")),
    ("sinkwindow", ap.SinkWindow(sink=2, window=5), Site(causal=True)),
    ("sinkwindow-nosink", ap.SinkWindow(sink=0, window=3), Site(causal=True)),
    ("sinkwindow-wide", ap.SinkWindow(sink=4, window=10_000), Site(causal=True)),
    ("neighborhood-1d", ap.Neighborhood(window=5, dilation=2), Site()),  # grid-less: one axis
    ("slidingtile-1d", ap.SlidingTile(tile=4, window=3), Site()),
    ("topk-1d", ap.TopKBlocks(keep=0.4, block=4), Site()),  # data dependent: the plan comes from q, k
    ("topk-mass-1d", ap.TopKBlocks(mass=0.6, block=3, local=1), Site()),  # joint / 3-D sites: test_topk.py
    ("topk-causal", ap.TopKBlocks(keep=0.5, block=4), Site(causal=True)),
    ("power", ap.Power(local=3, sink=1), Site(causal=True)),
    ("verticalslash", ap.VerticalSlash(verticals=3, slashes=2, last_q=4, sink=1, window=2), Site(causal=True)),
    ("temperature", ap.Temperature(tau=0.7), Site(causal=True)),
    ("entropyscale", ap.EntropyScale(train_len=8), Site(causal=True)),
]
# Radial needs a (T, H, W) grid: its matrix is in test_sparse.py
