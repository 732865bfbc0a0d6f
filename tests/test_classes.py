"""kernels/classes.py: one SDPA call per class of query rows with identical kept keys, against masked
float64 SDPA on the plan's materialised mask (an independent path: one call, every score, the whole mask)."""
import pytest
import torch
import torch.nn.functional as F

import attnpatch as ap
from attnpatch import kernels
from attnpatch.kernels import classes
from attnpatch.plan import Plan, materialise_mask
from attnpatch.site import Site


def _reference(q, k, v, plan):
    keep = materialise_mask(plan, 1, 1, q.shape[2], k.shape[2], q.device)
    qq = q.double() if plan.q_scale is None else q.double() * plan.q_scale
    return F.scaled_dot_product_attention(qq, k.double(), v.double(), attn_mask=keep,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _qkv(S, H=2, Hkv=2, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, H, S, D, generator=g).to(dtype), torch.randn(1, Hkv, S, D, generator=g).to(dtype),
            torch.randn(1, Hkv, S, D, generator=g).to(dtype))


@pytest.mark.parametrize("grid, text, H, Hkv", [((4, 16, 16), 0, 2, 2), ((4, 16, 16), 0, 4, 2), ((5, 16, 16), 12, 2, 2)])
def test_radial_by_classes_equals_masked_sdpa(grid, text, H, Hkv):
    site = Site(grid=grid, text_len=text, kind="joint" if text else "self", family="wan", layer=0)
    S = text + grid[0] * grid[1] * grid[2]
    q, k, v = _qkv(S, H, Hkv)
    plan = ap.Radial(tile=4).plan(q, k, site)
    kr = kernels.get("classes")
    assert kr.why_not(q, k, v, plan) is None
    lay = classes.layout(plan, S, S, q.device)
    assert 2 <= len(lay["parts"]) <= classes.MAX_CLASSES
    assert sum(p["n"] for p in lay["parts"]) == S  # every row in exactly one class
    rows = torch.cat([p["rows"] for p in lay["parts"]]).sort().values
    assert torch.equal(rows, torch.arange(S))
    # the pattern has both kinds of class: all keys (a view) and a window (gathered keys)
    assert any(p["key_run"] == (0, S) for p in lay["parts"]) and any(p["keys"] is not None for p in lay["parts"])
    out = kr.run(q, k, v, plan)
    torch.testing.assert_close(out.double(), _reference(q, k, v, plan), atol=2e-6, rtol=1e-5)


def test_every_key_path_and_q_scale(monkeypatch):
    """Rows in scattered classes (gathered, written back by index), keys as a contiguous run, a key bias
    over all keys and gathered keys, with a per-row q_scale: all against the masked float64 call."""
    S = 96
    g = torch.Generator().manual_seed(1)
    cls = torch.randint(0, 3, (S,), generator=g)  # rows of three classes, interleaved
    table = torch.zeros(3, S, dtype=torch.bool)
    table[0, 10:70] = True  # a contiguous run
    table[1] = True
    table[1, [5, 50]] = False  # nearly all keys: the bias path
    table[2, ::3] = True  # scattered keys: gathered
    keep = table[cls]
    plan = Plan(mask_mod=lambda b, h, qi, kv: keep[qi, kv], static=True, name="three-classes",
                q_scale=torch.linspace(0.5, 1.5, S).view(1, 1, S, 1))
    monkeypatch.setattr(classes, "BIAS_FRAC", 0.9)
    q, k, v = _qkv(S, 4, 2, 8)
    kr = kernels.get("classes")
    assert kr.why_not(q, k, v, plan) is None
    parts = classes.layout(plan, S, S, q.device)["parts"]
    assert sorted((p["key_run"] is not None, p["bias"] is not None, p["keys"] is not None) for p in parts) == [
        (False, False, True), (False, True, False), (True, False, False)]
    assert all(p["row_run"] is None for p in parts)
    torch.testing.assert_close(kr.run(q, k, v, plan).double(), _reference(q, k, v, plan), atol=2e-6, rtol=1e-5)
    # 16-bit inputs: within bfloat16's rounding of the float64 result
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    torch.testing.assert_close(kr.run(qb, kb, vb, plan).double(), _reference(qb, kb, vb, plan), atol=3e-2, rtol=3e-2)
    # gather applies q_scale the same way (it multiplied a bfloat16 q by the float32 scale: a dtype error in SDPA)
    gather = kernels.get("gather")
    assert gather.why_not(qb, kb, vb, plan) is None
    torch.testing.assert_close(gather.run(qb, kb, vb, plan).double(), _reference(qb, kb, vb, plan), atol=3e-2, rtol=3e-2)


