"""The tiles kernel: grouped calls on strided inputs, splits of large groups, reuse of its buffers
(only once dropped; across inference mode), release_buffers, and a v head size unlike q's; each
against the float64 reference kernel (held to the goldens by tests/test_goldens.py)."""
import pytest
import torch

import attnpatch as ap
from attnpatch import Site, kernels
from attnpatch.kernels import reference


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("B,Hq,Hkv", [(1, 2, 2), (2, 4, 2)])
@pytest.mark.parametrize("method,site", [
    (ap.SlidingTile(tile=4, window=3), Site(grid=(12, 16))),  # interior tiles move in lockstep: grouped calls
    (ap.Neighborhood(window=4, stride=4), Site(grid=(8, 12), text_len=3, kind="joint")),  # block diagonal + text
    (ap.Neighborhood(window=5, tile=4), Site(grid=(9, 11))),  # stride-1 window: partial runs stay single calls
    (ap.SinkWindow(sink=4, window=40, block=16), Site(causal=True)),  # no permutation: results written in place
], ids=["sta", "blocked-text", "window", "sinkwindow"])
def test_tiles_grouped_calls_on_strided_inputs(method, site, B, Hq, Hkv, layout):
    """tiles runs consecutive query ranges whose runs move by one stride as one call on strided
    views, and reads / writes rows through index maps built from the inputs' own strides: check
    both against the float64 reference on (B, H, S, D) tensors and on (B, S, H, D) transposed views
    (as diffusers' processors pass them), with GQA and B > 1."""
    from attnpatch.kernels.tiles import groups

    S = 117 if site.grid is None else (site.grid[0] * site.grid[1] + site.text_len)
    g = torch.Generator().manual_seed(S)
    def make(h):
        x = torch.randn(B, S, h, 16, generator=g) if layout == "bshd" else torch.randn(B, h, S, 16, generator=g)
        return x.transpose(1, 2) if layout == "bshd" else x
    q, k, v = make(Hq), make(Hkv), make(Hkv)
    plan = method.plan(q, k, site).with_site(site.causal, 0)
    assert kernels.get("tiles").why_not(q, k, v, plan) is None
    out = ap.attend(q, k, v, method, site, backend="tiles")
    exact = reference.attention(q.double(), k.double(), v.double(), plan, dtype=torch.float64)
    same = reference.attention(q, k, v, plan, dtype=torch.float32).double()
    assert out.shape == q.shape
    assert (out.double() - exact).abs().max() <= 2 * (same - exact).abs().max() + 1e-6
    gs = groups(plan.blocks)
    if isinstance(method, ap.SlidingTile) or (isinstance(method, ap.Neighborhood) and method.stride != 1):
        assert max(gr.n for gr in gs) > 1  # the grouped path really ran
    assert sum(gr.n * gr.L for gr in gs) == S  # every query row once


def test_tiles_splits_large_groups_exactly(monkeypatch):
    """Groups above MAX_CALL_BYTES run as several calls (sub-groups keep the stride): same result."""
    import attnpatch.kernels.tiles as tiles_mod

    site = Site(grid=(16, 32))
    method = ap.SlidingTile(tile=4, window=3)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 512, 16, generator=g) for _ in range(3))
    plan = method.plan(q, k, site).with_site(False, 0)
    assert max(gr.n for gr in tiles_mod.groups(plan.blocks)) >= 3
    whole = ap.attend(q, k, v, method, site, backend="tiles")
    calls = []
    real = tiles_mod.Tiles._call
    monkeypatch.setattr(tiles_mod.Tiles, "_call", staticmethod(lambda *a: (calls.append(a[6].n), real(*a))[1]))
    monkeypatch.setattr(tiles_mod, "MAX_CALL_BYTES", 2 * 16 * 2 * 16 * 4)  # two 16-row ranges per call
    split = ap.attend(q, k, v, method, site, backend="tiles")
    assert max(calls) == 2 and len(calls) > len(tiles_mod.groups(plan.blocks))
    exact = reference.attention(q.double(), k.double(), v.double(), plan, dtype=torch.float64)
    assert (split.double() - exact).abs().max() < 1e-5
    assert torch.allclose(split, whole, atol=1e-6)


@pytest.mark.parametrize("method", [ap.SlidingTile(tile=4, window=3), ap.Neighborhood(window=(2, 16), stride=(2, 16))],
                         ids=["permuted", "in-place"])
def test_tiles_recycles_outputs_only_once_dropped(method):
    """tiles reuses its previous output's memory (large fresh CPU blocks page-fault on every call),
    but only after the caller dropped every tensor viewing it: a kept result is never overwritten."""
    site = Site(grid=(16, 16))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 256, 8, generator=g) for _ in range(3))
    q2 = torch.randn(1, 2, 256, 8, generator=g)
    first = ap.attend(q, k, v, method, site, backend="tiles")
    kept = first.clone()
    view = first[0, 1]  # a view alone keeps the storage
    ptr = first.untyped_storage().data_ptr()
    del first
    second = ap.attend(q2, k, v, method, site, backend="tiles")
    assert second.untyped_storage().data_ptr() != ptr
    assert torch.equal(view, kept[0, 1])  # untouched by the second call
    plan = method.plan(q2, k, site).with_site(False, 0)
    exact = reference.attention(q2.double(), k.double(), v.double(), plan, dtype=torch.float64)
    assert (second.double() - exact).abs().max() < 1e-5
    del view
    ptr2 = second.untyped_storage().data_ptr()
    del second
    import attnpatch.kernels.tiles as tiles_mod

    pooled = {b.untyped_storage().data_ptr() for b in tiles_mod._OUTPUTS.__dict__.values()}  # alive: no new block can be there
    third = ap.attend(q, k, v, method, site, backend="tiles")  # every view of the earlier outputs is gone now
    assert third.untyped_storage().data_ptr() in pooled & {ptr, ptr2}  # recycled, not allocated afresh
    assert torch.allclose(third, kept, atol=1e-6)


