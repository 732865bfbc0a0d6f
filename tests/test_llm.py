"""LLM methods through transformers: covering windows reproduce stock generate, KV eviction
reproduces the un-evicted run with less memory, causal block-sparse prefill runs on the block
kernels, SinkCalibration matches its definition (padding masks and soft-capping included, values
and gradients), calibration profiles round-trip and validate."""
import math

import pytest
import torch

import attnpatch as ap
from attnpatch import Site, core
from attnpatch.models.tiny import llm


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return llm("llama")


def _generate(m, ids, method=None, n=12):
    if method is None:
        return m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    with ap.patch(m, method):
        return m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("method", [ap.TopKBlocks(keep=1.0, block=8), ap.Power(local=10**6), ap.VerticalSlash(window=10**6),
                                    ap.SinkWindow(sink=4, window=10**6, evict=True), ap.SinkCalibration(beta=1.0)],
                         ids=["topk", "power", "verticalslash", "sinkwindow-evict", "act-beta1"])
def test_covering_methods_reproduce_stock_generate(model, method):
    ids = torch.randint(3, model.config.vocab_size, (1, 37), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_generate(model, ids, method), _generate(model, ids))


def test_eviction_keeps_tokens_and_saves_memory(model):
    ids = torch.randint(3, model.config.vocab_size, (1, 50), generator=torch.Generator().manual_seed(2))
    plain, evict = ap.SinkWindow(sink=3, window=8), ap.SinkWindow(sink=3, window=8, evict=True)
    a = _generate(model, ids, plain, 16)
    with ap.patch(model, evict) as handle:
        b = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(a, b)
    kv = handle.stats()["kv_cache"]
    assert kv["after"] < kv["before"]
    assert not torch.equal(a, _generate(model, ids, None, 16))  # the window does matter here


def test_eviction_refuses_padding(model):
    ids = torch.randint(3, model.config.vocab_size, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with ap.patch(model, ap.SinkWindow(sink=2, window=4, evict=True)):
        with pytest.raises(ValueError, match="unpadded"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize("method", [ap.SinkWindow(sink=5, window=100, block=32), ap.TopKBlocks(keep=0.3, block=32, local=1)],
                         ids=["sinkwindow", "topk"])
def test_causal_prefill_runs_block_sparse(method):
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 6, 300, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g)
    site = Site(causal=True)
    plan = method.plan(q, k, site)
    assert plan.blocks is not None and plan.blocks.causal and plan.blocks.density() < 0.7
    from attnpatch import kernels

    # tiles can run it (at this size the cost model selects sdpa; every backend is checked below)
    assert kernels.get("tiles").why_not(q, k, v, plan.with_site(True, 0)) is None
    ref = ap.attend(q.double(), k.double(), v.double(), method, site, backend="reference")
    for backend in ("tiles", "flex", "sdpa"):
        out = ap.attend(q, k, v, method, site, backend=backend)
        assert (out.double() - ref).abs().max() < 1e-5, backend


@pytest.mark.parametrize("Sq,Skv,Hkv", [(40, 40, 2), (1, 40, 1), (7, 40, 2)], ids=["prefill", "decode", "chunk"])
def test_sink_calibration_matches_definition(Sq, Skv, Hkv):
    g = torch.Generator().manual_seed(4)
    B, H, D = 2, 4, 8
    q, k, v = torch.randn(B, H, Sq, D, generator=g), torch.randn(B, Hkv, Skv, D, generator=g), torch.randn(B, Hkv, Skv, D, generator=g)
    c = torch.randn(D, generator=g)
    q += c  # every query shares a direction that key 9 points along: a strong non-initial sink
    k[:, :, 9] = 4 * c
    m = ap.SinkCalibration(heads=[(0, 0), (0, 3)], threshold=2.0, beta=0.3)
    site = Site(causal=True, q_offset=Skv - Sq)
    out = ap.attend(q, k, v, m, site)
    kk, vv = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    sinks = torch.zeros(B, H, Skv, dtype=torch.bool)
    sinks[:, [0, 3]] = m.sinks(q[:, [0, 3]], kk[:, [0, 3]], Skv - Sq, True)
    assert sinks[:, [0, 3], 9].all() and not sinks[:, [1, 2]].any()
    s = q @ kk.transpose(-1, -2) / math.sqrt(D) + torch.where(sinks[:, :, None, :], math.log(0.3), 0.0)
    i = torch.arange(Sq)[:, None] + Skv - Sq
    s = s.masked_fill(torch.arange(Skv)[None, :] > i, float("-inf"))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ vv, atol=1e-5, rtol=1e-5)


