"""Wall-clock timing shared by the demo and the benchmark scripts.

GPU work is asynchronous: when CUDA is in use, every timed call is bracketed by
``torch.cuda.synchronize()``, so the clock measures the kernels, not their launches."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync() -> None:
    """Wait for queued GPU work (a no-op where CUDA was never initialised: CPU runs pay nothing)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], reps: int = 3, warmup: int = 1, reduce=statistics.median) -> float:
    """``reduce`` (median by default) of ``reps`` wall times of ``fn()`` in seconds, after
    ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return reduce(times)


def timeit_interleaved(fns: dict[str, Callable[[], object]], reps: int = 3, warmup: int = 1,
                       reduce=statistics.median) -> dict[str, float]:
    """Like ``timeit`` for several functions at once, run in turn within every repetition
    (a, b, c, a, b, c, ...), so a slow spell of a shared machine hits all of them alike and
    their ratios stay fair."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync()
            t = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - t)
    return {name: reduce(ts) for name, ts in times.items()}


def rotated(names: list[str], r: int) -> list[str]:
    """Repeat ``r``'s run order: every name once, starting ``r`` places later (a b c, b c a, c a b,
    ...), so no setting always runs right after the same other one (a warm cache or a core
    that throttles after long runs would otherwise favour one setting every time)."""
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def interleave(runs: dict[str, Callable[[], float | None]], repeats: int,
               times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds of every run in every repeat, the runs taken in turn within each repeat (order
    rotating, see ``rotated``), so a slow spell of a shared machine lands on all of them alike.

    A run returns its own seconds (it times only its own work, not set-up around it); a run
    that returns None failed and is left out of later repeats. ``times`` is filled in place,
    so what was measured survives an interrupt; ``times[name][r]`` is repeat ``r``."""
    times = {name: [] for name in runs} if times is None else times
    failed: set[str] = set()
    for r in range(repeats):
        for name in rotated(list(runs), r):
            if name in failed:
                continue
            t = runs[name]()
            if t is None:
                failed.add(name)
            else:
                times.setdefault(name, []).append(t)
    return times


def speedups(times: dict[str, list[float]], ref: str) -> dict[str, dict]:
    """Per name: ``ref``'s time / its time within each repeat (both measured under the same load),
    and their median, min and max over the repeats (``n`` of them; with one the spread says
    nothing). A load spike in one repeat moves one ratio, not the median of three or more."""
    out = {}
    for name, ts in times.items():
        ratios = sorted(s / t for s, t in zip(times.get(ref, []), ts) if t > 0)
        if ratios:
            out[name] = dict(median=statistics.median(ratios), min=ratios[0], max=ratios[-1], n=len(ratios),
                             seconds=statistics.median(ts))
    return out
