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
