"""HyperAttention: the pieces of the causal recursion, the Gray-code bucket order, the estimator's
weights (unbiased: a key outside the query's block has expected weight 1), seeded determinism, when a
call is exact, and a patched tiny Llama equal to the float64 golden. The golden itself: tests/zoo.py rows."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import attnpatch as ap
from attnpatch import Site
from attnpatch.methods.hyper import _gray_rank

sys.path.insert(0, str(Path(__file__).parent))
import goldens_hyper as GH  # noqa: E402

SMALL = dict(block=4, samples=5, hashes=3, min_len=8, seed=1)


def _qkv(B, Hq, Hkv, Sq, Skv, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, s, D, generator=g, dtype=torch.float64) for h, s in ((Hq, Sq), (Hkv, Skv), (Hkv, Skv)))


def test_causal_recursion_tiles_the_lower_triangle_once():
    """Every causal (row, key) pair lies in exactly one piece, with dense pieces only at <= min_len."""
    m = ap.HyperAttention(min_len=5, block=2)
    for Sq, off in [(37, 0), (12, 30), (1, 40), (64, 3)]:
        seen = torch.zeros(Sq, off + Sq, dtype=torch.long)
        for kind, q0, nq, k0, nk in m.nodes(Sq, off + Sq, off, True):
            causal = kind == "dense" and q0 == k0
            assert kind == "hyper" or (nq <= 5 if causal else nq < 5)
            i = torch.arange(q0, q0 + nq)[:, None]
            j = torch.arange(k0, k0 + nk)[None, :]
            seen[q0 - off:q0 - off + nq, k0:k0 + nk] += ((j <= i) if causal else torch.ones_like(i * j, dtype=torch.bool)).long()
        i = torch.arange(off, off + Sq)[:, None]
        assert torch.equal(seen, (torch.arange(off + Sq)[None, :] <= i).long())


def test_neighbouring_gray_places_differ_in_one_hyperplane():
    for bits in (1, 3, 7):
        rank = _gray_rank(bits)
        bucket = torch.empty_like(rank).scatter_(0, rank, torch.arange(2**bits))  # place -> bucket
        flips = bucket[1:] ^ bucket[:-1]
        assert torch.equal(flips & (flips - 1), torch.zeros_like(flips))  # one bit each
        assert sorted(rank.tolist()) == list(range(2**bits))


def test_sampled_weights_are_unbiased():
    """Averaged over seeds, every key outside a query's block carries weight 1 (draws * nk / samples),
    and a key in the block exactly 1: the estimator's numerator and denominator are unbiased."""
    q, k, _ = _qkv(1, 1, 1, 16, 16, seed=3)
    site = Site()
    total = torch.zeros(16, 16, dtype=torch.float64)
    runs = 600
    for seed in range(runs):
        t = ap.HyperAttention(block=4, samples=6, hashes=2, min_len=1, seed=seed).table(q, k, site)[0, 0]
        total += t.exp()
    mean = total / runs
    assert (mean - 1).abs().max() < 0.35, mean  # each draw hits a key with probability 1/16
    assert ((mean - 1).abs().mean()) < 0.08


def test_one_block_is_exact_and_the_recursion_merges_correctly():
    """block >= every piece's keys: each piece is exact, so the merged recursion is causal attention."""
    q, k, v = _qkv(2, 4, 2, 40, 40)
    out = ap.attend(q, k, v, ap.HyperAttention(block=64, samples=3, min_len=4), Site(causal=True), backend="reference")
    dense = ap.attend(q, k, v, ap.Dense(), Site(causal=True))
    assert (out - dense).abs().max() < 1e-12


@pytest.mark.parametrize("Sq,Skv,block,more", [(15, 15, 2, 1), (1, 30, 2, 7), (7, 30, 2, 1), (30, 60, 30, 0)],
                         ids=["short-prefill", "decode", "short-chunk", "one-block"])
def test_exact_calls_plan_dense(Sq, Skv, block, more):
    """Exact calls make no plan (plain SDPA): a prefill under 2 * min_len tokens (its lower-left half has
    fewer than min_len queries), a chunk (a decode) of fewer than min_len queries, pieces whose keys fit one
    block. The first call past each bound (``more`` queries added, or a block one key smaller) makes one."""
    q, k, _ = _qkv(1, 2, 2, Sq + more, Skv + more)
    site = Site(causal=True, q_offset=Skv - Sq)
    assert ap.HyperAttention(min_len=8, block=block).plan(q[:, :, more:], k[:, :, more:], site) is None
    assert ap.HyperAttention(min_len=8, block=block - 1 + more).plan(q, k, site) is not None