def test_release_buffers_frees_tiles_pools_and_calls_stay_exact():
    """kernels.release_buffers() empties tiles' reuse pools (reporting their size); the next call
    allocates afresh and is still exact."""
    import attnpatch.kernels.tiles as tiles_mod

    site, method = Site(grid=(16, 16)), ap.SlidingTile(tile=4, window=3)
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 256, 8, generator=g) for _ in range(3))
    first = ap.attend(q, k, v, method, site, backend="tiles").clone()
    assert tiles_mod._WORKSPACE.__dict__ and tiles_mod._OUTPUTS.__dict__
    assert kernels.release_buffers() >= 4 * 256 * 2 * 8 * 4  # q, k, v copies and the output at least
    assert not tiles_mod._WORKSPACE.__dict__ and not tiles_mod._OUTPUTS.__dict__
    assert kernels.release_buffers() == 0
    assert torch.equal(ap.attend(q, k, v, method, site, backend="tiles"), first)


@pytest.mark.parametrize("method", [ap.SlidingTile(tile=4, window=3), ap.Neighborhood(window=(2, 16), stride=(2, 16))],
                         ids=["permuted", "in-place"])
def test_tiles_buffers_survive_switching_inference_mode(method):
    """Reused buffers made under torch.inference_mode() cannot be written outside it: calls in
    and out of inference mode, in both orders, keep working and stay exact (GQA included)."""
    site = Site(grid=(16, 16))
    g = torch.Generator().manual_seed(11)
    q, k, v = torch.randn(1, 4, 256, 8, generator=g), torch.randn(1, 2, 256, 8, generator=g), torch.randn(1, 2, 256, 8, generator=g)
    plan = method.plan(q, k, site).with_site(False, 0)
    exact = reference.attention(q.double(), k.double(), v.double(), plan, dtype=torch.float64)
    outs = []
    for inference in (True, False, True, False):
        with torch.inference_mode(inference):
            o = ap.attend(q, k, v, method, site, backend="tiles")
        assert o.is_inference() == inference
        outs.append(o)
    for o in outs:
        assert (o.double() - exact).abs().max() < 1e-5


@pytest.mark.parametrize("method,site", [
    (ap.SlidingTile(tile=4, window=3), Site(grid=(8, 12))),
    (ap.Neighborhood(window=5, tile=4), Site(grid=(9, 11))),  # partial runs: merged by their LSE
], ids=["sta", "na-partial"])
def test_value_head_size_differs_from_query(method, site):
    """v's head size may differ from q's (sdpa and reference take it): tiles, which selection picks for
    large block-sparse plans, runs it too (the CPU flash kernel needs one head size: such parts go the math way)."""
    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(2, 4, 96 if site.grid == (8, 12) else 99, 16, generator=g), None, None
    k = torch.randn(2, 2, q.shape[2], 16, generator=g)
    v = torch.randn(2, 2, q.shape[2], 40, generator=g)
    plan = method.plan(q, k, site).with_site(False, 0)
    assert kernels.get("tiles").why_not(q, k, v, plan) is None
    out = ap.attend(q, k, v, method, site, backend="tiles")  # at this size the cost model would pick sdpa
    exact = reference.attention(q.double(), k.double(), v.double(), plan, dtype=torch.float64)
    same = reference.attention(q, k, v, plan, dtype=torch.float32).double()
    assert out.shape == (2, 4, q.shape[2], 40)
    assert (out.double() - exact).abs().max() <= 2 * (same - exact).abs().max() + 1e-6


@pytest.mark.parametrize("method,site", [
    (ap.SlidingTile(tile=8, window=3), Site(grid=(32, 32), text_len=16, kind="joint")),  # full tile rows: no bias
    (ap.Neighborhood(window=9), Site(grid=(32, 32), text_len=16, kind="joint")),  # partial runs: one bias over the gathered keys
], ids=["sta-joint", "window"])
@pytest.mark.parametrize("grad", [False, True])
def test_grid_groups_gather_where_the_cost_model_says_and_stay_exact(method, site, grad, monkeypatch):
    """At the fixture's head dim (24) the cost constants make some grid groups copy their key runs side by
    side for one call instead of merging one LSE part per run (tile_runs._grid_gathers); the output (and
    its gradients) equal the float64 reference, and the merged path's, with the switch off."""
    from attnpatch.kernels import tile_runs

    S = site.grid[0] * site.grid[1] + site.text_len
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 4, S, 24, generator=g, requires_grad=grad) for _ in range(3))
    plan = method.plan(q, k, site).with_site(False, 0)
    from attnpatch.kernels.cost import work_of

    work = work_of(q, v)  # (batch x heads, head dim, value dim, element bytes, the CPU's cost constants)
    assert any(gr.gather for gr in tile_runs.groups(plan.blocks, plan, "cpu", work))  # the gathered path runs
    out = ap.attend(q, k, v, method, site, backend="tiles")
    exact = reference.attention(q.double(), k.double(), v.double(), plan, dtype=torch.float64)
    torch.testing.assert_close(out.double(), exact, atol=2e-6, rtol=1e-5)
    monkeypatch.setattr(tile_runs, "GRID_GATHER", False)
    merged = ap.attend(q, k, v, method, site, backend="tiles")
    torch.testing.assert_close(out, merged, atol=2e-6, rtol=1e-5)
    if grad:
        w = torch.randn(out.shape, generator=g)
        got = torch.autograd.grad((out * w).sum(), (q, k, v))
        want = torch.autograd.grad((exact * w.double()).sum(), (q, k, v))
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=1e-4)