def test_calibration_profile_roundtrip_and_validation(model, tmp_path):
    from attnpatch.tools import calibrate

    result = dict(heads=[(0, 1), (1, 0)], base=3.0, calibrated=2.9, threshold=4.0, beta=0.5)
    path = tmp_path / "act.safetensors"
    calibrate.save(path, model, result)
    m = ap.SinkCalibration(heads=path)
    assert m._heads == {0: [1], 1: [0]} and m._meta["model_type"] == "llama"
    with ap.patch(model, m):
        pass  # validated against this model: fine
    other = llm("llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match="2 layers .* not this llama with 3"):
        ap.patch(other, ap.SinkCalibration(heads=path))
    with pytest.raises(ValueError, match="not a SinkCalibration profile"):
        from attnpatch.methods.pag import save_heads

        save_heads(tmp_path / "pag.safetensors", {0: [1]})
        ap.SinkCalibration(heads=tmp_path / "pag.safetensors")


def test_calibrate_picks_heads_that_lower_the_loss(model):
    from attnpatch.models.shapes import tokenizer
    from attnpatch.tools import calibrate

    tok = tokenizer()
    r = calibrate.calibrate(model, tok, prompts=["a red circle at the top left", "a blue square moving up"], threshold=1.5,
                            beta=0.5, max_heads=4, progress=False)
    assert r["calibrated"] <= r["base"]
    assert all(r["per_head"][f"{l}.{h}"] > 0 for l, h in r["heads"])


@pytest.mark.parametrize("method", [ap.TopKBlocks(keep=1.0, block=8), ap.Power(local=10**6), ap.VerticalSlash(window=10**6),
                                    ap.SinkCalibration(beta=1.0)], ids=["topk", "power", "verticalslash", "act-beta1"])
def test_covering_methods_on_a_left_padded_batch(model, method):
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, model.config.vocab_size, (2, 30), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # row 0 is left padded
    kw = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    stock = model.generate(ids, **kw)
    with ap.patch(model, method):
        assert torch.equal(model.generate(ids, **kw), stock)


def test_power_sink_is_the_first_real_tokens_under_padding():
    """With left padding (Site.kv_shift), the sink is the first real tokens, not the pad slots."""
    from attnpatch.plan import materialise_mask

    m, shift = ap.Power(local=2, sink=2), torch.tensor([-3, 0])  # row 0: 3 pad slots first
    q = torch.zeros(2, 1, 12, 1)
    plan = m.plan(q, q, Site(causal=True, kv_shift=shift)).with_site(True, 0)
    keep = materialise_mask(plan, 2, 1, 12, 12, "cpu")
    assert keep[0, 0, 11, 3] and keep[0, 0, 11, 4] and not keep[0, 0, 11, 0]  # real tokens 0, 1 sit in slots 3, 4
    assert keep[1, 0, 11, 0] and keep[1, 0, 11, 1]


# --- SinkCalibration sees the call's padding mask and soft-capping (issue 16) ------------------


def _act_reference(q, k, v, heads, keep, beta, threshold, first, max_sinks, pos, softcap=None):
    """ACT from its definition in float64: in the chosen heads, columns (absolute position >=
    first) whose mean over the rows that see a key of p_ij * n_i exceeds threshold (at most
    max_sinks, the strongest) get log(beta) added to their scores. keep: (B, 1, Sq, Skv) bool."""
    q, k, v = q.double(), k.double(), v.double()
    H, rep = q.shape[1], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~keep, float("-inf"))
    n = keep.sum(-1, keepdim=True).double()  # (B, 1, Sq, 1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    col = (p * n).sum(2) / (n > 0).sum(2)  # (B, H, Skv)
    col = col.masked_fill((pos < first)[:, None, :], 0.0)
    top = col.topk(max_sinks, -1)
    sinks = torch.zeros_like(col, dtype=torch.bool).scatter_(2, top.indices, top.values > threshold)
    chosen = torch.zeros(H, dtype=torch.bool)
    chosen[heads] = True
    sinks &= chosen[None, :, None]
    out = torch.softmax(s + torch.where(sinks[:, :, None, :], math.log(beta), 0.0), -1).nan_to_num(0.0) @ v
    return out, sinks