def test_find_recovers_the_row_classes_exactly():
    g = torch.Generator().manual_seed(2)
    for n in (1, 2, 7, 20):
        table = torch.rand(n, 200, generator=g) < 0.5
        table[:, 0] = True
        cls = torch.randperm(n * 40, generator=g) % n  # 40 rows each, shuffled
        keep = table[cls]
        found, first = classes.find(keep)
        assert first.numel() == n
        # same class <=> same row, for every pair (the property that makes one call per class exact)
        same_cls = found[:, None] == found[None, :]
        same_row = (keep[:, None, :] == keep[None, :, :]).all(-1)
        assert torch.equal(same_cls, same_row)
        assert torch.equal(keep, keep[first[found]])


def test_why_not_names_the_reason():
    kr = kernels.get("classes")
    q, k, v = _qkv(256)
    keep = torch.tril(torch.ones(256, 256, dtype=torch.bool))
    rows_all_distinct = Plan(mask_mod=lambda b, h, qi, kv: keep[qi, kv], static=True)
    assert "query classes" in kr.why_not(q, k, v, rows_all_distinct)
    assert "mask_mod" in kr.why_not(q, k, v, Plan())
    dynamic = Plan(mask_mod=lambda b, h, qi, kv: keep[qi, kv], static=False)
    assert "data-dependent" in kr.why_not(q, k, v, dynamic)
    hole = keep.clone()
    hole[3] = False
    assert "keeps no key" in kr.why_not(q, k, v, Plan(mask_mod=lambda b, h, qi, kv: hole[qi, kv], static=True))
    by_head = Plan(mask_mod=lambda b, h, qi, kv: (kv <= qi) | (h > 0), static=True)
    assert "differs by batch row or head" in kr.why_not(q, k, v, by_head)
    assert "model mask" in kr.why_not(q, k, v, rows_all_distinct, torch.ones(1, 1, 256, 256, dtype=torch.bool))


def test_measured_choice_runs_radial_exactly():
    """Through core with measured kernel choice on: whatever the trials pick (classes among the
    candidates), every call of the pattern equals the masked float64 call."""
    site = Site(grid=(4, 16, 16), kind="self", family="wan", layer=0)
    q, k, v = _qkv(1024)
    m = ap.Radial(tile=4)
    plan = m.plan(q, k, site)
    want = _reference(q, k, v, plan)
    was = kernels.tune.enabled()
    try:
        kernels.tune.enabled(True)
        for _ in range(30):
            torch.testing.assert_close(ap.core.run(q, k, v, m, site).double(), want, atol=2e-6, rtol=1e-5)
    finally:
        kernels.tune.enabled(was)


def test_a_projection_collision_never_merges_different_rows(monkeypatch):
    """With a degenerate projection (every row maps to 0) the check against each class's first row
    refuses the plan instead of running different rows as one class."""
    keep = torch.ones(64, 64, dtype=torch.bool).tril()
    real_rand = torch.rand
    monkeypatch.setattr(classes.torch, "rand", lambda *a, **kw: real_rand(*a, **kw) * 0)
    assert "collision" in classes.find(keep)
    monkeypatch.setattr(classes.torch, "rand", real_rand)
    assert isinstance(classes.find(keep), str) and "query classes" in classes.find(keep)  # 64 distinct rows
