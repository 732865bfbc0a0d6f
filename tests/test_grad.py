"""Autograd through attnpatch, on the zoo's rows (tests/zoo.py) and grad-specific inputs (padding,
a v head size unlike q's, soft-capping). The reference kernel's float64 gradients of q, k, v equal
those of the float64 golden (autograd through the loops); every other kernel that accepts inputs
requiring grad keeps the flash-attn rule the forward tests use: each gradient's max error against
the golden is at most twice the float32 reference kernel's own error + 1e-5. A kernel without a backward refuses such inputs, so selection never picks
it; and tiny diffusers models patched with a sparse method train for two rounds with the gradients
of the same model run through the reference kernel."""
import copy
import os

import pytest
import torch

import attnpatch as ap
import goldens as G
from attnpatch import Plan, Site, kernels
from attnpatch.core import run
from zoo import ZOO, golden
from zoo import inputs as zoo_inputs

ATOL = 1e-5
NO_GRAD = ()  # methods without a backward (none today)


class Softcap(ap.Method):
    """A general score_mod (Gemma-2 style capping): the path no kernel can fold into q."""

    def plan(self, q, k, site):
        return Plan(score_mod=lambda s, b, h, qi, kv: 5.0 * torch.tanh(s / 5.0), name="softcap")


def _dense_golden(q, k, v, s, mask=None):
    keep = G.static(G.causal(lambda p, j: True, s.q_offset), q.shape[2], k.shape[2]) if s.causal else torch.tensor(True).expand(
        q.shape[2], k.shape[2])
    return G.attention(q, k, v, keep, mask=mask)


def _grid_golden(rule):
    return lambda q, k, v, s, mask=None: G.attention(q, k, v, G.static(G.grid_keep(s, q.shape[2], rule), q.shape[2], q.shape[2]))


# grad-specific inputs on top of the zoo's rows: (id, method, site, (B, Hq, Hkv, Sq, Skv, D, Dv), padding, golden)
EXTRAS = [
    ("dense-gqa", ap.Dense(), Site(), (2, 4, 2, 13, 13, 16, 16), False, _dense_golden),
    ("causal", ap.Dense(), Site(causal=True), (1, 2, 2, 11, 11, 16, 16), False, _dense_golden),
    ("chunked-prefill", ap.Dense(), Site(causal=True, q_offset=8), (1, 2, 1, 3, 11, 16, 16), False, _dense_golden),
    ("padding-mask", ap.Dense(), Site(), (2, 2, 2, 9, 9, 16, 16), True, _dense_golden),
    ("v-head-size", ap.Dense(), Site(), (1, 2, 2, 9, 9, 16, 24), False, _dense_golden),
    ("sta-gqa", ap.SlidingTile(tile=4, window=3), Site(grid=(8, 12)), (2, 4, 2, 96, 96, 16, 16), False,
     _grid_golden(G.sliding_tile(4, 3))),
    ("sta-v-head-size", ap.SlidingTile(tile=4, window=3), Site(grid=(8, 12)), (1, 2, 2, 96, 96, 16, 24), False,
     _grid_golden(G.sliding_tile(4, 3))),
    ("na-partial", ap.Neighborhood(window=5, tile=4), Site(grid=(9, 11)), (1, 2, 2, 99, 99, 16, 16), False,
     _grid_golden(G.neighborhood(5))),
    ("na-joint", ap.Neighborhood(window=4, stride=4), Site(grid=(8, 8), text_len=3, kind="joint"), (1, 2, 1, 67, 67, 16, 16),
     False, _grid_golden(G.neighborhood(4, 4))),
    ("sinkwindow-prefill", ap.SinkWindow(sink=2, window=20, block=16), Site(causal=True), (1, 2, 2, 70, 70, 16, 16), False,
     lambda q, k, v, s, mask=None: G.attention(q, k, v, G.static(G.causal(G.sink_window(2, 20), 0), 70, 70))),
    ("softcap", Softcap(), Site(), (1, 2, 2, 12, 12, 16, 16), False,
     lambda q, k, v, s, mask=None: G.attention(q, k, v, torch.tensor(True).expand(12, 12), cap=5.0)),
]
# the zoo's rows (tests/zoo.py) whose calls are small enough for a float64 backward through their golden
ROWS = [c for c in ZOO if not c.xfail and not isinstance(c.method, NO_GRAD) and c.shape[3] * c.shape[4] <= 100 * 100]
KERNELS = [None] + kernels.names()


