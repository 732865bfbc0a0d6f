"""Score-only plans: Temperature / EntropyScale fold into q (Plan.q_scale) and run on SDPA, exact
against the float64 definition; no score-only plan makes a kernel compile per shape."""
import pytest
import torch

import attnpatch as ap
from attnpatch import Plan, Site, kernels
from attnpatch.kernels import reference

DTYPES = {torch.float32: 1e-6, torch.bfloat16: 1e-3}  # absolute floor under the flash-attn 2x rule


def _score_plan_method():
    class Tempered(ap.Method):
        def plan(self, q, k, site):
            return Plan(score_mod=lambda s, b, h, qi, kv: s * 0.5, name="tempered")

    return Tempered()


def _scaled_by_definition(q, k, v, factor, causal, q_offset=0):
    """float64 attention with every score of row i multiplied by factor(i), from the definition."""
    q, k, v = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], 1), v.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, H, Sq, Skv)
    s = s * torch.tensor([factor(i) for i in range(q.shape[2])], dtype=torch.float64).view(1, 1, -1, 1)
    if causal:
        i, j = torch.arange(q.shape[2]).view(-1, 1), torch.arange(k.shape[2]).view(1, -1)
        s = s.masked_fill(j > i + q_offset, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Sq,Skv", [(13, 13), (1, 21), (4, 21)], ids=["prefill", "decode", "chunk"])
@pytest.mark.parametrize("which", ["temperature", "entropyscale"])
def test_score_scaling_folds_into_q_exactly(which, Sq, Skv, dtype):
    """Temperature / EntropyScale fold into the softmax scale / q's rows (Plan.q_scale) and run on plain
    SDPA; equal to the float64 definition within the flash-attn rule."""
    import math

    g = torch.Generator().manual_seed(Sq + Skv)
    q, k, v = torch.randn(1, 4, Sq, 16, generator=g), torch.randn(1, 2, Skv, 16, generator=g), torch.randn(1, 2, Skv, 16, generator=g)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    off = Skv - Sq
    site = Site(causal=True, q_offset=off)
    if which == "temperature":
        method, factor = ap.Temperature(tau=0.6), lambda i: 1 / 0.6
    else:
        method, factor = ap.EntropyScale(train_len=8), lambda i: max(1.0, math.log(min(i + off + 1, Skv)) / math.log(8))
    plan = method.plan(q, k, site)
    assert plan.q_scale is not None and plan.score_mod is None
    exact = _scaled_by_definition(q, k, v, factor, True, off)
    out = ap.attend(q, k, v, method, site, backend="sdpa")
    same = reference.attention(q, k, v, plan.with_site(True, off), dtype=torch.float32).to(dtype).double()
    err, err_ref = (out.double() - exact).abs().max().item(), (same - exact).abs().max().item()
    assert err <= 2 * err_ref + DTYPES[dtype], (err, err_ref)


def test_score_only_plans_never_compile_per_shape_on_cpu(monkeypatch):
    """Property: for decode- and prefill-shaped calls whose lengths change every call, a score-only plan
    (Temperature, EntropyScale, a general score_mod such as Gemma-2's soft-capping) never selects the
    compiled flex kernel on CPU (it compiled once per key length: tens of seconds per decode step)."""
    monkeypatch.setenv("ATTNPATCH_FLEX_COMPILE", "1")
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)  # as with a C++ compiler present
    from attnpatch.core import _run_plan
    from attnpatch.plan import fold_q_scale

    chosen = []
    monkeypatch.setattr(kernels, "select", lambda q, k, v, plan, mask=None, backend=None, _s=kernels.select:
                        chosen.append(_s(q, k, v, plan, mask=mask, backend=backend)) or chosen[-1])
    g = torch.Generator().manual_seed(0)
    for method in (ap.Temperature(tau=0.8), ap.EntropyScale(train_len=4), _score_plan_method(), ap.Dense()):
        for Sq, Skv in [(9, 9), (17, 17), (1, 18), (1, 19), (1, 20), (3, 23)]:
            site = Site(causal=True, q_offset=Skv - Sq)
            q, k, v = torch.randn(1, 2, Sq, 16, generator=g), torch.randn(1, 2, Skv, 16, generator=g), torch.randn(1, 2, Skv, 16, generator=g)
            _run_plan(q, k, v, method.plan(q, k, site), site, None, None, None, 30.0 if isinstance(method, ap.Dense) else None)
    assert chosen and all(kern.name != "flex" for kern in chosen), [kern.name for kern in chosen]
