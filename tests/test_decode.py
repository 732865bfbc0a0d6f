"""Fast decode: Quest reads the sink page, its own page and the pages with the largest key bounds (kept
beside the cache by its KV policy, equal to bounds computed afresh); SinkWindow decode reads only its
sink and window keys. Exactness against the float64 definitions is in tests/test_goldens.py (zoo rows
quest-* and sinkwindow-decode); here: what each decode call reads, and that the incremental bounds
change nothing."""
import pytest
import torch

import attnpatch as ap
from attnpatch import Site
from attnpatch.methods.quest import PageBounds
from attnpatch.models.tiny import llm


def _qkv(B=1, Hq=4, Hkv=2, Skv=70, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, 1, D, generator=g), torch.randn(B, Hkv, Skv, D, generator=g),
            torch.randn(B, Hkv, Skv, D, generator=g))


def _decode_site(Skv):
    return Site(causal=True, q_offset=Skv - 1, decode=True)


def _read(plan, q, k, v, mask=None):
    """The keys / values / mask a decode plan's key selection hands the kernel."""
    return plan.transform(q, k, v, mask=mask)


def test_quest_decode_reads_its_budget_of_pages():
    q, k, v = _qkv(Skv=70)
    m = ap.Quest(budget=24, page=8, dense_layers=())
    _, kk, vv, _ = _read(m.plan(q, k, _decode_site(70)), q, k, v)
    # 3 pages of 8 (sink, one chosen, the full page 7 before the own page) ... : 2 whole pages + the own page's 6 keys
    assert kk.shape == vv.shape == (1, 2, 2 * 8 + 70 - 8 * 8, 16)
    tok = m.select(q, k, _decode_site(70))
    assert tok[..., :8].eq(torch.arange(8)).all() and tok[..., -6:].eq(torch.arange(64, 70)).all()
    assert torch.equal(kk, k.gather(2, tok[..., None].expand(-1, -1, -1, 16)))


def test_quest_that_keeps_every_page_is_plain_attention():
    q, k, _ = _qkv(Skv=40)
    assert ap.Quest(budget=40, page=8, dense_layers=()).plan(q, k, _decode_site(40)) is None  # 5 pages fit
    assert ap.Quest(budget=32, page=8, dense_layers=()).plan(q, k, _decode_site(40)) is not None
    assert ap.Quest(budget=16, page=8).plan(q, k, _decode_site(40)) is None  # layer 0: dense by default
    qs = torch.randn(1, 4, 40, 16)
    assert ap.Quest(budget=16, page=8, dense_layers=()).plan(qs, k, Site(causal=True)) is None  # prefill: dense


def test_quest_maps_the_call_mask_to_the_kept_keys():
    q, k, v = _qkv(B=2, Skv=70)
    mask = torch.ones(2, 1, 1, 70, dtype=torch.bool)
    mask[1, ..., :5] = False  # left padding of row 1
    m = ap.Quest(budget=24, page=8, dense_layers=())
    plan = m.plan(q, k, _decode_site(70))
    _, kk, _, mm = _read(plan, q, k, v, mask)
    tok = m.select(q, k, _decode_site(70)).repeat_interleave(2, 1)  # (B, H_q, n)
    assert mm.shape == (2, 4, 1, kk.shape[2]) and torch.equal(mm[:, :, 0], mask[:, :, 0].expand(2, 4, 70).gather(2, tok))
    out = ap.attend(q, k, v, m, _decode_site(70), mask=mask)
    keep = torch.zeros(2, 4, 1, 70, dtype=torch.bool).scatter_(3, tok[:, :, None], True) & mask
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
    assert torch.allclose(out, want, atol=1e-6)


