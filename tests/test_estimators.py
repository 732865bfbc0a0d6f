"""The data-dependent estimators' vectorised forms against their plain definitions on random inputs:
VerticalSlash's diagonal sums and mask table (strided views) against index-by-index formulas,
TopKBlocks' GQA block logits against repeated keys and its keep-everything shortcuts (exact dense
plans, never a dense run of a selection that drops a block), SinkCalibration's one-pass scan
against the explicit softmax definition under causality, masks, soft-capping, GQA and rows that
see no key. (Selections against the float64 goldens on every kernel: tests/test_goldens.py.)"""
import math

import pytest
import torch

import attnpatch as ap
from attnpatch import Site
from attnpatch.methods import sink_calibration as sc_mod
from attnpatch.methods import topk_blocks as tk_mod
from attnpatch.methods import vertical_slash as vs_mod
from attnpatch.plan import materialise_mask


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- VerticalSlash ---------------------------------------------------------------------------

@pytest.mark.parametrize("peak", [1.0, 40.0], ids=["plain", "peaky"])
def test_whole_prefill_output_equals_softmax_over_the_kept_keys(peak):
    """A prefill whose estimate reads every query answers from the estimate's probabilities renormalised over
    the kept keys; where a row's largest scores are all dropped (peaky scores: kept mass far below 1e-6) it takes
    the masked softmax instead. Both equal float64 softmax over the plan's own mask."""
    g = _gen(3)
    q, k, v = torch.randn(1, 4, 48, 16, generator=g) * peak ** 0.5, torch.randn(1, 2, 48, 16, generator=g) * peak ** 0.5, \
        torch.randn(1, 2, 48, 16, generator=g)
    method = ap.VerticalSlash(verticals=3, slashes=2, last_q=64, sink=1, window=2)
    plan = method.plan(q, k, Site(causal=True))
    assert plan.direct is not None
    keep = materialise_mask(plan.with_site(True, 0), 1, 4, 48, 48, "cpu")
    kk, vv = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * 16 ** -0.5
    kept = torch.softmax(s, -1).masked_fill(~keep, 0).sum(-1)
    assert (kept.min() < 1e-6) == (peak > 1)  # the peaky case has rows whose kept mass the renormalisation would lose
    want = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ vv
    torch.testing.assert_close(plan.direct(v).double(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("L,Skv,pos0", [(6, 20, 14), (1, 9, 8), (5, 30, 10), (4, 12, 10)],
                         ids=["prefill", "one-query", "chunk-before-end", "past-the-keys"])
@pytest.mark.parametrize("pad_max", [None, 0], ids=["padded", "by-row"])
def test_diagonal_sums_match_index_add(L, Skv, pos0, pad_max, monkeypatch):
    if pad_max is not None:  # the row-by-row path that large estimates take
        monkeypatch.setattr(vs_mod, "_PAD_MAX_BYTES", pad_max)
    p = torch.rand(2, 3, L, Skv, generator=_gen(0), dtype=torch.float64)
    pos = pos0 + torch.arange(L)[:, None]
    p = p.masked_fill(torch.arange(Skv) > pos, 0.0)  # causal: keys after a query's position hold nothing
    diag = (pos - torch.arange(Skv)).clamp(0, Skv - 1)
    want = torch.zeros(2, 3, Skv, dtype=torch.float64).index_add_(2, diag.flatten(), p.flatten(2))
    torch.testing.assert_close(vs_mod._diagonal_sums(p, pos0), want)


def _keep_by_index(keep_v, keep_s, Sq, off, sink, window, shift):
    """The mask by per-element lookups (the previous mask_mod)."""
    B, H, Skv = keep_v.shape
    b, h = torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1)
    i, j = torch.arange(Sq).view(1, 1, Sq, 1), torch.arange(Skv).view(1, 1, 1, Skv)
    d = i + off - j
    pos = j + shift.view(B, 1, 1, 1) if shift is not None else j
    return (keep_v[b, h, j] | keep_s[b, h, d.clamp(0, Skv - 1)] | ((pos < sink) & (pos >= 0)) | (d < window)) & (d >= 0)


@pytest.mark.parametrize("Sq,Skv,off,shift", [(16, 16, 0, None), (5, 21, 16, None), (12, 12, 0, [0, -3]), (6, 9, 0, None),
                                              (7, 5, 0, None)], ids=["prefill", "chunk", "left-padding", "keys-after", "keys-short"])
def test_keep_table_matches_index_lookups(Sq, Skv, off, shift):
    g = _gen(1)
    keep_v, keep_s = torch.rand(2, 3, Skv, generator=g) < 0.3, torch.rand(2, 3, Skv, generator=g) < 0.3
    shift = None if shift is None else torch.tensor(shift)
    got = vs_mod._keep_table(keep_v, keep_s, Sq, off, 2, 3, shift)
    assert torch.equal(got, _keep_by_index(keep_v, keep_s, Sq, off, 2, 3, shift))


def test_vertical_slash_mask_is_the_same_on_the_whole_grid_and_on_row_chunks():
    """The whole-grid fast path (the table) and the per-element path (any other grid) agree."""
    g = _gen(2)
    q, k = torch.randn(2, 4, 24, 8, generator=g), torch.randn(2, 2, 24, 8, generator=g)
    plan = ap.VerticalSlash(verticals=3, slashes=2, last_q=5, sink=1, window=2).plan(q, k, Site(causal=True)).with_site(True, 0)
    whole = materialise_mask(plan, 2, 4, 24, 24, "cpu")
    rows = torch.cat([materialise_mask(plan, 2, 4, 8, 24, "cpu", q_start=s) for s in (0, 8, 16)], 2)
    assert torch.equal(whole.expand(2, 4, 24, 24), rows.expand(2, 4, 24, 24))
    assert not whole.all(-1).all()  # a selection, not dense


# ---- TopKBlocks ------------------------------------------------------------------------------

def test_block_logits_share_pooled_keys_across_gqa_heads():
    g = _gen(3)
    pq, pk, sizes = torch.randn(2, 6, 5, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g), torch.arange(1, 8)
    want = pq @ pk.repeat_interleave(3, 1).transpose(-1, -2) / 4 + sizes.float().log()
    torch.testing.assert_close(tk_mod._block_logits(pq, pk, sizes), want)


@pytest.mark.parametrize("S,block", [(64, None), (256, None), (512, None), (700, 256)])
def test_causal_rule_that_keeps_every_block_is_plain_causal_attention(S, block):
    """Blocks of 256 (the default up to 512 keys): three blocks or fewer are all forced (first, own, one
    before), so no estimate runs and the plan is plain causal attention (None: SDPA's is_causal, no mask tensor)."""
    q, k = torch.randn(1, 2, S, 16), torch.randn(1, 2, S, 16)
    assert ap.TopKBlocks(keep=0.25, block=block).plan(q, k, Site(causal=True)) is None


def test_causal_selection_that_drops_a_block_is_applied_at_small_sizes():
    """Four blocks of 8 (32 tokens): the last query block may drop block 1, and the plan's mask
    must drop it (never a quiet dense run)."""
    g = _gen(4)
    q, k = torch.randn(1, 2, 32, 16, generator=g), torch.randn(1, 2, 32, 16, generator=g)
    m = ap.TopKBlocks(keep=0.25, block=8)
    plan = m.plan(q, k, Site(causal=True))
    assert plan is not None and plan.mask_mod is not None
    keep = materialise_mask(plan.with_site(True, 0), 1, 1, 32, 32, "cpu")[0, 0]
    assert not keep[24:, 8:16].any() and keep[24:, :8].all()  # block 1 dropped for the last rows, the sink kept


def test_grid_with_one_tile_or_full_keep_runs_dense_without_an_estimate(monkeypatch):
    """One tile (or keep=1.0): every tile is kept, so no estimate runs and the plan is dense attention
    (None: plain SDPA, no mask tensor)."""
    calls = []
    monkeypatch.setattr(ap.TopKBlocks, "estimate", lambda self, *a: calls.append(1))
    q, k, v = torch.randn(3, 1, 2, 80, 16).unbind(0)
    for m, site in ((ap.TopKBlocks(keep=0.25), Site(grid=(8, 8), text_len=16, kind="joint")),
                    (ap.TopKBlocks(keep=1.0, block=2), Site(grid=(8, 10)))):
        assert m.plan(q, k, site) is None
        torch.testing.assert_close(ap.attend(q, k, v, m, site), torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert not calls


def test_grid_selection_that_drops_a_tile_is_applied_on_a_two_tile_grid():
    """Two tiles, keep=0.25: each query tile keeps its own tile only (the smallest grid that selects)."""
    q, k = torch.randn(2, 1, 2, 128, 16).unbind(0)
    plan = ap.TopKBlocks(keep=0.25).plan(q, k, Site(grid=(4, 8, 4)))  # default 3-D tile (2, 8, 16): two tiles
    keep = materialise_mask(plan, 1, 1, 128, 128, "cpu")[0, 0]
    assert plan.blocks is not None and keep.float().mean().item() == 0.5


# ---- SinkCalibration -------------------------------------------------------------------------

def _scan_by_definition(m, q, k, off, causal, mask, scale, softcap, shift=None):
    """(sinks, lse) from the explicit softmax: a column's score is the mean over rows that see a key
    of p_ij * n_i; lse 0 for rows that see none."""
    rep = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(rep, 1).double()
    s = q.double() @ kk.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    Sq, Skv = q.shape[2], k.shape[2]
    seen = torch.ones(Sq, Skv, dtype=torch.bool)
    if causal:
        seen = torch.arange(Skv)[None, :] <= torch.arange(Sq)[:, None] + off
    seen = seen.expand(*s.shape).clone()
    if mask is not None:
        if mask.dtype == torch.bool:
            seen &= mask
        else:
            s = s + mask.double()
            seen &= mask > float("-inf")
    s = s.masked_fill(~seen, float("-inf"))
    n = seen.sum(-1, keepdim=True)
    dead = n == 0
    lse = s.masked_fill(dead, 0.0).logsumexp(-1, keepdim=True).masked_fill(dead, 0.0)
    p = torch.exp(s - lse).masked_fill(~seen, 0.0)
    col = (p * n).sum(2) / (~dead).sum(2).clamp_min(1)
    pos = torch.arange(Skv) if shift is None else torch.arange(Skv) + shift[:, None]
    col = col.masked_fill((pos < m.first).view(-1, 1, Skv), 0.0)
    top = col.topk(min(m.max_sinks, Skv), -1)
    sinks = torch.zeros_like(col, dtype=torch.bool).scatter_(2, top.indices, top.values > m.threshold)
    return sinks, lse.squeeze(-1), col


SCANS = [  # (Sq, Skv, Hq, Hkv, off, causal, mask kind, softcap)
    (40, 40, 4, 2, 0, True, None, None),
    (300, 300, 2, 1, 0, True, None, None),  # several causal chunks
    (7, 30, 2, 2, 23, True, None, None),  # a chunk after a cache
    (20, 20, 2, 2, 0, False, "bool", None),
    (20, 20, 4, 2, 0, True, "additive", 30.0),
    (12, 12, 2, 2, 0, True, "dead-rows", None),
]


@pytest.mark.parametrize("case", SCANS, ids=["causal-gqa", "chunks", "cache", "bool-mask", "additive-softcap", "dead-rows"])
def test_sink_scan_matches_the_explicit_softmax(case):
    Sq, Skv, Hq, Hkv, off, causal, kind, softcap = case
    g = _gen(5)
    q, k = torch.randn(2, Hq, Sq, 16, generator=g), torch.randn(2, Hkv, Skv, 16, generator=g)
    c = torch.randn(16, generator=g)
    q += c
    k[:, :, 5] = 3 * c  # a strong sink for some heads
    mask = None
    if kind == "bool":
        mask = torch.rand(2, 1, Sq, Skv, generator=g) < 0.8
    elif kind == "additive":
        mask = torch.randn(2, 1, 1, Skv, generator=g).masked_fill(torch.rand(2, 1, 1, Skv, generator=g) < 0.2, float("-inf"))
    elif kind == "dead-rows":  # left padding: the first 4 keys of row 1 hidden, so its first 4 queries see nothing
        mask = torch.ones(2, 1, Sq, Skv, dtype=torch.bool)
        mask[1, :, :, :4] = False
    m = ap.SinkCalibration(threshold=1.5, beta=0.4, detect_rows=None)  # every row: the exact mean (and every row's LSE)
    scale = 16 ** -0.5
    call = sc_mod._Call(off, causal, None, mask, scale, softcap)
    sinks, lse = m._scan(q, k, call)
    want_sinks, want_lse, col = _scan_by_definition(m, q, k, off, causal, mask, scale, softcap)
    assert want_sinks.any() or kind == "bool"  # the case exercises a detection
    close = ((col - m.threshold).abs() < 1e-4).any()  # a score at the threshold could round either way
    assert close or torch.equal(sinks, want_sinks)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_sink_scan_chunks_cover_every_row_once():
    for Sq, causal in ((1, True), (255, True), (256, True), (1000, True), (3000, False)):
        chunks = sc_mod._chunks(Sq, 9 * 4096, causal)
        assert chunks[0][0] == 0 and chunks[-1][1] == Sq and all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert all(e - s <= 1024 for s, e in chunks) and (not causal or Sq < 256 or len(chunks) >= 4)
