"""The SDPA kernel runs a causal plan's own mask on the CPU flash kernel with ``is_causal`` and the mask
together (it then skips the key blocks above the diagonal): outputs and gradients equal the reference
kernel for static and per-call masks, GQA and float16, and calls that are not upper-left aligned (a chunk
after a cache) keep the folded, non-causal mask."""
import pytest
import torch

import attnpatch as ap
from attnpatch.kernels import sdpa as sdpa_mod
from attnpatch.site import Site

CASES = [  # (id, method, Hq, Hkv, S)
    ("sinkwindow-static", ap.SinkWindow(sink=3, window=20, block=16), 4, 2, 150),
    ("power-static", ap.Power(local=16), 4, 4, 130),
    ("verticalslash-per-call", ap.VerticalSlash(verticals=8, slashes=8, last_q=16, window=8), 6, 2, 140),
    ("topk-per-call", ap.TopKBlocks(keep=0.5, block=32), 4, 2, 160),
]


def _qkv(Hq, Hkv, S, Sq=None, dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Hq, Sq or S, 32, generator=g).to(dtype)
    k, v = (torch.randn(1, Hkv, S, 32, generator=g).to(dtype) for _ in range(2))
    return tuple(x.requires_grad_(grad) for x in (q, k, v))


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = sdpa_mod._flash_causal_masked

    def wrapped(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(sdpa_mod, "_flash_causal_masked", wrapped)
    # these calls' 120-160 keys are one block of the CPU kernel, where the path is not taken (below): lowered so
    # that small tensors exercise it
    monkeypatch.setattr(sdpa_mod, "_ONE_KV_BLOCK", 64)
    sdpa_mod.MASKS.clear()
    return calls


@pytest.fixture
def spy_default(monkeypatch):
    calls = []
    real = sdpa_mod._flash_causal_masked
    monkeypatch.setattr(sdpa_mod, "_flash_causal_masked", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    sdpa_mod.MASKS.clear()
    return calls


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_causal_plan_mask_runs_with_is_causal_and_equals_the_reference(case, spy):
    _, m, Hq, Hkv, S = case
    q, k, v = _qkv(Hq, Hkv, S)
    site = Site(causal=True, family="llama")
    for _ in range(2):  # a static plan's second call takes its prepared call
        got = ap.attend(q, k, v, m, site, backend="sdpa")
    ref = ap.attend(q, k, v, m, site, backend="reference")
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert len(spy) == 2 and (got - ref).abs().max() < 1e-5 and (got - dense).abs().max() > 1e-3


@pytest.mark.parametrize("S, taken", [(150, False), (600, True)])
def test_the_path_needs_more_keys_than_one_kernel_block(S, taken, spy_default):
    """At most ``_ONE_KV_BLOCK`` keys the kernel's causal skip has nothing to skip: SDPA runs the folded mask
    alone (faster there); above it the kernel with ``is_causal``; both equal the reference."""
    m, site = ap.SinkWindow(sink=3, window=20, block=16), Site(causal=True, family="llama")
    q, k, v = _qkv(4, 2, S)
    for _ in range(2):  # and the static plan's prepared call
        got = ap.attend(q, k, v, m, site, backend="sdpa")
    ref = ap.attend(q, k, v, m, site, backend="reference")
    assert bool(spy_default) == taken and (got - ref).abs().max() < 1e-5


def test_gradients_and_float16_equal_the_folded_mask(spy):
    m, site = ap.SinkWindow(sink=2, window=24, block=16), Site(causal=True)
    q, k, v = _qkv(4, 2, 120, grad=True)
    got = ap.attend(q, k, v, m, site, backend="sdpa")
    gg = torch.autograd.grad(got.square().sum(), (q, k, v))
    q2, k2, v2 = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref = ap.attend(q2, k2, v2, m, site, backend="reference")
    gr = torch.autograd.grad(ref.square().sum(), (q2, k2, v2))
    assert spy and (got - ref).abs().max() < 1e-5 and all((a - b).abs().max() < 1e-4 for a, b in zip(gg, gr))
    h = _qkv(4, 2, 120, dtype=torch.float16)
    out16 = ap.attend(*h, m, site, backend="sdpa")
    ref32 = ap.attend(*(x.float() for x in h), m, site, backend="reference")
    assert (out16.float() - ref32).abs().max() < 5e-3


def test_a_chunk_after_a_cache_keeps_the_folded_mask(spy):
    """Bottom-right aligned causality (q_offset > 0) is not the kernel's is_causal: the folded mask runs."""
    m, site = ap.SinkWindow(sink=2, window=24, block=16), Site(causal=True, q_offset=90)
    q, k, v = _qkv(4, 2, 120, Sq=30)
    got = ap.attend(q, k, v, m, site, backend="sdpa")
    ref = ap.attend(q, k, v, m, site, backend="reference")
    assert not spy and (got - ref).abs().max() < 1e-5
