"""Timing and output helpers shared by the benchmark scripts."""

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


def repeated_seconds(function, min_repeats: int, max_repeats: int, min_seconds: float) -> list:
    """Seconds of each call of `function()`: at least `min_repeats` calls, more while under `min_seconds` in
    total, at most `max_repeats`."""
    times = []
    deadline = time.perf_counter() + min_seconds
    while len(times) < min_repeats or (time.perf_counter() < deadline and len(times) < max_repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def write_results(out, payload: dict, lines: list) -> None:
    """<out>.json (every number) and <out>.md (the table), and the table on standard output."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
