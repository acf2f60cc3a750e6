"""FP16 / BF16 as mixed precision in the ONNX graph, with NVIDIA ModelOpt AutoCast.

AutoCast (modelopt.onnx.autocast.convert_to_mixed_precision) is the path TensorRT 11's docs
prescribe: it runs the FP32 graph on calibration data (ONNX Runtime), keeps in FP32 every node
whose weights exceed the FP16 range or whose activations exceed `data_max` (512 by default: the
FP16 step there is 0.5), converts the rest, and inserts the Cast nodes at the boundaries. It is
installed without its `[onnx]` extra, whose pins conflict with onnx 1.23 / ORT 1.31
(`pip install 'enginekit[precision]'`). enginekit adds what AutoCast lacks: real calibration data
instead of its default U(-1, 1) for every input (token ids included), per-node reasons recorded
in the manifest, and the parity-driven fallback (exporter/lower/fallback.py) that passes nodes AutoCast
missed back through `nodes_to_exclude`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from exporter.export.onnxutil import dtype_name
from exporter.lower.emulate import LOW, tensor_types, typed
from runtimes._deps import require
from runtimes.choices import Precision
from runtimes.errors import BuildError, UsageError

FP16_MAX = 65504.0
_SKIP = re.compile(r"Skipping node (\S+): (.*)")


@dataclass
class MixedOptions:
    """keep_io_types: FP32 graph inputs/outputs (default) or native FP16/BF16 I/O (faster on GPU).
    fp32_nodes / fp32_ops: regexes (matched from the start of node names) / op types kept in FP32.
    range_rules: AutoCast's weight and activation range rules (off = a naive cast of every node,
    which only the parity-driven fallback then repairs). max_fp32_nodes / max_iterations: the
    fallback's budget."""

    precision: str = "fp16"
    keep_io_types: bool = True
    fp32_nodes: Sequence[str] = ()
    fp32_ops: Sequence[str] = ()
    range_rules: bool = True
    data_max: float = 512.0
    max_fp32_nodes: int = 64
    max_iterations: int = 6
    excluded: dict[str, str] = field(default_factory=dict)  # node name -> why (fallback decisions)
    op_reasons: dict[str, str] = field(default_factory=dict)  # fp32_ops entries the build added -> why
    # op types that read their FP16/BF16 inputs through a Cast to FP32 (keep_unrunnable_op): a comparison
    # is not lowered itself, so keeping it in FP32 does not help when the provider has no kernel for it
    cast_inputs_ops: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        precision = Precision.parse(self.precision, "the mixed precision")
        if not precision.mixed:
            raise UsageError(f"Expected fp16 or bf16 for mixed precision, found '{self.precision}'.")
        self.precision = precision


@contextlib.contextmanager
def _captured_modelopt_logs() -> Iterator[list[str]]:
    """ModelOpt prints INFO to stdout from every modelopt.onnx* logger; route it into a list."""
    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    names = [n for n in list(logging.root.manager.loggerDict) if n.startswith("modelopt")]
    saved = {}
    for name in names:
        lg = logging.getLogger(name)
        saved[name] = (lg.handlers[:], lg.propagate, lg.level)
        for h in lg.handlers[:]:
            lg.removeHandler(h)
        lg.propagate = name != "modelopt.onnx"
    top = logging.getLogger("modelopt.onnx")
    keep = _Keep(level=logging.INFO)
    top.addHandler(keep)
    top.setLevel(logging.INFO)
    # Parts of ModelOpt call logging.warning() on the root logger, which would also install a
    # stderr handler for the rest of the process; a handler of ours on root prevents both.
    root = logging.getLogger()
    root_keep = _Keep(level=logging.WARNING)
    root.addHandler(root_keep)
    try:
        yield records
    finally:
        root.removeHandler(root_keep)
        top.removeHandler(keep)
        for name, (handlers, propagate, level) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers[:] = handlers
            lg.propagate = propagate
            lg.setLevel(level)


def _autocast() -> Any:
    require("onnx_graphsurgeon", extra="precision", purpose="FP16/BF16 lowering (ModelOpt AutoCast)")
    mo = require("modelopt.onnx.autocast", extra="precision", purpose="FP16/BF16 lowering (ModelOpt AutoCast)")
    return mo.convert_to_mixed_precision