def _padded_case(Sq, Skv, pad=5):
    """Row 0 left padded by ``pad`` keys; a strong sink direction at the first real token of each
    row (never calibrated: first=1), at real key 9, and at a pad slot of row 0 (hidden)."""
    g = torch.Generator().manual_seed(4)
    B, H, Hkv, D = 2, 4, 2, 8
    q, k, v = torch.randn(B, H, Sq, D, generator=g), torch.randn(B, Hkv, Skv, D, generator=g), torch.randn(B, Hkv, Skv, D, generator=g)
    c = torch.randn(D, generator=g)
    q += c
    shift = torch.tensor([-pad, 0])
    for b in range(B):
        k[b, :, -shift[b]] = 4 * c  # first real token
        k[b, :, 9 - shift[b]] = 4 * c  # real position 9
    k[0, :, 2] = 5 * c  # a pad slot
    j = torch.arange(Skv)
    keep = (j[None, :] >= -shift[:, None])[:, None, None, :].expand(B, 1, Sq, Skv)  # padding
    causal = j[None, :] <= torch.arange(Sq)[:, None] + Skv - Sq
    return q, k, v, shift, keep, keep & causal


@pytest.mark.parametrize("Sq,Skv", [(40, 40), (1, 40), (7, 40)], ids=["prefill", "decode", "chunk"])
def test_sink_calibration_on_padded_batch_matches_definition(Sq, Skv):
    q, k, v, shift, pad_keep, keep = _padded_case(Sq, Skv)
    m = ap.SinkCalibration(heads=[(0, 0), (0, 3)], threshold=2.0, beta=0.3)
    site = Site(causal=True, q_offset=Skv - Sq, kv_shift=shift)
    out = ap.attend(q, k, v, m, site, mask=pad_keep)
    pos = torch.arange(Skv)[None, :] + shift[:, None]
    ref, sinks = _act_reference(q, k, v, [0, 3], keep, 0.3, 2.0, 1, 16, pos)
    assert sinks[0, [0, 3], 9 + 5].all() and sinks[1, [0, 3], 9].all()  # real position 9 is a sink in both rows
    assert not sinks[0, :, :5].any() and not sinks[0, :, 5].any() and not sinks[1, :, 0].any()
    live = keep.any(-1).expand(-1, 4, -1)  # rows that see a key (row 0's pad queries see none)
    torch.testing.assert_close(out[live], ref[live].float(), atol=1e-5, rtol=1e-5)


