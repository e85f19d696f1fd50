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


def write_results(out, payload: dict, lines: list) -> None:
    """<out>.json (every number) and <out>.md (the table), and the table on standard output."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