def write_calibration(feeds: Sequence[Mapping[str, np.ndarray]], folder: Path) -> Path:
    """AutoCast reads a folder of .npz files, one batch each."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(feeds):
        np.savez(folder / f"{i:04d}.npz", **{k: np.asarray(v) for k, v in f.items()})
    return folder


def lower_mixed(onnx_path: Path, out_path: Path, options: MixedOptions,
                calibration: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Convert `onnx_path` to mixed precision at `out_path`; returns the realised-precision record."""
    convert = _autocast()
    calib_dir = write_calibration(calibration, out_path.parent / f"{out_path.stem}.calib")
    from_ints = integer_derived_nodes(onnx.load(str(onnx_path), load_external_data=False))
    excluded = [f"^{re.escape(n)}$" for n in [*options.excluded, *from_ints]] + list(options.fp32_nodes)
    with _captured_modelopt_logs() as logs:
        try:
            model = convert(
                str(onnx_path),
                low_precision_type=options.precision,
                nodes_to_exclude=excluded or None,
                op_types_to_exclude=list(options.fp32_ops) or None,
                data_max=options.data_max if options.range_rules else np.inf,
                init_max=FP16_MAX if options.range_rules else None,
                keep_io_types=options.keep_io_types,
                calibration_data=str(calib_dir),
                providers=["cpu"],
            )
        except Exception as exc:  # AutoCast raises plain Exception/ValueError/AssertionError
            raise BuildError(
                f"Expected ModelOpt AutoCast to lower {onnx_path.name} to {options.precision}, but it failed: "
                f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}. Keep the "
                "failing op in FP32 with --fp32-ops OP, or report the model."
            ) from None
        finally:
            shutil.rmtree(calib_dir, ignore_errors=True)
    if options.cast_inputs_ops:
        model = cast_inputs_to_fp32(model, options.cast_inputs_ops)
    big = model.ByteSize() > (1 << 30)
    onnx.save(model, str(out_path), save_as_external_data=big, location=out_path.name + ".data" if big else None)
    autocast_reasons = {n: INTEGER_DERIVED for n in from_ints}
    for line in logs:
        m = _SKIP.match(line)
        if m:
            autocast_reasons[m.group(1)] = "AutoCast: " + m.group(2)
    return census(model, options, autocast_reasons)


# ONNX Runtime's words for a node no provider has a kernel for (1.31: "Provider type for Resize node with
# name 'x' is not set" during memcpy planning; older: "Could not find an implementation for Resize(19)
# node with name 'x'").
_NO_KERNEL = re.compile(r"Provider type for (\w+) node with name '([^']*)' is not set"
                        r"|Could not find an implementation for (\w+)\(\d+\) node with name '([^']*)'")


