"""TopKBlocks: data-dependent block sparsity. The plan is checked against its definition
(estimated block mass from pooled q / k, top fraction or mass threshold, forced own tile and
text) and the estimate's quality against the true attention mass. (Every kernel against the
float64 golden on 1-D / 2-D / 3-D / joint / causal layouts: the zoo, tests/zoo.py.)"""
import math

import pytest
import torch

import attnpatch as ap
from attnpatch import Site
from attnpatch.plan import materialise_mask


def _qkv(B, Hq, Hkv, S, D, local=0.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    if local:  # keys correlated with the query of the same position: attention concentrates nearby
        k = k + local * q[:, : Hkv]
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _definition(method, q, k, site, tile_of, nT):
    """Selection by a plain loop over the documented rule, for comparison."""
    B, H, S, D = q.shape
    v0, n = site.visual_start, site.visual_len
    qv, kv = q[:, :, v0:v0 + n].double(), k[:, :, v0:v0 + n].double().repeat_interleave(H // k.shape[1], 1)
    sizes = torch.bincount(tile_of, minlength=nT).double()
    pq = torch.stack([qv[:, :, tile_of == t].mean(2) for t in range(nT)], 2)
    pk = torch.stack([kv[:, :, tile_of == t].mean(2) for t in range(nT)], 2)
    est = torch.softmax(pq @ pk.transpose(-1, -2) / math.sqrt(D) + sizes.log(), -1).mean((0, 1))
    keep = torch.zeros(nT, nT, dtype=torch.bool)
    for i in range(nT):
        keep[i, i] = True
        others = sorted((j for j in range(nT) if j != i), key=lambda j: -est[i, j].item())
        if method.mass is not None:
            got = est[i, i].item()
            for j in others:
                if got >= method.mass:
                    break
                keep[i, j], got = True, got + est[i, j].item()
        else:
            for j in others[: max(1, math.ceil(method.keep * nT)) - 1]:
                keep[i, j] = True
    return keep


@pytest.mark.parametrize("method", [ap.TopKBlocks(keep=0.3, block=2), ap.TopKBlocks(mass=0.8, block=2)], ids=["keep", "mass"])
def test_selection_matches_definition(method):
    site = Site(grid=(6, 8), text_len=3, kind="joint")
    q, k, _ = _qkv(2, 4, 2, 51, 16, local=1.0, seed=3)
    keep = materialise_mask(method.plan(q, k, site), 1, 1, 51, 51, "cpu")[0, 0]
    tile_of = torch.tensor([(r // 2) * 4 + c // 2 for r in range(6) for c in range(8)])
    want_tiles = _definition(method, q, k, site, tile_of, 12)
    want = torch.ones(51, 51, dtype=torch.bool)
    want[3:, 3:] = want_tiles[tile_of][:, tile_of]  # text rows and columns stay dense
    assert torch.equal(keep, want)


def test_full_keep_is_dense_attention():
    site = Site(grid=(6, 7), text_len=4, kind="joint")
    q, k, v = _qkv(1, 2, 2, 46, 16)
    for m in (ap.TopKBlocks(keep=1.0, block=3), ap.TopKBlocks(mass=1.0, block=3)):
        assert m.plan(q, k, site) is None  # every tile kept: plain SDPA, no mask tensor
        out = ap.attend(q, k, v, m, site)
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_estimate_finds_local_attention_and_recall_grows_with_keep():
    """On inputs whose attention is local, the kept blocks hold most of the true mass, more so
    as keep grows; on inputs with no structure the recall is about the kept fraction."""
    site = Site(grid=(16, 16))
    q, k, _ = _qkv(1, 2, 2, 256, 32, local=0.0, seed=1)
    pos = torch.stack(torch.meshgrid(torch.arange(16.), torch.arange(16.), indexing="ij"), -1).reshape(256, 2)
    feat = torch.cat([torch.sin(pos / 3), torch.cos(pos / 3), torch.sin(pos / 5), torch.cos(pos / 5)], -1) * 3  # (256, 8)
    q_loc, k_loc = q.clone(), k.clone()
    q_loc[..., :8] += feat
    k_loc[..., :8] += feat  # nearby tokens share features: attention decays with distance
    recalls = []
    for keep in (0.125, 0.25, 0.5):
        m = ap.TopKBlocks(keep=keep, block=4)
        mask = materialise_mask(m.plan(q_loc, k_loc, site), 1, 1, 256, 256, "cpu")
        p = torch.softmax(q_loc @ k_loc.transpose(-1, -2) / math.sqrt(32), -1)
        recalls.append((p * mask).sum(-1).mean().item())
    assert recalls[0] > 0.5 and recalls == sorted(recalls), recalls
    m = ap.TopKBlocks(keep=0.25, block=4)
    mask = materialise_mask(m.plan(q, k, site), 1, 1, 256, 256, "cpu")
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), -1)
    assert (p * mask).sum(-1).mean().item() < recalls[1]


@pytest.mark.parametrize("bad", [dict(keep=0.0), dict(keep=1.5), dict(keep=None), dict(mass=0.0), dict(mass=2.0),
                                 dict(block=0), dict(local=-1)])
def test_bad_parameters_name_themselves(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name if name != "keep" or bad[name] is not None else "keep"):
        ap.TopKBlocks(**bad)


def test_left_padded_causal_rows_are_planned_alone():
    """Under left padding each row's TopKBlocks pattern is the one it gets alone (blocks from its first real
    token, its own estimate), shifted by its padding; the pattern is sparse, not plain causal."""
    from attnpatch.plan import materialise_mask

    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 2, 40, 8, generator=g), torch.randn(2, 1, 40, 8, generator=g)
    m = ap.TopKBlocks(keep=0.3, block=4, local=1)
    site = ap.Site(causal=True, kv_shift=torch.tensor([0, -7]))
    keep = materialise_mask(m.plan(q, k, site).with_site(True, 0), 2, 2, 40, 40, "cpu")
    for b, pad in ((0, 0), (1, 7)):
        alone = m.plan(q[b:b + 1, :, pad:], k[b:b + 1, :, pad:], ap.Site(causal=True)).with_site(True, 0)
        ref = materialise_mask(alone, 1, 2, 40 - pad, 40 - pad, "cpu")[0]
        assert torch.equal(keep[b, :, pad:, pad:], ref.expand_as(keep[b, :, pad:, pad:]))
        assert not keep[b, :, pad:, :pad].any()  # real queries never see padding
        causal = torch.ones(40 - pad, 40 - pad, dtype=torch.bool).tril()
        assert not torch.equal(ref[0], causal)  # sparse: some causal pairs dropped


def test_a_batch_of_different_prompts_gives_each_row_what_it_gets_alone():
    """Causal TopKBlocks on a batch: every row's blocks come from its own estimate (averaged over a batch of
    RULER prompts, each prompt's needle blocks were dropped), its output equals the row run alone, and the
    plan's mask (what the reference and masked kernels run) holds each row's own pattern."""
    m = ap.TopKBlocks(keep=0.6, block=32)  # the first, own and previous blocks forced, plus the best free
    site = Site(causal=True)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(3, 2, 256, 16, generator=g) for _ in range(3))
    for b in range(3):  # row b's queries like key block 2 + 2 b: the rows' kept blocks differ
        d = torch.randn(16, generator=g)
        q[b] += d
        k[b, :, 32 * (2 + 2 * b):32 * (3 + 2 * b)] += 2 * d
    plan = m.plan(q, k, site)
    assert plan.rows is not None and len(plan.rows) == 3
    keep = materialise_mask(plan.with_site(True, 0), 3, 2, 256, 256, "cpu")
    from attnpatch import kernels

    orig, seen = kernels.select, []
    kernels.select = lambda q_, k_, v_, plan_, **kw: seen.append((q_.shape[0], plan_.blocks is not None)) or orig(q_, k_, v_, plan_, **kw)
    try:
        got = ap.core.run(q, k, v, m, site)
    finally:
        kernels.select = orig
    assert seen == [(1, True)] * 3, seen  # each row its own call, with its own block structure for the block kernels
    for b in range(3):
        alone = m.plan(q[b:b + 1], k[b:b + 1], site)
        ref = materialise_mask(alone.with_site(True, 0), 1, 2, 256, 256, "cpu")[0]
        assert torch.equal(keep[b], ref.expand_as(keep[b]))
        assert ref[:, 255, 32 * (2 + 2 * b)].all()  # its own liked block, kept for the last query
        want = torch.nn.functional.scaled_dot_product_attention(q[b:b + 1].double(), k[b:b + 1].double(),
                                                                v[b:b + 1].double(), attn_mask=ref)
        torch.testing.assert_close(got[b:b + 1], want.float(), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got[b:b + 1], ap.core.run(q[b:b + 1], k[b:b + 1], v[b:b + 1], m, site))
    assert not torch.equal(keep[0], keep[1])  # the inputs did give other patterns per row
    # a named backend runs the whole batch on the plan's mask: the same result
    torch.testing.assert_close(ap.core.run(q, k, v, m, site, backend="sdpa"), got, atol=2e-5, rtol=1e-4)
    # identical rows share one plan (one block structure for the call, as before)
    same = m.plan(q[:1].expand(2, -1, -1, -1), k[:1].expand(2, -1, -1, -1), site)
    assert same.rows is None and same.blocks is not None


def test_causal_block_structures_are_shared_per_kept_pattern_and_stay_exact():
    """A causal prefill's BlockSparse is reused for a repeated kept pattern (so the kernels' derived runs are),
    never for a different one: each call's tiles output equals SDPA with that call's own mask."""
    m = ap.TopKBlocks(keep=0.6, block=32, local=0)  # the first, own and previous blocks forced, plus the best free
    site = Site(causal=True)
    g = torch.Generator().manual_seed(3)
    calls = []
    for i in range(3):  # call i: every query likes key block 2 + 2i, so the free block it keeps differs
        q, k, v = (torch.randn(1, 2, 256, 16, generator=g) for _ in range(3))
        d = torch.randn(16, generator=g)
        q += d
        k[:, :, 32 * (2 + 2 * i):32 * (3 + 2 * i)] += 2 * d
        calls.append((q, k, v))
    calls.append(calls[0])  # the first call again: same pattern
    plans = []
    for q, k, v in calls:
        plan = m.plan(q, k, site)
        keep = materialise_mask(plan.with_site(True, 0), 1, 2, 256, 256, "cpu")
        want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep)
        got = ap.core.run(q, k, v, m, site, backend="tiles")
        torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=1e-4)
        plans.append((plan.blocks, keep))
    assert plans[3][0] is plans[0][0]
    for (b1, k1), (b2, k2) in zip(plans, plans[1:3]):
        assert (b1 is b2) == torch.equal(k1, k2)
    assert not all(torch.equal(plans[0][1], p[1]) for p in plans[1:3])  # the inputs did give other patterns


