"""The tiles kernel's refined runs for causal plans: diagonal blocks whose mask is exactly causal
run as one is_causal call (no mask tensor), partial runs keep only their kept key columns (a
256-key sink block becomes a 4-key full run) and join call groups where their masks repeat. Each
against the float64 reference kernel and against tiles with the refinement off (``REFINE``)."""
import pytest
import torch

import attnpatch as ap
from attnpatch import Site, kernels
from attnpatch.kernels import cost, reference
from attnpatch.kernels import tile_runs
from attnpatch.kernels import tiles as tiles_mod


def _qkv(S, Hq=4, Hkv=2, D=16, B=1, seed=0, q_len=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, q_len or S, D, generator=g)
    return q, torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)


def _close(out, q, k, v, plan):
    exact = reference.attention(q.double(), k.double(), v.double(), plan, dtype=torch.float64)
    same = reference.attention(q, k, v, plan, dtype=torch.float32).double()
    assert (out.double() - exact).abs().max() <= 2 * (same - exact).abs().max() + 1e-6


def _causal_calls(monkeypatch):
    """Count the is_causal calls tiles makes: LSE parts (``_causal_lse``) and single-run ranges (SDPA)."""
    n = {"lse": 0, "sdpa": 0}
    real_lse, real_sdpa = tiles_mod._causal_lse, tiles_mod.F.scaled_dot_product_attention

    def lse(*a):
        n["lse"] += 1
        return real_lse(*a)

    def sdpa(*a, is_causal=False, **kw):
        n["sdpa"] += bool(is_causal)
        return real_sdpa(*a, is_causal=is_causal, **kw)

    monkeypatch.setattr(tiles_mod, "_causal_lse", lse)
    monkeypatch.setattr(tiles_mod.F, "scaled_dot_product_attention", sdpa)
    return n


CAUSAL_PLANS = [  # S not a multiple of the block: the last diagonal block is partial (shorter)
    (ap.SinkWindow(sink=4, window=64, block=32), 200),  # window >= block: every diagonal causal
    (ap.SinkWindow(sink=0, window=40, block=32), 117),  # no sink
    (ap.Power(local=300, sink=4), 1000),  # local band >= the 256-token default block
    (ap.TopKBlocks(keep=0.3, block=32), 200),  # the forced diagonal
]


@pytest.mark.parametrize("gather", [0, 3], ids=["parts", "gathered"])
@pytest.mark.parametrize("method,S", CAUSAL_PLANS, ids=["sinkwindow", "nosink", "power", "topk"])
def test_causal_diagonal_runs_with_is_causal(method, S, gather, monkeypatch):
    """Every diagonal block of these plans is exactly causal: one is_causal call for each range
    that is not gathered (the first block alone through SDPA, the others as LSE parts; grouped
    ranges count once); gathered ranges mask it in their one call. The result equals the reference
    and tiles without the refinement, with GQA and B > 1, both with gathering off and on."""
    monkeypatch.setattr(tile_runs, "GATHER_FACTOR", gather)
    site = Site(causal=True)
    q, k, v = _qkv(S, B=2)
    plan = method.plan(q, k, site).with_site(True, 0)
    assert kernels.get("tiles").why_not(q, k, v, plan) is None
    gs = tiles_mod.groups(plan.blocks, plan)
    diag = [g for g in gs if any(r[3] == tiles_mod.CAUSAL for r in g.runs)]
    assert sum(g.n * g.L for g in diag) == S  # every row's diagonal block (blocks or SPLIT_ROWS ranges)
    assert any(g.gather for g in gs) == (gather > 0)
    n = _causal_calls(monkeypatch)
    out = ap.attend(q, k, v, method, site, backend="tiles")
    assert n["lse"] + n["sdpa"] == sum(not g.gather for g in diag) and n["sdpa"] >= 1
    _close(out, q, k, v, plan)
    monkeypatch.setattr(tile_runs, "REFINE", False)
    n["lse"] = n["sdpa"] = 0
    before = ap.attend(q, k, v, method, site, backend="tiles")
    assert n["lse"] + n["sdpa"] == 0  # the switch really turns the path off
    torch.testing.assert_close(out, before, rtol=1e-5, atol=1e-6)


def test_diagonal_not_causal_keeps_its_mask(monkeypatch):
    """A window narrower than the block leaves the diagonal's lower corner masked: no is_causal
    call, the partial mask applies (exact)."""
    method, site = ap.SinkWindow(sink=4, window=20, block=32), Site(causal=True)
    q, k, v = _qkv(150)
    plan = method.plan(q, k, site).with_site(True, 0)
    assert not any(r[3] == tiles_mod.CAUSAL for g in tiles_mod.groups(plan.blocks, plan) for r in g.runs)
    n = _causal_calls(monkeypatch)
    out = ap.attend(q, k, v, method, site, backend="tiles")
    assert n["lse"] + n["sdpa"] == 0
    _close(out, q, k, v, plan)