def keep_unrunnable_op(exc: Exception, options: MixedOptions, history: list[dict[str, Any]],
                       say: Callable[[str], None], graph: Path | None = None) -> bool:
    """The provider refused a lowered node for lack of a kernel in its dtype: keep that op type in
    FP32 and ask for another lowering round. AutoCast does not know ONNX Runtime's kernel coverage
    (on the H200, ORT 1.31's CUDA provider has no BF16 Resize: a YOLOX-style detector's upsampling
    stopped the build), and ORT's kernel registry cannot be queried safely (get_all_opkernel_def
    crashes the process in onnxruntime-gpu builds whose TensorRT provider libraries are absent), so
    the session creation is the oracle. False when the error is anything else, or the op is
    already FP32 (no progress possible).

    A refused node without a name is one ONNX Runtime made itself: it expands an op that has no kernel in
    its dtype into the op's ONNX function body (Clip-13 → Less, Where), and the body's ops have none either
    (a YOLOX-style detector's BF16 Clip on the H200, and on the CPU provider). `graph` (the refused ONNX)
    names the op types whose function holds the refused op; those are kept in FP32 instead."""
    m = _NO_KERNEL.search(str(exc))
    if not m:
        return False
    op, node = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not node and graph is not None and len(history) < options.max_iterations:
        expanded = [t for t in function_ops_holding(graph, op) if t not in options.fp32_ops]
        if expanded:
            options.fp32_ops = sorted({*options.fp32_ops, *expanded})
            for t in expanded:
                options.op_reasons[t] = (f"no {options.precision} kernel in the execution provider: ONNX Runtime expands "
                                         f"{t} into its ONNX function, whose {op} it cannot run either")
            history.append({"round": len(history) + 1, "failures": [options.op_reasons[expanded[0]]], "kept_fp32": [],
                            "kept_fp32_ops": expanded, "stopped": None})
            say(f"ONNX Runtime expanded {', '.join(expanded)} into a {op} it has no {options.precision} kernel for: "
                f"keeping {', '.join(expanded)} in FP32 and lowering again")
            return True
    if op in options.fp32_ops and op not in options.cast_inputs_ops and len(history) < options.max_iterations:
        # Refused again with the op itself in FP32: it reads lowered tensors (a Less fed by BF16 boxes in the
        # YOLOX-style detector on the H200). Cast those inputs up to FP32 at the node.
        options.cast_inputs_ops.append(op)
        why = f"no {options.precision} kernel for {op} in the execution provider: its {options.precision} inputs are cast to FP32 at the node"
        history.append({"round": len(history) + 1, "failures": [why], "kept_fp32": [], "cast_inputs_ops": [op], "stopped": None})
        say(f"ONNX Runtime still refused {op} ({node}) in FP32: casting its {options.precision} inputs to FP32 and lowering again")
        return True
    if op in options.fp32_ops or len(history) >= options.max_iterations:
        kept = [h["kept_fp32_ops"][0] for h in history if h.get("kept_fp32_ops")]
        raise BuildError(
            f"Expected every node of the {options.precision} graph to have a kernel in the execution provider, but "
            f"ONNX Runtime refused {op} node '{node}' even with {op} kept in FP32 (op types kept in FP32 so far: "
            f"{', '.join(kept) or 'none'}). Its inputs come from {options.precision} nodes (a comparison, for example, "
            f"is not lowered itself but reads lowered tensors). Keep the producers in FP32 with --fp32-nodes REGEX, "
            "or build another precision (fp16 has wider kernel coverage)."
        ) from None
    options.fp32_ops = sorted({*options.fp32_ops, op})
    options.op_reasons[op] = f"no {options.precision} kernel in the execution provider (ONNX Runtime refused node {node})"
    history.append({"round": len(history) + 1, "failures": [options.op_reasons[op]], "kept_fp32": [],
                    "kept_fp32_ops": [op], "stopped": None})
    say(f"ONNX Runtime has no {options.precision} kernel for {op} ({node}): keeping {op} in FP32 and lowering again")
    return True


def function_ops_holding(graph: Path, op: str) -> list[str]:
    """Op types of `graph`'s low-precision nodes whose ONNX function body (static, or built for the node's own
    inputs) contains `op`: what ONNX Runtime expands when it has no kernel for the op itself."""
    from onnx import FunctionProto, helper

    model = onnx.load(str(graph), load_external_data=False)
    types = tensor_types(typed(model))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 22)
    found = set()
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx") or n.op_type in found or not any(types.get(i) in LOW for i in n.input):
            continue
        try:
            schema = onnx.defs.get_schema(n.op_type, opset)
            if schema.has_context_dependent_function:
                inputs = [helper.make_tensor_type_proto(types.get(i, onnx.TensorProto.FLOAT), None).SerializeToString()
                          for i in n.input]
                body = FunctionProto()
                body.ParseFromString(schema.get_context_dependent_function(n.SerializeToString(), inputs))
                ops = {b.op_type for b in body.node}
            else:
                ops = {b.op_type for b in schema.function_body.node} if schema.has_function else set()
        except Exception:  # onnx's schema errors (an op unknown at this opset, a body it cannot build)
            continue
        if op in ops:
            found.add(n.op_type)
    return sorted(found)


def cast_inputs_to_fp32(model: onnx.ModelProto, ops: Sequence[str]) -> onnx.ModelProto:
    """`model` with a Cast to FP32 in front of every FP16/BF16 input of the nodes whose op type is in `ops`
    (onnx_ir; the node then computes, or compares, in FP32)."""
    import onnx_ir as ir

    types = tensor_types(typed(model))
    graph_model = ir.from_proto(model)
    graph = graph_model.graph
    for node in [n for n in graph if n.op_type in ops]:
        for k, value in enumerate(node.inputs):
            if value is None or types.get(value.name) not in LOW:
                continue
            cast = ir.node("Cast", [value], attributes={"to": ir.DataType.FLOAT}, name=f"{node.name or node.op_type}_in{k}_fp32")
            cast.outputs[0].name = f"{value.name}_fp32_for_{node.name or node.op_type}_{k}"
            cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.FLOAT, value.shape
            graph.insert_before(node, cast)
            node.replace_input_with(k, cast.outputs[0])
    return ir.to_proto(graph_model)


