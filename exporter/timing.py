"""Time: how long each build stage took (`timed`, with the progress callback every stage takes),
and the wall-clock latency of a callable (`measure`: warm-up, then percentiles over many runs; GPU
timings synchronise inside `fn`, or use CUDA events, before the clock is read)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# A stage's progress callback: "Stage" starts a stage, "Stage: detail" updates it (exporter/cli/__init__.py shows it).
Progress = Callable[[str], None]


def no_progress(_msg: str) -> None:
    """The default Progress: says nothing."""


@contextmanager
def timed(timings: dict[str, float], key: str, say: Progress, msg: str) -> Iterator[None]:
    """Announce a stage with `say(msg)` and record its seconds in `timings[key]`."""
    say(msg)
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = round(time.perf_counter() - t, 3)


def measure(fn: Callable[[], Any], *, warmup: int = 5, runs: int = 50, min_seconds: float = 0.0) -> dict[str, float]:
    """Latency percentiles in milliseconds of `fn()`; runs at least `runs` times and `min_seconds`."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, round(p / 100 * (len(samples) - 1)))]

    return {"p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "mean_ms": statistics.fmean(samples), "runs": len(samples)}
