"""Kernel behaviour beyond the method x kernel matrix (that is tests/test_goldens.py over the zoo):
model masks, fully masked rows, fallback and selection, registration, bad inputs, the LSE paths and
the tiles kernel's grouped calls, buffers and splits."""
import logging

import pytest
import torch

import attnpatch as ap
from attnpatch import Plan, Site, kernels
from attnpatch.kernels import reference
import goldens as G
import goldens_guided as GG

def _inputs(B, Hq, Hkv, Sq, Skv, D, dtype):
    g = torch.Generator().manual_seed(Sq * 131 + Skv)
    q, k, v = (torch.randn(B, h, s, D, generator=g, dtype=torch.float64) for h, s in ((Hq, Sq), (Hkv, Skv), (Hkv, Skv)))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _mask_takers(q, k, v, plan, mask):
    """The registered kernels that accept a model's own mask for this call."""
    return [n for n in kernels.names() if kernels.get(n).why_not(q, k, v, plan, mask) is None]


def test_sinkwindow_mask_matches_definition():
    """The mask against a plain loop over the definition (j <= i and (j < sink or i - j < window))."""
    sink, window, S = 3, 4, 19
    method = ap.SinkWindow(sink=sink, window=window)
    plan = method.plan(torch.zeros(1, 1, S, 1), torch.zeros(1, 1, S, 1), Site(causal=True)).with_site(True, 0)
    from attnpatch.plan import materialise_mask

    got = materialise_mask(plan, 1, 1, S, S, "cpu")[0, 0]
    want = torch.tensor([[j <= i and (j < sink or i - j < window) for j in range(S)] for i in range(S)])
    assert torch.equal(got, want)


def test_sinkwindow_left_padding_keeps_real_sink():
    """With left padding the sink is the first real tokens, not the pad slots."""
    S, pad = 12, torch.tensor([0, 3])
    site = Site(causal=True, kv_shift=-pad)
    plan = ap.SinkWindow(sink=2, window=3).plan(None, None, site).with_site(True, 0)
    from attnpatch.plan import materialise_mask

    keep = materialise_mask(plan, 2, 1, S, S, "cpu")  # (2, 1, S, S)
    assert keep[0, 0, 11, :2].all() and not keep[0, 0, 11, 2:9].any()
    assert keep[1, 0, 11, 3:5].all() and not keep[1, 0, 11, 5:9].any()


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_external_masks(kind):
    """The model's own boolean and additive masks combine with the method's pattern, on every kernel
    that takes such a mask, against the float64 golden (SinkWindow's rule and the mask applied by loops)."""
    q, k, v = _inputs(2, 4, 2, 9, 9, 16, torch.float32)
    keep = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True
    mask = keep if kind == "bool" else torch.randn(2, 1, 9, 9, generator=torch.Generator().manual_seed(2))
    site, method = Site(causal=True), ap.SinkWindow(sink=1, window=3)
    want = G.attention(q, k, v, G.static(G.causal(G.sink_window(1, 3), 0), 9, 9), mask=mask)
    plan = method.plan(q, k, site).with_site(True, 0)
    takers = _mask_takers(q, k, v, plan, mask)
    assert "reference" in takers and len(takers) >= 2, takers
    for kernel in takers:
        out = ap.attend(q, k, v, method, site, backend=kernel, mask=mask)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5, msg=kernel)


def test_fully_masked_rows_are_zero():
    q, k, v = _inputs(1, 2, 2, 4, 6, 8, torch.float32)
    mask = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    mask[..., 2, :] = False
    takers = _mask_takers(q, k, v, Plan(), mask)
    assert "reference" in takers and len(takers) >= 2, takers
    for kernel in takers:  # the kernels that take a model's own mask
        out = ap.attend(q, k, v, ap.Dense(), backend=kernel, mask=mask)
        assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2])), kernel
        assert out[:, :, 1].abs().sum() > 0


def _score_plan_method():
    class Tempered(ap.Method):
        def plan(self, q, k, site):
            return Plan(score_mod=lambda s, b, h, qi, kv: s * 0.5, name="tempered")

    return Tempered()


def test_fallback_logs_reason(caplog):
    q, k, v = _inputs(1, 2, 2, 8, 8, 8, torch.float32)
    caplog.set_level(logging.DEBUG, logger="attnpatch")
    out = ap.attend(q, k, v, _score_plan_method())
    exact = GG.score_scaled(q, k, v, 0, False, lambda n: 0.5)  # the score_mod halves every score
    torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=1e-5)
    assert any("using reference" in r.message and "sdpa: plan.score_mod" in r.message for r in caplog.records)


def test_named_backend_that_cannot_run_raises_with_reason():
    q, k, v = _inputs(1, 2, 2, 8, 8, 8, torch.float32)
    with pytest.raises(RuntimeError, match="backend 'sdpa' cannot run.*score_mod"):
        ap.attend(q, k, v, _score_plan_method(), backend="sdpa")
    with pytest.raises(ValueError, match="unknown backend 'nope'; available: sdpa, triton, tiles, flex, reference"):
        ap.attend(q, k, v, ap.Dense(), backend="nope")


def test_no_capable_kernel_lists_every_reason():
    q, k, v = _inputs(1, 2, 2, 8, 8, 8, torch.float32)

    # core.run applies plan.output itself; a kernel is never handed one, so ask select() directly
    plan = Plan(output=lambda o, q, k, v, scale: o, name="transformed")
    with pytest.raises(RuntimeError, match=r"no kernel can run plan 'transformed'.*sdpa: .*output.*reference: .*output"):
        kernels.select(q, k, v, plan)