INTEGER_DERIVED = ("computes from integers only (lengths, positions, masks): kept exact in FP32 (wav2vec2's "
                   "frame lengths rounded in FP16 indexed past its mask)")
_INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
              onnx.TensorProto.UINT8, onnx.TensorProto.BOOL}


def integer_derived_nodes(model: onnx.ModelProto, small: int = 16) -> list[str]:
    """Float nodes of `model` whose inputs all derive from integers and small constants, never from a
    float graph input or a weight: sequence lengths, position ids turned into angles, masks. In FP16 they
    round (a frame count of 48.9 becomes 49.0, an index past the end); kept in FP32 they cost nothing."""
    types = tensor_types(typed(model))
    g = model.graph
    derived = {i.name for i in g.input if i.type.tensor_type.elem_type in _INT_TYPES}
    derived |= {t.name for t in g.initializer if t.data_type in _INT_TYPES or np.prod(t.dims, dtype=np.int64) <= small}
    derived.add("")  # an omitted optional input
    found = []
    for n in g.node:
        if n.op_type == "Constant" or (n.op_type in ("Shape", "Size") and n.input):
            derived.update(n.output)
            continue
        if not all(x in derived for x in n.input):
            continue
        derived.update(n.output)
        if n.op_type != "Cast" and any(types.get(y) == onnx.TensorProto.FLOAT for y in n.output):
            found.append(n.name)
    return [name for name in found if name]


def census(model: onnx.ModelProto, options: MixedOptions, autocast_reasons: Mapping[str, str]) -> dict[str, Any]:
    """Node counts per compute dtype and every FP32 node with the reason it stayed FP32."""
    types = tensor_types(typed(model))
    counts: Counter[str] = Counter()
    fp32 = []
    user = [re.compile(p) for p in options.fp32_nodes]
    for n in model.graph.node:
        if n.op_type in ("Cast", "Constant"):
            continue
        floats = [types[y] for y in n.output if types.get(y) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                                   onnx.TensorProto.BFLOAT16)]
        if not floats:
            continue
        dtype = dtype_name(floats[0])
        counts[dtype] += 1
        if dtype == "float32":
            if n.name in options.excluded:
                reason = options.excluded[n.name]
            elif any(p.match(n.name) for p in user):
                reason = "user: --fp32-nodes"
            elif n.op_type in options.fp32_ops:
                reason = options.op_reasons.get(n.op_type, "user: --fp32-ops")
            elif n.name in autocast_reasons:
                reason = autocast_reasons[n.name]
            else:
                reason = f"AutoCast: {n.op_type} has no {options.precision} kernel at this opset, or feeds an FP32 graph output"
            fp32.append({"node": n.name, "op": n.op_type, "reason": reason})
    return {
        "requested": options.precision,
        "tool": "nvidia-modelopt AutoCast " + _modelopt_version(),
        "nodes_by_dtype": dict(counts),
        "cast_nodes": sum(1 for n in model.graph.node if n.op_type == "Cast"),
        "fp32_nodes": fp32,
        "io": "fp32" if options.keep_io_types else options.precision,
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "range_rules": options.range_rules,
        **({"inputs_cast_to_fp32": list(options.cast_inputs_ops)} if options.cast_inputs_ops else {}),
    }


def _modelopt_version() -> str:
    try:
        from importlib.metadata import version

        return version("nvidia-modelopt")
    except Exception:
        return "?"


def mixed_options(options: Any) -> MixedOptions | None:
    """The mixed-precision lowering's options from a build's (exporter.options.BuildOptions), or None
    for precisions that are not mixed (fp32, int8, fp8)."""
    if not options.precision.mixed:
        return None
    return MixedOptions(
        precision=options.precision, keep_io_types=not options.native_io, fp32_nodes=list(options.fp32_nodes),
        fp32_ops=list(options.fp32_ops), range_rules=options.range_rules,
        max_fp32_nodes=options.fallback_budget, max_iterations=options.fallback_rounds,
    )
