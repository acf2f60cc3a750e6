"""Time: how long each build stage took (`timed`, with the progress callback every stage takes),
the wall-clock latency of a callable (`measure`: warm-up, then percentiles over many runs; GPU
timings synchronise inside `fn`, or use CUDA events, before the clock is read), and of several
callables against each other (`compare`: alternating rounds, so a machine that gets busier or quieter
while it runs shifts every variant alike, with the spread between rounds shown)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

# Round medians whose interquartile range exceeds this fraction of the overall median make a ratio untrustworthy.
NOISY_SPREAD = 0.25

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


def compare(fns: Mapping[str, Callable[[], Any]], *, rounds: int = 8, runs: int = 8, warmup: int = 5) -> dict[str, dict[str, Any]]:
    """Latency of several callables in alternating rounds: each warms up `warmup` times, then every
    round runs each `runs` times, the order reversed every other round (A B, B A, ...). Per name:
    min_ms, p50_ms (all runs), p90_ms, mean_ms, runs, round_p50_ms (each round's median) and
    spread: the interquartile range of the round medians over p50, how much the rounds disagree (one
    disturbed round moves neither the median nor the spread much)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    rounds_p50: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            fn, taken = fns[name], []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                taken.append((time.perf_counter() - t0) * 1e3)
            samples[name] += taken
            rounds_p50[name].append(statistics.median(taken))
    out = {}
    for name, xs in samples.items():
        xs.sort()
        p50 = statistics.median(xs)
        out[name] = {"min_ms": xs[0], "p50_ms": p50, "p90_ms": xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))],
                     "mean_ms": statistics.fmean(xs), "runs": len(xs), "round_p50_ms": rounds_p50[name],
                     "spread": _iqr(rounds_p50[name]) / p50 if p50 > 0 else 0.0}
    return out


def _iqr(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q3 - q1


def noise_warning(timings: Mapping[str, Mapping[str, Any]]) -> str | None:
    """One line when any variant's rounds disagree by more than NOISY_SPREAD, else None."""
    noisy = {n: t["spread"] for n, t in timings.items() if t.get("spread", 0.0) > NOISY_SPREAD}
    if not noisy:
        return None
    worst = max(noisy, key=lambda n: noisy[n])
    return (f"timings are noisy: {worst}'s round medians spread over {noisy[worst]:.0%} of its median (interquartile "
            "range; a busy or shared machine): read the speedup as approximate, or rerun on a quiet machine")
