"""Every LLM method on a tiny Llama (GQA 4/2) through the three ways a decoder runs: a left-padded batch
of 2, a chunked prefill (three pieces on a DynamicCache, then decode steps) and ``generate`` (4 new
tokens). The automatic kernel choice equals the reference kernel running the same method (logits
within 1e-4, same tokens), and the method applies (the logits differ from stock), so no path quietly
runs dense. Already elsewhere: covering methods equal stock generate, padded or not (test_llm.py);
SinkCalibration's definition under padding (test_llm.py); eviction over many steps and chunks
(test_llm_defects.py); HyperAttention against its golden through the model (test_hyper.py). And a
left-padded row equals the row alone (strict xfails: the methods whose pattern counts pad slots).

Also: attnpatch's own calls into transformers raise no deprecation (5.24 renamed ``past_key_values``
to ``cache``)."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

import attnpatch as ap
from attnpatch.models import tiny
from attnpatch.patchers.transformers import cache_name, cache_of

METHODS = {  # parameters small enough to bite on 20-30 tokens
    "sinkwindow": lambda: ap.SinkWindow(sink=2, window=6, block=16),
    "sinkwindow-evict": lambda: ap.SinkWindow(sink=2, window=6, evict=True),
    "topkblocks": lambda: ap.TopKBlocks(keep=0.5, block=4, local=1),
    "power": lambda: ap.Power(local=3, sink=1),
    "verticalslash": lambda: ap.VerticalSlash(verticals=3, slashes=2, last_q=4, sink=1, window=2),
    "verticalslash-blocks": lambda: ap.VerticalSlash(verticals=3, slashes=2, last_q=4, sink=1, window=2, block=4),
    "sinkcalibration": lambda: ap.SinkCalibration(threshold=0.8, beta=0.3),  # a random model attends ~uniformly: scores ~1
    "temperature": lambda: ap.Temperature(tau=0.6),
    "entropyscale": lambda: ap.EntropyScale(train_len=8),
    "hyperattention": lambda: ap.HyperAttention(block=4, samples=5, hashes=3, min_len=8),
    "quest": lambda: ap.Quest(budget=8, page=4, dense_layers=()),
}
DENSE_PREFILL = {"quest"}  # decode-only methods: a forward pass alone is stock by definition
EVICT_PADDING = "SinkWindow(evict=True) refuses padded batches (tested in test_llm.py)"


@pytest.fixture(scope="module")
def model():
    return tiny.llm("llama")


@pytest.fixture(autouse=True)
def _eager_flex(monkeypatch):
    monkeypatch.setenv("ATTNPATCH_FLEX_COMPILE", "0")  # score-table plans (HyperAttention): no compile per shape


def _ids(B=2, S=26, seed=0):
    return torch.randint(1, 97, (B, S), generator=torch.Generator().manual_seed(seed))


def _padded():
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding, as generate pads
    ids[1, :5] = 0
    return ids, mask


def padded_batch(model, ids, mask):
    return model(ids, attention_mask=mask).logits


def chunked(model, ids, mask=None, pieces=(10, 18, 24)):
    """Prefill in pieces on a DynamicCache, then decode the remaining tokens one by one; every logit."""
    from transformers import DynamicCache

    cache, name, logits, start = DynamicCache(config=model.config), cache_name(model), [], 0
    for end in [*pieces, *range(pieces[-1] + 1, ids.shape[1] + 1)]:
        out = model(ids[:, start:end], use_cache=True, **{name: cache})
        cache, start = cache_of(out), end
        logits.append(out.logits)
    return torch.cat(logits, 1)


def generated(model, ids, mask):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


def _run(model, method, path, backend):
    ids, mask = _padded()
    if path == "chunked":
        ids, mask = _ids(1, 26, seed=1), None
    elif path == "generate" and isinstance(method, ap.SinkWindow) and method.evict:
        ids, mask = _ids(2, 20, seed=2), torch.ones(2, 20, dtype=torch.long)
    fn = {"padded-batch": padded_batch, "chunked": chunked, "generate": generated}[path]
    with torch.no_grad():
        if method is None:
            return fn(model, ids, mask)
        with ap.patch(model, method, backend=backend):
            return fn(model, ids, mask)


@pytest.mark.parametrize("path", ["padded-batch", "chunked", "generate"])
@pytest.mark.parametrize("name", list(METHODS))
def test_auto_kernels_equal_the_reference_and_the_method_applies(model, name, path):
    method = METHODS[name]()
    if path == "padded-batch" and name == "sinkwindow-evict":
        pytest.skip(EVICT_PADDING)
    auto = _run(model, method, path, None)
    ref = _run(model, METHODS[name](), path, "reference")
    stock = _run(model, None, path, None)
    if path == "generate":
        (seq_a, auto), (seq_r, ref), (_, stock) = auto, ref, stock
        assert torch.equal(seq_a, seq_r), f"{name}: generated tokens differ between kernels"
    err = (auto - ref).abs().max().item()
    assert err <= 1e-4, f"{name} on {path}: automatic kernels differ from the reference by {err}"
    moved = (ref - stock).abs().max().item() if ref.shape == stock.shape else float("inf")
    if path == "padded-batch" and name in DENSE_PREFILL:
        assert moved < 1e-4, f"{name}: its prefill is dense by definition ({moved})"
        return
    assert moved > 1e-3, f"{name} on {path}: logits equal stock ({moved}): the pattern did not apply"


# methods whose pattern is counted in key slots, so the pad slots move it (found here; the padded batch still
# equals the reference kernel above): TopKBlocks' blocks, VerticalSlash's estimate and Quest's pages include
# the pad keys
SLOT_BASED: dict = {}  # methods whose pattern counts pad slots (none left: TopKBlocks, VerticalSlash, Quest follow positions)


@pytest.mark.parametrize("name", [n for n in METHODS if n != "sinkwindow-evict"])
def test_a_left_padded_row_equals_the_row_alone(model, name, request):
    """Row 1 of a left-padded batch (positions as generate numbers them) gives the logits the row gives
    alone, for a forward pass and for generate: a method's pattern follows token positions, not slots."""
    if name in SLOT_BASED:
        request.applymarker(pytest.mark.xfail(strict=True, reason=SLOT_BASED[name]))
    ids, mask = _padded()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad(), ap.patch(model, METHODS[name]()):
        both = model(ids, attention_mask=mask, position_ids=pos).logits[1, 5:]
        alone = model(ids[1:, 5:]).logits[0]
        _, gen_both = generated(model, ids, mask)
        _, gen_alone = generated(model, ids[1:, 5:], None)
    assert (both - alone).abs().max() < 1e-4
    assert (gen_both[1] - gen_alone[0]).abs().max() < 1e-4


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("name", ["dense", "sinkwindow-evict"])
def test_no_deprecation_from_attnpatch_calls(model, name):
    """Patched forward, chunked prefill on a cache, generate and the TP check's decode loop use the cache
    keyword the installed transformers has: no past_key_values deprecation (a warning or a log line)."""
    from attnpatch.tools import tp_check

    method = ap.Dense() if name == "dense" else METHODS[name]()
    records, root = _Records(), logging.getLogger("transformers")
    root.addHandler(records)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*past_key_values.*")
            warnings.filterwarnings("error", category=FutureWarning)
            with torch.no_grad(), ap.patch(model, method):
                chunked(model, _ids(1, 22, seed=3))
                model.generate(_ids(1, 12), max_new_tokens=3, do_sample=False)
                tp_check._run(model, {"tokens": 14, "decode": 3})
    finally:
        root.removeHandler(records)
    assert not [m for m in records.messages if "deprecat" in m.lower()], records.messages
