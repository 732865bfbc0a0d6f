"""SinkCalibration's per-call speed paths (issue 18) compute what the slow ones do: the kernel's row
LSE (``ops.lse.dense_lse``, handed to the output step by core) equals the explicit one for every
causal / mask / GQA layout; detection from ``detect_rows`` sampled rows follows its definition and
is the exact mean when the call has few queries; the mask-free fast scan equals the general loop;
the fallback without a kernel LSE gives the same output; plans are reused per site geometry."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import attnpatch as ap
from attnpatch import Site, core
from attnpatch.methods import _sink_scores as S
from attnpatch.ops.lse import dense_lse, sdpa_lse_math
from attnpatch.plan import Plan


def _qkv(B, Hq, Hkv, Sq, Skv, D, seed=0, sink=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, s, D, generator=g, dtype=torch.float64) for h, s in ((Hq, Sq), (Hkv, Skv), (Hkv, Skv)))
    if sink is not None:  # key ``sink`` points along every query's shared direction: a strong non-initial sink
        c = torch.randn(D, generator=g, dtype=torch.float64)
        q += c
        k[:, :, sink] = 4 * c
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _keep(Sq, Skv, causal, off, mask):
    keep = torch.ones(Sq, Skv, dtype=torch.bool)
    if causal:
        keep = torch.arange(Skv) <= torch.arange(off, off + Sq)[:, None]
    return keep if mask is None else keep & (mask if mask.dtype == torch.bool else mask > float("-inf"))


LAYOUTS = [  # (B, Hq, Hkv, Sq, Skv, causal, q_offset, mask kind)
    (1, 2, 2, 24, 24, False, 0, None),
    (1, 4, 2, 24, 24, True, 0, None),  # GQA prefill: SDPA's top-left is_causal
    (1, 2, 1, 7, 30, True, 23, None),  # a chunk after a cache: the causal mask folds into a bias
    (2, 2, 2, 1, 30, True, 29, None),  # decode: sees every key
    (1, 2, 2, 9, 30, True, 0, None),  # top-left causal with Sq < Skv
    (2, 4, 2, 20, 20, True, 0, "padding"),  # left padding: row 1's first queries see no key
    (2, 2, 2, 16, 16, False, 0, "additive"),
]


def _mask(kind, B, Sq, Skv):
    if kind == "padding":
        m = torch.ones(B, 1, Sq, Skv, dtype=torch.bool)
        m[1, :, :, :5] = False
        return m
    if kind == "additive":
        g = torch.Generator().manual_seed(1)
        return torch.randn(B, 1, 1, Skv, generator=g).masked_fill(torch.rand(B, 1, 1, Skv, generator=g) < 0.2, float("-inf"))
    return None


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"{l[5] and 'causal' or 'full'}-{l[3]}x{l[4]}-{l[7]}" for l in LAYOUTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_lse_equals_the_explicit_one(layout, dtype):
    B, Hq, Hkv, Sq, Skv, causal, off, kind = layout
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv, 16, dtype=dtype)
    mask = _mask(kind, B, Sq, Skv)
    got = dense_lse(q, k, v, mask=mask, causal=causal, q_offset=off)
    assert got is not None
    keep = _keep(Sq, Skv, causal, off, mask)
    bias = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))
    if mask is not None and mask.dtype != torch.bool:
        bias = bias + mask.to(dtype)
    rep = Hq // Hkv
    out, lse = sdpa_lse_math(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), bias)
    live = keep.expand(B, 1, Sq, Skv).any(-1).expand(B, Hq, Sq)  # rows that see no key: out 0, lse any finite value
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got[0][live], out[live], atol=tol, rtol=tol)
    torch.testing.assert_close(got[1][live].to(dtype), lse[live], atol=tol, rtol=tol)
    assert torch.isfinite(got[1]).all() and (got[0][~live] == 0).all()


def test_kernel_lse_refuses_autograd():
    """No fused kernel differentiates its LSE: under autograd the output step recomputes it."""
    q, k, v = _qkv(1, 2, 2, 8, 8, 16)
    assert dense_lse(q.requires_grad_(), k, v) is None


class _Record(ap.Method):
    """Dense attention whose output step records the ``lse`` core hands it."""

    def __init__(self, **plan):
        self.seen, self.fields = [], plan

    def plan(self, q, k, site):
        return Plan(output=lambda out, q, k, v, scale, lse=None: self.seen.append(lse) or out, **self.fields)


def test_core_hands_the_kernel_lse_to_the_output_step_of_a_plain_plan_only():
    q, k, v = _qkv(1, 4, 2, 12, 12, 16)
    m = _Record()
    core.run(q, k, v, m, Site(causal=True))
    want = sdpa_lse_math(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                         torch.zeros(12, 12).masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf")))[1]
    torch.testing.assert_close(m.seen[0], want, atol=1e-5, rtol=1e-5)
    core.run(q, k, v, m, Site(causal=True), backend="reference")  # another kernel: no LSE to hand over
    extra = _Record(extra_kv=(k[:, :, :2], v[:, :, :2]))  # keys the output step does not see: its LSE would be wrong
    core.run(q, k, v, extra, Site())
    assert m.seen[1] is None and extra.seen == [None]


def test_detection_rows_are_evenly_spaced_and_end_at_the_last():
    assert S.sample(64, 64, "cpu") == (None, None) and S.sample(10, None, "cpu") == (None, None)
    for Sq, R in ((65, 64), (256, 64), (1000, 7), (4096, 64)):
        rows, idx = S.sample(Sq, R, "cpu")
        assert len(set(rows)) == R and rows == sorted(rows) and rows[-1] == Sq - 1 and rows[0] >= 0
        assert idx.tolist() == rows and max(b - a for a, b in zip(rows, rows[1:])) <= -(-Sq // R)


def _sink_scores(q, k, rows, scale):
    """Column scores from the definition, causal: the mean over ``rows`` of p_ij * n_i."""
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], 1).double()
    s = q.double() @ kk.transpose(-1, -2) * scale
    Sq, Skv = q.shape[2], k.shape[2]
    keep = torch.arange(Skv) <= torch.arange(Sq)[:, None] + Skv - Sq
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) * keep.sum(-1, keepdim=True)
    return p[:, :, rows].mean(2)


def test_sampled_detection_follows_its_definition_and_differs_from_the_exact_mean():
    """Key 9 is a sink only for the rows detection samples (every other row ignores it): detect_rows=6
    finds it, the exact mean over every row does not, each as its definition says."""
    B, H, Sq, D = 1, 2, 48, 16
    q, k, v = _qkv(B, H, H, Sq, Sq, D, seed=3)
    rows = S.sample(Sq, 6, "cpu")[0]
    kd = k[:, :, 9:10]
    q[:, :, rows] += 6 * kd / kd.norm(dim=-1, keepdim=True) * math.sqrt(D)
    call = S._Call(0, True, None, None, D ** -0.5, None)
    sampled, exact = (ap.SinkCalibration(threshold=8.0, detect_rows=r)._scan(q, k, call)[0] for r in (6, None))
    for got, r in ((sampled, rows), (exact, list(range(Sq)))):
        score = _sink_scores(q, k, r, D ** -0.5)
        score[..., 0] = 0
        assert ((score - 8.0).abs() > 1e-3).all() and torch.equal(got, score > 8.0)
    assert sampled[..., 9].all() and not exact[..., 9].any()


@pytest.mark.parametrize("Sq", [40, 64])
def test_a_call_of_at_most_detect_rows_queries_uses_every_row(Sq):
    q, k, v = _qkv(1, 4, 2, Sq, Sq, 16, seed=2, sink=7)
    outs = [ap.attend(q, k, v, ap.SinkCalibration(threshold=2.0, detect_rows=r), Site(causal=True)) for r in (64, None)]
    assert torch.equal(*outs)


CASES = [  # (id, method, site, (B, Hq, Hkv, Sq, Skv), mask kind)
    ("causal-gqa", ap.SinkCalibration(threshold=2.0, detect_rows=16), Site(causal=True), (1, 4, 2, 80, 80), None),
    ("chunk", ap.SinkCalibration(threshold=2.0, detect_rows=8), Site(causal=True, q_offset=50), (1, 2, 2, 30, 80), None),
    ("heads", ap.SinkCalibration(heads=[(0, 1)], threshold=2.0, detect_rows=8), Site(grid=(8, 9)), (1, 2, 2, 72, 72), None),
    ("padding", ap.SinkCalibration(threshold=2.0, detect_rows=8), Site(causal=True), (2, 4, 2, 40, 40), "padding"),
    ("exact", ap.SinkCalibration(threshold=2.0, detect_rows=None), Site(causal=True), (1, 2, 2, 90, 90), None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_lse_path_equals_the_recomputed_one(case, monkeypatch):
    """The fast path (kernel LSE, mask-free scan) and the fallback (no kernel LSE: the general scan
    and every row's LSE recomputed) calibrate alike, and something was calibrated."""
    cid, m, site, (B, Hq, Hkv, Sq, Skv), kind = case
    q, k, v = _qkv(B, Hq, Hkv, Sq, Skv, 16, seed=4, sink=9)
    mask = _mask(kind, B, Sq, Skv)
    fast = ap.attend(q, k, v, m, site, mask=mask)
    import attnpatch.core as core_mod
    monkeypatch.setattr(core_mod, "dense_lse", lambda *a, **kw: None)
    slow = ap.attend(q, k, v, m, site, mask=mask)
    dense = ap.attend(q, k, v, ap.Dense(), site, mask=mask)
    live = _keep(Sq, Skv, site.causal, site.q_offset, mask).expand(B, 1, Sq, Skv).any(-1).expand(B, Hq, Sq)
    torch.testing.assert_close(fast[live], slow[live], atol=2e-6, rtol=2e-6)
    assert (fast - dense).abs().max() > 1e-3


def test_fast_scan_equals_the_general_loop():
    """Without a mask the scan takes the cached four-pass path; an all-keeping mask forces the general
    loop: the same columns and scores."""
    q, k, v = _qkv(1, 6, 2, 100, 100, 16, seed=5, sink=11)
    m = ap.SinkCalibration(threshold=2.0, detect_rows=12)
    lse = dense_lse(q, k, v, causal=True)[1]
    fast = m._scan(q, k, S._Call(0, True, None, None, 0.25, None), lse)[0]
    loop = m._scan(q, k, S._Call(0, True, None, torch.ones(1, 1, 100, 100, dtype=torch.bool), 0.25, None), lse)[0]
    assert fast[..., 11].all() and torch.equal(fast, loop)


@pytest.mark.parametrize("Sq,Skv,off", [(1100, 1100, 0), (700, 1300, 600), (1024, 1024, 0)])
def test_long_causal_scan_in_two_row_groups_equals_the_score_definition(Sq, Skv, off):
    """A long causal call's detection rows run in two groups (the earlier half against the keys it sees only):
    the column scores equal the definition (mean over the sampled rows of p_ij n_i, float64), GQA, after a cache too."""
    q, k, v = _qkv(1, 4, 2, Sq, Skv, 16, seed=6)  # no sink: every key's attention weighs in the comparison
    call = S._Call(off, True, None, None, 0.25, None)
    out, lse = dense_lse(q, k, v, causal=True, q_offset=off)
    rows, idx = S.sample(Sq, 64, "cpu")
    got = S.plain_col(q, k, call, lse, rows, idx, 4)
    k2 = k.double().repeat_interleave(2, 1)
    s = (q.double()[:, :, rows] @ k2.transpose(-1, -2)) * 0.25  # (1, 4, 64, Skv)
    pos = torch.tensor(rows) + off
    s = s.masked_fill(torch.arange(Skv) > pos[:, None], float("-inf"))
    n = (pos + 1).clamp(max=Skv).double()
    want = (s.softmax(-1) * n[:, None]).mean(-2)
    want[..., :4] = 0  # the first keys are scored ~0 (the floor)
    assert (got - want).abs().max() < 1e-5 * want.abs().max()


def test_plans_are_reused_per_site_geometry():
    q, k, v = _qkv(1, 2, 2, 400, 400, 16)  # above plan.DIRECT_MAX scores: no per-call small path
    m = ap.SinkCalibration()
    a, b = m.plan(q, k, Site(causal=True)), m.plan(q, k, Site(causal=True))
    assert a is b and a.direct is None and m.plan(q, k, Site(causal=True, q_offset=3)) is not a
    q, k = q[:, :, :10], k[:, :, :10]  # a small call: a per-call direct output over the cached plan
    a, b = m.plan(q, k, Site(causal=True)), m.plan(q, k, Site(causal=True))
    assert a.direct is not None and a.output is b.output
    shift = torch.tensor([0])
    assert m.plan(q, k, Site(causal=True, kv_shift=shift)) is not m.plan(q, k, Site(causal=True, kv_shift=shift))
    twin = copy.deepcopy(m)  # its plans must call the copy, not the original
    twin.beta = 1.0
    qs, ks, vs = _qkv(1, 2, 2, 30, 30, 16, seed=4, sink=9)
    dense, site = ap.attend(qs, ks, vs, ap.Dense(), Site(causal=True)), Site(causal=True)
    assert (ap.attend(qs, ks, vs, m, site) - dense).abs().max() > 1e-3
    torch.testing.assert_close(ap.attend(qs, ks, vs, twin, site), dense, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cols", [(9,), (9, 17)], ids=["one-sink", "two-sinks"])
def test_correction_matches_the_definition_with_one_and_several_sinks(cols):
    """One sink column per head takes the shortcut (its value row is o_s); several the general sum: both equal
    the softmax with log(beta) added to the sink columns' scores."""
    B, H, Hkv, S_, D = 1, 4, 2, 60, 16
    q, k, v = _qkv(B, H, Hkv, S_, S_, D, seed=7, dtype=torch.float64)
    c = torch.randn(D, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    q += c
    for j in cols:
        k[:, :, j] = 4 * c
    m = ap.SinkCalibration(threshold=2.0, beta=0.3, detect_rows=16)
    out = ap.attend(q.float(), k.float(), v.float(), m, Site(causal=True))
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    sinks = m.sinks(q, kk, 0, True)
    assert sinks[..., list(cols)].all() and int(sinks.sum(-1).max()) == len(cols)
    s = q @ kk.transpose(-1, -2) / math.sqrt(D) + torch.where(sinks[:, :, None, :], math.log(0.3), 0.0)
    s = s.masked_fill(torch.ones(S_, S_, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ vv, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("Hq,Hkv,Sq,Skv,causal,heads", [
    (4, 2, 48, 48, True, None),  # GQA prefill, every head
    (2, 2, 12, 40, True, [(0, 1)]),  # a chunk after 28 cached keys, one calibrated head
    (3, 1, 30, 30, False, None),  # non-causal (a DiT's joint call), one KV head
], ids=["gqa-prefill", "chunk-one-head", "noncausal"])
def test_small_calls_take_their_output_from_the_detection_scores(Hq, Hkv, Sq, Skv, causal, heads):
    """A small call gets Plan.direct: the output from its one score pass (detection on every row, or on
    sampled rows) equals the kernel + output step (backend named) and differs from dense (a sink was found)."""
    q, k, v = _qkv(2, Hq, Hkv, Sq, Skv, 16, seed=3, sink=5)
    m = ap.SinkCalibration(heads=heads, threshold=2.0, beta=0.3)
    site = Site(causal=causal, q_offset=Skv - Sq if causal else 0)
    assert m.plan(q, k, site).direct is not None
    got = ap.attend(q, k, v, m, site)
    want = ap.attend(q, k, v, m, site, backend="sdpa")  # a named backend: the kernel and the output step
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert (got - ap.attend(q, k, v, ap.Dense(), site)).abs().max() > 1e-3
    m.detect_rows = Sq // 3  # sampled detection rows: still one pass, the same rows as the kernel path reads
    assert m.plan(q, k, site).direct is not None
    torch.testing.assert_close(ap.attend(q, k, v, m, site), ap.attend(q, k, v, m, site, backend="sdpa"), atol=2e-6, rtol=1e-5)
    big = _qkv(1, Hq, Hkv, 400, 400, 16)[:2]
    assert m.plan(*big, Site(causal=causal)).direct is None  # above plan.DIRECT_MAX scores: the kernel is cheaper
