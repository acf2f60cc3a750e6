"""Explicit quantization: calibration ranges → a Q/DQ ONNX graph that TensorRT and ONNX Runtime both run.

TensorRT 10/11 build INT8/FP8 only from Q/DQ nodes in the graph (its calibrators are gone), so the
graph is written in the form TensorRT accepts, with onnxruntime.quantization doing the rewrite:

- Q/DQ on the *inputs* of Conv, ConvTranspose, Gemm and MatMul only (OpTypesToExcludeOutputQuantization):
  TensorRT fuses DQ → op and needs no Q/DQ on outputs; quantizing outputs too costs accuracy for
  nothing (all-MiniLM-L6-v2: per-sentence cosine 0.86 with output Q/DQ vs 0.98 without).
- symmetric scales, zero point 0, for activations (per tensor) and weights (per output channel);
  bias left in float (QuantizeBias=False): TensorRT quantizes bias itself.
- one Q/DQ pair per consumer (DedicatedQDQPair): a DQ shared by two consumers blocks TensorRT fusions.

FP8 (E4M3) uses the same placement. ONNX Runtime's own FP8 scales come from the tensors' standard
deviation, which clips transformer activations badly (cosine 0.64 on all-MiniLM-L6-v2), so the
scales are given explicitly instead: amax / 448 (448 is E4M3's largest finite value) from the same
calibration ranges as INT8.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtimes._deps import require
from runtimes.errors import BuildError, UsageError

METHODS = ("minmax", "entropy", "percentile")
QUANT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
PERCENTILE = 99.99  # ORT's default 99.999 keeps too many outliers for transformer activations
FP8_MAX = 448.0  # largest finite float8 E4M3FN value
INT8_MAX = 127.0  # symmetric int8 uses [-127, 127]

Feeds = dict[str, np.ndarray]


def check_method(method: str, *, allow_all: bool = False) -> str:
    allowed = METHODS + (("all",) if allow_all else ())
    if method not in allowed:
        raise UsageError(
            f"Expected a calibration method among {', '.join(allowed)}, found '{method}'. minmax keeps every "
            f"observed value, percentile clips at the {PERCENTILE}th percentile, entropy minimises the KL "
            "divergence of the quantized histogram" + ("; all compares them." if allow_all else ".")
        )
    return method


@dataclass
class QuantizedGraph:
    path: Path
    precision: str
    method: str
    quantized: list[str] = field(default_factory=list)  # node names that now read Q/DQ inputs
    excluded: list[str] = field(default_factory=list)  # candidates kept in float on purpose
    smoothed: list[str] = field(default_factory=list)  # activations divided per channel (calibration/smooth.py)
    smooth_alpha: float | None = None

    def realised(self) -> dict[str, Any]:
        fmt = "int8" if self.precision == "int8" else "float8 E4M3FN"
        return {
            "format": "QDQ",
            "activations": f"{fmt}, symmetric, per tensor, zero point 0",
            "weights": f"{fmt}, symmetric, per output channel, zero point 0",
            "bias": "float (not quantized)",
            "quantized_ops": list(QUANT_OPS),
            "calibration_method": self.method,
            "quantized_nodes": list(self.quantized),
            "excluded_nodes": list(self.excluded),
            "smoothquant": {"alpha": self.smooth_alpha, "activations": list(self.smoothed)} if self.smoothed else None,
        }


# -- preparing the graph ----------------------------------------------------------------------------------
def prepare_model(onnx_path: Path, work: Path, name: str = "prepared.onnx") -> Path:
    """A shape-inferred copy of the graph with every node named: the quantizer needs the value
    types of node inputs, and exclusions and reports refer to nodes by name."""
    import onnx

    work.mkdir(parents=True, exist_ok=True)
    inferred = work / name
    head = onnx.load(str(onnx_path), load_external_data=False)
    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in head.graph.initializer):
        raise BuildError(
            f"Expected the weights of '{onnx_path}' inside the ONNX file for calibration, found them in external "
            "data (models over 1 GiB). Quantizing such models is not supported yet in this version of enginekit; "
            "use --precision fp16 for them."
        )
    try:
        onnx.shape_inference.infer_shapes_path(str(onnx_path), str(inferred))
    except Exception as exc:  # onnx raises InferenceError / ValidationError subclasses
        raise BuildError(
            f"Expected ONNX shape inference to run on '{onnx_path}' before quantization, but it failed: "
            f"{str(exc).strip().splitlines()[0][:300]}. Check the graph with `enginekit inspect {onnx_path}`."
        ) from None
    model = onnx.load(str(inferred))
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    onnx.save(model, str(inferred))
    return inferred


def candidate_nodes(model: Any, op_types: Sequence[str] = QUANT_OPS) -> list[str]:
    """Nodes the quantizer may quantize: the op types, with a float activation input."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in op_types and n.input and n.input[0] not in inits]