def _inputs(B, Hq, Hkv, Sq, Skv, D, Dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g)
    k = torch.randn(B, Hkv, Skv, D, generator=g)
    v = torch.randn(B, Hkv, Skv, Dv, generator=g)
    return q, k, v


def _padding(B, Skv):
    mask = torch.ones(B, 1, 1, Skv, dtype=torch.bool)
    mask[-1, ..., :3] = False  # the last row is left-padded by 3
    return mask


def _grads(fn, q, k, v, go):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, go)


def _attend(method, site, kernel, mask):
    def fn(*t):
        try:
            return ap.attend(*t, method, site, backend=kernel, mask=mask)
        except RuntimeError as e:
            if kernel is not None and str(e).startswith(f"backend {kernel!r} cannot run"):
                pytest.skip(str(e))
            raise
    return fn


def _check(method, site, q, k, v, mask, golden, kernel):
    """The reference kernel's float64 gradients equal the golden's (autograd through the loops); every
    other kernel's float32 gradients keep the flash-attn rule against the float32 reference's error."""
    go = torch.randn(q.shape[:3] + v.shape[-1:], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want_out, want = _grads(lambda *t: golden(*t, site, mask=mask) if mask is not None else golden(*t, site),
                            q.double(), k.double(), v.double(), go)
    if kernel == "reference":
        out, got = _grads(_attend(method, site, kernel, mask), q.double(), k.double(), v.double(), go)
        assert (out - want_out).abs().max() < 1e-10
        for name, g, e in zip("qkv", got, want):
            assert (g - e).abs().max() < 1e-9, name
        return
    q, k, v = q.float(), k.float(), v.float()
    out, got = _grads(_attend(method, site, kernel, mask), q, k, v, go.float())
    _, same = _grads(_attend(method, site, "reference", mask), q, k, v, go.float())
    assert (out.double() - want_out).abs().max() < 1e-5
    for name, g, e, s in zip("qkv", got, want, same):
        assert torch.isfinite(g).all(), name
        err, err_ref = (g.double() - e).abs().max().item(), (s.double() - e).abs().max().item()
        assert err <= 2 * err_ref + ATOL * max(1.0, e.abs().max().item()), (name, err, err_ref)  # floor relative above 1


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda n: n or "auto")
@pytest.mark.parametrize("case", ROWS, ids=[c.id for c in ROWS])
def test_zoo_gradients_match_golden(case, kernel, monkeypatch):
    monkeypatch.setenv("ATTNPATCH_FLEX_COMPILE", "0")  # the GPU compiles per shape; the CPU refuses backward anyway
    site, (q, k, v) = zoo_inputs(case)
    _check(case.method, site, q, k, v, None, lambda *a: golden(case, *a), kernel)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda n: n or "auto")
@pytest.mark.parametrize("case", EXTRAS, ids=[c[0] for c in EXTRAS])
def test_gradients_match_golden(case, kernel, monkeypatch):
    monkeypatch.setenv("ATTNPATCH_FLEX_COMPILE", "0")
    _, method, site, dims, padding, want = case
    q, k, v = _inputs(*dims)
    _check(method, site, q, k, v, _padding(dims[0], dims[4]) if padding else None, want, kernel)


