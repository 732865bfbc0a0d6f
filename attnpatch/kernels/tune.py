"""Measured kernel choice for repeated static plans: the cost model (kernels/cost.py) ranks the capable
kernels from constants fitted on one machine, and near a crossover it can pick a kernel 1.2-1.5x slower
than another exact one (measured on the 2-core CPU: Power at 256 tokens on ``lines`` 1.46x stock where
masked SDPA ran 1.03x; a Wan 4x8x8 Neighborhood on ``tiles`` 1.15x vs SDPA 1.04x). A static plan runs the
same shapes on every layer and step, so its first calls can measure instead.

From the ``MIN_SEEN``-th call of a plan at one call shape (shapes, dtype, device, threads, mask) the next
calls run, in turn, each candidate: the cost model's pick and every capable kernel it estimates within
``SPAN`` of the best estimate. Each candidate's first run is a warm-up (layouts, masks, buffers are built
then), the next ``TRIALS`` or more are timed (short calls get up to ``MAX_TRIALS``, ``TRIAL_S`` of timing
each: two runs of a 0.3 ms call decided by noise on a loaded machine); the fastest minimum wins, but
replaces the cost model's pick only when at least ``MARGIN`` faster, and stays with the plan for that shape
(the trials live on the plan object: a static plan is one object per method, shape and geometry). Every
candidate is exact, so a trial costs time, never accuracy; the calls that run trials return their own
kernel's output. A shape seen once (decode steps, whose key length grows every call) is never tried.
Kernels without an estimate are not tried (flex and triton compile, the reference is an oracle), except
``UNMODELLED`` ones (gather, whose estimate is withheld above head dim 32; classes, never estimated); devices without cost constants
(CUDA today) keep the model's preference order. ``ATTNPATCH_TUNE=0`` (or ``enabled(False)``) keeps the
cost model's choice alone (the test suite does, so kernel choices in tests are deterministic)."""
from __future__ import annotations

import math
import os
import threading
import time

import torch

from . import cost
from .base import Kernel

SPAN = 2.0  # candidates: estimated within this multiple of the best estimate (misses seen: up to 1.5x)
# capable kernels tried even without an estimate: gather's is withheld above head dim 32, where it ran
# 0.6-1.9x the time of the kernel chosen (SmolLM2 Power at 1K: 0.93x stock where lines ran 1.15x)
UNMODELLED = ("gather", "classes")  # classes: a few near-dense calls, which the model does not rate
TRIALS = 2  # timed runs per candidate at least, after its warm-up run
# short calls get more: on the 2-core CPU under load, two runs of 64-token calls picked gather for a Wan 1x8x8
# Neighborhood (1.4x masked SDPA's time measured over 100 interleaved runs) and sdpa for the fixture's 32x32
# SlidingTile (1.33x stock where tiles ran 1.06x); a few ms of trials per candidate cost nothing at those sizes
MAX_TRIALS = 12
# timed seconds a candidate gets at least (up to MAX_TRIALS runs), from its warm-up run's time; 4 ms gave a 5 ms call
# two runs, and a full per-call run on 2 threads once kept tiles (1.18x stock) for the fixture's 32x32 SlidingTile
# where classes ran 0.79x: 15 ms gives those calls three or four runs each, ~0.1 s once per plan and shape
TRIAL_S = 0.015
MARGIN = 0.03  # another kernel replaces the cost model's pick only when its best run is this much faster
# a close call gets more runs before it is decided: when the fastest candidate and the one it is judged against (the
# cost model's pick, or the runner-up when that is the fastest) are within CLOSE, both run on until each has CLOSE_S of
# timing (at most MAX_TRIALS runs). On the 2-core CPU at 2 threads, the fixture's 1,040-token InwardWindow runs gather
# 1.09x and masked SDPA 1.17x stock (60 interleaved runs), and three or four runs each picked SDPA in full per-call runs
CLOSE = 0.15
CLOSE_S = 0.06
MIN_SEEN = 2  # calls of a signature before trials start
_ENABLED = [os.environ.get("ATTNPATCH_TUNE", "1") != "0"]
_LOCK = threading.Lock()
UNSETTLED = [0]  # calls that ran a kernel not yet final (benchmarks warm up until a call adds none)


def enabled(on: bool | None = None) -> bool:
    """Whether measured choice is on; ``enabled(False)`` / ``enabled(True)`` switches it (and forgets
    what was measured)."""
    if on is not None:
        from . import invalidate  # kernels/__init__ imports this module: at call time

        _ENABLED[0] = bool(on)
        invalidate()  # its epoch is in every call key: choices and trials remembered on plans go too
    return _ENABLED[0]


def applies(plan) -> bool:
    """Only static masked plans: a method returns the same plan for every layer and step of a shape."""
    return _ENABLED[0] and plan.static and plan.mask_mod is not None


