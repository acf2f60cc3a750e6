"""Run the parity gate: reference (torch fp32, or ORT on the fp32 ONNX) vs an engine runner,
on real data (--data) or on inputs generated at the min, opt and max shapes of every dim."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from runtimes.base import Runner
from runtimes.manifest import IOSpec
from runtimes.samples import SHAPE_POINTS, generate_feeds

from .parity import ParityReport, TolerancePolicy, compare_case

Feeds = dict[str, np.ndarray]


def gate_cases(io: IOSpec, *, data: Path | None = None, tokenizer_dir: Path | None = None, seed: int = 0,
               max_data_batches: int = 8) -> list[tuple[str, Feeds]]:
    """Labelled feed dicts: 'data[i]' batches from --data (real inputs), then one generated case per
    distinct min/opt/max shape, so the dynamic ranges are exercised even when the data is short."""
    cases: list[tuple[str, Feeds]] = []
    if data is not None:
        from calibration.data import load_feeds

        batch_dim = next((d for s in io.inputs for d in s.shape[:1] if isinstance(d, str)), None)
        batch = min(8, io.dims[batch_dim].max) if batch_dim in io.dims else 1
        feeds = load_feeds(data, io, tokenizer_dir=tokenizer_dir, batch_size=batch)
        cases += [(f"data[{i}]", f) for i, f in enumerate(feeds[:max_data_batches])]
    seen = set()
    for i, point in enumerate(SHAPE_POINTS):
        key = tuple(sorted((k, r.at(point)) for k, r in io.dims.items()))
        if key in seen:
            continue
        seen.add(key)
        label = point + (" (" + ", ".join(f"{k}={v}" for k, v in key) + ")" if key else "")
        cases.append((label, generate_feeds(io, point, seed=seed + i)))
    return cases


def run_gate(
    reference: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
    runner: Runner,
    cases: Sequence[tuple[str, Feeds]],
    policy: TolerancePolicy,
    precision: str,
    *,
    on_case: Callable[[str], None] | None = None,
) -> ParityReport:
    report = ParityReport(precision, policy)
    for label, feeds in cases:
        if on_case:
            on_case(label)
        ref = reference(feeds)
        got = runner.infer(feeds)
        report.cases.append(compare_case(label, feeds, ref, got, policy))
    return report.finish()
