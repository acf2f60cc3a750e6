"""`enginekit calibrate ONNX --data DATA -o OUT`: an FP32 ONNX file → a Q/DQ ONNX file, with its
accuracy on held-out samples and its CPU speed next to the FP32 graph's.

The Q/DQ graph is the one TensorRT builds from (`enginekit build onnx:OUT --target trt`); ONNX
Runtime runs it too. Output and its ranges cache (`OUT.calib/`) are written beside the target
first and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from exporter.bundle.staging import new_staging
from exporter.options import BuildOptions
from exporter.source.loading import load_onnx_source, prepare_dims
from exporter.source.spec import parse_source
from exporter.timing import Progress, measure
from runtimes.errors import BuildError


def measure_speedup(fp32: Path, quantized: Path, feed: dict[str, np.ndarray], *, rounds: int = 5,
                    runs: int = 8) -> dict[str, Any]:
    """Median ORT CPU latency of the FP32 graph and of the INT8 graph on one held-out batch.

    `quantized` is a bundle's engine or a Q/DQ graph (rewritten to its ORT CPU form first). The two
    sessions alternate in rounds so that load from other processes hits both alike."""
    import onnx

    from calibration.calibrate import ort_session
    from calibration.quantize import to_ort_cpu_form

    with tempfile.TemporaryDirectory(prefix="enginekit-speed-") as tmp:
        model = onnx.load(str(quantized), load_external_data=False)
        path = Path(quantized)
        if not any(i.name == "enginekit_u8_zero_point_128" for i in model.graph.initializer):
            path = Path(tmp) / "int8.ort-cpu.onnx"
            to_ort_cpu_form(Path(quantized), path)
        a, b = ort_session(Path(fp32)), ort_session(path)
        fp32_ms, int8_ms = [], []
        for _ in range(rounds):
            fp32_ms.append(measure(lambda: a.run(None, feed), warmup=2, runs=runs)["p50_ms"])
            int8_ms.append(measure(lambda: b.run(None, feed), warmup=2, runs=runs)["p50_ms"])
    f, q = float(np.median(fp32_ms)), float(np.median(int8_ms))
    return {"fp32_ms": round(f, 3), "int8_ms": round(q, 3), "speedup": round(f / q, 2),
            "shapes": {k: list(v.shape) for k, v in feed.items()}, "threads": "onnxruntime default",
            "method": f"median of {rounds} rounds x {runs} runs, alternating, after warm-up; ONNX Runtime CPU"}


def calibrate_onnx(onnx_path: Path, output: Path, *, precision: str, calib: Any, options: BuildOptions,
                   processor_dir: Path | None = None, force: bool = False, progress: Progress | None = None) -> Any:
    """Quantize an FP32 ONNX file; returns calibration.calibrate.CalibrationResult (speed included
    for INT8). `calib` is a CalibOptions; `options` carries --shapes for dims without a range."""
    from calibration.calibrate import quantize_model

    say = progress or (lambda _m: None)
    output = Path(output)
    if output.exists() and not force:
        raise BuildError(f"Expected '{output}' not to exist, but it does. Pass --force to replace it; nothing was written.")
    loaded = load_onnx_source(parse_source(f"onnx:{onnx_path}"))
    loaded.io = prepare_dims(loaded, options.shapes, options.dynamic)
    calib.cache_dir = output.parent / f"{output.name}.calib"
    staging = new_staging(output)
    try:
        result = quantize_model(Path(onnx_path), staging / output.name, precision, loaded.io, calib,
                                work=staging / "work", tokenizer_dir=processor_dir, progress=say)
        if precision == "int8" and result.split.evaluation:
            say("Measuring CPU latency: FP32 vs INT8")
            result.speed = measure_speedup(Path(onnx_path), result.graph.path, result.split.evaluation[0])
        os.replace(result.graph.path, output)
        result.graph.path = output
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)
