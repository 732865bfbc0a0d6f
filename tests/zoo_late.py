"""Rows of the test zoo (tests/zoo.py) for the methods added later: StyleInjection, SinkRedistribution,
TopKBlocks' selection options and SinkWindow's per-head profiles. zoo.py imports ``ROWS`` at its end and
appends them to ``ZOO``; this module reads zoo's helpers, so it is imported through zoo only."""
from __future__ import annotations

import torch

import attnpatch as ap
import goldens as G
import goldens_redistribute as GR
import goldens_select as GS
import goldens_sinkwindow_heads as GSW
import goldens_style as GST
from attnpatch import Site
from zoo import C, J35, Case, _boost, _dense, _select, replace

ROWS: list = []


def _style(id, seed, gamma, T, site, shape, batches=(1, 1)):
    """The row of a StyleInjection that recorded a style pass and a content pass at ``site`` (features from
    goldens_style.features; the passes run through ap.attend, as in a pipeline). The rows carry batch roles
    so test_fuzz leaves them out: recorded features fit one shape only."""

    B, Hq, Hkv, S, _, D = shape
    cs, _ = G.coords(site, S)
    vis = [i for i in range(S) if cs[i] is not None]
    bc, bs = batches
    q_c, _, _ = GST.features(seed, bc, Hq, Hkv, len(vis), D)
    _, k_s, v_s = GST.features(seed + 1, bs, Hq, Hkv, len(vis), D)

    def full(b, h, part):  # a pass's (b, h, S, D) input holding ``part`` at the visual tokens
        x = torch.zeros(b, h, S, D, dtype=torch.float64)
        x[:, :, vis] = part
        return x

    m = ap.StyleInjection(query_keep=gamma, temperature=T)
    ap.attend(full(bs, Hq, 1.0), full(bs, Hkv, k_s), full(bs, Hkv, v_s), m.record("style"), site)
    ap.attend(full(bc, Hq, q_c), full(bc, Hkv, 0.5), full(bc, Hkv, 0.5), m.record("content"), site)
    return Case(id, m.record(None), site, shape, lambda q, k, v, s: GST.style_injection(q, k, v, s, q_c, k_s, v_s, gamma, T))


ROWS += [  # StyleInjection: visual K / V from the style pass, queries blended toward the content's, scores times T
    _style("style-self", 11, 0.75, 1.5, Site(grid=(4, 5), timestep=0.5, roles=("cond",)), (1, 2, 2, 20, 20, 64)),
    _style("style-joint-gqa-batch", 13, 0.5, 1.3, Site(grid=(3, 4), text_len=3, kind="joint", timestep=0.3,
                                                        roles=("cond", "cond")), (2, 4, 2, 15, 15, 48), batches=(2, 1)),
    _style("style-joint-text-last", 17, 0.3, 2.0, Site(grid=(2, 7), text_len=2, text_first=False, kind="joint", step=3,
                                                        roles=("cond",)), (1, 2, 1, 16, 16, 80)),
    Case("style-cross", ap.StyleInjection(), Site(kind="cross", roles=("cond",)), (1, 2, 2, 12, 7, 64), _dense),
]


def _redist(**kw):
    return lambda q, k, v, s: GR.redistribution(q, k, v, s.q_offset, s.causal, **kw)


J35_TEXT, J35_VISUAL = range(0, 4), range(4, 19)  # Site(**J35): 4 text tokens first, then the 3 x 5 grid
ROWS += [  # SinkRedistribution: alpha of the magnets' attention moved to the targets, pro rata (VAR's rule)
    Case("redist-causal-targets", ap.SinkRedistribution(alpha=0.4, targets=range(18, 40), threshold=2.0, detect_rows=None),
         C, (1, 2, 2, 40, 40, 64), _redist(alpha=0.4, targets=range(18, 40), threshold=2.0), _boost(7, 4.0)),
    Case("redist-sampled-chunk-gqa", ap.SinkRedistribution(alpha=0.5, threshold=2.0, first=1, detect_rows=4), C,
         (1, 4, 2, 10, 30, 80), _redist(alpha=0.5, threshold=2.0, first=1, detect_rows=4), _boost(5, 4.0)),
    Case("redist-joint-text-magnets", ap.SinkRedistribution(heads=[(0, 0)], alpha=0.6, targets="visual", candidates="text",
                                                           threshold=1.5, detect_rows=7),
         Site(**J35), (1, 2, 2, 19, 19, 48), _redist(heads=[0], alpha=0.6, targets=J35_VISUAL, candidates=J35_TEXT,
                                                     threshold=1.5, detect_rows=7), _boost(2, 4.0)),
    # detection on every row of a small call: the output from its one score pass (Plan.direct) under "auto"
    Case("redist-whole-joint-rows-gqa", ap.SinkRedistribution(heads=[(0, 1), (0, 2)], alpha=0.5, targets="visual",
                                                              candidates="text", queries="visual", threshold=1.5),
         Site(**J35), (2, 4, 2, 19, 19, 48), _redist(heads=[1, 2], alpha=0.5, targets=J35_VISUAL, candidates=J35_TEXT,
                                                     queries=J35_VISUAL, threshold=1.5), _boost(2, 4.0)),
    Case("redist-given-visual-rows", ap.SinkRedistribution(magnets=[0, 2], alpha=0.7, targets="visual", queries="visual"),
         Site(**J35), (2, 2, 1, 19, 19, 72), _redist(magnets=[0, 2], alpha=0.7, targets=J35_VISUAL, queries=J35_VISUAL)),
    Case("redist-given-decode", ap.SinkRedistribution(magnets=[0, 5], alpha=0.4, targets=range(10, 16)), C,
         (2, 4, 2, 1, 23, 16), _redist(magnets=[0, 5], alpha=0.4, targets=range(10, 16))),
]