def test_page_bounds_grow_incrementally_and_equal_fresh_bounds():
    pol, state = PageBounds(4, __import__("weakref").WeakSet()), {}
    k = torch.randn(2, 3, 50, 8)
    for S in (9, 10, 13, 30, 31, 50):  # prefill, then pages completing one decode step at a time
        keys = k[:, :, :S].clone()
        pol.observe(5, state, keys)
        mx, mn, mu = pol.bounds(5, keys)
        pages = keys[:, :, :S // 4 * 4].unflatten(2, (S // 4, 4))
        assert torch.equal(mx, pages.amax(3)) and torch.equal(mn, pages.amin(3)) and mu is None
        assert pol.bounds(5, keys.clone()) is None  # other keys (another cache, attend): computed afresh
    pol.observe(5, state, torch.randn(2, 3, 7, 8))  # shorter: a cropped / new cache starts over
    assert state["n"] == 1


def test_page_means_grow_incrementally_and_equal_fresh_means():
    """With ``pooled`` the policy also keeps each full page's mean key (float32, also for bfloat16 keys)."""
    pol, state = PageBounds(4, __import__("weakref").WeakSet(), means=True), {}
    k = torch.randn(1, 2, 41, 8).bfloat16()
    for S in (9, 13, 14, 41):
        keys = k[:, :, :S].clone()
        pol.observe(2, state, keys)
        mx, mn, mu = pol.bounds(2, keys)
        pages = keys[:, :, :S // 4 * 4].unflatten(2, (S // 4, 4))
        assert torch.equal(mx, pages.amax(3)) and mu.dtype == torch.float32
        assert torch.allclose(mu, pages.float().mean(3), atol=1e-6)
    assert PageBounds(4, __import__("weakref").WeakSet()).means is False  # pooled 0: no mean table kept


def test_pooled_pages_find_the_page_a_loose_bound_misses():
    """The bound sum_d max(q_d M_d, q_d m_d) is loose where a page's keys spread over many channels: noise pages
    with wide channels outrank a page whose every key aligns with the query. ``pooled`` picks that page by its
    mean key; the bound alone does not."""
    g = torch.Generator().manual_seed(3)
    D, P, S = 32, 4, 4 * 40
    q = torch.randn(1, 1, 1, D, generator=g)
    k = 3 * torch.randn(1, 1, S, D, generator=g)  # wide noise: every page's bound is large
    needle = 20
    k[:, :, needle * P:(needle + 1) * P] = 2 * q[0, 0, 0] + 0.05 * torch.randn(P, D, generator=g)
    site = _decode_site(S)
    scores = (q @ k.transpose(-1, -2))[0, 0, 0]
    assert int(scores.argmax()) // P == needle  # the needle's keys score highest
    plain = ap.Quest(budget=24, page=P, dense_layers=(), pooled=0.0).select(q, k, site)
    pooled = ap.Quest(budget=24, page=P, dense_layers=(), pooled=0.5).select(q, k, site)
    assert needle * P not in plain[0, 0].tolist()
    assert needle * P in pooled[0, 0].tolist() and pooled.shape == plain.shape  # same budget


def test_quest_pooled_rejects_a_share_outside_0_1():
    with pytest.raises(ValueError, match="pooled"):
        ap.Quest(pooled=1.5)


@torch.no_grad()
def _greedy_logits(model, ids, n):
    """Logits of ``n`` greedy decode steps after a prefill of ``ids`` (the model's own DynamicCache)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(ids, cache=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for _ in range(n):
        nxt = logits[-1].argmax(-1, keepdim=True)
        out = model(nxt, cache=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("pooled", [0.0, 0.5])
def test_quest_bounds_beside_the_cache_change_nothing(monkeypatch, pooled):
    """A patched model's decode reads the bounds (and mean keys) its cache layers keep (no pass over the keys),
    and its logits equal those of the same method computing every table afresh from the keys."""
    model = llm("llama", num_hidden_layers=3)
    ids = torch.randint(3, 97, (1, 45), generator=torch.Generator().manual_seed(1))
    method = ap.Quest(budget=16, page=4, dense_layers=(0,), pooled=pooled)
    hits = []
    real = PageBounds.bounds

    def counted(self, layer, keys):
        got = real(self, layer, keys)
        hits.append(got is not None)
        return got

    monkeypatch.setattr(PageBounds, "bounds", counted)
    with ap.patch(model, method) as handle:
        kept = _greedy_logits(model, ids, 12)
    assert hits and all(hits), "a decode call recomputed its bounds instead of reading the cache's"
    stats = handle.stats()["kv_cache"]
    # 2 / page of the keys' bytes (3 / page with the mean keys): pages of 4, keys half of a token's K + V
    assert stats["evicted"] == 0 and 0 < stats["bounds"] <= stats["after"] * (3 if pooled else 2) // 8 + 1
    monkeypatch.setattr(PageBounds, "bounds", lambda self, layer, keys: None)
    with ap.patch(model, method):
        fresh = _greedy_logits(model, ids, 12)
    assert torch.equal(kept, fresh)
    assert not torch.allclose(kept, _greedy_logits(model, ids, 12))  # the selection matters here


def test_quest_generate_with_left_padding_runs_the_selection():
    """Left-padded batches are not refused (nothing is evicted): decode gathers the model's mask too."""
    model = llm("llama", num_hidden_layers=2)
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    with ap.patch(model, ap.Quest(budget=16, page=4, dense_layers=())):
        a = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with ap.patch(model, ap.Quest(budget=16, page=4, dense_layers=()), backend="reference"):
        b = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("sink,window,Skv,n", [(4, 16, 100, 20), (0, 16, 100, 16), (4, 95, 100, 99), (3, 10, 12, None)],
                         ids=["sink+window", "window-only", "one-key-dropped", "everything"])
def test_sinkwindow_decode_reads_only_kept_keys(sink, window, Skv, n):
    q, k, v = _qkv(Skv=Skv)
    m, site = ap.SinkWindow(sink=sink, window=window), _decode_site(Skv)
    plan = m.plan(q, k, site)
    if n is None:
        assert plan is None  # sink + window cover every key: plain attention, no mask
        return
    _, kk, _, _ = _read(plan, q, k, v)
    assert kk.shape[2] == n and plan.mask_mod is None
    if sink == 0:
        assert kk.data_ptr() == k[:, :, Skv - window:].data_ptr()  # a view of the cache, no copy
    full = m._plan(q, k, site)  # the mask over the whole cache: the same attention
    want = ap.attend(q.double(), k.double(), v.double(), ap.Dense(), Site(causal=True, q_offset=Skv - 1),
                     mask=__import__("attnpatch").plan.materialise_mask(full.with_site(True, Skv - 1), 1, 4, 1, Skv, "cpu"))
    assert (ap.attend(q, k, v, m, site).double() - want).abs().max() < 1e-6


def test_quest_cache_layer_appends_in_place_and_equals_dynamic_layer():
    """A Quest cache layer appends into buffers with room (no O(length) copy per decode step) and holds
    exactly what transformers' DynamicLayer holds through updates, crop and beam reordering."""
    from transformers.cache_utils import DynamicLayer

    from attnpatch.patchers.kv_cache import KVCache, PolicyLayer

    kv = KVCache(ap.Quest(page=4, budget=8).kv_policy(), [0])
    ours, plain = PolicyLayer(kv, 0), DynamicLayer()
    g = torch.Generator().manual_seed(3)
    ptrs = set()
    for step, n in enumerate([20, 1, 1, 3, 1, 1]):
        k, v = torch.randn(2, 2, n, 8, generator=g), torch.randn(2, 2, n, 8, generator=g)
        a, b = ours.update(k, v), plain.update(k, v)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        ptrs.add(a[0].data_ptr())
        if step == 3:
            ours.crop(-2), plain.crop(-2)
        if step == 4:
            ours.reorder_cache(torch.tensor([1, 0])), plain.reorder_cache(torch.tensor([1, 0]))
    assert len(ptrs) == 3  # the first fill exactly, room from the first append, re-seated once by the reordering
    assert torch.equal(ours.keys, plain.keys) and ours.get_seq_length() == plain.get_seq_length()


@pytest.mark.parametrize("method", [ap.SinkWindow(sink=2, window=8), ap.StreamingHeads([(0, 1), (1, 2)], sink=2, window=8),
                                    ap.Dense(), ap.Power(local=4)], ids=["SinkWindow", "StreamingHeads", "Dense", "Power"])
def test_cache_keeps_every_key_appended_in_place(method):
    """A method without a KV policy of its own (SinkWindow evict=False, Dense, ...) gets KeepAll: the cache holds
    every key, exactly as many as DynamicLayer after the prefill, then in buffers that decode steps append to (no
    copy of the whole cache per token as DynamicLayer's cat); the logits equal the same method over transformers'
    own StaticCache, which the policy leaves as it is."""
    from transformers import DynamicCache, StaticCache

    from attnpatch.patchers.kv_cache import PolicyLayer

    model = llm("llama", num_hidden_layers=2)
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(4))
    with ap.patch(model, method) as handle, torch.no_grad():
        cache, ptrs, logits = DynamicCache(config=model.config), set(), []
        out = model(ids, cache=cache, use_cache=True)
        assert cache.layers[1]._bufs[0].shape[2] == 30  # a prefill holds what DynamicLayer holds, no room yet
        for _ in range(10):
            logits.append(out.logits[:, -1])
            out = model(logits[-1].argmax(-1, keepdim=True), cache=cache, use_cache=True)
            ptrs.add(cache.layers[1].keys.data_ptr())
        assert all(isinstance(layer, PolicyLayer) for layer in cache.layers)
        assert len(ptrs) == 1 and cache.get_seq_length() == 40 and cache.layers[1].keys.shape[2] == 40
        stats = handle.stats()["kv_cache"]
        assert stats["evicted"] == 0 and stats["before"] == stats["after"] > 0
        static, want = StaticCache(config=model.config, max_cache_len=64), []
        out = model(ids, cache=static, use_cache=True, cache_position=torch.arange(30))
        for i in range(10):
            want.append(out.logits[:, -1])
            out = model(want[-1].argmax(-1, keepdim=True), cache=static, use_cache=True, cache_position=torch.tensor([30 + i]))
        assert not any(isinstance(layer, PolicyLayer) for layer in static.layers)
    assert (torch.stack(logits) - torch.stack(want)).abs().max() < 1e-4
    stock = _greedy_logits(model, ids, 9).transpose(0, 1)  # (10 steps, 1, V) as the lists above
    if isinstance(method, ap.Dense):  # stock attention: the in-place cache changes nothing
        assert (torch.stack(logits) - stock).abs().max() < 1e-5
    else:  # the method matters here (so the equality above is not that of two dense runs)
        assert not torch.allclose(torch.stack(logits), stock)


def test_sinkwindow_keepall_allows_patching_some_layers():
    """KeepAll trims nothing, so layers=... stays allowed (an evicting policy needs every layer: it refuses)."""
    model = llm("llama", num_hidden_layers=2)
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(5))
    with ap.patch(model, ap.SinkWindow(sink=2, window=4), layers=[1]):
        a = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with ap.patch(model, ap.SinkWindow(sink=2, window=4), layers=[1], backend="reference"):
        b = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="needs every layer patched"):
        ap.patch(model, ap.SinkWindow(sink=2, window=4, evict=True), layers=[1])


def test_quest_on_some_layers_names_dense_layers():
    """Quest's page tables sit beside every layer's cache: layers=... is refused with its own fix (not evict=False)."""
    with pytest.raises(ValueError, match="dense_layers") as err:
        ap.patch(llm("llama", num_hidden_layers=2), ap.Quest(budget=8, page=4), layers=[1])
    assert "evict" not in str(err.value)
