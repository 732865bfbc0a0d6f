"""Score-only plans: Temperature / EntropyScale fold into q (Plan.q_scale) and run on SDPA (their
outputs against the float64 definition: tests/zoo.py); no score-only plan makes a kernel compile per
shape."""
import pytest
import torch

import attnpatch as ap
from attnpatch import Plan, Site, kernels
from attnpatch.plan import fold_q_scale

def _score_plan_method():
    class Tempered(ap.Method):
        def plan(self, q, k, site):
            return Plan(score_mod=lambda s, b, h, qi, kv: s * 0.5, name="tempered")

    return Tempered()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Sq,Skv", [(13, 13), (1, 21), (4, 21)], ids=["prefill", "decode", "chunk"])
@pytest.mark.parametrize("method", [ap.Temperature(tau=0.6), ap.EntropyScale(train_len=8)], ids=["temperature", "entropyscale"])
def test_score_scaling_folds_into_q(method, Sq, Skv, dtype):
    """Temperature / EntropyScale plans are a q_scale (folded into the softmax scale / q's rows), no
    score_mod: plain SDPA runs them. (Their outputs on every kernel against the float64 definition,
    these shapes included: the zoo, tests/zoo.py.)"""
    g = torch.Generator().manual_seed(Sq + Skv)
    q, k = torch.randn(1, 4, Sq, 16, generator=g).to(dtype), torch.randn(1, 2, Skv, 16, generator=g).to(dtype)
    site = Site(causal=True, q_offset=Skv - Sq)
    plan = method.plan(q, k, site)
    assert plan.q_scale is not None and plan.score_mod is None
    fq, _, fplan = fold_q_scale(q, None, plan.with_site(True, Skv - Sq))
    assert kernels.get("sdpa").why_not(fq, k, k, fplan) is None


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