# -- calibration ------------------------------------------------------------------------------------------
class _OneFeed:
    """onnxruntime's CalibrationDataReader protocol over one feed dict."""

    def __init__(self, feeds: Feeds):
        self._items = [feeds]

    def get_next(self) -> Feeds | None:
        return self._items.pop() if self._items else None


def compute_ranges(model_path: Path, feeds: Iterable[Feeds], method: str, work: Path,
                   op_types: Sequence[str] = QUANT_OPS) -> dict[str, tuple[float, float]]:
    """(min, max) of every float input/output of the quantizable ops over `feeds`, by `method`.

    Each feed dict is collected on its own: histogram methods merge per-call histograms, so the
    batches may differ in shape (texts padded per batch)."""
    q = require("onnxruntime.quantization", extra="cpu", purpose="Calibration (INT8/FP8)")
    check_method(method)
    kinds = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
             "percentile": q.CalibrationMethod.Percentile}
    extra: dict[str, Any] = {"symmetric": True} if method != "minmax" else {}
    if method == "percentile":
        extra["percentile"] = PERCENTILE
    if method == "entropy":
        # ORT's default 128 bins equal its 128 quantized bins, so only the full range is ever tried
        # and entropy silently equals minmax; 512 bins give the KL search room (2048, TensorRT's
        # classic setting, costs ~50 s of pure-Python search on all-MiniLM-L6-v2).
        extra.update(num_bins=512, num_quantized_bins=128)
    work.mkdir(parents=True, exist_ok=True)
    calibrator = q.create_calibrator(Path(model_path), list(op_types), augmented_model_path=str(work / "augmented.onnx"),
                                     calibrate_method=kinds[method], extra_options=extra)
    count = 0
    # The histogram calibrators print progress to stdout, which would corrupt `--json` output.
    with contextlib.redirect_stdout(io.StringIO()):
        for feed in feeds:
            calibrator.collect_data(_OneFeed(feed))
            count += 1
        if not count:
            raise BuildError("Expected at least one calibration batch, found none; nothing was quantized.")
        data = calibrator.compute_data()
    ranges = {}
    for name, td in data.data.items():
        lo, hi = td.range_value
        ranges[name] = (float(np.min(lo)), float(np.max(hi)))
    return ranges


