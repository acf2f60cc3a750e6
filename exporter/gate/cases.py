"""Run the parity gate: reference (torch fp32, or ORT on the fp32 ONNX) vs an engine runner,
on real data (--data) or on inputs generated at the min, opt and max shapes of every dim."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from exporter.gate.parity import (
    CaseReport,
    ConstantWatch,
    OutputMetrics,
    ParityReport,
    Tolerance,
    TolerancePolicy,
    check_constant_references,
    compare_case,
)
from exporter.gate.task import TaskParity
from runtimes.errors import EnginekitError, EngineRefused
from runtimes.manifest import IOSpec
from runtimes.samples import SHAPE_POINTS, generate_feeds

Feeds = dict[str, np.ndarray]
REAL_PREFIXES = ("data[", "eval[")
# Generated (random) inputs lie outside the ranges INT8/FP8 scales were calibrated on, so clipping
# there is expected and says nothing about service inputs (all-MiniLM-L6-v2 INT8: cosine 0.994 on
# held-out sentences, 0.980 on random token ids at the max shape). For quantized engines those
# cases prove that every shape runs without NaN/Inf against a floor that catches a broken graph;
# accuracy is gated on the real, held-out samples.
QUANTIZED_GENERATED = Tolerance(cosine=0.95, argmax=0.8, equal=0.9)
RUN_FAILED = "(run)"  # the output name of a case whose engine raised instead of returning outputs


def generated_policy(precision: str, policy: TolerancePolicy) -> TolerancePolicy | None:
    """The policy for generated cases of `precision` (None: the same as for real data)."""
    if precision not in ("int8", "fp8"):
        return None
    return TolerancePolicy(QUANTIZED_GENERATED, dict(policy.per_output))


def gate_cases(io: IOSpec, *, data: Path | None = None, tokenizer_dir: Path | None = None, seed: int = 0,
               max_data_batches: int = 8, feeds: Sequence[Feeds] | None = None,
               image_options: Any = None) -> list[tuple[str, Feeds]]:
    """Labelled feed dicts: 'data[i]' batches from --data (real inputs), or 'eval[i]' for `feeds`
    (the calibration data's held-out samples), then one generated case per distinct min/opt/max
    shape, so the dynamic ranges are exercised even when the data is short."""
    cases: list[tuple[str, Feeds]] = []
    if data is not None:
        from calibration.data import load_feeds

        batch_dim = next((d for s in io.inputs for d in s.shape[:1] if isinstance(d, str)), None)
        batch = min(8, io.dims[batch_dim].max) if batch_dim in io.dims else 1
        loaded = load_feeds(data, io, tokenizer_dir=tokenizer_dir, batch_size=batch, image_options=image_options)
        cases += [(f"data[{i}]", f) for i, f in enumerate(loaded[:max_data_batches])]
    elif feeds:
        cases += [(f"eval[{i}]", f) for i, f in enumerate(feeds[:max_data_batches])]
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
    engine: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | None,
    cases: Sequence[tuple[str, Feeds]],
    policy: TolerancePolicy,
    precision: str,
    *,
    emulator: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | None = None,
    on_case: Callable[[str], None] | None = None,
    task: TaskParity | None = None,
    calibrated: bool = True,
) -> ParityReport:
    """Compare the engine (`engine`: a runner's infer, None when it cannot run here) and, for reduced
    precision on a machine that cannot show it, the emulated low-precision graph (`emulator`).
    task: the task's own check per case and the outputs it takes out of element-wise gating
    (exporter/gate/task.py), e.g. detections matched by IoU after NMS."""
    report = ParityReport(precision, policy)
    loose = generated_policy(precision, policy)
    if loose is not None and any(not label.startswith(REAL_PREFIXES) for label, _ in cases):
        why = "are outside the calibrated ranges" if calibrated else \
            "(random values, unlike service inputs) give dynamic INT8 activation ranges no real input has"
        report.notes.append(f"generated inputs {why}: checked against a floor (cosine >= {QUANTIZED_GENERATED.cosine}); "
                            f"{precision} accuracy is gated on real samples (--data)")
    constants = ConstantWatch()
    for label, feeds in cases:
        if on_case:
            on_case(label)
        ref = reference(feeds)
        for name, value in (task.elementwise(ref) if task else ref).items():
            constants.add(name, value)
        case_policy = policy if label.startswith(REAL_PREFIXES) or loose is None else loose
        if engine is not None:
            report.cases.append(_run_and_compare(label, feeds, ref, engine, case_policy, task))
        if emulator is not None:
            report.cases.append(_run_and_compare(f"{precision}-emulated {label}", feeds, ref, emulator, case_policy, task))
    check_constant_references(report, constants)
    masked = sum(o.masked for c in report.cases for o in c.outputs)
    if masked:
        report.notes.append(f"padded positions (attention_mask 0) are left out of the per-position outputs' metrics "
                            f"({masked} positions over all cases): a model's values there are unspecified")
    return report.finish(engine_checked=engine is not None)


def _run_and_compare(label: str, feeds: Feeds, ref: Mapping[str, np.ndarray],
                     run: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]], policy: TolerancePolicy,
                     task: TaskParity | None) -> CaseReport:
    """One case; an engine that fails on valid inputs fails the case (the gate, exit 1), with its error."""
    try:
        got = run(feeds)
    except EngineRefused:
        raise
    except Exception as exc:  # ORT's own exception types: the engine (or its emulation) broke at run time
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        failed = OutputMetrics(RUN_FAILED, [], [], failures=[f"the engine failed on these inputs: {text}"])
        return CaseReport(label, {k: list(np.shape(v)) for k, v in feeds.items()}, [failed])
    return _compare(label, feeds, ref, got, policy, task)


def _compare(label: str, feeds: Feeds, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
             policy: TolerancePolicy, task: TaskParity | None) -> CaseReport:
    if task is None:
        return compare_case(label, feeds, ref, got, policy)
    case = compare_case(label, feeds, task.elementwise(ref), got, policy)
    case.checks.append(task.check(ref, got))
    return case


class CachedReference:
    """Reference outputs computed once per feed dict (the fallback re-gates the same cases)."""

    def __init__(self, fn: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]):
        self.fn = fn
        self._cache: dict[int, Mapping[str, np.ndarray]] = {}

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        key = id(feeds)
        if key not in self._cache:
            self._cache[key] = self.fn(feeds)
        return self._cache[key]


def shrink(io: IOSpec, feeds: Mapping[str, np.ndarray], max_batch: int = 2) -> Feeds:
    """The first `max_batch` rows of every batch-like dim (keeps layer-wise runs small)."""
    out = {}
    for spec in io.inputs:
        arr = np.asarray(feeds[spec.name])
        for axis, d in enumerate(spec.shape):
            if isinstance(d, str) and "batch" in d and arr.shape[axis] > max_batch:
                arr = np.take(arr, range(max_batch), axis=axis)
        out[spec.name] = np.ascontiguousarray(arr)
    return out


def not_runnable_here(exc: EnginekitError, device: str, precision: str) -> str:
    """The one rule for an engine the gate cannot open on this machine (IncompatibleEngine,
    MissingDependency): one built for hardware this machine may lack (a CUDA engine; BF16 or FP8
    numerics) is published 'not checked', never 'passed', and this returns the reason for the
    report's note; a CPU engine that cannot run on the CPU is the build's error, so `exc` is raised."""
    if (device == "cpu" and precision not in ("bf16", "fp8")) or isinstance(exc, EngineRefused):
        raise exc  # EngineRefused: the device's runtime is here and refused the engine (found on the H200)
    return str(exc).split(". ")[0]
