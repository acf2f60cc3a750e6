"""Task-level parity (numpy only): the checks a task adds to the per-output metrics of the gate.

- object-detection (NMS in the graph): the final outputs (num_detections, boxes, scores, classes)
  are compared by matching detections (exporter/gate/detection.py), never element-wise; the pre-NMS
  head outputs, when present, keep the element-wise metrics.
- zero-shot (CLIP-like dual encoders): the per-image ranking of text prompts (pairwise order and
  top-1, tie-aware) and the softmax over prompts, on `logits_per_image`.

The task comes from the manifest (`source.task`; a detector's settings in `source.detection`), or
from the output names for an onnx: source. Thresholds are per precision and can be overridden with
`--tolerance detections:matched=0.9` or `--tolerance zero-shot:order=0.95` (the check's name, then
its metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from exporter.gate.detection import CHECK_NAME as DETECTIONS
from exporter.gate.detection import (
    DETECTION_TOLERANCES,
    FINAL_OUTPUTS,
    DetectionTolerance,
    compare_detections,
    is_detection_io,
)
from exporter.gate.parity import TaskCheck, TolerancePolicy, parse_tolerance, tolerance_value
from runtimes.errors import UsageError

ZERO_SHOT = "zero-shot"
Outputs = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class ZeroShotTolerance:
    """order: tie-aware fraction of prompt pairs ranked alike (per image, worst image); top1: tie-aware
    top-1 agreement; prob_delta: max |softmax(reference) - softmax(engine)| over prompts."""

    order: float | None = 0.99
    top1: float | None = 0.99
    prob_delta: float | None = 1e-3


ZERO_SHOT_TOLERANCES = {
    "fp32": ZeroShotTolerance(0.99, 0.99, 1e-3),
    "fp16": ZeroShotTolerance(0.95, 0.98, 0.02),
    "bf16": ZeroShotTolerance(0.95, 0.97, 0.05),
    "int8": ZeroShotTolerance(0.9, 0.95, 0.1),
    "fp8": ZeroShotTolerance(0.9, 0.95, 0.1),
}


@dataclass
class TaskParity:
    """What a task changes in the gate: outputs left out of element-wise gating, and one check per case."""

    name: str
    check: Callable[[Outputs, Outputs], TaskCheck]
    ungated: frozenset[str] = field(default_factory=frozenset)

    def elementwise(self, reference: Outputs) -> dict[str, np.ndarray]:
        return {k: v for k, v in reference.items() if k not in self.ungated}


def compare_zero_shot(reference: Outputs, candidate: Outputs, tol: ZeroShotTolerance) -> TaskCheck:
    """Per-image ranking of the text prompts in `logits_per_image` [images, prompts]."""
    check = TaskCheck(ZERO_SHOT)
    if "logits_per_image" not in candidate:
        check.failures.append("engine outputs lack 'logits_per_image'")
        return check
    r = np.asarray(reference["logits_per_image"], np.float64)
    g = np.asarray(candidate["logits_per_image"], np.float64)
    err = np.abs(g - r)
    # A pair of prompts whose reference logits differ by less than the matrix's typical error is a
    # tie: either order is right (the same rule as the gate's argmax agreement).
    noise = 3 * float(np.percentile(err, 90)) if err.size else 0.0
    dr = r[:, :, None] - r[:, None, :]
    dg = g[:, :, None] - g[:, None, :]
    agree = (np.sign(dr) == np.sign(dg)) | (np.abs(dr) <= noise)
    n = r.shape[1]
    pairs = max(n * (n - 1), 1)
    order = (agree.sum(axis=(1, 2)) - n) / pairs if n > 1 else np.ones(len(r))
    a, b = r.argmax(1), g.argmax(1)
    rows = np.arange(len(a))
    top1 = np.mean((a == b) | (r[rows, a] - r[rows, b] <= noise)) if len(a) else 1.0
    pr, pg = _softmax(r), _softmax(g)
    check.metrics = {
        "order": float(order.min()) if order.size else 1.0,
        "top1": float(top1), "top1_raw": float(np.mean(a == b)) if len(a) else 1.0,
        "prob_delta": float(np.abs(pr - pg).max()) if pr.size else 0.0,
        "logit_delta": float(err.max()) if err.size else 0.0,
    }
    m = check.metrics
    if tol.order is not None and m["order"] < tol.order:
        check.failures.append(f"prompt order agreement {m['order']:.4f} < {tol.order} (worst image)")
    if tol.top1 is not None and m["top1"] < tol.top1:
        check.failures.append(f"top-1 prompt agreement {m['top1']:.4f} < {tol.top1}")
    if tol.prob_delta is not None and m["prob_delta"] > tol.prob_delta:
        check.failures.append(f"probability delta {m['prob_delta']:.3g} > {tol.prob_delta:g}")
    return check


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def split_tolerances(overrides: Sequence[str]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(element-wise overrides, {check name: {metric: value}}) from --tolerance values."""
    plain, task = [], {}
    for text in overrides:
        head, sep, rest = text.partition(":")
        if sep and head in (DETECTIONS, ZERO_SHOT):
            allowed = [f.name for f in fields(DetectionTolerance if head == DETECTIONS else ZeroShotTolerance)]
            for pair in rest.split(","):
                key, sep, val = pair.partition("=")
                if key not in allowed or not sep:
                    raise UsageError(
                        f"Expected --tolerance {head}:METRIC=VALUE with METRIC in {allowed}, found '{text}'. "
                        f"Example: --tolerance {head}:{allowed[0]}=0.9."
                    )
                task.setdefault(head, {})[key] = tolerance_value(key, val, text)
        else:
            plain.append(text)
    return plain, task