def test_register_orders_kernels():
    class Fast(kernels.Kernel):
        name = "fast-test"

        def why_not(self, q, k, v, plan, mask=None):
            return "only for this test"

    try:
        kernels.register(Fast(), before="sdpa")
        assert kernels.names()[:2] == ["fast-test", "sdpa"]
        q, k, v = _inputs(1, 2, 2, 8, 8, 8, torch.float32)
        assert kernels.select(q, k, v, Plan()).name == "sdpa"
    finally:
        kernels._REGISTRY[:] = [k for k in kernels._REGISTRY if k.name != "fast-test"]


@pytest.mark.parametrize("bad,match", [
    (dict(q=torch.zeros(2, 3, 4)), "q must be a 4-D tensor"),
    (dict(k=torch.zeros(1, 3, 5, 8), v=torch.zeros(1, 3, 5, 8)), "multiple of key/value heads"),
    (dict(v=torch.zeros(1, 2, 6, 8)), "must share heads and length"),
])
def test_bad_tensors(bad, match):
    t = dict(q=torch.zeros(1, 4, 5, 8), k=torch.zeros(1, 2, 5, 8), v=torch.zeros(1, 2, 5, 8))
    t.update(bad)
    with pytest.raises(ValueError, match=match):
        ap.attend(t["q"], t["k"], t["v"], ap.Dense())


def test_lse_paths_agree():
    """The fused CPU flash path and the explicit path (other devices) give the same output and
    log-sum-exp, and merging two halves equals attention over the whole."""
    from attnpatch.ops.lse import merge, sdpa_lse, sdpa_lse_math

    q, k, v = _inputs(1, 2, 2, 7, 19, 16, torch.float32)
    bias = torch.zeros(1, 1, 7, 19).masked_fill(torch.rand(1, 1, 7, 19, generator=torch.Generator().manual_seed(5)) > 0.7,
                                                float("-inf"))
    o1, l1 = sdpa_lse(q, k, v, bias)
    o2, l2 = sdpa_lse_math(q, k, v, bias)
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    halves = [sdpa_lse(q, k[:, :, s], v[:, :, s], bias[..., s]) for s in (slice(0, 9), slice(9, 19))]
    torch.testing.assert_close(merge(halves), o1, atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("bad,match", [
    (dict(k=torch.zeros(1, 2, 5, 8, dtype=torch.float64)), r"share one dtype.*k.to\(q.dtype\)"),
    (dict(k=torch.zeros(1, 2, 5, 8, device="meta")), r"on one device.*k.to\(q.device\)"),
    (dict(mask=torch.ones(1, 1, 5, 6, dtype=torch.bool)), r"mask of shape \(1, 1, 5, 6\) does not broadcast to .*\(1, 4, 5, 5\)"),
    (dict(mask=torch.ones(3, 1, 5, 5, dtype=torch.bool)), r"does not broadcast"),
    (dict(mask=torch.ones(1, 1, 5, 5, dtype=torch.long)), r"boolean.*or additive float.*mask.bool\(\)"),
    (dict(mask=[[True]]), r"mask must be a tensor"),
    (dict(scale="x"), r"scale must be a positive number.*'x'"),
    (dict(scale=-1.0), r"scale must be a positive number"),
    (dict(scale=float("nan")), r"scale must be a positive number"),
])
def test_bad_inputs_fail_early_with_the_fix(bad, match):
    """Mismatched dtypes / devices, masks that do not broadcast and non-numeric scales raise a ValueError
    at attend naming the problem and the fix (they were raw torch errors from inside the kernels)."""
    t = dict(q=torch.zeros(1, 4, 5, 8), k=torch.zeros(1, 2, 5, 8), v=torch.zeros(1, 2, 5, 8), mask=None, scale=None)
    t.update(bad)
    if t["k"].device.type == "meta":
        t["v"] = torch.zeros(1, 2, 5, 8, device="meta")
    with pytest.raises(ValueError, match=match):
        ap.attend(t["q"], t["k"], t["v"], ap.Dense(), mask=t["mask"], scale=t["scale"])



def test_flex_raises_dynamo_recompile_limit_only_during_its_calls(monkeypatch):
    """flex used to raise torch._dynamo's global recompile limit for good on first use: every
    other torch.compile user in the process inherited it. Now only its own calls see it."""
    from attnpatch.kernels import flex

    cfg = torch._dynamo.config
    # set and restored by hand: pytest >= 9.2's monkeypatch deletes a module attribute that is not in its
    # __dict__ on undo, and dynamo's config then reports recompile_limit as gone for the rest of the session
    saved = cfg.recompile_limit
    cfg.recompile_limit = 8
    monkeypatch.setattr(flex, "_COMPILED", None)
    monkeypatch.setenv("ATTNPATCH_FLEX_COMPILE", "1")
    try:
        flex._flex()  # builds the compiled function (no call: nothing compiles yet)
        assert cfg.recompile_limit == 8
        with flex._recompile_room():
            with flex._recompile_room():  # nested / concurrent calls share one raise
                assert cfg.recompile_limit >= 256
            assert cfg.recompile_limit >= 256
        assert cfg.recompile_limit == 8
    finally:
        cfg.recompile_limit = saved
