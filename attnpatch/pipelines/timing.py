"""Wall-clock timing shared by the demo and the benchmark scripts."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def timeit(fn: Callable[[], object], reps: int = 3, warmup: int = 1, reduce=statistics.median) -> float:
    """``reduce`` (median by default) of ``reps`` wall times of ``fn()`` in seconds, after
    ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
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
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: reduce(ts) for name, ts in times.items()}
