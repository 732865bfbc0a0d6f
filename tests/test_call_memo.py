"""core.run remembers the kernel call of a ``plans_by_site`` method per (Site, shapes, scale) (attnpatch/core.py,
``_remember``): a remembered call gives what planning gives, another Site, shape, mask or a changed parameter is
planned again, and data-dependent methods are remembered only on calls whose plan does not depend on the data
(``some_static`` / ``static_at``: a dense step or layer, a grid of one tile)."""
import pytest
import torch
import torch.nn.functional as F

import attnpatch as ap
from attnpatch import core
from attnpatch.methods.base import remembered_calls
from attnpatch.plan import Plan, materialise_mask
from attnpatch.site import Site


def _qkv(S, H=4, Hkv=4, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, H, S, D, generator=g), torch.randn(1, Hkv, S, D, generator=g), torch.randn(1, Hkv, S, D, generator=g)


def _golden(method, q, k, v, site, mask=None):
    """float64 SDPA on the plan's own mask (and the call's), scale times a float q_scale."""
    plan = (method.head_plans(q, k, site)[0][1] or Plan()).with_site(site.causal, site.q_offset)
    keep = materialise_mask(plan, 1, q.shape[1], q.shape[2], k.shape[2], "cpu")
    if mask is not None:
        keep = mask if keep is None else keep & mask
    scale = q.shape[-1] ** -0.5 * (plan.q_scale or 1.0)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep, scale=scale).float()


def _planned(method):
    """Count the method's head_plans calls (set past the method's own __setattr__: not a parameter)."""
    count, real = [0], method.head_plans

    def spy(*a, **kw):
        count[0] += 1
        return real(*a, **kw)

    object.__setattr__(method, "head_plans", spy)
    return count


def test_a_remembered_call_equals_its_golden_and_skips_planning():
    q, k, v = _qkv(64)
    site = Site(grid=(8, 8), layer=1, step=10, steps=20, timestep=0.5)
    for method in (ap.Neighborhood(window=(3, 3), dense_steps=0), ap.SlidingTile(tile=(4, 4), window=(1, 3), dense_steps=0),
                   ap.Temperature(tau=0.7)):
        count = _planned(method)
        want = _golden(method, q, k, v, site)
        outs = [core.run(q, k, v, method, site) for _ in range(6)]
        for out in outs:
            torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
        assert remembered_calls(method), method  # remembered once its kernel was final
        before = count[0]
        core.run(q, k, v, method, site)
        assert count[0] == before, method  # the remembered call did not plan again


def test_another_site_shape_or_mask_is_planned_again():
    q, k, v = _qkv(64)
    method = ap.Neighborhood(window=(3, 3), dense_steps=5)
    sparse_site = Site(grid=(8, 8), layer=1, step=10, steps=20, timestep=0.5)
    dense_site = Site(grid=(8, 8), layer=1, step=2, steps=20, timestep=0.9)  # inside dense_steps: plain attention
    for _ in range(6):
        sparse = core.run(q, k, v, method, sparse_site)
    dense = core.run(q, k, v, method, dense_site)
    torch.testing.assert_close(dense, F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=1e-4)
    assert (dense - sparse).abs().max() > 1e-2  # the two sites' outputs differ: the dense one is not the sparse one
    # a causal method at two lengths and with a padding mask
    lm = ap.SinkWindow(sink=2, window=8)
    for S in (32, 48, 32, 48, 32, 48):
        q, k, v = _qkv(S, H=4, Hkv=2, seed=S)
        site = Site(causal=True, layer=0)
        torch.testing.assert_close(core.run(q, k, v, lm, site), _golden(lm, q, k, v, site), atol=2e-5, rtol=1e-4)
    mask = torch.ones(1, 1, 48, 48, dtype=torch.bool)
    mask[..., :5] = False  # left padding: keys 0..4 hidden
    mask[..., :5, 0] = True  # the padded rows keep one key
    got = core.run(q, k, v, lm, site, mask=mask)
    torch.testing.assert_close(got, _golden(lm, q, k, v, site, mask), atol=2e-5, rtol=1e-4)