def test_grid_block_structures_are_shared_per_kept_pattern_and_stay_exact():
    m = ap.TopKBlocks(keep=0.25, block=(2, 2))
    site = Site(grid=(8, 8), step=10, steps=20, timestep=0.5)
    g = torch.Generator().manual_seed(4)
    calls, plans = [], []
    for i in range(3):  # call i: every query likes the tile at row 2 i: the kept tiles differ
        q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
        d = torch.randn(16, generator=g)
        q += d
        k.view(1, 2, 8, 8, 16)[:, :, 2 * i:2 * i + 2, 4:6] += 3 * d
        calls.append((q, k, v))
    calls.append(calls[0])
    for q, k, v in calls:
        plan = m.plan(q, k, site)
        keep = materialise_mask(plan.with_site(False, 0), 1, 2, 64, 64, "cpu")
        want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep)
        torch.testing.assert_close(ap.core.run(q, k, v, m, site, backend="tiles"), want.float(), atol=2e-5, rtol=1e-4)
        plans.append((plan.blocks, keep))
    assert plans[3][0] is plans[0][0]
    for (b1, k1), (b2, k2) in zip(plans, plans[1:3]):
        assert (b1 is b2) == torch.equal(k1, k2)
    assert not all(torch.equal(plans[0][1], p[1]) for p in plans[1:3])


