"""transformers decoders: Dense equals stock (padding, GQA, cache), unpatch restores the
attention implementation exactly, SinkWindow through generate with prefill and KV-cache decode."""
import pytest
import torch

import attnpatch as ap
from attnpatch import Method
from attnpatch.models.tiny import llm

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]


class Record(Method):
    def __init__(self):
        self.sites = []

    def plan(self, q, k, site):
        self.sites.append((site, q.shape[2], k.shape[2]))
        return None


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 97, (2, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as generate uses
    ids[1, :4] = 0
    return ids, mask


def _generate(model, ids, mask, n=6):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    # sliding-window layers with a window shorter than the prompt: rolling caches and local masks
    overrides = {"mistral": {"sliding_window": 6}, "gemma3_text": {"sliding_window": 5}}.get(request.param, {})
    return llm(request.param, **overrides)


def test_dense_matches_stock_and_unpatch_restores(model):
    ids, mask = _batch()
    impl = model.config._attn_implementation
    with torch.no_grad():
        stock = model(ids, attention_mask=mask).logits
        with ap.patch(model, ap.Dense()) as h:
            assert model.config._attn_implementation == "attnpatch"
            assert len(h.modules) == model.config.num_hidden_layers
            out = model(ids, attention_mask=mask).logits
        after = model(ids, attention_mask=mask).logits
    valid = mask.bool()  # logits of pad positions are not meaningful for either
    torch.testing.assert_close(out[valid], stock[valid], atol=1e-4, rtol=1e-4)
    assert torch.equal(after, stock)
    assert model.config._attn_implementation == impl
    assert not any(hasattr(m, "_attnpatch") for m in model.modules())


def test_wide_sinkwindow_generate_equals_stock_narrow_differs(model):
    ids, mask = _batch()
    with torch.no_grad():
        stock = _generate(model, ids, mask)
        with ap.patch(model, ap.SinkWindow(sink=4, window=4096)):
            wide = _generate(model, ids, mask)
        with ap.patch(model, ap.SinkWindow(sink=1, window=2)):
            narrow_logits = model(ids, attention_mask=mask).logits
        dense_logits = model(ids, attention_mask=mask).logits
    assert torch.equal(wide, stock)
    if model.config.model_type == "llama":
        with ap.patch(model, ap.SinkWindow(sink=1, window=2)):
            assert not torch.equal(_generate(model, ids, mask), stock)
    assert (narrow_logits[:, -1] - dense_logits[:, -1]).abs().max() > 1e-3


def test_sites_prefill_and_decode(model):
    ids, mask = _batch()
    rec = Record()
    with torch.no_grad(), ap.patch(model, rec):
        _generate(model, ids, mask, n=3)
    L = model.config.num_hidden_layers
    prefill, decode = rec.sites[:L], rec.sites[L:]
    assert [s.layer for s, _, _ in prefill] == list(range(L))
    for site, Sq, Skv in prefill:
        assert site.causal and site.prefill and not site.decode and Sq == Skv == 13
        assert site.kv_shift.tolist() == [0, -4]
        assert site.family == model.config.model_type and site.name.endswith("self_attn")
    assert len(decode) == 2 * L
    for i, (site, Sq, Skv) in enumerate(decode):
        step = i // L
        assert site.decode and Sq == 1 and site.q_offset == Skv - 1
        assert (Skv - 1 + site.kv_shift).tolist() == [13 + step, 9 + step]  # absolute positions of the new token
        if not getattr(model.config, "sliding_window", None) or model.config.sliding_window > 20:  # no rolling cache
            assert Skv == 14 + step


def test_narrow_window_matches_masked_reference():
    """SinkWindow through generate equals a stock model whose mask is that pattern: run the
    stock eager model on the full sequence with the sink+window mask given as a 4-D mask."""
    model = llm("llama")
    ids, _ = _batch()
    ids = ids[:1]
    sink, window = 2, 5
    with torch.no_grad(), ap.patch(model, ap.SinkWindow(sink=sink, window=window)):
        out = model(ids).logits
    S = ids.shape[1]
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    keep = (j <= i) & ((j < sink) | (i - j < window))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(ids, attention_mask=torch.where(keep, 0.0, float("-inf"))[None, None]).logits
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_layer_selection_by_pattern():
    model = llm("qwen2")
    rec = Record()
    with torch.no_grad(), ap.patch(model, rec, layers="model.layers.1.*"):
        model(torch.randint(3, 97, (1, 7)))
    assert {s.layer for s, _, _ in rec.sites} == {1}


def test_unsupported_transformers_model_names_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(TypeError, match="Llama, Mistral, Qwen2"):
        ap.patch(m, ap.Dense())


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_dense_gradients_equal_stock(family, padded):
    """Fine-tuning / guidance gradients through a patched decoder: with Dense() the parameter
    gradients of an LM loss equal the stock model's (Gemma-2: soft-capped logits, which once
    picked a kernel without a backward on CPU)."""
    model = llm(family)
    ids, mask = _batch()
    if not padded:
        ids, mask = ids[:1], None
    # no loss on pads, nor on a row's first real token: a pad position predicts it, and pad rows'
    # outputs are not meaningful (stock attends uniformly over masked keys, attnpatch gives zeros)
    labels = ids if mask is None else ids.masked_fill((mask == 0) | (mask.cumsum(1) == 1), -100)

    def grads():
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    stock = grads()
    with ap.patch(model, ap.Dense()):
        patched = grads()
    assert stock.keys() == patched.keys() and len(stock) > 10
    for name, g in stock.items():
        torch.testing.assert_close(patched[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_choosing_another_attention_implementation_ends_the_patch_loudly(caplog):
    """attnpatch is the model's attention implementation: set_attn_implementation("eager") on a patched
    model used to run stock attention under a handle that still said "active" and counted nothing.
    Now the patch is removed first with a WARNING; a deep copy made before stays patched."""
    import copy
    import logging

    from attnpatch.handle import handle_of

    m = llm("llama")
    x = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(x).logits
        h = ap.patch(m, ap.SinkWindow(sink=2, window=8))
        patched = m(x).logits
        assert (patched - ref).abs().max() > 1e-3  # the window changes the result
        twin = copy.deepcopy(m)
        with caplog.at_level(logging.WARNING, logger="attnpatch"):
            m.set_attn_implementation("eager")
        assert "the patch is removed" in caplog.text
        assert not h.active and handle_of(m) is None
        assert m.config._attn_implementation == "eager"
        torch.testing.assert_close(m(x).logits, ref, atol=1e-5, rtol=1e-5)  # eager = stock, as asked
        assert torch.equal(twin(x).logits, patched)  # the copy keeps its own patch
        ap.unpatch(twin)
        assert torch.equal(twin(x).logits, ref)
