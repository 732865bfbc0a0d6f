"""The kernel cost model (attnpatch/kernels/cost.py), sdpa's cache of static masks, and the static
methods' plan caches. No wall-clock assertions: decisions are checked for given constants."""
from __future__ import annotations

import threading

import pytest
import torch

import attnpatch as ap
from attnpatch import core, kernels
from attnpatch.kernels import cost, sdpa
from attnpatch.plan import Plan

# a made-up device: 50 GFLOP/s dense at any head dim (4 D FLOPs per score element), 20 us per SDPA call
CONSTANTS = dict(call_s=20e-6, elem_s={"64": 256 / 50e9, "128": 512 / 50e9}, causal_factor=0.55,
                 mask_elem_s={"64": 1e-9, "128": 1e-9}, build_s=30e-6,
                 build_s_per_elem=5e-9, tiles_factor=1.2, lse_s=30e-6, merge_s_per_elem=1e-9, gather_s_per_byte=1e-10)


def _qkv(S, H=4, D=64, Hkv=None):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, H, S, D, generator=g), torch.randn(1, Hkv or H, S, D, generator=g),
            torch.randn(1, Hkv or H, S, D, generator=g))


def _plan(method, q, k, site):
    return method.plan(q, k, site).with_site(site.causal, site.q_offset)


def test_tiny_shapes_rank_sdpa_first_large_sparse_grids_tiles():
    pref = ["tiles", "sdpa", "flex", "triton", "reference"]
    q, k, v = _qkv(64)
    small = _plan(ap.Neighborhood(window=3), q, k, ap.Site(grid=(8, 8)))
    assert cost.rank(pref, CONSTANTS, q, k, v, small)[0] == ["sdpa", "tiles", "flex", "triton", "reference"]
    q, k, v = _qkv(4096)
    large = _plan(ap.SlidingTile(tile=8, window=3), q, k, ap.Site(grid=(64, 64)))
    order, est = cost.rank(pref, CONSTANTS, q, k, v, large)
    assert order[:2] == ["tiles", "sdpa"] and est["tiles"] < 0.5 * est["sdpa"]
    assert order[2:] == ["flex", "triton", "reference"]  # kernels the model does not know keep their places


def test_rank_keeps_the_preference_order_without_constants_and_on_near_ties(monkeypatch):
    q, k, v = _qkv(64)
    plan = _plan(ap.Neighborhood(window=3), q, k, ap.Site(grid=(8, 8)))
    assert cost.rank(["tiles", "sdpa"], None, q, k, v, plan)[0] == ["tiles", "sdpa"]
    for tiles_s, want in ((1.01, ["tiles", "sdpa"]), (1.05, ["sdpa", "tiles"]), (0.5, ["tiles", "sdpa"])):
        est = {"sdpa": 1.0, "tiles": tiles_s}  # within 2 % of the cheapest: the preferred one stays first
        monkeypatch.setattr(cost, "estimate", lambda n, *a, est=est: est[n])
        assert cost.rank(["tiles", "sdpa"], CONSTANTS, q, k, v, plan)[0] == want


def test_unknown_kernels_put_first_in_preference_stay_first():
    q, k, v = _qkv(64)
    plan = _plan(ap.Neighborhood(window=3), q, k, ap.Site(grid=(8, 8)))
    order, _ = cost.rank(["reference", "tiles", "sdpa"], CONSTANTS, q, k, v, plan)
    assert order == ["reference", "sdpa", "tiles"]


def test_select_is_cost_aware_deterministic_and_falls_back_to_preference(monkeypatch):
    monkeypatch.setattr(cost, "constants", lambda device, threads: CONSTANTS)
    kernels._RANKED.clear()
    q, k, v = _qkv(64)
    plan = _plan(ap.Neighborhood(window=3), q, k, ap.Site(grid=(8, 8)))
    assert {kernels.select(q, k, v, plan).name for _ in range(5)} == {"sdpa"}
    q, k, v = _qkv(4096)
    plan = _plan(ap.SlidingTile(tile=8, window=3), q, k, ap.Site(grid=(64, 64)))
    assert {kernels.select(q, k, v, plan).name for _ in range(5)} == {"tiles"}
    assert kernels.select(q, k, v, plan, backend="sdpa").name == "sdpa"  # a named backend still wins
    monkeypatch.setattr(cost, "constants", lambda device, threads: None)  # an uncalibrated device
    kernels._RANKED.clear()
    q, k, v = _qkv(64)
    plan = _plan(ap.Neighborhood(window=3), q, k, ap.Site(grid=(8, 8)))
    assert kernels.select(q, k, v, plan).name == "tiles"  # PREFERENCE: tiles first for masked plans on CPU
    kernels._RANKED.clear()