def check_tolerances(overrides: Sequence[str]) -> None:
    """Refuse a malformed --tolerance (syntax, metric names, non-finite values) before anything runs;
    which outputs they may name is known only once the model is loaded (check_tolerance_outputs)."""
    plain, _ = split_tolerances(overrides)
    for text in plain:
        parse_tolerance(text)


def tolerance_output(text: str) -> str | None:
    """The OUTPUT (or task check) an --tolerance value names; None when it sets every output."""
    head, sep, _ = text.strip().partition(":")
    return head.strip() if sep and "=" not in head else None


def task_checks(output_names: Sequence[str]) -> tuple[str, ...]:
    """The task checks that gate_policy may add for a model with these outputs."""
    return ((DETECTIONS,) if is_detection_io(list(output_names)) else ()) + \
        ((ZERO_SHOT,) if "logits_per_image" in output_names else ())


def check_tolerance_outputs(overrides: Sequence[str], output_names: Sequence[str],
                            checks: Sequence[str] | None = None) -> None:
    """Refuse an --tolerance OUTPUT: prefix that names neither an output of the model nor one of its
    task checks (default: task_checks): the policy would keep it for an output that never comes, and
    the gate would run with the default tolerance the user meant to change."""
    known = list(output_names) + list(task_checks(output_names) if checks is None else checks)
    for text in overrides:
        name = tolerance_output(text)
        if name is not None and name not in known:
            raise UsageError(
                "Expected --tolerance OUTPUT:METRIC=VALUE to name one of this model's outputs"
                + (" or checks" if len(known) > len(output_names) else "") + f" ({', '.join(known)}), found "
                f"'{name}' in '{text}'. Use one of those names, or drop '{name}:' to set the tolerance for every output."
            )


def gate_policy(precision: str, overrides: Sequence[str], source: Mapping[str, Any],
                output_names: Sequence[str]) -> tuple[TolerancePolicy, TaskParity | None]:
    """The element-wise policy and the task check for a bundle's gate."""
    plain, task_over = split_tolerances(overrides)
    policy = TolerancePolicy.for_precision(precision, plain)
    base = precision if precision in DETECTION_TOLERANCES else "fp32"
    task = source.get("task")
    if task == "object-detection" or (task in (None, "custom") and is_detection_io(list(output_names))):
        if not is_detection_io(list(output_names)):
            return policy, None  # raw head outputs only (--detector-outputs raw): element-wise is right
        det = dict(source.get("detection") or {})
        dtol = replace(DETECTION_TOLERANCES[base], **task_over.get(DETECTIONS, {}))

        def detections(ref: Outputs, got: Outputs) -> TaskCheck:
            return compare_detections(ref, got, dtol, score_threshold=det.get("score_threshold"),
                                      max_detections=det.get("max_detections"), storage=precision)

        return policy, TaskParity(DETECTIONS, detections, frozenset(FINAL_OUTPUTS))
    if task == "zero-shot-image-classification" and "logits_per_image" in output_names:
        ztol = replace(ZERO_SHOT_TOLERANCES[base], **task_over.get(ZERO_SHOT, {}))
        return policy, TaskParity(ZERO_SHOT, lambda ref, got: compare_zero_shot(ref, got, ztol))
    if task_over:
        raise UsageError(
            f"Expected --tolerance {'/'.join(task_over)}:… only for a bundle of that task, found task '{task}'. "
            "Drop it, or use [OUTPUT:]METRIC=VALUE for element-wise tolerances."
        )
    return policy, None
