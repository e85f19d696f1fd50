"""Timing helper shared by the benchmark scripts."""

import statistics
import time


def median_seconds(function, warmup: int, repeat: int, calls: int = 1) -> float:
    """Median seconds per call of `function(calls)`-style work: `warmup` untimed runs, then `repeat` timed
    blocks; `function` is called with `calls` and must do that many evaluations."""
    for _ in range(warmup):
        function(calls)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function(calls)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)
