"""The steps attnpatch.core applies around a kernel (softcap, transform, extra_kv, q_scale fold,
output, parts) are the same for every kernel, the reference included: a kernel is handed only the
plan they leave, a named backend runs every part of a call (PAG's perturbed rows too), and every
capable kernel keeps the flash-attn rule against a float64 truth. Also: the preference table
decides which capable kernel runs, and a flex call leaves torch._dynamo's config as it found it."""
from __future__ import annotations

import math

import pytest
import torch

import attnpatch as ap
from attnpatch import Site, core, kernels
from attnpatch.plan import Plan

try:  # the float64 goldens of guided / calibrated methods (tests/goldens.py before they moved)
    import goldens_guided as G
except ImportError:
    import goldens as G

FLOOR32 = 1e-6
CORE_STEPS = ("transform", "extra_kv", "output", "parts")  # Plan fields core applies around every kernel
PAG_SITE = Site(grid=(3, 4), text_len=4, kind="joint", roles=("cond", "perturbed", "perturbed"))
CASES = [  # (id, method, site, (B, Hq, Hkv, S, D), softcap, float64 truth(q, k, v, site))
    ("pag", ap.PAG(), PAG_SITE, (3, 2, 2, 16, 64), None, lambda q, k, v, s: G.pag(q, k, v, s, [1, 2])),
    ("softpag-heads-gqa", ap.PAG(soft=0.4, heads=[1, 2]), PAG_SITE, (3, 4, 2, 16, 64), None,
     lambda q, k, v, s: G.pag(q, k, v, s, [1, 2], heads=[1, 2], soft=0.4)),
    ("shared", ap.SharedAttention(), Site(grid=(4, 4)), (3, 2, 2, 16, 64), None, lambda q, k, v, s: G.shared(q, k, v, s, ())),
    ("sinkcal", ap.SinkCalibration(threshold=2.0, beta=0.4), Site(causal=True), (1, 2, 2, 24, 64), None, None),
    ("softcap", ap.Dense(), Site(causal=True), (1, 4, 2, 20, 64), 5.0, None),
    ("softcap-temperature", ap.Temperature(tau=0.7), Site(causal=True), (1, 2, 2, 20, 64), 3.0, None),
]


def softcapped(q, k, v, cap, q_mult=1.0):
    """Causal attention with Gemma-2 logit soft-capping, from the definition, in float64: scores
    (times a temperature's q_mult) capped as cap * tanh(s / cap)."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) * q_mult
    s = cap * torch.tanh(s / cap)
    S = q.shape[2]
    s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def _inputs(cid, shape):
    B, Hq, Hkv, S, D = shape
    g = torch.Generator().manual_seed(sum(map(ord, cid)))
    q, k, v = (torch.randn(B, h, S, D, generator=g) for h in (Hq, Hkv, Hkv))
    k[:, :, 3] = 4 * q.mean(2).reshape(B, Hkv, -1, D).mean(2)  # a strong key column: SinkCalibration finds a sink
    return q, k, v


def _truth(case, q, k, v):
    cid, method, site, _, cap, golden = case
    if golden is not None:
        return golden(q.double(), k.double(), v.double(), site)
    if cap is not None:
        return softcapped(q, k, v, cap, 1 / method.tau if isinstance(method, ap.Temperature) else 1.0)
    # no golden here (tests/test_goldens.py holds SinkCalibration's): the float64 reference kernel
    return core.run(q.double(), k.double(), v.double(), method, site, backend="reference")


def _run(q, k, v, method, site, backend, cap):
    try:
        return core.run(q, k, v, method, site, backend=backend, softcap=cap)
    except RuntimeError as e:
        if str(e).startswith(f"backend {backend!r} cannot run"):
            pytest.skip(str(e))
        raise


@pytest.mark.parametrize("backend", kernels.names())
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_kernel_keeps_the_flash_attn_rule(case, backend, monkeypatch):
    monkeypatch.setenv("ATTNPATCH_FLEX_COMPILE", "0")  # compiled flex: a compile per shape takes minutes on CPU
    cid, method, site, shape, cap, _ = case
    q, k, v = _inputs(cid, shape)
    want = _truth(case, q, k, v)
    out = _run(q, k, v, method, site, backend, cap)
    ref = core.run(q, k, v, method, site, backend="reference", softcap=cap)
    err, err_ref = ((x.double() - want).abs().max().item() for x in (out, ref))
    assert err <= 2 * err_ref + FLOOR32, f"{cid} on {backend}: error {err} vs float32 reference {err_ref}"


class Recorder(kernels.Kernel):
    """The reference kernel under another name, recording every plan it is handed."""

    name = "recorder-test"

    def __init__(self):
        self.plans = []

    def run(self, q, k, v, plan, *, mask=None, scale=None):
        self.plans.append(plan)
        return kernels.get("reference").run(q, k, v, plan, mask=mask, scale=scale)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_named_backend_runs_every_step_of_the_call(case):
    """A named backend computes every part of the call (PAG's perturbed rows were an SDPA call of
    their own, whatever the backend) and is never handed a step core applies around it."""
    cid, method, site, shape, cap, _ = case
    q, k, v = _inputs(cid, shape)
    rec = kernels.register(Recorder())
    try:
        out = core.run(q, k, v, method, site, backend=rec.name, softcap=cap)
    finally:
        kernels._REGISTRY[:] = [x for x in kernels._REGISTRY if x.name != rec.name]
    ref = core.run(q, k, v, method, site, backend="reference", softcap=cap)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert rec.plans and all(not getattr(p, f, None) for p in rec.plans for f in CORE_STEPS)
    if isinstance(method, ap.PAG):
        assert len(rec.plans) == 2 and rec.plans[1].mask_mod is not None  # the identity rows ran here too


@pytest.mark.parametrize("field,value", [("transform", lambda q, k, v: (q, k, v)), ("output", lambda o, q, k, v, s: o),
                                         ("extra_kv", lambda k, v: (k, v))])
def test_no_kernel_accepts_a_core_step(field, value):
    """Handed directly a plan that still carries a step core applies around kernels, every kernel
    refuses it (a kernel running it would silently skip the step)."""
    q = k = v = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match=f"no kernel can run.*sdpa: plan.{field}"):
        kernels.select(q, k, v, Plan(**{field: value}))


def test_preference_table_decides_the_order(monkeypatch):
    """The first capable kernel of the device's list runs: moving reference first selects it."""
    q = k = v = torch.randn(1, 2, 8, 16)
    assert kernels.select(q, k, v, Plan()).name == "sdpa"
    order = kernels.PREFERENCE[("cpu", "plain")]
    monkeypatch.setitem(kernels.PREFERENCE, ("cpu", "plain"), ["reference"] + [n for n in order if n != "reference"])
    assert kernels.select(q, k, v, Plan()).name == "reference"
    # buckets leads every masked list but runs only plans with Plan.buckets; after it, the default list's order
    assert [x.name for x in kernels.preference("xpu", Plan(mask_mod=lambda b, h, i, j: i >= j))][:3] == ["buckets", "tiles", "sdpa"]


