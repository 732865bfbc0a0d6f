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