def test_forward_only_kernels_refuse_inputs_that_require_grad(monkeypatch):
    """Not vacuous: the forward-only kernels (triton; flex on CPU) accept the same call without grad and
    refuse it with grad, and selection then picks a kernel with a backward (any v head size)."""
    monkeypatch.setenv("ATTNPATCH_FLEX_COMPILE", "0")
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 2, 96, 96, 16, 16))
    plan = ap.SlidingTile(tile=4, window=3).plan(q, k, Site(grid=(8, 12))).with_site(False, 0)
    forward_only = ["triton"] if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1" else []
    forward_only += ["flex"] if q.device.type == "cpu" else []
    for name in forward_only:
        if name == "triton":
            pytest.importorskip("triton")
        with torch.no_grad():
            assert kernels.get(name).why_not(q, k, v, plan) is None, name
        assert "grad" in kernels.get(name).why_not(q, k, v, plan), name
    for vv in (v, v[..., :8].detach().clone().requires_grad_()):  # selection picks a kernel with a backward
        picked = kernels.select(q, k, vv, plan).name
        assert picked not in forward_only and kernels.get(picked).why_not(q, k, vv, plan) is None, picked


def test_softcapped_dense_backward():
    """Gemma-2's soft-capping (core.run's softcap, a score_mod) with gradients on: on CPU FlexAttention
    has no backward, so another kernel runs it, with the golden's gradients."""
    q, k, v = _inputs(1, 4, 2, 10, 10, 16, 16)
    go = torch.randn(1, 4, 10, 16, generator=torch.Generator().manual_seed(2))
    _, got = _grads(lambda *t: run(*t, ap.Dense(), Site(causal=True), softcap=5.0), q, k, v, go)
    keep = G.static(G.causal(lambda p, j: True, 0), 10, 10)
    _, exact = _grads(lambda *t: G.attention(*t, keep, cap=5.0), q.double(), k.double(), v.double(), go.double())
    for g, e in zip(got, exact):
        assert (g.double() - e).abs().max() < 1e-4


def _train_two_rounds(model, inputs):
    grads = []
    for _ in range(2):  # a second round must not reach into the first round's graph
        model.zero_grad()
        out = model(**inputs)[0]
        out.float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return grads


@pytest.mark.parametrize("family", ["flux", "wan", "sd3"])
def test_patched_diffusers_model_trains_like_reference(family):
    """A tiny model patched with a sparse method (tiles on CPU): forward + backward twice works (reused
    kernel buffers once chained each call's graph to the previous one's, and out= gathers refused
    autograd), and the parameter gradients equal those of the same model run with the reference kernel."""
    from attnpatch.models.tiny import CASES as MODELS

    c = MODELS[family]
    torch.manual_seed(0)
    model = c.build().train()
    twin = copy.deepcopy(model)
    inputs = c.inputs()
    method = ap.Neighborhood(window=3, dense_steps=0)
    with ap.patch(model, method):
        first, second = _train_two_rounds(model, inputs)
    with ap.patch(twin, ap.Neighborhood(window=3, dense_steps=0), backend="reference"):
        _, want = _train_two_rounds(twin, inputs)
    assert first.keys() == want.keys() and len(want) > 0
    for n, g in second.items():
        torch.testing.assert_close(g, first[n], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g, want[n], atol=1e-5, rtol=1e-4)


def test_gemma2_dense_backward_and_decode_without_flex(monkeypatch):
    """Gemma-2 soft-caps its logits (a score_mod): with gradients on, the patched model's parameter
    gradients equal the stock model's (FlexAttention, picked before, has no backward on CPU), and its
    decode steps never go to the flex kernel (which compiled once per key length)."""
    from attnpatch.models.tiny import llm

    stock = llm("gemma2", attn_logit_softcapping=5.0).train()
    patched = copy.deepcopy(stock)
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(3))
    want = _train_two_rounds(stock, dict(input_ids=ids, labels=ids))[1]
    used = []
    real = kernels.select
    monkeypatch.setattr(kernels, "select", lambda *a, **kw: used.append(real(*a, **kw).name) or real(*a, **kw))
    with ap.patch(patched, ap.Dense()):
        got = _train_two_rounds(patched, dict(input_ids=ids, labels=ids))[1]
        with torch.no_grad():
            patched.eval().generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert used and "flex" not in used, set(used)
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, atol=1e-5, rtol=1e-4)
