"""Precision lowering, once, in ONNX, before any engine build (see DESIGN.md "Ground truth").

The same lowered ONNX feeds TensorRT (strongly typed: precision lives in the graph) and ONNX
Runtime. FP32 passes through; FP16/BF16 and INT8/FP8 are added by their own modules.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from exporter.export.onnxutil import dtype_name
from runtimes.errors import UsageError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")


@dataclass
class Lowered:
    path: Path
    realised: dict[str, Any] = field(default_factory=dict)
    calibration: Any = None  # int8/fp8: calibration.calibrate.CalibrationResult


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UsageError(
            f"Expected --precision to be one of {', '.join(PRECISIONS)}, found '{precision}'. fp16/bf16 lower to "
            "mixed precision in the graph; int8/fp8 insert Q/DQ nodes from calibration data (--calib)."
        )
    return precision


def census(path: Path) -> dict[str, Any]:
    """What precision a graph computes in: initializer dtypes and Cast / Q/DQ node counts."""
    model = onnx.load(str(path), load_external_data=False)
    weights = Counter(dtype_name(i.data_type) for i in model.graph.initializer)
    ops = Counter(n.op_type for n in model.graph.node)
    return {
        "nodes": len(model.graph.node),
        "initializer_dtypes": dict(weights),
        "cast_nodes": ops.get("Cast", 0),
        "quantize_nodes": ops.get("QuantizeLinear", 0),
        "dequantize_nodes": ops.get("DequantizeLinear", 0),
    }


def lower_precision(onnx_path: Path, precision: str, work_dir: Path, *, mixed: Any = None,
                    calibration: Sequence[Mapping[str, Any]] = (), quantize: dict[str, Any] | None = None,
                    dynamic: bool = False) -> Lowered:
    """Lower `onnx_path` to `precision` under `work_dir`; returns the lowered graph and what it realised.

    mixed: MixedOptions for fp16/bf16 (exporter/lower/mixed.py); calibration: feed dicts whose ranges
    drive AutoCast's range analysis (fp16/bf16); quantize (int8/fp8): keyword arguments of
    calibration.calibrate.quantize_model (io, options, tokenizer_dir, progress); dynamic: int8 by ONNX
    Runtime's dynamic quantization instead (exporter/lower/dynamic.py, no calibration)."""

    check_precision(precision)
    if precision == "fp32":
        return Lowered(Path(onnx_path), {"requested": "fp32", **census(Path(onnx_path))})
    if precision in ("fp16", "bf16"):
        from exporter.lower.mixed import MixedOptions, lower_mixed

        opts = mixed or MixedOptions(precision=precision)
        out = Path(work_dir) / f"model.{precision}.onnx"
        return Lowered(out, lower_mixed(Path(onnx_path), out, opts, calibration))
    if precision == "int8" and dynamic:
        from exporter.lower.dynamic import quantize_dynamic_int8

        out = Path(work_dir) / "model.int8-dynamic.onnx"
        done = quantize_dynamic_int8(Path(onnx_path), out, **(quantize or {}))
        return Lowered(out, {"requested": precision, **census(out), **done})
    if precision in ("int8", "fp8"):
        from calibration.calibrate import quantize_model

        if not quantize:
            raise UsageError(
                f"Expected calibration data for --precision {precision}: pass --calib DATA (texts, images or .npz "
                "feeds the model takes in service)."
            )
        out = Path(work_dir) / f"model.{precision}.onnx"
        result = quantize_model(Path(onnx_path), out, precision, work=Path(work_dir) / "calibration", **(quantize or {}))
        return Lowered(out, {"requested": precision, **census(out), **result.graph.realised()}, calibration=result)
    raise UsageError(
        f"Expected a precision this build supports, found '{precision}': lowering to {precision} is not "
        "implemented in this version of enginekit."
    )
