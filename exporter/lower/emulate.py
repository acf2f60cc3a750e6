"""Low-precision numerics on the CPU, honestly: FP32 compute, FP16/BF16 storage.

ONNX Runtime's CPU provider has almost no FP16 kernels and no BF16 ones: it casts FP16 tensors
back to FP32 around every node, so an FP16 graph run on the CPU hides overflow (an activation
above 65504 never becomes inf) and storage rounding. GPU kernels (TensorRT, ORT CUDA) store
activations in the low precision and accumulate in FP32. `emulation_model` rewrites a lowered
graph into exactly that: every node that computes in FP16/BF16 gets its inputs cast up to FP32
and its outputs cast back down, so each activation is rounded (and overflows) the way a GPU's
would; ORT then runs it on the CPU at close to FP32 speed. Tensor names are kept, so the
emulated intermediates line up with the FP32 graph's for the fallback search.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from runtimes._deps import require

LOW = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
FLOATS = LOW | {TensorProto.FLOAT, TensorProto.DOUBLE}
_PROTO_LIMIT = (1 << 31) - (1 << 24)  # protobuf cannot serialize a message past 2 GiB
# Nodes that only move or create data keep their dtype: wrapping them would change nothing.
_PASS_THROUGH = {"Cast", "CastLike", "Constant", "ConstantOfShape"}


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor that shape inference or the graph declares."""
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def typed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with value_info filled in (shape inference); weights are not touched."""
    return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)


def emulation_model(lowered: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `lowered` that computes every low-precision node in FP32 and rounds its outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(lowered)
    types = tensor_types(typed(m))
    g = m.graph
    nodes = []
    for idx, n in enumerate(g.node):
        tag = f"{n.name or n.op_type}_{idx}"  # node names may be empty; the inserted ones must be unique
        low_in = [x for x in n.input if types.get(x) in LOW]
        low_out = [y for y in n.output if types.get(y) in LOW]
        if n.op_type in _PASS_THROUGH or n.domain not in ("", "ai.onnx") or not (low_in or low_out):
            nodes.append(n)
            continue
        for i, x in enumerate(n.input):
            if types.get(x) in LOW:
                up = f"{x}__emu_f32_{tag}_{i}"
                nodes.append(helper.make_node("Cast", [x], [up], to=TensorProto.FLOAT, name=f"{tag}__emu_up{i}"))
                n.input[i] = up
        downs = []
        for j, y in enumerate(n.output):
            if types.get(y) in LOW:
                raw = f"{y}__emu_raw"
                downs.append(helper.make_node("Cast", [raw], [y], to=types[y], name=f"{tag}__emu_down{j}"))
                n.output[j] = raw
        nodes.append(n)
        nodes.extend(downs)
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # stale after the rewrite; ORT infers types itself
    return m


def _session(model: onnx.ModelProto, outputs: Iterable[str] | None = None) -> object:
    ort = require("onnxruntime", extra="cpu", purpose="Low-precision emulation on the CPU")
    if outputs is not None:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs if n not in have)
        model = m
    so = ort.SessionOptions()
    # DISABLE_ALL: the reference and the emulation must run the graph as written (no fusion may
    # skip a rounding step); ORT's mandatory CPU cast insertion does not change the numerics.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    if model.ByteSize() < _PROTO_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    # Past protobuf's 2 GiB the model must go through a file with its weights beside it.
    tmp = Path(tempfile.mkdtemp(prefix="enginekit-emu-"))
    try:
        onnx.save(model, str(tmp / "m.onnx"), save_as_external_data=True, location="m.onnx.data")
        return ort.InferenceSession(str(tmp / "m.onnx"), so, providers=["CPUExecutionProvider"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # ORT has read the weights by now


def float_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of the float activations (node outputs) of a graph, in topological order."""
    types = tensor_types(typed(model))
    out = []
    for n in model.graph.node:
        for y in n.output:
            if y and types.get(y) in FLOATS:
                out.append(y)
    return out


def run_with_intermediates(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """Run `model` on the CPU and return the tensors `names` (graph outputs and intermediates),
    as float64 for comparison. Models above protobuf's 2 GiB cannot be run this way."""
    sess = _session(model, names)
    inputs = {i.name for i in sess.get_inputs()}  # type: ignore[attr-defined]
    values = sess.run(names, {k: v for k, v in feeds.items() if k in inputs})  # type: ignore[attr-defined]
    return {n: np.asarray(v) for n, v in zip(names, values)}


def run_outputs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = _session(model)
    names = [o.name for o in sess.get_outputs()]  # type: ignore[attr-defined]
    return dict(zip(names, sess.run(names, dict(feeds))))  # type: ignore[attr-defined]


def load_full(path: Path) -> onnx.ModelProto:
    """Graph and weights in memory (the emulation and the layer-wise runs need them inline)."""
    return onnx.load(str(path), load_external_data=True)


def emulated_runner(lowered_path: Path) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """A callable running the storage emulation of a lowered graph (one session, reused)."""
    sess = _session(emulation_model(load_full(lowered_path)))
    names = [o.name for o in sess.get_outputs()]  # type: ignore[attr-defined]
    inputs = {i.name for i in sess.get_inputs()}  # type: ignore[attr-defined]

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in inputs})))  # type: ignore[attr-defined]

    return run