@pytest.mark.parametrize("Sq,Skv,block", [(600, 600, 32), (48, 1100, 64), (40, 2100, 128)])
def test_causal_default_block_follows_the_key_count(Sq, Skv, block):
    """TopKBlocks() on a causal call: key blocks of about Skv / 16 tokens (a power of two in 32..256), equal to
    the float64 golden with that block on every kernel that runs it; the default plan drops blocks."""
    import goldens as G
    import goldens_select as GS

    from attnpatch.methods.topk_blocks import causal_block

    assert causal_block(Skv) == block
    q, k, v = _qkv(1, 2, 1, Skv, 16, local=0.5, seed=5)
    q = q[:, :, Skv - Sq:]
    site = Site(causal=True, q_offset=Skv - Sq)
    m = ap.TopKBlocks(keep=0.25)
    keep = GS.topk_causal_keep(q, k, Skv - Sq, keep=0.25, block=block)
    want = G.attention(q, k, v, keep)
    plan = m.plan(q, k, site)
    assert plan is not None and not bool(materialise_mask(plan.with_site(True, Skv - Sq), 1, 2, Sq, Skv, "cpu").eq(
        torch.ones(Sq, Skv, dtype=torch.bool).tril(Skv - Sq)).all())
    for backend in ["sdpa", "reference"] + (["tiles"] if Sq == Skv else []):
        torch.testing.assert_close(ap.core.run(q, k, v, m, site, backend=backend).double(), want, atol=2e-5, rtol=1e-4)


def test_causal_default_block_keeps_short_calls_dense():
    """At most 512 keys: 256-token blocks, every one the always-kept rule holds: exact causal attention, no plan."""
    q, k, v = _qkv(1, 2, 2, 512, 16, seed=1)
    assert ap.TopKBlocks(keep=0.25).plan(q, k, Site(causal=True)) is None
