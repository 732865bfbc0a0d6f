"""TopKBlocks' selection options (XAttention's antidiagonal scores, VMoBA's similarity threshold,
global selection and layer-cycled partitions): properties of the estimates and the selections.
(Every kernel against the float64 goldens of each option: the zoo, tests/zoo.py.)"""
import math

import pytest
import torch

import attnpatch as ap
from attnpatch import Site
from attnpatch.methods import _block_scores as bs


def _qk(B, H, S, D, seed=0, local=0.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g)
    k = torch.randn(B, H, S, D, generator=g) + local * q  # local > 0: each query matches the key at its position
    return q, k


def _estimate(method, q, k, site):
    return method.estimate(q, k, site, method._layouts.get(site, q.shape[2], q.device))


def test_plain_method_keeps_its_repr_and_options_show_when_set():
    assert repr(ap.TopKBlocks()) == "TopKBlocks(keep=0.25, mass=None, block=None, local=0)"
    m = ap.TopKBlocks(score="antidiagonal", stride=4, scope="global")
    assert repr(m).endswith("score='antidiagonal', stride=4, scope='global')")


def test_antidiagonal_at_stride_one_is_the_true_block_mass():
    """Stride 1: every group is one token, so the estimate is the dense attention mass of each tile
    pair (over visual keys), exactly: the XAttention score is dense attention pooled by tiles."""
    site = Site(grid=(4, 6), text_len=3, kind="joint")
    q, k = _qk(2, 3, 27, 16, local=0.7)
    m = ap.TopKBlocks(keep=0.5, block=(2, 3), score="antidiagonal", stride=1)
    lay = m._layouts.get(site, 27, "cpu")
    v0, n = site.visual_start, site.visual_len
    p = torch.softmax(q[:, :, v0:v0 + n] @ k[:, :, v0:v0 + n].transpose(-1, -2) / 4, -1).mean((0, 1))  # (n, n)
    t = lay["tile_of"]
    onehot = torch.nn.functional.one_hot(t).float()  # (n, nT)
    want = onehot.T @ p @ onehot / onehot.sum(0)[:, None]  # (nT, nT) mass per tile pair, per query of the tile
    torch.testing.assert_close(_estimate(m, q, k, site), want, atol=1e-5, rtol=1e-5)


def test_antidiagonal_finds_what_mean_pooling_averages_away():
    """A key tile whose keys match the query tile in pairs and oppose it in the other pairs (its mean key
    is zero): dense attention puts most mass there, the strided antidiagonal score sees it, mean pooling
    does not."""
    D, S = 16, 64
    q, k = torch.zeros(1, 1, S, D), torch.randn(1, 1, S, D) * 0.1
    q[0, 0, :8, 0] = 3.0  # query tile 0 (tokens 0-7) all point along axis 0
    k[0, 0, 40:48, 0] = torch.tensor([12.0, 12.0, -12.0, -12.0] * 2)  # key tile 5: matching pairs, mean zero
    site = Site(grid=(S,))
    ad = _estimate(ap.TopKBlocks(block=8, score="antidiagonal", stride=2), q, k, site)
    mean = _estimate(ap.TopKBlocks(block=8), q, k, site)
    true = torch.softmax(q[0, 0, :8] @ k[0, 0].T / 4, -1)[:, 40:48].sum(-1).mean()
    assert true > 0.9 and ad[0, 5] > 0.9 and mean[0, 5] < 0.2, (true, ad[0, 5], mean[0, 5])


def test_similarity_rows_are_min_max_shares():
    """One head: each row's min-max normalised gate has its minimum at 0 (so a row's least similar tile
    adds nothing to the cumulative similarity); rows scaled to sum to 1."""
    q, k = _qk(1, 1, 48, 8, seed=1)
    site = Site(grid=(6, 8))
    m = ap.TopKBlocks(mass=0.5, block=(2, 2), score="similarity")
    est = _estimate(m, q, k, site)
    torch.testing.assert_close(est.sum(-1), torch.ones(12))
    assert float(est.amin(-1).abs().max()) < 1e-7
    assert m.plan(q, k, site) is not None


def test_global_scope_spends_one_budget_over_the_map():
    """scope='global' keeps ceil(keep * nT^2) pairs in all, unevenly across query tiles where their
    estimates differ; scope='query' keeps the same count in every row."""
    q, k = _qk(1, 2, 64, 16, seed=2, local=1.5)
    q[:, :, :16] *= 4  # the first query tiles attend sharply (their top pairs outrank other rows' top pairs)
    site = Site(grid=(8, 8))
    rows = {}
    for scope in ("query", "global"):
        m = ap.TopKBlocks(keep=0.3, block=(2, 2), scope=scope)
        lay = m._layouts.get(site, 64, "cpu")
        keep = m.select(_estimate(m, q, k, site), lay["forced"])
        rows[scope] = keep.sum(-1)
        assert int(keep.sum()) == (math.ceil(0.3 * 256) if scope == "global" else 16 * math.ceil(0.3 * 16))
    assert len(set(rows["query"].tolist())) == 1 and len(set(rows["global"].tolist())) > 1