def _pick(**kw):
    return _select(GS.topk_grid_keep, **kw)


AD, SIM, GL = dict(score="antidiagonal"), dict(score="similarity"), dict(scope="global")
VM = dict(mass=0.6, block=(1, 2, 3), score="similarity", scope="global", partition="cycle")
ROWS += [  # TopKBlocks as XAttention (antidiagonal scores) and VMoBA (similarity threshold, global, partition cycle) select
    Case("topk-antidiag-2d-gqa", ap.TopKBlocks(keep=0.3, block=(2, 4), stride=3, **AD), Site(grid=(6, 8)),
         (1, 2, 1, 48, 48, 48), _pick(keep=0.3, block=(2, 4), stride=3, **AD)),
    Case("topk-antidiag-mass-joint", ap.TopKBlocks(mass=0.8, block=(2, 2), stride=3, **AD),
         Site(grid=(4, 6), text_len=5, kind="joint"), (2, 2, 2, 29, 29, 64), _pick(mass=0.8, block=(2, 2), stride=3, **AD)),
    Case("topk-antidiag-3d-local", ap.TopKBlocks(keep=0.25, block=(1, 2, 2), local=1, stride=3, **AD), Site(grid=(2, 4, 8)),
         (1, 4, 2, 64, 64, 16), _pick(keep=0.25, block=(1, 2, 2), local=1, stride=3, **AD)),
    Case("topk-similarity-mass", ap.TopKBlocks(mass=0.5, block=(2, 3), **SIM), Site(grid=(5, 7)), (1, 2, 2, 35, 35, 80),
         _pick(mass=0.5, block=(2, 3), **SIM)),
    Case("topk-global-keep", ap.TopKBlocks(keep=0.3, block=(2, 2), **GL), Site(grid=(4, 6)), (2, 2, 1, 24, 24, 64),
         _pick(keep=0.3, block=(2, 2), **GL)),
    Case("topk-antidiag-global-mass-text-last", ap.TopKBlocks(mass=0.7, block=(2, 2), stride=2, **AD, **GL),
         Site(grid=(4, 6), text_len=3, text_first=False, kind="joint"), (1, 2, 1, 27, 27, 72),
         _pick(mass=0.7, block=(2, 2), stride=2, **AD, **GL)),
    *(Case(f"topk-vmoba-cycle-layer{layer}", ap.TopKBlocks(**VM), Site(grid=(3, 4, 6), layer=layer), (1, 2, 1, 72, 72, 48),
           _pick(**VM)) for layer in range(3)),
    Case("topk-partition-tuple", ap.TopKBlocks(keep=0.4, partition=((2, 2), (1, 4))), Site(grid=(4, 8), layer=1),
         (1, 2, 2, 32, 32, 16), _pick(keep=0.4, partition=((2, 2), (1, 4)))),
]


def _sw_heads(params):
    return GSW.attention(params)


SWP = {"window": torch.tensor([[3, 8, 3, 20], [5, 2, 9, 1]]), "sink": torch.tensor([[0, 2, 2, 1], [3, 3, 0, 1]])}
ROWS += [  # SinkWindow with a per-(layer, head) profile: each head as its own uniform SinkWindow
    Case("sinkwindow-profile-gqa", ap.SinkWindow(profile=SWP), C, (1, 4, 2, 40, 40, 64),
         _sw_heads([(0, 3), (2, 8), (2, 3), (1, 20)])),
    Case("sinkwindow-profile-chunk-layer1", ap.SinkWindow(profile=SWP), replace(C, layer=1), (2, 4, 1, 6, 30, 48),
         _sw_heads([(3, 5), (3, 2), (0, 9), (1, 1)])),
    Case("sinkwindow-profile-decode", ap.SinkWindow(profile=SWP), replace(C, layer=1), (2, 4, 2, 1, 37, 80),
         _sw_heads([(3, 5), (3, 2), (0, 9), (1, 1)])),
    Case("sinkwindow-profile-blocks", ap.SinkWindow(block=16, profile={"window": torch.tensor([[4, 24]])}), C,
         (1, 2, 1, 72, 72, 64), _sw_heads([(4, 4), (4, 24)])),
    Case("sinkwindow-profile-dense-layer", ap.SinkWindow(window=3, profile={"window": torch.tensor([[2, 5]])},
                                                         dense_layers=(0,)), C, (1, 2, 2, 17, 17, 64), _dense),
]