def test_committed_cpu_constants_load():
    c = cost.constants("cpu", 1)
    assert c is not None and set(cost.KEYS) <= set(c)
    assert cost.per_d(c["elem_s"], 64) > 0 and cost.per_d(c["mask_elem_s"], 100) >= 0
    assert cost.constants("cpu", 64) is not None  # the nearest thread count measured
    assert cost.constants("no-such-device", 1) is None


def _recording_sdpa(monkeypatch):
    seen = []
    real = sdpa.F.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, **kw):
        seen.append((attn_mask, kw.get("is_causal", False)))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", record)
    return seen


@pytest.mark.parametrize("method,site,S", [
    (ap.Neighborhood(window=15), ap.Site(grid=(8, 8)), 64),  # a window wider than the grid keeps everything
    (ap.SinkWindow(window=4096), ap.Site(causal=True), 64),  # a window wider than the prefill is causal
])
def test_a_plan_that_keeps_everything_runs_plain_sdpa_without_a_mask(monkeypatch, method, site, S):
    q, k, v = _qkv(S)
    ref = core.run(q, k, v, method, site, backend="reference")
    seen = _recording_sdpa(monkeypatch)
    for _ in range(2):
        out = core.run(q, k, v, method, site, backend="sdpa")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert seen and all(mask is None for mask, _ in seen)
    assert all(causal == site.causal for _, causal in seen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_mask_cache_returns_what_a_fresh_build_gives(dtype):
    q, k, v = (t.to(dtype) for t in _qkv(96))
    site = ap.Site(causal=True)
    plan = _plan(ap.SinkWindow(sink=2, window=16, block=16), q, k, site)
    assert plan.static
    fresh = Plan(mask_mod=plan.mask_mod, causal=True)  # not static: materialised per call, as before
    want = kernels.get("sdpa").run(q, k, v, fresh)
    for _ in range(2):  # the first call builds and caches, the second reads the cache
        got = kernels.get("sdpa").run(q, k, v, plan)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    pad = torch.ones(1, 1, 96, 96, dtype=torch.bool)
    pad[..., :3] = False  # a model mask combines with the cached one
    torch.testing.assert_close(kernels.get("sdpa").run(q, k, v, plan, mask=pad),
                               kernels.get("sdpa").run(q, k, v, fresh, mask=pad), rtol=0, atol=0)


def test_mask_cache_is_bounded_and_thread_safe():
    cache = sdpa.MaskCache(max_bytes=4096, max_entries=8)
    results, errors = [], []

    def work(i):
        try:
            for j in range(50):
                key = (i + j) % 12
                got = cache.get(key, lambda key=key: torch.full((16, 16), float(key)))  # 1 KiB each
                results.append(bool((got == key).all()))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(results)
    assert cache.bytes <= 4096 and len(cache.store) <= 4
    assert cache.bytes == sum(t.numel() * t.element_size() for t in cache.store.values())


@pytest.mark.parametrize("method,site,S", [
    (ap.SinkWindow(window=16), ap.Site(causal=True), 64),
    (ap.Power(local=8), ap.Site(causal=True), 64),
    (ap.Temperature(tau=0.9), ap.Site(), 64),
    (ap.EntropyScale(train_len=16), ap.Site(causal=True), 64),
    (ap.Neighborhood(window=3), ap.Site(grid=(8, 8)), 64),
    (ap.Radial(tile=4), ap.Site(grid=(4, 4, 4)), 64),
])
def test_static_plans_are_cached_per_shape_for_every_layer_and_step(method, site, S):
    q, k, _ = _qkv(S)
    from dataclasses import replace

    first = method.plan(q, k, site)
    for layer, step in ((0, None), (3, 1), (7, 5)):
        assert method.plan(q, k, replace(site, layer=layer, step=step)) is first
    if first.mask_mod is not None:
        assert first.static
    if isinstance(method, (ap.SinkWindow, ap.EntropyScale)):  # plans that depend on the length
        q2, k2, _ = _qkv(2 * S)
        assert method.plan(q2, k2, site) is not first


def test_per_head_dim_constants_interpolate():
    table = {"32": 1.0, "64": 2.0, "128": 6.0}
    assert [cost.per_d(table, d) for d in (16, 32, 48, 64, 96, 128, 256)] == [1.0, 1.0, 1.5, 2.0, 4.0, 6.0, 12.0]


def test_with_site_and_fold_reuse_their_derived_plan():
    plan = Plan(q_scale=2.0, mask_mod=lambda b, h, i, j: i >= j, static=True)
    a, b = plan.with_site(True, 0), plan.with_site(True, 0)
    assert a is b and a.causal and not plan.causal
    q = torch.randn(1, 1, 4, 8)
    from attnpatch.plan import fold_q_scale

    assert fold_q_scale(q, None, a)[2] is fold_q_scale(q, None, a)[2]
    assert plan.with_site(False, 3).q_offset == 3 and plan.with_site(True, 0) is not a  # latest key only


def test_a_plan_with_lines_never_reuses_the_ranking_of_one_without():
    """Power's plan (with lines) and a mask-only plan of the same signature: each gets its own ranking,
    equal to a ranking made with an empty cache (a collision once ran Power's 64-token call on lines)."""
    kernels.invalidate()
    q, k = torch.randn(1, 4, 1024, 64), torch.randn(1, 2, 1024, 64)  # lines_native (or lines) the cheapest here; the mask-only
    # plan ranks lines (inf there) at its preference place, before sdpa: the two rankings differ
    site = ap.Site(causal=True)
    with_lines = ap.Power(local=16).plan(q, k, site).with_site(True, 0)
    assert with_lines.lines is not None
    import dataclasses
    bare = dataclasses.replace(with_lines, lines=None)
    first = [kr.name for kr in kernels.ranked(q, k, k, bare)]
    second = [kr.name for kr in kernels.ranked(q, k, k, with_lines)]
    kernels.invalidate()
    fresh = [kr.name for kr in kernels.ranked(q, k, k, with_lines)]
    assert fresh.index("lines_native") < fresh.index("sdpa") and second == fresh and first != fresh
    kernels.invalidate()


def test_gather_kernel_on_joint_attention_splits_wide_text_blocks_and_is_exact():
    """The fixture's joint call (16 text rows that see every key, then a 32 x 32 grid under a 9 x 9
    neighbourhood): the gather layout puts the wide text block in a group of its own (not padding every
    block to 1,040 keys), computes well under half the dense scores, matches masked SDPA, and the cost
    model picks it at D 24 (calibrated CPU constants) but not at D 128, where it measured slower."""
    from attnpatch.kernels import gather

    kernels.invalidate()
    site = ap.Site(grid=(32, 32), text_len=16, text_first=True, kind="joint", family="fixture", layer=0,
                   step=10, steps=20, timestep=0.5)
    q, k, v = (torch.randn(1, 4, 1040, 24) for _ in range(3))
    plan = ap.Neighborhood(window=9).plan(q, k, site).with_site(False, 0)
    rows = gather.best_rows(plan, q, k)
    lay = gather.layout(plan, 1040, 1040, "cpu", rows)
    assert len(lay["groups"]) == 2 and max(g["K"] for g in lay["groups"]) == 1040
    assert lay["cost"] < 0.5 * 1040 * 1040
    got = kernels.get("gather").run(q, k, v, plan)
    torch.testing.assert_close(got, kernels.get("sdpa").run(q, k, v, plan), atol=2e-6, rtol=1e-5)
    c = cost.constants("cpu", 1)
    assert cost.estimate("gather", c, q, k, v, plan) < cost.estimate("sdpa", c, q, k, v, plan)
    q128, k128 = torch.randn(1, 4, 1040, 128), torch.randn(1, 4, 1040, 128)
    assert cost.estimate("gather", c, q128, k128, k128, plan) == float("inf")
    kernels.invalidate()


def test_masked_sdpa_estimate_follows_what_the_kernel_runs():
    """A data-dependent VerticalSlash plan: SDPA builds its per-head mask every call and computes every score under it
    (no is_causal skip, which only a static plan's cached mask gets), so its estimate is the full masked call plus a
    per-head build; the same plan marked static is cheaper by the causal skip and the cached build. Before 12-05 both
    were estimated alike and 256-token VerticalSlash calls ran on masked SDPA at 2.5x the native kernel's time."""
    import dataclasses

    q, k, v = _qkv(1024, H=8, Hkv=2)
    site = ap.Site(causal=True)
    dyn = _plan(ap.VerticalSlash(verticals=64, slashes=64, window=64), q, k, site)
    assert dyn.lines is not None and not dyn.static
    c = CONSTANTS
    E = 8 * 1024 * 1024
    full = c["call_s"] + E * (c["elem_s"]["64"] + c["mask_elem_s"]["64"]) + c["build_s"] + E * c["build_s_per_elem"]
    assert cost.estimate("sdpa", c, q, k, v, dyn) == pytest.approx(full)
    static = dataclasses.replace(dyn, static=True)
    assert cost.estimate("sdpa", c, q, k, v, static) < full * c["causal_factor"]
