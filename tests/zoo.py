"""The test zoo: ONE list of every public method with representative parameters, sites and shapes,
each row with its float64 golden written from the method's definition (goldens*.py), never from the
plan's ``mask_mod``. tests/test_goldens.py runs every row through every registered kernel (and
automatic selection); test_fuzz.py and test_grad.py draw their methods from here too.

Adding a method: its file, its name in attnpatch/methods/__init__.py (_FILES), rows here or in zoo_late.py (and its
golden in goldens*.py); nothing else. test_goldens.py fails while a public method (methods.__all__)
has no row, no row with a head dim that is not a power of two (48, 72, 80: kernels that pad or tile
head dims) or none with a power of two (flex and triton run only those)."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, NamedTuple

import torch

import attnpatch as ap
import goldens as G
import goldens_guided as GG
import goldens_hyper as GH
import goldens_quest as GQ
import goldens_select as GS
from attnpatch import Site


class Case(NamedTuple):
    id: str
    method: ap.Method
    site: Site  # causal sites get q_offset = Skv - Sq from the shape (see ``site_of``)
    shape: tuple  # (B, Hq, Hkv, Sq, Skv, D)
    golden: Callable  # golden(q, k, v, site) -> (B, Hq, Sq, D) float64, or (out, detection margin, sinks found)
    prep: Callable | None = None  # prep(q, k, v) -> (q, k, v): inputs with the structure the method looks for
    xfail: str | None = None  # the golden is the paper's, the library differs: the reference row is a strict xfail
    covers: tuple = ()  # public names this row stands for besides its class (the Sparse schedule base)


def site_of(case: Case) -> Site:
    """The row's site, with a causal row's cache offset taken from its shape."""
    *_, Sq, Skv, _ = case.shape
    return replace(case.site, q_offset=Skv - Sq) if case.site.causal else case.site


def inputs(case: Case):
    """(site, float64 q, k, v) of a row: seeded by its id, every value exactly representable in
    bfloat16 (so float32 and bfloat16 runs see the very inputs the golden saw)."""
    B, Hq, Hkv, Sq, Skv, D = case.shape
    g = torch.Generator().manual_seed(sum(map(ord, case.id)))
    q, k, v = (torch.randn(B, h, s, D, generator=g, dtype=torch.float64).bfloat16().double()
               for h, s in ((Hq, Sq), (Hkv, Skv), (Hkv, Skv)))
    if case.prep is not None:
        q, k, v = (x.bfloat16().double() for x in case.prep(q, k, v))
    return site_of(case), (q, k, v)


def golden(case: Case, q, k, v, site):
    """The row's golden output (a detection golden's margin checked: a clear-cut, non-empty selection)."""
    want = case.golden(q, k, v, site)
    if isinstance(want, tuple):  # (golden, detection margin, sinks found)
        want, margin, found = want
        assert margin > 1e-3 and found, f"{case.id}: {found} sinks, a column within {margin} of the threshold: pick other inputs"
    return want


def _boost(col, logit):
    """Key ``col`` scores about ``logit`` against the average query: a vertical / a hidden sink."""
    def prep(q, k, v):
        B, Hkv, _, D = k.shape
        qm = q.mean(2).reshape(B, Hkv, -1, D).mean(2)  # (B, Hkv, D) mean query per KV head
        k = k.clone()
        k[:, :, col] = logit * D ** 0.5 * qm / qm.square().sum(-1, keepdim=True)
        return q, k, v
    return prep


def _causal(rule):
    return lambda q, k, v, s: G.attention(q, k, v, G.static(G.causal(rule, s.q_offset), q.shape[2], k.shape[2]))


def _grid(rule):
    return lambda q, k, v, s: G.attention(q, k, v, G.static(G.grid_keep(s, q.shape[2], rule), q.shape[2], q.shape[2]))


def _keep(make):
    """Golden of a data-independent keep(b, h, i, j) built by ``make(site, S)``."""
    return lambda q, k, v, s: G.attention(q, k, v, G.static(make(s, q.shape[2]), q.shape[2], k.shape[2]))


def _dense(q, k, v, s):
    return _causal(lambda p, j: True)(q, k, v, s) if s.causal else G.attention(q, k, v, torch.tensor(True).expand(q.shape[2], k.shape[2]))


def _per_head(rules):
    """Head h of a grid site follows ``rules[h]`` (a per-head profile)."""
    def golden(q, k, v, s):
        keeps = [G.grid_keep(s, q.shape[2], r) for r in rules]
        return G.attention(q, k, v, lambda b, h, i, j: keeps[h](b, h, i, j))
    return golden


def _select(fn, **kw):
    return lambda q, k, v, s: G.attention(q, k, v, fn(q, k, s, **kw))


def _vs(*args, **kw):
    return lambda q, k, v, s: G.attention(q, k, v, GS.vertical_slash_keep(q, k, s.q_offset, *args, **kw))


def _topk_causal(**kw):
    return lambda q, k, v, s: G.attention(q, k, v, GS.topk_causal_keep(q, k, s.q_offset, **kw))


def _scaled(factor):
    return lambda q, k, v, s: GG.score_scaled(q, k, v, s.q_offset, s.causal, factor)


def _entropy(train):
    return _scaled(lambda n: max(1.0, math.log(n) / math.log(train)))


def _sinkcal(**kw):
    return lambda q, k, v, s: GG.sink_calibration(q, k, v, s.q_offset, s.causal, **kw)


C = Site(causal=True)
J35 = dict(grid=(3, 5), text_len=4, kind="joint")
RADIAL_SINK = ("Radial makes the sink frame's queries dense too (keep_fn: qc[0] < nd | kc[0] < nd); the authors' mask "
               "(radial_attn/attn_mask.py, `if j == 0`) only makes the sink a key: frame-0 queries follow the decay pattern")
VS_BUDGET = ("VerticalSlash keeps `verticals` columns and `slashes` diagonals on top of the sink and window; MInference "
             "(vertical[..., :30] = inf; slash[..., -100:] = inf before topk) counts the sink columns and local diagonals "
             "inside those budgets")

ZOO = [
    # dense
    Case("dense", ap.Dense(), Site(), (2, 4, 2, 33, 33, 72), _dense),
    Case("dense-cross", ap.Dense(), Site(kind="cross"), (1, 2, 1, 7, 23, 48), _dense),
    Case("dense-joint", ap.Dense(), Site(**J35), (1, 2, 2, 19, 19, 48), _dense),
    Case("dense-causal-chunk", ap.Dense(), C, (1, 2, 1, 5, 29, 16), _dense),
    Case("dense-decode", ap.Dense(), C, (2, 4, 2, 1, 23, 80), _dense),
    # SinkWindow
    Case("sinkwindow", ap.SinkWindow(sink=2, window=5), C, (1, 2, 2, 40, 40, 64), _causal(G.sink_window(2, 5))),
    Case("sinkwindow-nosink", ap.SinkWindow(sink=0, window=3), C, (2, 6, 2, 17, 17, 48), _causal(G.sink_window(0, 3))),
    Case("sinkwindow-wide", ap.SinkWindow(sink=4, window=10_000), C, (1, 2, 2, 33, 33, 72), _causal(G.sink_window(4, 10_000))),
    Case("sinkwindow-chunk-gqa", ap.SinkWindow(sink=3, window=4), C, (1, 4, 2, 6, 30, 48), _causal(G.sink_window(3, 4))),
    Case("sinkwindow-decode", ap.SinkWindow(sink=1, window=6), C, (2, 2, 1, 1, 37, 80), _causal(G.sink_window(1, 6))),
    # Neighborhood (NATTEN itself is the oracle of its full parameter space: test_sparse.py)
    Case("neighborhood-1d-dil", ap.Neighborhood(window=5, dilation=2), Site(), (1, 2, 2, 31, 31, 48),
         _grid(G.neighborhood(5, 1, 2))),
    Case("neighborhood-2d", ap.Neighborhood(window=(3, 5)), Site(grid=(5, 7)), (1, 2, 2, 35, 35, 64), _grid(G.neighborhood((3, 5)))),
    Case("neighborhood-2d-stride", ap.Neighborhood(window=(3, 5), stride=(3, 2)), Site(grid=(5, 7)), (1, 2, 1, 35, 35, 80),
         _grid(G.neighborhood((3, 5), (3, 2)))),
    Case("neighborhood-joint", ap.Neighborhood(window=(3, 5)), Site(grid=(9, 11), text_len=7, kind="joint"),
         (1, 4, 2, 106, 106, 48), _grid(G.neighborhood((3, 5)))),
    Case("neighborhood-3d-text-last", ap.Neighborhood(window=3, dilation=(1, 1, 2)),
         Site(grid=(3, 4, 5), text_len=3, text_first=False, kind="joint"), (1, 2, 2, 63, 63, 80),
         _grid(G.neighborhood(3, 1, (1, 1, 2)))),
    # SlidingTile (and the Sparse schedule base: per-head profile, dense layers)
    Case("slidingtile-1d", ap.SlidingTile(tile=4, window=3), Site(), (1, 2, 2, 29, 29, 72), _grid(G.sliding_tile(4, 3))),
    Case("slidingtile-2d", ap.SlidingTile(tile=2, window=3), Site(grid=(5, 7)), (1, 2, 2, 35, 35, 48), _grid(G.sliding_tile(2, 3))),
    Case("slidingtile-2d-uneven", ap.SlidingTile(tile=(4, 4), window=(3, 1)), Site(grid=(9, 13)), (1, 4, 2, 117, 117, 80),
         _grid(G.sliding_tile((4, 4), (3, 1)))),
    Case("slidingtile-3d-joint", ap.SlidingTile(tile=(1, 2, 2), window=(3, 1, 3)), Site(grid=(3, 4, 5), text_len=4, kind="joint"),
         (1, 2, 1, 64, 64, 64), _grid(G.sliding_tile((1, 2, 2), (3, 1, 3)))),
    Case("slidingtile-3d-joint-gqa", ap.SlidingTile(tile=(2, 4, 4), window=3), Site(grid=(3, 9, 7), text_len=6, kind="joint"),
         (1, 4, 2, 195, 195, 48), _grid(G.sliding_tile((2, 4, 4), 3))),
    Case("sparse-profile-per-head", ap.SlidingTile(tile=2, window=3, profile={"window": torch.tensor([[[1, 1], [3, 5]]])}),
         Site(grid=(5, 7)), (1, 2, 2, 35, 35, 80), _per_head([G.sliding_tile(2, (1, 1)), G.sliding_tile(2, (3, 5))]),
         covers=("Sparse",)),
    Case("sparse-dense-layer", ap.SlidingTile(tile=2, window=1, dense_layers=(0,)), Site(grid=(5, 7)), (1, 2, 2, 35, 35, 64),
         _dense, covers=("Sparse",)),
    # InwardWindow (FreeSwim)
    Case("inwardwindow-2d", ap.InwardWindow(train_grid=4, tile=4), Site(grid=(9, 11)), (2, 2, 2, 99, 99, 48),
         _keep(lambda s, S: G.inward_window(s, S, 4))),
    Case("inwardwindow-joint", ap.InwardWindow(train_grid=(3, 5), tile=4), Site(grid=(7, 10), text_len=3, kind="joint"),
         (1, 2, 2, 73, 73, 80), _keep(lambda s, S: G.inward_window(s, S, (3, 5)))),
    Case("inwardwindow-text-last", ap.InwardWindow(train_grid=6, tile=4), Site(grid=(6, 13), text_len=2, text_first=False,
                                                                              kind="joint"),
         (1, 2, 1, 80, 80, 72), _keep(lambda s, S: G.inward_window(s, S, 6))),
    Case("inwardwindow-short-rows", ap.InwardWindow(train_grid=8, tile=4), Site(grid=(4, 12)), (1, 2, 1, 48, 48, 16),
         _keep(lambda s, S: G.inward_window(s, S, 8))),  # rows shorter than the window: dense on that axis
    Case("inwardwindow-video", ap.InwardWindow(train_grid=4, tile=4), Site(grid=(3, 5, 7), text_len=2, kind="joint"),
         (1, 2, 2, 107, 107, 64), _keep(lambda s, S: G.inward_window(s, S, 4))),
    # Radial
    Case("radial-window", ap.Radial(window=3, tile=1, dense_frames=1), Site(grid=(6, 3, 4)), (1, 2, 2, 72, 72, 64),
         _keep(lambda s, S: G.radial_keep(s, S, 3, 2.0, 1, 1))),
    Case("radial-frame-joint", ap.Radial(decay=1.5, tile=2, dense_frames=0), Site(grid=(5, 4, 4), text_len=3, kind="joint"),
         (1, 2, 2, 83, 83, 80), _keep(lambda s, S: G.radial_keep(s, S, None, 1.5, 0, 2))),
    Case("radial-tile2-gqa", ap.Radial(window=3, tile=2), Site(grid=(9, 5, 7)), (1, 4, 2, 315, 315, 48),
         _keep(lambda s, S: G.radial_keep(s, S, 3, 2.0, ap.Radial().dense_frames, 2))),
    Case("radial-decay-text-last", ap.Radial(window=(5, 3), decay=1.5, dense_frames=2, tile=(2, 3)),
         Site(grid=(7, 6, 9), text_len=5, text_first=False, kind="joint"), (1, 4, 2, 383, 383, 80),
         _keep(lambda s, S: G.radial_keep(s, S, (5, 3), 1.5, 2, (2, 3)))),
    Case("radial-paper-sink", ap.Radial(window=3, tile=1, dense_frames=1), Site(grid=(6, 3, 4)), (1, 2, 2, 72, 72, 48),
         _keep(lambda s, S: G.radial_keep(s, S, 3, 2.0, 1, 1, sink_queries=False)), xfail=RADIAL_SINK),
]
ZOO += [
    # TopKBlocks (data dependent: the golden selects its own blocks)
    Case("topk-1d", ap.TopKBlocks(keep=0.4, block=4), Site(), (2, 4, 2, 33, 33, 48), _select(GS.topk_grid_keep, keep=0.4, block=4)),
    Case("topk-mass-1d", ap.TopKBlocks(mass=0.6, block=3, local=1), Site(), (1, 2, 2, 29, 29, 72),
         _select(GS.topk_grid_keep, mass=0.6, block=3, local=1)),
    Case("topk-2d", ap.TopKBlocks(keep=0.3, block=(2, 3)), Site(grid=(5, 7)), (2, 2, 2, 35, 35, 64),
         _select(GS.topk_grid_keep, keep=0.3, block=(2, 3))),
    Case("topk-mass-joint-gqa", ap.TopKBlocks(mass=0.7, block=(2, 2)), Site(grid=(5, 7), text_len=6, kind="joint"),
         (2, 4, 2, 41, 41, 48), _select(GS.topk_grid_keep, mass=0.7, block=(2, 2))),
    Case("topk-3d-local", ap.TopKBlocks(keep=0.2, block=(1, 2, 3), local=1), Site(grid=(3, 4, 7)), (1, 2, 1, 84, 84, 80),
         _select(GS.topk_grid_keep, keep=0.2, block=(1, 2, 3), local=1)),
    Case("topk-mass-3d-joint", ap.TopKBlocks(mass=0.5, block=(1, 2, 2), local=1), Site(grid=(3, 4, 5), text_len=4, kind="joint"),
         (1, 2, 1, 64, 64, 48), _select(GS.topk_grid_keep, mass=0.5, block=(1, 2, 2), local=1)),
    Case("topk-mass-text-last", ap.TopKBlocks(mass=0.5, block=(2, 2)), Site(grid=(4, 6), text_len=5, text_first=False,
                                                                            kind="joint"),
         (1, 2, 2, 29, 29, 72), _select(GS.topk_grid_keep, mass=0.5, block=(2, 2))),
    Case("topk-causal", ap.TopKBlocks(keep=0.5, block=8), C, (1, 4, 2, 50, 50, 80), _topk_causal(keep=0.5, block=8)),
    Case("topk-causal-chunk", ap.TopKBlocks(keep=0.4, block=6, local=1), C, (1, 2, 2, 9, 49, 64),
         _topk_causal(keep=0.4, block=6, local=1)),
    Case("topk-causal-decode", ap.TopKBlocks(keep=0.5, block=4), C, (2, 6, 2, 1, 23, 48), _topk_causal(keep=0.5, block=4)),
    # Power, VerticalSlash
    Case("power", ap.Power(local=3, sink=1), C, (1, 2, 2, 70, 70, 80), _causal(G.power(3, 1))),
    Case("power-chunk-gqa", ap.Power(local=2, sink=2), C, (1, 4, 2, 6, 46, 64), _causal(G.power(2, 2))),
    Case("power-decode", ap.Power(local=3, sink=1), C, (2, 6, 2, 1, 23, 48), _causal(G.power(3, 1))),
    Case("verticalslash", ap.VerticalSlash(verticals=3, slashes=2, last_q=6, sink=1, window=2), C, (1, 2, 2, 40, 40, 48),
         _vs(3, 2, 6, 1, 2), _boost(11, 3.0)),
    Case("verticalslash-chunk-gqa", ap.VerticalSlash(verticals=4, slashes=3, last_q=5, sink=2, window=3), C,
         (1, 4, 2, 8, 38, 64), _vs(4, 3, 5, 2, 3)),
    Case("verticalslash-authors-budget", ap.VerticalSlash(verticals=3, slashes=3, last_q=6, sink=1, window=2), C,
         (1, 2, 2, 40, 40, 64), _vs(3, 3, 6, 1, 2, forced_in_budget=True), xfail=VS_BUDGET),
    # the estimate reads every query (last_q >= S): the output comes from its scores (Plan.direct) under "auto"
    Case("verticalslash-whole-gqa", ap.VerticalSlash(verticals=3, slashes=2, last_q=64, sink=1, window=2), C,
         (2, 4, 2, 36, 36, 48), _vs(3, 2, 64, 1, 2), _boost(9, 3.0)),
    # MInference's kernel granularity: a row keeps what its block's diagonals reach (the last block shorter)
    Case("verticalslash-blocks", ap.VerticalSlash(verticals=3, slashes=2, last_q=6, sink=1, window=2, block=8), C,
         (1, 2, 2, 44, 44, 48), _vs(3, 2, 6, 1, 2, block=8), _boost(11, 3.0)),
    Case("verticalslash-blocks-chunk-gqa", ap.VerticalSlash(verticals=4, slashes=3, last_q=5, sink=2, window=3, block=4), C,
         (1, 4, 2, 10, 38, 64), _vs(4, 3, 5, 2, 3, block=4)),
    Case("verticalslash-blocks-whole", ap.VerticalSlash(verticals=3, slashes=2, last_q=64, sink=1, window=2, block=16), C,
         (1, 4, 2, 36, 36, 48), _vs(3, 2, 64, 1, 2, block=16), _boost(9, 3.0)),
    Case("verticalslash-decode", ap.VerticalSlash(verticals=2, slashes=2, last_q=4, sink=1, window=2), C, (1, 2, 2, 1, 20, 80),
         _dense),  # MInference: decode stays dense
    # PAG, SharedAttention
    Case("pag-self", ap.PAG(), Site(grid=(4, 5), roles=("cond", "perturbed")), (2, 2, 2, 20, 20, 48),
         lambda q, k, v, s: GG.pag(q, k, v, s, [1])),
    Case("softpag-joint-heads", ap.PAG(soft=0.6, heads=[1]),
         Site(grid=(3, 4), text_len=4, kind="joint", roles=("uncond", "cond", "perturbed")), (3, 2, 2, 16, 16, 64),
         lambda q, k, v, s: GG.pag(q, k, v, s, [2], heads=[1], soft=0.6)),
    Case("pag-other-layer", ap.PAG(layers=[3]), Site(grid=(4, 5), roles=("cond", "perturbed")), (2, 2, 2, 20, 20, 80),
         _dense),  # layer 0 is not chosen: plain attention
    Case("shared-self", ap.SharedAttention(), Site(grid=(4, 5)), (3, 2, 2, 20, 20, 64), lambda q, k, v, s: GG.shared(q, k, v, s, ())),
    Case("shared-joint-cfg-gqa", ap.SharedAttention(reference=1),
         Site(grid=(3, 4), text_len=3, kind="joint", roles=("uncond", "uncond", "cond", "cond")), (4, 2, 1, 15, 15, 48),
         lambda q, k, v, s: GG.shared(q, k, v, s, s.roles, reference=1)),
    Case("shared-no-adain", ap.SharedAttention(adain=False), Site(grid=(2, 7)), (2, 2, 2, 14, 14, 80),
         lambda q, k, v, s: GG.shared(q, k, v, s, (), use_adain=False)),
    # SinkCalibration, Temperature, EntropyScale
    # detect_rows=None pins the paper's exact column mean over every query (any call of at most detect_rows queries too)
    Case("sinkcal-causal", ap.SinkCalibration(threshold=2.0, beta=0.4, detect_rows=None), C, (1, 2, 2, 40, 40, 64),
         _sinkcal(threshold=2.0, beta=0.4), _boost(7, 4.0)),
    Case("sinkcal-sampled", ap.SinkCalibration(threshold=2.0, beta=0.4, detect_rows=6), C, (1, 2, 2, 40, 40, 64),
         _sinkcal(threshold=2.0, beta=0.4, detect_rows=6), _boost(7, 4.0)),
    Case("sinkcal-sampled-chunk-gqa", ap.SinkCalibration(threshold=2.0, beta=0.5, detect_rows=4), C, (1, 4, 2, 10, 30, 80),
         _sinkcal(threshold=2.0, beta=0.5, detect_rows=4), _boost(5, 4.0)),
    Case("sinkcal-sampled-joint", ap.SinkCalibration(heads=[(0, 0)], threshold=1.5, beta=0.25, detect_rows=7),
         Site(**J35), (1, 2, 2, 19, 19, 48), _sinkcal(heads=[0], threshold=1.5, beta=0.25, detect_rows=7), _boost(9, 4.0)),
    Case("sinkcal-heads", ap.SinkCalibration(heads=[(0, 1)], threshold=1.5, beta=0.25), Site(), (1, 2, 2, 30, 30, 48),
         _sinkcal(heads=[1], threshold=1.5, beta=0.25), _boost(9, 4.0)),
    Case("sinkcal-chunk-gqa", ap.SinkCalibration(threshold=2.0, beta=0.5), C, (1, 4, 2, 10, 30, 80),
         _sinkcal(threshold=2.0, beta=0.5), _boost(5, 4.0)),
    Case("temperature", ap.Temperature(tau=0.7), C, (1, 4, 2, 33, 33, 48), _scaled(lambda n: 1 / 0.7)),
    Case("temperature-decode", ap.Temperature(tau=0.6), C, (1, 4, 2, 1, 21, 16), _scaled(lambda n: 1 / 0.6)),
    Case("temperature-chunk", ap.Temperature(tau=0.6), C, (1, 4, 2, 4, 21, 72), _scaled(lambda n: 1 / 0.6)),
    Case("temperature-joint", ap.Temperature(tau=1.3), Site(**J35), (1, 2, 2, 19, 19, 80), _scaled(lambda n: 1 / 1.3)),
    Case("temperature-other-layer", ap.Temperature(tau=0.5, layers=(2,)), Site(), (1, 2, 2, 20, 20, 64), _dense),
    Case("entropyscale", ap.EntropyScale(train_len=8), C, (1, 2, 2, 30, 30, 80), _entropy(8)),
    Case("entropyscale-chunk", ap.EntropyScale(train_len=8), C, (1, 4, 2, 4, 21, 48), _entropy(8)),
    Case("entropyscale-grid", ap.EntropyScale(train_len=16), Site(grid=(5, 7)), (1, 2, 2, 35, 35, 64),
         _scaled(lambda n: math.log(n) / math.log(16))),
    Case("entropyscale-decode", ap.EntropyScale(train_len=8), C, (1, 2, 2, 1, 41, 48), _entropy(8)),
]



def _hyper(**kw):
    return lambda q, k, v, s: GH.hyper_attention(q, k, v, s.q_offset, s.causal, layer=s.layer, **kw)


HYPER = dict(block=4, samples=5, hashes=3, min_len=8, seed=1)
ZOO += [  # HyperAttention: sorted LSH blocks + weighted samples; causal by recursion down to min_len (dense)
    Case("hyper-causal", ap.HyperAttention(**HYPER), replace(C, layer=2), (1, 4, 2, 40, 40, 64), _hyper(**HYPER)),
    Case("hyper-chunk-gqa", ap.HyperAttention(**HYPER), C, (2, 4, 2, 12, 44, 48), _hyper(**HYPER)),
    Case("hyper-noncausal", ap.HyperAttention(block=5, samples=4, hashes=2, min_len=6, seed=3), Site(), (1, 2, 1, 30, 27, 80),
         _hyper(block=5, samples=4, hashes=2, min_len=6, seed=3)),
    Case("hyper-decode", ap.HyperAttention(**HYPER), C, (2, 2, 1, 1, 23, 16), _dense),  # one query: exact by definition
]


def _quest(budget, page, dense=False, pooled=0.0):
    return lambda q, k, v, s: G.attention(q, k, v, GQ.quest_keep(q, k, s.q_offset, budget, page, dense, pooled))


ZOO += [  # Quest: decode reads the sink page, its own page and the pages with the largest key bounds
    Case("quest-decode-gqa", ap.Quest(budget=16, page=4, dense_layers=(), pooled=0.0), C, (2, 6, 2, 1, 37, 48), _quest(16, 4)),
    Case("quest-decode-pooled-default", ap.Quest(budget=16, page=4, dense_layers=()), C, (2, 6, 2, 1, 37, 48),
         _quest(16, 4, pooled=0.5)),
    Case("quest-decode-full-page", ap.Quest(budget=12, page=4, dense_layers=(), pooled=0.0), C, (1, 4, 1, 1, 40, 64), _quest(12, 4)),
    Case("quest-prefill", ap.Quest(budget=8, page=4, dense_layers=(), pooled=0.0), C, (1, 2, 2, 30, 30, 80), _quest(8, 4)),
    Case("quest-dense-layer", ap.Quest(budget=8, page=4, pooled=0.0), C, (1, 2, 1, 1, 33, 16), _quest(8, 4, dense=True)),
    # half the chosen pages by mean key score (pooled keys), the rest by bound
    Case("quest-decode-pooled", ap.Quest(budget=28, page=4, dense_layers=(), pooled=0.5), C, (2, 6, 2, 1, 61, 48),
         _quest(28, 4, pooled=0.5)),
    Case("quest-decode-pooled-only", ap.Quest(budget=16, page=4, dense_layers=(), pooled=1.0), C, (1, 4, 1, 1, 45, 32),
         _quest(16, 4, pooled=1.0)),
]


def public_methods() -> set:
    """Every public method name: attnpatch.methods.__all__ less the base class and the mask printer."""
    return set(ap.methods.__all__) - {"Method", "ascii_mask"}


def covered(case: Case) -> set:
    return {type(case.method).__name__, *case.covers}


def _streaming(full, sink, window):
    return lambda q, k, v, s: G.attention(q, k, v, G.streaming_heads(full, sink, window, s.q_offset))


SH = [(1, 0), (1, 3), (2, 1)]  # retrieval heads: layer 1 heads 0 and 3 (two KV groups under GQA 4/2), layer 2 head 1
ZOO += [  # StreamingHeads: retrieval heads dense, the others SinkWindow
    Case("streaming-heads-gqa", ap.StreamingHeads(SH, sink=2, window=5), replace(C, layer=1), (1, 4, 2, 40, 40, 64),
         _streaming({0, 3}, 2, 5)),
    Case("streaming-heads-chunk", ap.StreamingHeads(SH, sink=3, window=4), replace(C, layer=2), (2, 4, 4, 6, 30, 48),
         _streaming({1}, 3, 4)),
    Case("streaming-heads-none", ap.StreamingHeads(SH, sink=1, window=3), C, (1, 2, 1, 17, 17, 80), _streaming(set(), 1, 3)),
    Case("streaming-heads-decode", ap.StreamingHeads(SH, sink=1, window=6), replace(C, layer=1), (2, 4, 2, 1, 37, 72),
         _streaming({0, 3}, 1, 6)),
]


# the rows of the methods added later live in zoo_late.py, which reads this module's helpers: imported last, once
# every name above exists (import zoo, never zoo_late directly)
from zoo_late import ROWS as _LATE  # noqa: E402

ZOO += _LATE