# -- quantization -----------------------------------------------------------------------------------------
def _weight_axis(node: Any) -> int:
    """The output-channel axis of a node's weight: TensorRT wants per-channel scales there."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return -1
    return 0


def _fp8_overrides(model: Any, ranges: Mapping[str, tuple[float, float]], nodes: Sequence[str]) -> dict[str, Any]:
    """Explicit FP8 scales: amax/448 per activation tensor, per output channel for weights."""
    import ml_dtypes
    from onnx import numpy_helper

    zero = np.array(0, dtype=ml_dtypes.float8_e4m3fn)
    over: dict[str, Any] = {}
    for name, (lo, hi) in ranges.items():
        amax = max(abs(lo), abs(hi), 1e-8)
        over[name] = [{"scale": np.array(amax / FP8_MAX, dtype=np.float32), "zero_point": zero}]
    inits = {i.name: i for i in model.graph.initializer}
    wanted = set(nodes)
    for node in model.graph.node:
        if node.name not in wanted or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        axis = _weight_axis(node) % w.ndim
        amax = np.maximum(np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(1), 1e-8)
        over[node.input[1]] = [{"axis": axis, "scale": np.array(a / FP8_MAX, dtype=np.float32), "zero_point": zero}
                               for a in amax]
    return over


def quantize_graph(model_path: Path, output: Path, ranges: Mapping[str, tuple[float, float]], *, precision: str,
                   method: str, exclude: Sequence[str] = (), op_types: Sequence[str] = QUANT_OPS) -> QuantizedGraph:
    """Write the Q/DQ graph of `model_path` (a prepare_model() output) to `output`."""
    import onnx

    q = require("onnxruntime.quantization", extra="cpu", purpose="Quantization (INT8/FP8)")
    from onnxruntime.quantization.calibrate import TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import update_opset_version

    model = onnx.load(str(model_path))
    candidates = candidate_nodes(model, op_types)
    nodes = [n for n in candidates if n not in set(exclude)]
    qtype = q.QuantType.QInt8 if precision == "int8" else q.QuantType.QFLOAT8E4M3FN
    extra: dict[str, Any] = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "DedicatedQDQPair": True,
        "OpTypesToExcludeOutputQuantization": list(op_types),
    }
    if precision == "fp8":
        extra["TensorQuantOverrides"] = _fp8_overrides(model, ranges, nodes)
    data = TensorsData(q.CalibrationMethod.MinMax,
                       {k: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
                        for k, (lo, hi) in ranges.items()})
    model = update_opset_version(model, qtype, qtype, tensor_quant_overrides=extra.get("TensorQuantOverrides"))
    if not nodes:
        onnx.save(model, str(output))
        return QuantizedGraph(Path(output), precision, method, [], sorted(set(candidates) - set(nodes)))
    quantizer = QDQQuantizer(model, True, False, qtype, qtype, data, nodes, [], list(op_types), extra)
    quantizer.quantize_model()
    quantizer.model.save_model_to_file(str(output), False)
    done = _quantized_nodes(onnx.load(str(output), load_external_data=False), op_types)
    return QuantizedGraph(Path(output), precision, method, [n for n in nodes if n in done],
                          [n for n in candidates if n not in set(nodes)])


def _quantized_nodes(model: Any, op_types: Sequence[str]) -> set[str]:
    produced_by_dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in model.graph.node if n.op_type in op_types and any(i in produced_by_dq for i in n.input)}


def to_ort_cpu_form(path: Path, output: Path) -> int:
    """Rewrite symmetric int8 activation Q/DQ pairs (zero point 0) as uint8 with zero point 128.

    The values are identical (u8 = s8 + 128 for every s8 in [-128, 127]), but x86 ONNX Runtime has
    fast integer kernels only for u8 activations × s8 weights (VPMADDUBSW / VNNI): with s8
    activations most MatMuls stay in float around Q/DQ and INT8 is *slower* than FP32 (0.46× at
    batch 1 on all-MiniLM-L6-v2). TensorRT gets the canonical s8 graph; only the ORT CPU engine
    is rewritten, and the parity gate runs on the rewritten engine. Weights stay s8. Returns the
    number of pairs rewritten."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    zp_name = "enginekit_u8_zero_point_128"
    changed = 0
    for n in graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits or len(n.input) < 3:
            continue
        zp = inits.get(n.input[2])
        if zp is None or zp.data_type != TensorProto.INT8 or np.any(numpy_helper.to_array(zp) != 0):
            continue
        users = consumers.get(n.output[0], [])
        if not users or not all(u.op_type == "DequantizeLinear" for u in users):
            continue
        n.input[2] = zp_name
        for u in users:
            u.input[2] = zp_name
        changed += 1
    if changed:
        graph.initializer.append(numpy_helper.from_array(np.array(128, dtype=np.uint8), zp_name))
    onnx.save(model, str(output))
    return changed


def write_ranges(path: Path, ranges: Mapping[str, tuple[float, float]], meta: Mapping[str, Any]) -> None:
    """Ranges as JSON, written to a temp file and renamed: a killed build leaves no half cache."""
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"meta": dict(meta), "ranges": {k: list(v) for k, v in sorted(ranges.items())}},
                              indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
