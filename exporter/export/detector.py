"""Detectors in the build: which outputs the engine ships, and how the gate still sees the raw ones.

A detector source (a py: factory returning `exporter.export.nms.Detector`, whose `enginekit_info` puts
task 'object-detection' and its NMS settings in the manifest) exports with NMS in the graph and
six outputs: the final num_detections, boxes, scores, classes and the pre-NMS raw_boxes and
raw_scores. The engine ships only the final four (copying every anchor's scores off the GPU on each
call would cost more than the detector); the raw tensors stay inside the graph, where they feed NMS.
The gate compares the final outputs by matching detections (exporter/gate/detection.py) and the raw
ones element-wise, reading them from the engine's own graph with those tensors exposed again as
outputs (`with_raw_outputs`): an ORT engine is run a second time by ONNX Runtime with two more
outputs, a TensorRT plan has its lowered ONNX run by ONNX Runtime on the same device.

`--detector-outputs raw` exports the raw outputs only (no NMS in the graph) for callers that run
their own post-processing; then everything is compared element-wise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from exporter.source.spec import LoadedSource
from runtimes.errors import UsageError
from runtimes.manifest import IOSpec

MODES = ("nms", "raw")
RAW_OUTPUTS = ("raw_boxes", "raw_scores")
# Post-processing that must stay FP32 under --precision fp16/bf16: ONNX NonMaxSuppression takes
# float32 only, and top-K over FP16 scores would order near-equal detections differently.
FP32_OPS = ("NonMaxSuppression", "TopK")
Infer = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def detection(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """The NMS settings of a detector source or bundle (manifest source), else None."""
    return dict(info["detection"]) if info.get("task") == "object-detection" and info.get("detection") else None


def set_outputs(loaded: LoadedSource, mode: str) -> None:
    """Apply --detector-outputs to a loaded detector source."""
    if mode not in MODES:
        raise UsageError(f"Expected --detector-outputs nms or raw, found '{mode}'.")
    det = detection(loaded.info)
    if det is None:
        if mode == "raw":
            raise UsageError(
                f"Expected a detector source for --detector-outputs raw (a py: factory returning "
                f"exporter.export.nms.Detector), found '{loaded.spec}' (task {loaded.info.get('task')}). Drop the option."
            )
        return
    if mode == "raw":
        loaded.module.model.outputs = "raw"  # the wrapper's model is the Detector
        loaded.module.output_names = list(RAW_OUTPUTS)
        loaded.info["detection"] = {**det, "outputs": "raw"}


def hidden_outputs(info: Mapping[str, Any]) -> list[str]:
    """Outputs exported for the gate but left out of the engine (the raw ones, with NMS in the graph)."""
    det = detection(info)
    return list(det.get("raw_outputs", RAW_OUTPUTS)) if det and det.get("outputs") == "nms" else []


def accuracy_budget(info: Mapping[str, Any], budget: str | None) -> str | None:
    """INT8/FP8 with NMS in the graph: the default budget (cosine on every output) applies to the raw
    head outputs; the padded post-NMS slots have no per-element meaning (see exporter/gate/detection.py)."""
    hidden = hidden_outputs(info)
    if not hidden or budget is None or budget.strip() != "cosine>=0.99":
        return budget
    return ",".join(f"{name}:cosine>=0.99" for name in hidden)


def engine_graph(onnx_path: Path, drop: list[str]) -> Path:
    """The graph with `drop` removed from its outputs (the tensors stay: NMS consumes them), written
    beside `onnx_path` so external weights keep resolving."""
    import onnx

    if not drop:
        return onnx_path
    model = onnx.load(str(onnx_path), load_external_data=False)
    kept = [o for o in model.graph.output if o.name not in drop]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    dest = onnx_path.with_name(onnx_path.stem + ".engine.onnx")
    onnx.save(model, str(dest))
    return dest


def engine_io(io: IOSpec, drop: list[str]) -> IOSpec:
    return replace(io, outputs=[o for o in io.outputs if o.name not in drop]) if drop else io


def with_raw_outputs(infer: Infer, graph: Path, names: list[str], device: str,
                     cuda_options: Mapping[str, Any] | None = None) -> tuple[Infer, str | None]:
    """`infer` plus `names` read from `graph` (the engine's ONNX, or a TensorRT plan's lowered ONNX)
    re-run by ONNX Runtime with those tensors as outputs. Returns (infer, None) unchanged with a
    note when the graph no longer holds them (an optimizer renamed them).

    cuda_options: the engine's own CUDA provider options (its runner's). The raw outputs must come from
    the same kernels as the engine's: on 2026-11-21 the YOLOX-S-sized detector's FP32 gate failed on
    raw_scores (rel-L2 2.2e-4 > 1e-4) read from a second session with ORT's defaults, which let
    convolutions use TF32, while the engine itself runs FP32 bundles with TF32 off."""
    import onnx

    from runtimes._deps import require

    ort = require("onnxruntime", extra="cpu", purpose="The gate's raw detector outputs")
    model = onnx.load(str(graph))
    produced = {o for n in model.graph.node for o in n.output}
    # Under FP16/BF16, AutoCast casts graph outputs back to FP32 and renames the low-precision
    # tensor '<name>_pre_cast'; once the output is dropped, ONNX Runtime removes the unused cast.
    found = {n: next((t for t in (n, f"{n}_pre_cast") if t in produced), None) for n in names}
    missing = [n for n, t in found.items() if t is None]
    if missing:
        return infer, f"raw head outputs {missing} not found in {graph.name}: compared after NMS only"
    # Read as FP32 through a cast: in a BF16 engine the raw tensors are BF16 (the tiny detector's, on the H200,
    # 12-02), which ONNX Runtime cannot hand to numpy ("No corresponding Numpy type for Tensor Type. bfloat16").
    tensors = [f"{found[n]}__enginekit_fp32" for n in names]
    model.graph.node.extend(onnx.helper.make_node("Cast", [found[n]], [t], to=onnx.TensorProto.FLOAT,
                                                  name=f"{t}_cast") for n, t in zip(names, tensors))
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), so, providers=raw_providers(device, cuda_options))
    feed_names = {i.name for i in session.get_inputs()}

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(infer(feeds))
        raw = session.run(tensors, {k: v for k, v in feeds.items() if k in feed_names})
        out.update({n: np.asarray(v, np.float32) for n, v in zip(names, raw)})
        return out

    return run, None


def raw_providers(device: str, cuda_options: Mapping[str, Any] | None) -> list[Any]:
    """ONNX Runtime providers for the raw-output session: exactly the engine runner's CUDA options (TF32,
    algorithm search, layout), else (a TensorRT plan's lowered ONNX) TF32 off; or the CPU."""
    if device != "cuda":
        return ["CPUExecutionProvider"]
    options = dict(cuda_options) if cuda_options is not None else {"use_tf32": 0}
    return [("CUDAExecutionProvider", {k: str(v) for k, v in options.items()}), "CPUExecutionProvider"]
