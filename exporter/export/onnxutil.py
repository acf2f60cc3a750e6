"""Small ONNX helpers on top of the onnx package: checked loading, IO specs, summaries."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from runtimes.errors import SourceError
from runtimes.manifest import DimRange, TensorSpec

# enginekit records the export's dim ranges and input value hints in the ONNX metadata, so that a
# later `enginekit build onnx:model.onnx` (e.g. on a TensorRT machine) reuses them.
METADATA_DIMS = "enginekit.dims"
METADATA_VALUES = "enginekit.values"
# Set on a lowered ONNX kept for a TensorRT machine (exporter/build/handoff.py): the precision it is
# already lowered to, and the FP32 ONNX beside it that the parity gate uses as its reference.
METADATA_LOWERED = "enginekit.lowered"
METADATA_REFERENCE = "enginekit.reference"

_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64", onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.INT16: "int16", onnx.TensorProto.UINT16: "uint16",
}


def dtype_name(elem_type: int) -> str:
    if elem_type in _DTYPES:
        return _DTYPES[elem_type]
    return onnx.helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower()


def load_onnx_checked(path: Path, *, what: str = "ONNX model") -> onnx.ModelProto:
    """Load the graph (weights stay on disk) and run the ONNX checker on the file; SourceError when
    the file is missing, not ONNX, truncated, or references missing external data."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(
            f"Expected an {what} file at '{path}', found {'a folder' if path.is_dir() else 'nothing'}. "
            "Check the path (onnx:<file>.onnx)."
        )
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, or onnx's own parse errors
        raise SourceError(
            f"Expected '{path}' to be an ONNX protobuf, but it cannot be parsed ({type(exc).__name__}: "
            f"{str(exc)[:200]}); the file is corrupt, truncated or not ONNX. Re-export it, e.g. with "
            "`enginekit export SOURCE -o model.onnx`."
        ) from None
    if not model.graph.node and not model.graph.output:
        raise SourceError(
            f"Expected '{path}' to hold an ONNX graph, found an empty model (no nodes, no outputs); the file "
            "is truncated or not ONNX. Re-export it."
        )
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # ValidationError, or a missing external-data file
        raise SourceError(
            f"Expected '{path}' to pass the ONNX checker, but it fails: {str(exc).strip().splitlines()[0][:300]}. "
            "The file is damaged or was written by a broken exporter; re-export it. If its weights live in a "
            "separate .data file, keep that file next to it."
        ) from None
    return model


def _shape(t: onnx.ValueInfoProto, prefix: str) -> tuple[int | str, ...]:
    dims: list[int | str] = []
    for axis, d in enumerate(t.type.tensor_type.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or f"{prefix}_dim{axis}")
    return tuple(dims)


def io_from_onnx(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec], list[str], dict[str, dict[str, Any]]]:
    """(inputs, outputs, named dims of the inputs in order, value hints) of a graph."""
    inits = {i.name: i for i in model.graph.initializer}
    inputs = [
        TensorSpec(i.name, dtype_name(i.type.tensor_type.elem_type), _shape(i, i.name))
        for i in model.graph.input
        if i.name not in inits
    ]
    outputs = [TensorSpec(o.name, dtype_name(o.type.tensor_type.elem_type), _shape(o, o.name)) for o in model.graph.output]
    dims: list[str] = []
    for spec in inputs:
        dims += [d for d in spec.shape if isinstance(d, str) and d not in dims]
    meta = {p.key: p.value for p in model.metadata_props}
    hints: dict[str, dict[str, Any]] = dict(json.loads(meta.get(METADATA_VALUES, "{}")))
    for spec in inputs:
        if not spec.dtype.startswith("int") or spec.name in hints:
            continue
        # Token ids feed a Gather on an embedding table: its first dim bounds valid values.
        table = next(
            (inits[n.input[0]] for n in model.graph.node
             if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == spec.name and n.input[0] in inits),
            None,
        )
        if table is not None and table.dims:
            hints[spec.name] = {"kind": "randint", "low": 0, "high": int(table.dims[0])}
        elif "mask" in spec.name:
            hints[spec.name] = {"kind": "mask"}
    return inputs, outputs, dims, hints


def recorded_dims(model: onnx.ModelProto) -> dict[str, DimRange]:
    """Dim ranges recorded by `enginekit export` in the model's metadata (empty if none)."""
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        return {k: DimRange(**v) for k, v in json.loads(meta.get(METADATA_DIMS, "{}")).items()}
    except (TypeError, ValueError):
        return {}


def summarize(model: onnx.ModelProto) -> dict[str, Any]:
    """Op counts, opsets, initializer count and bytes (without loading external weights)."""
    ops = Counter((n.domain or "ai.onnx", n.op_type) for n in model.graph.node)
    weight_bytes = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            weight_bytes += int(next((e.value for e in init.external_data if e.key == "length"), 0))
        else:
            weight_bytes += len(init.raw_data) or 0
    return {
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "nodes": len(model.graph.node),
        "ops": {f"{d}::{t}" if d != "ai.onnx" else t: c for (d, t), c in sorted(ops.items(), key=lambda kv: -kv[1])},
        "initializers": len(model.graph.initializer),
        "weight_bytes": weight_bytes,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
    }
