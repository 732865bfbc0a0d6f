"""Kernel behaviour beyond the method x kernel matrix (that is tests/test_goldens.py over the zoo):
model masks, fully masked rows, fallback and selection, registration, bad inputs, the LSE paths and
the flex recompile limit (the tiles kernel's own behaviour: test_tiles.py)."""
import logging

import pytest
import torch

import attnpatch as ap
from attnpatch import Plan, Site, kernels
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
    with pytest.raises(ValueError, match="unknown backend 'nope'; available: sdpa, triton, tiles, lines_native, lines, gather, classes, buckets, flex, reference"):
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


def test_a_static_plans_prepared_sdpa_call_matches_a_fresh_build_per_shape_and_scale():
    """The second call of a static plan runs the SDPA call prepared by the first (kept on the plan);
    it must equal the reference kernel for the same shape, and a new scale or shape is not served
    the old call."""
    from attnpatch.kernels.sdpa import SDPA

    site = ap.Site(grid=(6, 6))
    plan = ap.Neighborhood(window=3).plan(torch.zeros(1, 2, 36, 8), torch.zeros(1, 2, 36, 8), site).with_site(False, 0)
    assert plan.static
    torch.manual_seed(0)
    sd, ref = SDPA(), kernels.get("reference")
    for scale in (None, None, 0.3, 0.3):
        q, k, v = (torch.randn(2, 2, 36, 8) for _ in range(3))
        torch.testing.assert_close(sd.run(q, k, v, plan, scale=scale), ref.run(q, k, v, plan, scale=scale), atol=1e-5, rtol=1e-5)
        assert plan.__dict__["_sdpa_call"][0][-1] == scale  # prepared for this scale
    gq, gk = torch.randn(1, 4, 36, 8), torch.randn(1, 2, 36, 8)  # GQA: a new key shape, a new prepared call
    torch.testing.assert_close(sd.run(gq, gk, gk, plan), ref.run(gq, gk, gk, plan), atol=1e-5, rtol=1e-5)


def test_select_remembers_its_choice_on_a_static_plan_until_the_registry_changes():
    q = k = v = torch.randn(1, 2, 36, 8)
    plan = ap.Neighborhood(window=3).plan(q, k, ap.Site(grid=(6, 6))).with_site(False, 0)
    first = kernels.select(q, k, v, plan)
    assert plan.__dict__["_selected"][1] is first
    class Always(type(kernels.get("reference"))):  # noqa: E306
        name = "always"
    try:
        kernels.register(Always(), before=kernels.names()[0])
        kernels.PREFERENCE[("cpu", "masked")].remove("always")
        kernels.PREFERENCE[("cpu", "masked")].insert(0, "always")
        kernels.invalidate()
        assert kernels.select(q, k, v, plan).name == "always"  # not the remembered choice
    finally:
        kernels._REGISTRY[:] = [x for x in kernels._REGISTRY if x.name != "always"]
        for order in kernels.PREFERENCE.values():
            if "always" in order:
                order.remove("always")
        kernels.invalidate()
    assert kernels.select(q, k, v, plan).name == first.name
