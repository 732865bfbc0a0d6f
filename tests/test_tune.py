"""Measured kernel choice (attnpatch/kernels/tune.py): a static plan's first calls try the capable kernels
the cost model estimates close to its pick, keep the fastest measured, and every call's output is exact."""
import time

import pytest
import torch
import torch.nn.functional as F

import attnpatch as ap
from attnpatch import core, kernels
from attnpatch.kernels import tune
from attnpatch.plan import materialise_mask
from attnpatch.site import Site


@pytest.fixture
def tuning():
    tune.enabled(True)
    yield
    tune.enabled(False)


def _call():
    """A Wan-shaped video call (4 x 8 x 8 tokens, 12 heads of 128) with a static Neighborhood plan."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, 256, 128, generator=g) for _ in range(3))
    site = Site(grid=(4, 8, 8), layer=0, step=10, steps=20, timestep=0.5)
    return q, k, v, ap.Neighborhood(window=(3, 3, 3), dense_steps=0), site


def _expected(q, k, v, method, site):
    plan = method.plan(q, k, site).with_site(False, 0)
    keep = materialise_mask(plan, 1, q.shape[1], q.shape[2], k.shape[2], "cpu")
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep).float()


def _picks(q, k, v, method, site, n):
    """(kernel run by each of n calls, whether it was a trial), each output checked against the reference."""
    want, out = _expected(q, k, v, method, site), []
    for _ in range(n):
        before = tune.UNSETTLED[0]
        orig = kernels.select
        seen = []
        kernels.select = lambda *a, **kw: seen.append(orig(*a, **kw)) or seen[-1]
        try:
            got = core.run(q, k, v, method, site)
        finally:
            kernels.select = orig
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        out.append((seen[0].name, tune.UNSETTLED[0] != before))
    return out


def test_the_tuner_keeps_the_measured_fastest_even_against_the_cost_model(tuning, monkeypatch):
    q, k, v, method, site = _call()
    first = _picks(q, k, v, method, site, 1)[0][0]  # the cost model's pick, on a signature seen once
    slow = kernels.get(first)
    run = type(slow).run
    monkeypatch.setattr(type(slow), "run", lambda self, *a, **kw: (time.sleep(0.05), run(self, *a, **kw))[1])
    picks = _picks(q, k, v, method, site, 16)
    tried = {name for name, trial in picks if trial}
    assert first in tried and len(tried) >= 2, picks  # the pick and at least one other capable kernel were timed
    settled = [name for name, trial in picks if not trial]
    assert settled and all(name == settled[-1] for name in settled), picks  # one final choice, kept
    assert settled[-1] != first, picks  # the slowed pick lost to a measured faster exact kernel
    assert sum(trial for _, trial in picks) <= 1 + (1 + tune.TRIALS) * len(kernels.names()), picks


def test_a_shape_seen_once_is_never_tried_and_tuning_off_keeps_the_cost_model(tuning):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 256, 32, generator=g) for _ in range(3))
    method = ap.Power(local=16)
    orig, seen = kernels.select, []
    kernels.select = lambda *a, **kw: seen.append(orig(*a, **kw)) or seen[-1]
    try:
        for n in range(200, 256, 8):  # growing lengths, as decode steps or new prompts: each signature once
            core.run(q[:, :, :n], k[:, :, :n], v[:, :, :n], method, Site(causal=True, layer=0))
    finally:
        kernels.select = orig
    assert seen and not any(isinstance(kr, tune.Trial) for kr in seen)
    q, k, v, method, site = _call()
    tune.enabled(False)
    model = _picks(q, k, v, method, site, 1)[0][0]
    assert _picks(q, k, v, method, site, 8) == [(model, False)] * 8
