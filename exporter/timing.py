"""Wall-clock latency of a callable: warm-up, then percentiles over many runs (CPU timings).
GPU timings synchronise inside `fn` (or use CUDA events) before the clock is read."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


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