def test_setting_a_parameter_forgets_the_remembered_calls():
    q, k, v = _qkv(64)
    site = Site(grid=(8, 8), layer=1, step=10, steps=20, timestep=0.5)
    method = ap.Neighborhood(window=(3, 3), dense_steps=0)
    for _ in range(6):
        narrow = core.run(q, k, v, method, site)
    method.window = (7, 7)
    method.__post_init__()  # the parameter as a user would set it, then the method's own derived state
    wide = core.run(q, k, v, method, site)
    torch.testing.assert_close(wide, _golden(ap.Neighborhood(window=(7, 7), dense_steps=0), q, k, v, site),
                               atol=2e-5, rtol=1e-4)
    assert (wide - narrow).abs().max() > 1e-2


def test_data_dependent_methods_are_never_remembered():
    method = ap.TopKBlocks(keep=0.5, block=8)
    site = Site(causal=True, layer=0)
    for seed in range(4):
        q, k, v = _qkv(64, seed=seed)
        core.run(q, k, v, method, site)
    assert not ap.TopKBlocks.plans_by_site and remembered_calls(method) is None


def test_layers_share_a_remembered_call_unless_the_layer_changes_the_plan():
    q, k, v = _qkv(64)
    step = dict(step=10, steps=20, timestep=0.5)
    free = ap.Neighborhood(window=(3, 3), dense_steps=0)
    count = _planned(free)
    for _ in range(6):  # until the kernel choice is final
        core.run(q, k, v, free, Site(grid=(8, 8), layer=0, **step))
    want = _golden(free, q, k, v, Site(grid=(8, 8), layer=0, **step))
    before = count[0]
    for layer in range(1, 6):  # a pipeline step's other layers: the same call, no planning
        torch.testing.assert_close(core.run(q, k, v, free, Site(grid=(8, 8), layer=layer, name=f"b.{layer}", **step)), want,
                                   atol=2e-5, rtol=1e-4)
    assert count[0] == before
    layered = ap.Neighborhood(window=(3, 3), dense_steps=0, dense_layers=(2,))
    assert not layered.layer_free()
    for _ in range(6):
        sparse = core.run(q, k, v, layered, Site(grid=(8, 8), layer=1, **step))
    dense = core.run(q, k, v, layered, Site(grid=(8, 8), layer=2, **step))  # a dense layer: plain attention
    torch.testing.assert_close(dense, F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=1e-4)
    assert (dense - sparse).abs().max() > 1e-2


def test_a_collected_method_takes_its_remembered_calls_with_it():
    import gc

    from attnpatch.methods import base

    q, k, v = _qkv(64)
    site = Site(grid=(8, 8), layer=0, step=10, steps=20, timestep=0.5)
    method = ap.Neighborhood(window=(3, 3), dense_steps=0)
    for _ in range(6):
        core.run(q, k, v, method, site)
    key = id(method)
    assert key in base._CALLS
    del method
    gc.collect()
    assert key not in base._CALLS  # its plans (and the masks they hold) are not kept for a method that is gone


def test_a_mixed_streaming_heads_layer_is_remembered_per_layer():
    """StreamingHeads: a layer with retrieval heads runs its merged per-head plan; remembered, it equals the
    float64 golden (full heads causal, the others sink + window) and skips planning; another layer (other
    retrieval heads) is planned on its own."""
    q, k, v = _qkv(48, H=4, Hkv=2)
    method = ap.StreamingHeads([(0, 1), (1, 2), (1, 3)], sink=2, window=6)
    count = _planned(method)
    i = torch.arange(48)
    causal = i[:, None] >= i
    local = causal & ((i[:, None] - i < 6) | (i < 2))
    for layer, full in ((0, {1}), (1, {2, 3})):
        site = Site(causal=True, layer=layer)
        keep = torch.stack([causal if h in full else local for h in range(4)])[None]
        rk, rv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        want = F.scaled_dot_product_attention(q.double(), rk.double(), rv.double(), attn_mask=keep).float()
        for _ in range(6):
            torch.testing.assert_close(core.run(q, k, v, method, site), want, atol=2e-5, rtol=1e-4)
    assert len(remembered_calls(method) or {}) == 2  # one per layer
    before = count[0]
    for layer in (0, 1):
        core.run(q, k, v, method, Site(causal=True, layer=layer))
    assert count[0] == before


