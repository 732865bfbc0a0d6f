"""transformers' StaticCache (``cache_implementation="static"``, what torch.compile users run) hands every
attention call all its slots: keys at their cache positions, empty slots after them. The patcher cuts the
call to the keys its last query can see (attnpatch/patchers/transformers.py ``_visible``); before that a
decode query sat at the last slot and every position-dependent method (SinkWindow's window, Power's
distances, VerticalSlash's diagonals, TopKBlocks' causal blocks, StreamingHeads) attended the wrong keys
while Dense, whose model mask hid the slots, stayed right. Reference: the same method over the default
DynamicCache, whose keys end at the query."""
import pytest
import torch

import attnpatch as ap
from attnpatch.models.tiny import llm

METHODS = {
    "Dense": lambda: ap.Dense(),
    "SinkWindow": lambda: ap.SinkWindow(sink=2, window=8),
    "SinkWindow-evict": lambda: ap.SinkWindow(sink=2, window=8, evict=True),
    "Power": lambda: ap.Power(local=4),
    "VerticalSlash": lambda: ap.VerticalSlash(verticals=4, slashes=4, window=4, last_q=4),
    "TopKBlocks": lambda: ap.TopKBlocks(keep=0.5, block=8),
    "HyperAttention": lambda: ap.HyperAttention(block=8, samples=8, min_len=16),
    "SinkCalibration": lambda: ap.SinkCalibration(),
    "StreamingHeads": lambda: ap.StreamingHeads([(0, 1)], sink=2, window=8),
}


@pytest.fixture(scope="module")
def model():
    return llm("llama", num_hidden_layers=2)


def _scores(model, method, ids, mask, impl, n=6):
    with ap.patch(model, method):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             cache_implementation=impl, output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, 1)


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_static_cache_generates_what_the_dynamic_cache_does(model, name, padded):
    ids = torch.randint(3, 97, (2, 30), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5] = 0
    if name == "SinkWindow-evict":  # a cache that cannot shrink is refused, with the fix named
        with pytest.raises(ValueError, match="StaticLayer.*evict=False"):
            _scores(model, METHODS[name](), ids[:1], mask[:1], "static")
        return
    seq, want = _scores(model, METHODS[name](), ids, mask, None)
    got_seq, got = _scores(model, METHODS[name](), ids, mask, "static")
    assert torch.equal(got_seq, seq)
    assert torch.equal(got.isinf(), want.isinf())  # min_new_tokens hides EOS the same way
    assert (got - want)[want.isfinite()].abs().max() < 1e-5


def test_quest_refuses_a_static_cache_without_naming_evict(model):
    """Quest's page bounds live beside the default cache: refused, and the hint is not SinkWindow's evict=False."""
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="StaticLayer") as err:
        _scores(model, ap.Quest(budget=8, page=4, dense_layers=()), ids, torch.ones_like(ids), "static")
    assert "evict" not in str(err.value)


@pytest.mark.parametrize("name", ["SinkWindow", "Power", "VerticalSlash", "TopKBlocks", "StreamingHeads"])
def test_static_cache_chunked_prefill_equals_the_dynamic_cache(model, name):
    """Prefill in chunks (12 and 7 tokens after 20, then decode): the chunks' mask places their queries."""
    from transformers import DynamicCache, StaticCache

    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(6))
    got = {}
    for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=64)):
        with ap.patch(model, METHODS[name]()), torch.no_grad():
            kw = (lambda a, b: dict(cache_position=torch.arange(a, b))) if isinstance(cache, StaticCache) else (lambda a, b: {})
            got[type(cache).__name__] = torch.cat([model(ids[:, a:b], cache=cache, use_cache=True, **kw(a, b)).logits
                                                   for a, b in [(0, 20), (20, 32), (32, 33), (33, 40)]], 1)
    assert (got["StaticCache"] - got["DynamicCache"]).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
@pytest.mark.parametrize("name", ["SinkWindow", "Power"])
def test_static_cache_with_sliding_window_layers(family, name):
    """Sliding-window layers (window 16 < 42 tokens) roll their static slots; the full-attention layers' slots stay
    at their positions: both kinds give what the dynamic cache gives."""
    m = llm(family, num_hidden_layers=2, sliding_window=16)
    ids = torch.randint(3, 97, (2, 30), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    got = {impl: _scores(m, METHODS[name](), ids, mask, impl, n=12) for impl in (None, "static")}
    assert torch.equal(got["static"][0], got[None][0])
    want = got[None][1]
    assert (got["static"][1] - want)[want.isfinite()].abs().max() < 1e-5