def test_seeded_and_sparse():
    q, k, v = _qkv(1, 2, 1, 40, 40)
    site = Site(causal=True, layer=1)
    a = ap.attend(q, k, v, ap.HyperAttention(**SMALL), site)
    assert torch.equal(a, ap.attend(q, k, v, ap.HyperAttention(**SMALL), site))
    assert not torch.equal(a, ap.attend(q, k, v, ap.HyperAttention(**{**SMALL, "seed": 2}), site))
    assert not torch.equal(a, ap.attend(q, k, v, ap.HyperAttention(**SMALL), Site(causal=True, layer=2)))  # hyperplanes per layer
    keep = ap.HyperAttention(**SMALL).table(q, k, site) > float("-inf")
    assert keep.float().mean() < 0.75 * torch.ones(40, 40).tril().mean()  # it skips causal keys (30 % here)


@pytest.mark.parametrize("kw,match", [(dict(block=0), "block"), (dict(hashes=17), "hashes"), (dict(samples=-1), "samples"),
                                      (dict(min_len=1.5), "min_len")])
def test_parameters_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        ap.HyperAttention(**kw)


def test_causal_call_must_end_at_the_last_key():
    q, k, _ = _qkv(1, 1, 1, 20, 30)
    with pytest.raises(ValueError, match="last keys"):
        ap.HyperAttention(**SMALL).plan(q, k, Site(causal=True, q_offset=3))


def test_patched_llama_prefill_equals_the_golden():
    """Through transformers (GQA 4/2, RoPE, the model's own q, k, v): each layer's output is the golden's."""
    from attnpatch.models import tiny

    model = tiny.llm("llama")
    seen = []

    def spy(module, args, kwargs, out):
        seen.append((module.layer_idx, out))

    from attnpatch.patchers import transformers as tp

    calls = []
    orig = tp.core.run

    def run(q, k, v, method, site, **kw):
        out = orig(q, k, v, method, site, **kw)
        calls.append((q, k, v, site, out))
        return out

    ids = torch.randint(1, 90, (1, 24), generator=torch.Generator().manual_seed(0))
    tp.core.run = run
    try:
        with torch.no_grad(), ap.patch(model, ap.HyperAttention(**SMALL)):
            model(ids)
    finally:
        tp.core.run = orig
    assert len(calls) == model.config.num_hidden_layers
    for q, k, v, site, out in calls:
        want = GH.hyper_attention(q, k, v, site.q_offset, True, layer=site.layer, **SMALL)
        assert (out.double() - want).abs().max() < 1e-5, site.layer


@pytest.mark.parametrize("Sq,Skv", [(40, 40), (12, 44)], ids=["prefill", "chunk"])
def test_left_padding_is_left_out(Sq, Skv):
    """Left padding (Site.kv_shift, the model's mask): each row equals the golden of its real tokens
    alone, which is also what the row computes unpadded at batch size 1."""
    q, k, v = _qkv(3, 4, 2, Sq, Skv, seed=5)
    pads = [0, 7, 3]
    site = Site(causal=True, q_offset=Skv - Sq, kv_shift=-torch.tensor(pads), layer=1)
    mask = torch.arange(Skv)[None, :] >= torch.tensor(pads)[:, None]  # (B, Skv) real keys
    out = ap.attend(q, k, v, ap.HyperAttention(**SMALL), site, backend="reference", mask=mask[:, None, None, :])
    want = GH.hyper_attention(q, k, v, Skv - Sq, True, layer=1, pads=pads, **SMALL)
    for b, p in enumerate(pads):
        r0 = max(0, p - (Skv - Sq))
        assert (out[b, :, r0:] - want[b, :, r0:]).abs().max() < 1e-12, b
        alone = ap.attend(q[b:b + 1, :, r0:], k[b:b + 1, :, p:], v[b:b + 1, :, p:], ap.HyperAttention(**SMALL),
                          Site(causal=True, q_offset=Skv - p - (Sq - r0), layer=1), backend="reference")
        assert (out[b:b + 1, :, r0:] - alone).abs().max() < 1e-12, b


