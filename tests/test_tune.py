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
    core.REMEMBER[0] = False  # every call through kernels.select, which _picks watches (core's call memo skips it)
    yield
    tune.enabled(False)
    core.REMEMBER[0] = True


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
    assert sum(trial for _, trial in picks) <= 1 + (1 + tune.MAX_TRIALS) * len(kernels.names()), picks


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


class _Fake:
    def __init__(self, name):
        self.name = name


def _state(*names):
    st = tune._State()
    st.cands = [_Fake(n) for n in names]
    st.runs, st.times = {n: 0 for n in names}, {n: [] for n in names}
    return st


def _run_trials(st, seconds):
    """Run the state's trials to the end, each candidate timing ``seconds[name](i)`` on its i-th run; the runs made."""
    made = []
    while st.winner is None:
        kr = st.next()
        made.append(kr.name)
        st.record(kr, seconds[kr.name](st.runs[kr.name]))
    return made


def test_short_calls_get_more_trials_in_turn_and_a_near_tie_keeps_the_cost_model_s_pick():
    st = _state("model", "other")
    # 0.4 ms calls: TRIAL_S of timing needs more than TRIALS runs; the other kernel 1 % faster (within MARGIN)
    made = _run_trials(st, {"model": lambda i: 4e-4, "other": lambda i: 4e-4 * 0.99})
    assert all(1 + tune.TRIALS < made.count(n) <= 1 + tune.MAX_TRIALS for n in ("model", "other")), made
    assert made[:4] == ["model", "other", "model", "other"]  # interleaved, so a slow spell hits both
    assert st.winner.name == "model"
    # clearly faster (10 %): it wins
    st = _state("model", "other")
    _run_trials(st, {"model": lambda i: 4e-4, "other": lambda i: 3.6e-4})
    assert st.winner.name == "other"


def test_one_noisy_run_does_not_decide_and_long_calls_keep_the_minimum_of_trials():
    # the faster kernel's first timed run is hit by a 3x slow spell: the minimum over its trials still finds it
    st = _state("model", "other")
    _run_trials(st, {"model": lambda i: 1e-3, "other": lambda i: 3e-3 if i == 2 else 5e-4})
    assert st.winner.name == "other"
    # a long call (50 ms) gets TRIALS timed runs, not more
    st = _state("model", "other")
    made = _run_trials(st, {"model": lambda i: 0.05, "other": lambda i: 0.06})
    assert made.count("model") == 1 + tune.TRIALS and st.winner.name == "model"


def test_a_close_call_gets_more_runs_and_a_clear_one_does_not():
    # 5 ms calls, the faster kernel's first three timed runs in a slow spell (5.5 ms, within CLOSE of the model's
    # 5 ms): without more runs the model's pick would stay; with them the faster kernel's later runs decide
    st = _state("model", "other")
    made = _run_trials(st, {"model": lambda i: 5e-3, "other": lambda i: 5.5e-3 if i <= 3 else 4.5e-3})
    assert st.winner.name == "other" and made.count("other") > 1 + 3, made
    assert all(made.count(n) <= 1 + tune.MAX_TRIALS for n in ("model", "other"))
    # 30 % apart: decided on the first runs (15 ms of timing each: four runs with the warm-up)
    st = _state("model", "other")
    made = _run_trials(st, {"model": lambda i: 5e-3, "other": lambda i: 6.5e-3})
    assert st.winner.name == "model" and made.count("model") == 4 and made.count("other") == 4, made