@pytest.mark.parametrize("layer,tile", [(0, (2, 8, 8)), (1, (4, 4, 4)), (2, (2, 4, 4)), (3, (2, 8, 8))])
def test_partition_cycle_tiles_by_layer(layer, tile):
    """VMoBA's recurrent partition: temporal, spatial, spatio-temporal tiles, repeating every 3 layers."""
    q, k = _qk(1, 2, 256, 16, seed=3)
    m = ap.TopKBlocks(keep=0.25, block=(2, 4, 4), partition="cycle")
    plan = m.plan(q, k, Site(grid=(4, 8, 8), layer=layer))
    assert set(plan.blocks.bounds.diff().tolist()) == {math.prod(tile)}


def test_partition_tiles_helper():
    assert bs.partition_tiles((5, 8, 8), (1, 4, 4)) == [(1, 8, 8), (5, 4, 4), (1, 4, 4)]
    assert bs.partition_tiles((16, 16), (4, 4)) == [(4, 16), (16, 4), (4, 4)]
    assert bs.partition_tiles((100,), (8,)) == [(8,)]


def test_global_keep_everything_is_dense():
    q, k = _qk(1, 2, 24, 8)
    assert ap.TopKBlocks(keep=1.0, block=(2, 2), scope="global").plan(q, k, Site(grid=(4, 6))) is None


@pytest.mark.parametrize("bad", [dict(score="max"), dict(scope="head"), dict(stride=0), dict(partition="spiral"),
                                 dict(partition=(4, 4))])
def test_bad_options_fail_at_construction(bad):
    with pytest.raises(ValueError, match="TopKBlocks"):
        ap.TopKBlocks(**bad)


def test_options_refused_on_causal_calls():
    q, k = _qk(1, 2, 64, 8)
    with pytest.raises(ValueError, match="for grids"):
        ap.TopKBlocks(keep=0.25, block=8, score="antidiagonal").plan(q, k, Site(causal=True))


def test_partition_of_the_wrong_rank_fails_clearly():
    q, k = _qk(1, 1, 32, 8)
    with pytest.raises(ValueError, match="axes"):
        ap.TopKBlocks(partition=((2, 2, 2),)).plan(q, k, Site(grid=(4, 8)))


def test_antidiagonal_chunks_heads_like_one_pass(monkeypatch):
    """The estimate runs head chunks when the group map is large: the same numbers as one pass."""
    q, k = _qk(1, 4, 96, 8, seed=4)
    site = Site(grid=(8, 12))
    m = ap.TopKBlocks(block=(2, 4), score="antidiagonal", stride=4)
    whole = _estimate(m, q, k, site)
    monkeypatch.setattr(bs, "CHUNK", 24 * 24)  # one head per chunk
    torch.testing.assert_close(_estimate(m, q, k, site), whole)


def test_block_selection_example_on_the_fixture():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "examples/block_selection.py", "--steps", "3"], cwd=root, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [l for l in r.stdout.splitlines() if "density" in l]
    assert len(lines) == 3 and all("PSNR" in l for l in lines), r.stdout


@pytest.mark.parametrize("method", [ap.TopKBlocks(keep=0.5, block=4, score="antidiagonal", stride=3),
                                    ap.TopKBlocks(mass=0.5, block=4, score="similarity", scope="global", partition=((4, 4), (2, 12)))],
                         ids=["antidiagonal", "vmoba"])
@pytest.mark.parametrize("layer", [0, 1])
def test_a_head_split_call_equals_the_whole_call(method, layer):
    """Tensor parallelism: the estimates average over every rank's heads, so two thread ranks holding
    half the heads each plan what one process plans (and the method changes the output)."""
    from test_tp import _split_run

    from attnpatch import core

    torch.manual_seed(layer)
    q, k, v = torch.randn(1, 4, 96, 16), torch.randn(1, 2, 96, 16), torch.randn(1, 2, 96, 16)
    where = dict(grid=(8, 12))
    whole = core.run(q, k, v, method, Site(layer=layer, **where))
    assert (whole - core.run(q, k, v, ap.Dense(), Site(**where))).abs().max() > 1e-3
    assert torch.allclose(_split_run(method, q, k, v, layer, where), whole, atol=1e-5)