def test_sink_block_trimmed_and_band_grouped():
    """SinkWindow at 256-token blocks: past the first blocks each range attends a 4-key full sink
    run, a partial band trimmed to its kept columns and a causal diagonal, and ranges with the same
    band mask form one group (a handful of calls instead of three per block)."""
    method, site = ap.SinkWindow(sink=4, window=256), Site(causal=True)
    q, k, v = _qkv(2048, Hq=2, Hkv=1)
    plan = method.plan(q, k, site).with_site(True, 0)
    gs = tiles_mod.groups(plan.blocks, plan)
    big = max(gs, key=lambda g: g.n)
    assert big.n >= 5
    assert [(r[2], r[3]) for r in big.runs] == [(4, True), (255, False), (256, tiles_mod.CAUSAL)]
    assert sum(g.n * g.L for g in gs) == 2048  # every query row once
    _close(ap.attend(q, k, v, method, site, backend="tiles"), q, k, v, plan)


def test_scattered_keys_split_into_short_ranges(monkeypatch):
    """Power's power-of-two keys leave 256-row blocks partial across most of their keys: its ranges
    split into SPLIT_ROWS-row ranges with their own trimmed runs (less than SPLIT_GAIN of the score
    elements), which repeat and group; exact, and the same as tiles with splitting off."""
    method, site = ap.Power(local=64), Site(causal=True)
    q, k, v = _qkv(1024, Hq=3, Hkv=1)
    plan = method.plan(q, k, site).with_site(True, 0)
    gs = tile_runs.groups(plan.blocks, plan)
    assert {g.L for g in gs} >= {tile_runs.SPLIT_ROWS} and max(g.n for g in gs) > 1
    assert sum(g.n * g.L for g in gs) == 1024
    split = cost.block_stats(plan.blocks, plan)["density"]
    out = ap.attend(q, k, v, method, site, backend="tiles")
    _close(out, q, k, v, plan)
    monkeypatch.setattr(tile_runs, "SPLIT_ROWS", 0)
    assert split < tile_runs.SPLIT_GAIN * cost.block_stats(plan.blocks, plan)["density"]
    torch.testing.assert_close(out, ap.attend(q, k, v, method, site, backend="tiles"), rtol=1e-5, atol=1e-6)


def test_chunked_prefill_falls_back():
    """q_offset > 0 (a chunk after a KV cache): no causal block structure, so tiles declines and
    the call stays exact on another kernel."""
    method, site = ap.SinkWindow(sink=4, window=64, block=32), Site(causal=True, q_offset=100)
    q, k, v = _qkv(200, q_len=100)
    plan = method.plan(q, k, site).with_site(True, 100)
    assert kernels.get("tiles").why_not(q, k, v, plan) is not None
    _close(ap.attend(q, k, v, method, site), q, k, v, plan)


def test_causal_diagonal_under_autograd():
    """Under autograd the diagonal takes the explicit LSE path with a causal bias: gradients equal
    those of tiles without the refinement."""
    method, site = ap.SinkWindow(sink=4, window=64, block=32), Site(causal=True)
    grads = []
    for refine in (True, False):
        tile_runs.REFINE = refine
        try:
            q, k, v = (x.requires_grad_() for x in _qkv(150, seed=3))
            ap.attend(q, k, v, method, site, backend="tiles").square().sum().backward()
        finally:
            tile_runs.REFINE = True
        grads.append([x.grad for x in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cost_model_counts_the_cheaper_diagonal():
    """The tiles estimate drops by the diagonal's share times (1 - diag_factor), and the refined
    runs compute less of the score matrix than the stored blocks (the trimmed sink)."""
    method, site = ap.SinkWindow(sink=4, window=256), Site(causal=True)
    q, k, v = _qkv(1024, Hq=9, Hkv=3, D=64)
    plan = method.plan(q, k, site).with_site(True, 0)
    refined, stored = cost.block_stats(plan.blocks, plan), cost.block_stats(plan.blocks)
    assert refined["diag"] > 0 and stored["diag"] == 0 and refined["density"] < stored["density"]
    c = dict(cost.constants("cpu", 1), diag_factor=1.0)
    full = cost.estimate("tiles", c, q, k, v, plan)
    half = cost.estimate("tiles", dict(c, diag_factor=0.5), q, k, v, plan)
    dense = 9 * 1024 * 1024 * cost.per_d(c["elem_s"], 64)
    assert full - half == pytest.approx(refined["diag"] * 0.5 * dense * c["tiles_factor"])