class _State:
    """One signature's trials: candidates in the order they run, each one's run count and timed seconds."""

    def __init__(self):
        self.seen, self.cands, self.runs, self.times, self.winner = 1, None, {}, {}, None
        self.want = {}  # runs each candidate needs (its warm-up sets it)
        self.extended = False  # a close call's extra runs were granted (once)

    def next(self) -> Kernel | None:
        left = [kr for kr in self.cands if self.runs[kr.name] < self.want.get(kr.name, 1 + TRIALS)]
        return min(left, key=lambda kr: self.runs[kr.name]) if left else None  # in turn: load hits them alike

    def record(self, kernel: Kernel, seconds: float) -> None:
        with _LOCK:
            self.runs[kernel.name] += 1
            if self.runs[kernel.name] > 1:  # the first run of each is its warm-up
                self.times[kernel.name].append(seconds)
            else:
                self.want[kernel.name] = 1 + min(MAX_TRIALS, max(TRIALS, math.ceil(TRIAL_S / max(seconds, 1e-9))))
            if self.winner is None and self.next() is None and not self._extend():
                self.winner = self.fastest()

    def _extend(self) -> bool:
        """Whether a close call was given more runs (``CLOSE``, ``CLOSE_S``): once, for the fastest candidate and
        the one it is judged against."""
        if self.extended or len(self.cands) < 2:
            return False
        self.extended = True
        best = min(self.cands, key=lambda kr: min(self.times[kr.name]))
        other = self.cands[0] if best is not self.cands[0] else \
            min((kr for kr in self.cands if kr is not best), key=lambda kr: min(self.times[kr.name]))
        lo, hi = sorted(min(self.times[kr.name]) for kr in (best, other))
        if hi >= (1 + CLOSE) * lo:
            return False
        more = False
        for kr in (best, other):
            want = 1 + min(MAX_TRIALS, max(len(self.times[kr.name]), math.ceil(CLOSE_S / max(min(self.times[kr.name]), 1e-9))))
            if want > self.runs[kr.name]:
                self.want[kr.name], more = want, True
        return more

    def fastest(self) -> Kernel:
        """The candidate with the least best time; the cost model's pick (the first) unless beaten by ``MARGIN``."""
        picked, best = self.cands[0], min(self.cands, key=lambda kr: min(self.times[kr.name]))
        return best if min(self.times[best.name]) < (1 - MARGIN) * min(self.times[picked.name]) else picked


def _candidates(picked: Kernel, capable: list, q, k, v, plan, mask) -> list:
    c = cost.constants(q.device.type, torch.get_num_threads())
    if c is None:
        return [picked]  # no estimates: which kernels would be safe to try is unknown (compiling ones)
    est = {kr.name: cost.estimate(kr.name, c, q, k, v, plan, mask) for kr in capable}
    best = min((e for e in est.values() if e < math.inf), default=math.inf)
    return [picked] + [kr for kr in capable if kr is not picked
                       and (est[kr.name] <= SPAN * best or (est[kr.name] == math.inf and kr.name in UNMODELLED))]


def choose(key, picked: Kernel, capable, q, k, v, plan, mask) -> tuple[Kernel, bool]:
    """(the kernel to run this call, whether the choice is final). The trials live on the plan (a static
    plan is one object per method, shape and geometry) under ``key`` (the call shape); ``capable`` gives
    the capable kernels in ranked order (called once per plan and shape). ``key`` holds the registry's epoch,
    so ``kernels.invalidate()`` starts the trials anew."""
    got = _choose(key, picked, capable, q, k, v, plan, mask)
    if not got[1]:
        UNSETTLED[0] += 1
    return got


def _choose(key, picked: Kernel, capable, q, k, v, plan, mask) -> tuple[Kernel, bool]:
    with _LOCK:
        got = plan.__dict__.get("_tune")
        if got is None or got[0] != key:
            object.__setattr__(plan, "_tune", (key, _State()))
            return picked, False
        st = got[1]
        if st.winner is not None:
            return st.winner, True
        st.seen += 1
        fresh = st.cands is None and st.seen >= MIN_SEEN
    if fresh:
        cands = _candidates(picked, capable(), q, k, v, plan, mask)
        with _LOCK:
            if st.cands is None:
                st.cands, st.runs, st.times = cands, {kr.name: 0 for kr in cands}, {kr.name: [] for kr in cands}
                if len(cands) == 1:
                    st.winner = cands[0]
    with _LOCK:
        if st.cands is None:
            return picked, False
        if st.winner is not None:
            return st.winner, True
        nxt = st.next()
    return (Trial(nxt, st), False) if nxt is not None else (picked, False)


class Trial(Kernel):
    """``kernel`` run and timed for the tuner (same name, same result)."""

    def __init__(self, kernel: Kernel, state: _State):
        self.kernel, self.state, self.name = kernel, state, kernel.name

    def why_not(self, q, k, v, plan, mask=None):
        return self.kernel.why_not(q, k, v, plan, mask)

    def run(self, q, k, v, plan, *, mask=None, scale=None):
        sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
        sync()
        t = time.perf_counter()
        out = self.kernel.run(q, k, v, plan, mask=mask, scale=scale)
        sync()
        self.state.record(self.kernel, time.perf_counter() - t)
        return out

    def release(self) -> int:
        return self.kernel.release()