def test_flex_call_leaves_dynamo_config_unchanged(monkeypatch):
    """flex raises dynamo's recompile limit only while its own calls run, never for good."""
    monkeypatch.setenv("ATTNPATCH_FLEX_COMPILE", "0")
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    before = cfg.get_config_copy() if hasattr(cfg, "get_config_copy") else None
    limit = getattr(cfg, name)
    q, k, v = _inputs("flex", (1, 2, 2, 16, 16))
    out = ap.attend(q, k, v, ap.SlidingTile(tile=2, window=3), Site(grid=(4, 4)), backend="flex")
    assert out.shape == q.shape
    assert getattr(cfg, name) == limit < 256  # a raise that stayed would read 256 here
    if before is not None:
        assert cfg.get_config_copy() == before


def _masked(q, k, v, keep):
    """Float64 attention of one (b, h) slice (S, D) under a boolean keep matrix (S, S)."""
    s = (q @ k.T / math.sqrt(q.shape[-1])).masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("mask_shape", [(3, 1, 16, 16), (2, 16, 16), (16, 16)])
def test_pag_part_sees_the_calls_mask(mask_shape):
    """The perturbed rows run with the call's own mask (their batch rows and heads of it), as every
    other row does; compared with masked attention written out per (row, head) in float64."""
    q, k, v = (x.double() for x in _inputs("pag-mask", (3, 2, 2, 16, 64)))
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., torch.arange(16), torch.arange(16)] = True  # every query keeps its own key
    out = core.run(q, k, v, ap.PAG(soft=0.5), PAG_SITE, mask=mask)
    image = torch.zeros(16, dtype=torch.bool)
    image[4:] = True  # 4 text tokens first, then the 3x4 image
    ident = ~(image[:, None] & image[None, :]) | torch.eye(16, dtype=torch.bool)
    full = mask.expand(3, 2, 16, 16)
    for b in range(3):
        for h in range(2):
            dense = _masked(q[b, h], k[b, h], v[b, h], full[b, h])
            want = dense if b == 0 else 0.5 * dense + 0.5 * _masked(q[b, h], k[b, h], v[b, h], full[b, h] & ident)
            torch.testing.assert_close(out[b, h], want, rtol=0, atol=1e-12)