def test_sink_calibration_softcap_matches_definition():
    """Soft-capped logits (Gemma-2): detection and both partitions use the capped scores."""
    q, k, v, shift, pad_keep, keep = _padded_case(40, 40)
    m = ap.SinkCalibration(heads=[(0, 1), (0, 2)], threshold=1.5, beta=0.5)
    site = Site(causal=True, kv_shift=shift)
    out = core.run(q, k, v, m, site, mask=pad_keep, softcap=3.0)
    ref, sinks = _act_reference(q, k, v, [1, 2], keep, 0.5, 1.5, 1, 16, torch.arange(40)[None, :] + shift[:, None], 3.0)
    assert sinks.any()
    live = keep.any(-1).expand(-1, 4, -1)
    torch.testing.assert_close(out[live], ref[live].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Sq", [40, 1])
def test_sink_calibration_beta_one_is_dense_with_a_padding_mask(Sq):
    q, k, v, shift, pad_keep, keep = _padded_case(Sq, 40)
    site = Site(causal=True, q_offset=40 - Sq, kv_shift=shift)
    out = ap.attend(q, k, v, ap.SinkCalibration(threshold=2.0, beta=1.0), site, mask=pad_keep)
    dense = ap.attend(q, k, v, ap.Dense(), site, mask=pad_keep)
    live = keep.any(-1).expand(-1, 4, -1)
    torch.testing.assert_close(out[live], dense[live], atol=1e-6, rtol=1e-6)


def _sharp(family):
    """A tiny random decoder with query / key weights scaled up: peaked attention, so it has sinks
    for SinkCalibration to find (the plain random one attends almost uniformly)."""
    m = llm(family)
    with torch.no_grad():
        for mod in m.modules():
            if hasattr(mod, "q_proj"):
                mod.q_proj.weight *= 12
                mod.k_proj.weight *= 12
    return m


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sink_calibration_beta_one_is_stock_on_a_left_padded_batch(family):
    m = _sharp(family)
    ids = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    with torch.no_grad():
        stock = m(ids, attention_mask=mask).logits
        with ap.patch(m, ap.SinkCalibration(threshold=1.3, beta=1.0)):
            out = m(ids, attention_mask=mask).logits
        with ap.patch(m, ap.SinkCalibration(threshold=1.3, beta=0.3)):
            calibrated = m(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (calibrated - stock)[valid].abs().max() > 1e-2  # these settings do find sinks
    torch.testing.assert_close(out[valid], stock[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sink_calibration_padded_row_equals_the_row_alone(family):
    """beta < 1 through a model: a left-padded row (positions as generate gives them) computes
    what the same row computes alone, Gemma-2's soft-capped logits included."""
    m = _sharp(family)
    ids = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    with torch.no_grad():
        stock = m(ids[:1, 7:]).logits
        with ap.patch(m, ap.SinkCalibration(threshold=1.3, beta=0.3)):
            both = m(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
            alone = m(ids[:1, 7:]).logits
    assert (alone - stock).abs().max() > 1e-2  # sinks were found and calibrated
    torch.testing.assert_close(both[0, 7:], alone[0], atol=1e-5, rtol=1e-5)


def test_sink_calibration_gradients_match_reference():
    """Backward through the calibration (LoRA / guidance gradients): equal to the float64
    definition's gradients, padded rows included (no NaN from rows that see no key)."""
    q, k, v, shift, pad_keep, keep = _padded_case(20, 20)
    m = ap.SinkCalibration(heads=[(0, 0), (0, 3)], threshold=2.0, beta=0.3)
    site = Site(causal=True, kv_shift=shift)
    w = torch.randn(2, 4, 20, 8, generator=torch.Generator().manual_seed(9))
    live = keep.any(-1, keepdim=True)  # (B, 1, Sq, 1): loss over rows that see a key
    grads = []
    for f, dtype in ((lambda *t: ap.attend(*t, m, site, mask=pad_keep, backend="reference"), torch.float32),
                     (lambda *t: _act_reference(*t, [0, 3], keep, 0.3, 2.0, 1, 16, torch.arange(20)[None, :] + shift[:, None])[0],
                      torch.float64)):
        t = [x.detach().to(dtype).clone().requires_grad_() for x in (q, k, v)]
        ((f(*t) * w.to(dtype)) * live).sum().backward()
        grads.append([x.grad for x in t])
    for g, r in zip(*grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)