def test_per_row_q_scales_are_remembered_and_applied_per_call():
    """EntropyScale on a causal call scales each query row by max(1, log n_i / log train_len) (a tensor
    q_scale): the remembered call applies it to each new q (not to the first call's), equal to float64 SDPA
    on the rescaled rows, without planning again."""
    method = ap.EntropyScale(train_len=8)
    count = _planned(method)
    site = Site(causal=True, layer=3)
    n = torch.arange(1, 41, dtype=torch.float64)
    factor = (n.log() / torch.tensor(8.0, dtype=torch.float64).log()).clamp_min(1.0).view(1, 1, -1, 1)
    for seed in range(6):  # fresh tensors each call: a remembered q would show
        q, k, v = _qkv(40, H=4, Hkv=2, seed=seed)
        rk, rv = k.repeat_interleave(2, 1).double(), v.repeat_interleave(2, 1).double()
        want = F.scaled_dot_product_attention(q.double() * factor, rk, rv, is_causal=True).float()
        torch.testing.assert_close(core.run(q, k, v, method, site), want, atol=2e-5, rtol=1e-4)
    assert remembered_calls(method)
    before = count[0]
    core.run(q, k, v, method, site)
    assert count[0] == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_remembered_per_row_scales_equal_the_planned_call_in_every_dtype(dtype, monkeypatch):
    """The remembered call casts the scales once (float32 or wider, q's own dtype after the product, as
    fold_q_scale): bitwise the output of a call that plans and selects afresh."""
    method, site = ap.EntropyScale(train_len=8), Site(causal=True, layer=1)
    for seed in range(3):
        q, k, v = (x.to(dtype) for x in _qkv(40, H=4, Hkv=2, seed=seed))
        got = core.run(q, k, v, method, site)
        monkeypatch.setattr(core, "REMEMBER", [False])
        want = core.run(q, k, v, method, site)
        monkeypatch.setattr(core, "REMEMBER", [True])
        assert got.dtype == dtype and torch.equal(got, want)
    assert remembered_calls(method)


def test_a_data_dependent_method_is_remembered_only_where_its_plan_ignores_the_data():
    """TopKBlocks on a grid of one tile (its default tile covers an 8 x 8 grid) and on its dense steps: remembered,
    equal to dense attention; on a grid of several tiles (an estimate per call): never remembered, and calls with
    other q / k give their own plans (each equal to the method's plan for those q / k)."""
    one = ap.TopKBlocks()
    site = Site(grid=(8, 8), text_len=16, kind="joint", layer=0, step=10, steps=20, timestep=0.5)
    q, k, v = _qkv(80)
    assert one.static_at(q, k, site)
    count = _planned(one)
    for _ in range(4):
        torch.testing.assert_close(core.run(q, k, v, one, site), F.scaled_dot_product_attention(q, k, v), atol=2e-6, rtol=1e-5)
    before = count[0]
    core.run(q, k, v, one, site)
    assert remembered_calls(one) and count[0] == before
    stepped = ap.TopKBlocks(keep=0.25, block=(4, 4), dense_steps=5)
    grid = Site(grid=(16, 16), layer=0, step=2, steps=20, timestep=0.9)
    q, k, v = _qkv(256)
    assert stepped.static_at(q, k, grid)  # a dense step
    for _ in range(4):
        core.run(q, k, v, stepped, grid)
    assert remembered_calls(stepped)
    sparse = ap.TopKBlocks(keep=0.25, block=(4, 4), dense_steps=0)
    assert not sparse.static_at(q, k, grid)
    for seed in range(4):
        q, k, v = _qkv(256, seed=seed)
        torch.testing.assert_close(core.run(q, k, v, sparse, grid), _golden(sparse, q, k, v, grid), atol=2e-5, rtol=1e-4)
    assert not remembered_calls(sparse)
    llm = ap.TopKBlocks(keep=0.25)  # a 64-token prefill: the first, own and previous blocks are every block it sees
    q, k, v = _qkv(64)
    assert llm.static_at(q, k, Site(causal=True, layer=0))
    for _ in range(4):
        torch.testing.assert_close(core.run(q, k, v, llm, Site(causal=True, layer=0)),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-6, rtol=1e-5)
    assert remembered_calls(llm)
    assert not llm.static_at(q[:, :, -1:], k, Site(causal=True, layer=0, q_offset=63))  # a decode step: seen once