def test_whole_grid_views_equal_the_gathered_entries():
    """mask_mod / score_mod answer whole index grids (a run of rows) with a view of the tables, any other
    indices by gathering: both give the same entries."""
    from attnpatch.plan import index_grids

    q, k, _ = _qkv(2, 4, 2, 40, 40)
    plan = ap.HyperAttention(**SMALL).plan(q, k, Site(causal=True))
    b, h, i, j = index_grids(2, 4, 30, 40, "cpu", q_start=10)
    score = torch.randn(2, 4, 30, 40, dtype=torch.float64)
    flip = torch.arange(39, -1, -1).view(1, 1, 1, 40)  # the same keys in reverse: no view applies
    assert torch.equal(plan.mask_mod(b, h, i, j), plan.mask_mod(b, h, i, flip).flip(-1))
    assert torch.equal(plan.score_mod(score, b, h, i, j), plan.score_mod(score.flip(-1), b, h, i, flip).flip(-1))


def test_method_file_prints_its_mask():
    import subprocess

    r = subprocess.run([sys.executable, "-m", "attnpatch.methods.hyper"], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    rows = [line for line in r.stdout.splitlines() if line and set(line) <= {"#", "."}]
    assert r.returncode == 0 and r.stderr == "" and len(rows) == 32
    assert all(row[i + 1:] == "." * (31 - i) for i, row in enumerate(rows))  # causal
    assert any(row[:i + 1].count(".") for i, row in enumerate(rows))  # and sparse below the diagonal


def test_buckets_kernel_runs_without_the_score_table(monkeypatch):
    """The automatic choice for a HyperAttention prefill is the buckets kernel, which never builds the
    (S_q, S_kv) table (the table builder is made to fail) and equals the reference kernel on the table."""
    from attnpatch.methods import hyper

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, 96, 16, generator=g) for h in (4, 2, 2))
    m = ap.HyperAttention(block=8, samples=6, hashes=3, min_len=20)
    site = ap.Site(causal=True, layer=1)
    ref = ap.attend(q, k, v, m, site, backend="reference")
    plan = m.plan(q, k, site)
    assert plan.buckets is not None and any(p.order_q is not None for p in plan.buckets.pieces)
    assert ap.kernels.select(q, k, v, plan.with_site(True, 0)).name == "buckets"

    def no_table(*a, **kw):
        raise AssertionError("the score table was built")

    monkeypatch.setattr(hyper, "_from_pieces", no_table)
    got = ap.attend(q, k, v, m, site)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    dense = ap.attend(q, k, v, ap.Dense(), site)
    assert (got - dense).abs().max() > 1e-3  # the pattern applies: not dense


@pytest.mark.parametrize("causal", [False, True])
def test_buckets_kernel_rows_whose_every_draw_is_in_their_block(causal):
    """One draw and 2-4 blocks: a quarter to a half of the rows drew a key of their own block, so they have no residual
    (their drawn part sees no key) and are their block's attention alone; GQA 4 / 2. The buckets kernel equals
    the reference kernel on the score table."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, h, 64, 16, generator=g) for h in (4, 2, 2))
    m = ap.HyperAttention(block=16, samples=1, hashes=2, min_len=16)
    site = ap.Site(causal=causal, layer=2)
    plan = m.plan(q, k, site)
    pieces = [p for p in plan.buckets.pieces if p.order_q is not None and p.drawn is not None]
    assert pieces and all(2 <= -(-p.nk // p.block) <= 4 for p in pieces)  # one draw in 2-4 blocks
    assert ap.kernels.select(q, k, v, plan.with_site(causal, 0)).name == "buckets"
    got = ap.attend(q, k, v, m, site)
    ref = ap.attend(q, k, v, m, site, backend="reference")
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("n", [64, 60], ids=["whole-blocks", "short-last-block"])
def test_buckets_kernel_without_draws(n):
    """samples=0: each query sees its block only (no bias at all when the blocks are whole, the short last block's
    padding masked otherwise); equals the reference kernel on the score table."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, h, n, 16, generator=g) for h in (4, 2, 2))
    m = ap.HyperAttention(block=16, samples=0, hashes=2, min_len=16)
    site = ap.Site(causal=False, layer=0)
    plan = m.plan(q, k, site)
    assert all(p.drawn is None for p in plan.buckets.pieces)
    assert ap.kernels.select(q, k, v, plan.with_site(False, 0)).name == "buckets"
    torch.testing.assert_close(ap.attend(q, k, v, m, site), ap.attend(q, k, v, m, site, backend="reference"),
                               atol=2e-5, rtol=2e-5)
