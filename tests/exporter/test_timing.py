"""exporter.timing.compare: alternating rounds, min/median/spread, and the noise warning (issue 21)."""

from __future__ import annotations

import time

from exporter.timing import NOISY_SPREAD, compare, noise_warning


def test_rounds_alternate_and_report_min_median_and_spread():
    calls: list[str] = []

    def work(name: str, seconds: float):
        def fn():
            calls.append(name)
            time.sleep(seconds)
        return fn

    out = compare({"a": work("a", 0.001), "b": work("b", 0.002)}, rounds=4, runs=3, warmup=2)
    timed = calls[4:]  # after 2 warm-up calls each
    blocks = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert [b[0] for b in blocks] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # order flips every round
    for name in "ab":
        t = out[name]
        assert t["runs"] == 12 and len(t["round_p50_ms"]) == 4
        assert t["min_ms"] <= t["p50_ms"] <= t["p90_ms"] and t["spread"] >= 0
    assert out["b"]["min_ms"] > out["a"]["min_ms"]


def test_a_machine_that_slows_down_midway_is_flagged():
    state = {"n": 0}

    def drifting():
        state["n"] += 1
        time.sleep(0.001 if state["n"] <= 10 else 0.004)  # quiet for two rounds, then four times slower

    out = compare({"steady": lambda: time.sleep(0.001), "drifting": drifting}, rounds=4, runs=5, warmup=0)
    assert out["drifting"]["spread"] > NOISY_SPREAD
    warning = noise_warning(out)
    assert warning is not None and warning.startswith("timings are noisy: drifting's round medians spread over")
    assert noise_warning({"x": {"spread": 0.05}}) is None
