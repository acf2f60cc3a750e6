"""A memory bound on the dim ranges, checked before anything large is allocated.

`--shapes batch=1:1:100000000` once took a 24 GB host down: the export traces at small sample
sizes and succeeds, then the gate generates its inputs at the max shape (input_ids int64
[100000000, 128] alone is 95 GiB) and the OOM killer ends the session. Two estimates, both lower
bounds of what a build allocates, are compared with the memory this machine has (or --memory-limit):

- before export, from the IOSpec: the bytes of every graph input at each shape point the gate
  generates a case for (exporter/gate/cases.py gate_cases keeps one feed dict per distinct
  min/opt/max point, all in one list for the whole gate), so the sum over those points is held at once;
- after export, from the ONNX graph: its input dims set to their max values, onnx shape inference
  propagates them, and inputs + outputs + the largest intermediate tensor must fit (one run of the
  engine at the max shape holds at least those).

Importing this module imports no torch; onnx only inside graph_estimate.
"""

from __future__ import annotations

import ast
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtimes.errors import UsageError
from runtimes.manifest import IOSpec
from runtimes.samples import SHAPE_POINTS

GIB = 1 << 30


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    dims: tuple[str, ...] = ()  # the named dims of its shape, for the message

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True)
class Estimate:
    total: int  # bytes
    largest: Tensor
    what: str  # what the total counts, for the message


def itemsize(dtype: str) -> int:
    import numpy as np

    try:
        return int(np.dtype(dtype).itemsize)
    except TypeError:  # bfloat16, float8_*: numpy has no such dtype
        bits = re.search(r"(\d+)", dtype)
        return max(1, int(bits.group(1)) // 8) if bits else 4


def available_bytes() -> int | None:
    """Memory this process can still allocate: MemAvailable (/proc/meminfo; what the kernel can give
    without swapping), capped by a cgroup v2 limit (a container's memory.max, where the OOM killer
    acts first); else free physical pages (sysconf); None where none of them can be read."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            room = max(0, int(limit) - used)
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def input_estimate(io: IOSpec, *, gate_cases: bool = True) -> Estimate | None:
    """The graph inputs' bytes over the gate's generated cases (one per distinct min/opt/max point,
    as gate_cases makes them), or at the max point alone (gate_cases=False: generation bundles,
    whose gate runs prompts, and whose runtime holds one batch of them)."""
    points = SHAPE_POINTS if gate_cases else ("max",)
    seen, total = set(), 0
    largest: Tensor | None = None
    for point in points:
        key = tuple(sorted((k, r.at(point)) for k, r in io.dims.items()))
        if key in seen:
            continue
        seen.add(key)
        for spec in io.inputs:
            try:
                t = Tensor(spec.name, spec.dtype, io.shape_at(spec, point),
                           tuple(d for d in spec.shape if isinstance(d, str)))
            except KeyError:  # a dim without a range: prepare_dims refuses those first
                continue
            total += t.nbytes
            if largest is None or t.nbytes > largest.nbytes:
                largest = t
    if largest is None:
        return None
    if not gate_cases:
        return Estimate(total, largest, "one batch of the inputs")
    cases = f"{len(seen)} case{'s' if len(seen) > 1 else ''}, held at once"
    return Estimate(total, largest, f"the parity gate's generated inputs alone ({cases})")


def graph_estimate(onnx_path: Path, io: IOSpec) -> Estimate | None:
    """Inputs + outputs + the largest intermediate tensor of the graph at the max shape (onnx shape
    inference from the inputs' max dims; a dim it cannot infer counts as 1: a lower bound still)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    top = {k: r.max for k, r in io.dims.items()}
    for value in model.graph.input:
        for d in value.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in top:
                d.dim_value = top[d.dim_param]  # a oneof: this clears dim_param
    del model.graph.value_info[:]
    inferred = model
    for data_prop in (True, False):  # data propagation resolves Reshape targets built from Shape ops
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=data_prop)
            break
        except Exception:  # onnx raises InferenceError, ValidationError, or a C++ error as RuntimeError
            continue
    g = inferred.graph
    weights = {t.name for t in g.initializer}
    inputs = [_tensor(v, top) for v in g.input if v.name not in weights]
    outputs = [_tensor(v, top) for v in g.output]
    ends = {v.name for v in g.output}
    middle = [_tensor(v, top) for v in g.value_info if v.name not in ends and v.name not in weights]
    tensors = [t for t in inputs + outputs + middle if t is not None]
    if not tensors:
        return None
    biggest = max((t for t in middle if t is not None), key=lambda t: t.nbytes, default=None)
    total = sum(t.nbytes for t in inputs + outputs if t is not None) + (biggest.nbytes if biggest else 0)
    return Estimate(total, max(tensors, key=lambda t: t.nbytes),
                    "one run of the graph (its inputs, outputs and largest intermediate tensor)")


def _tensor(value: Any, top: Mapping[str, int]) -> Tensor | None:
    import onnx

    tt = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    except (KeyError, TypeError, ValueError):
        dtype = "float32"
    shape, names = [], []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            shape.append(int(d.dim_value))
        else:
            shape.append(_dim_value(d.dim_param, top) or 1)
            if d.dim_param:
                names.append(d.dim_param)
    return Tensor(value.name, dtype, tuple(shape), tuple(names))


def _dim_value(expr: str, top: Mapping[str, int]) -> int | None:
    """A symbolic dim ('batch', 'sequence + 1', '2*s0') at the max values; None when unknown."""
    if not expr:
        return None
    try:
        node = ast.parse(expr, mode="eval").body
    except SyntaxError:
        return None
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.FloorDiv: lambda a, b: a // b, ast.Div: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}

    def ev(n: ast.AST) -> int | None:
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.Name):
            return top.get(n.id)
        if isinstance(n, ast.BinOp) and type(n.op) in ops:
            a, b = ev(n.left), ev(n.right)
            if a is None or b is None or (b == 0 and isinstance(n.op, (ast.FloorDiv, ast.Div, ast.Mod))):
                return None
            return ops[type(n.op)](a, b)
        return None

    value = ev(node)
    return value if value is not None and value > 0 else None


def check_memory(io: IOSpec, memory_limit: float | None, *, graph: Path | None = None,
                 gate_cases: bool = True) -> Estimate | None:
    """Refuse dim ranges whose estimate (input_estimate, or graph_estimate when `graph` is given)
    exceeds `memory_limit` GiB (None: available_bytes()). Each recipe calls this once its dims are
    merged (before export) and once per exported graph. Returns the estimate."""
    est = graph_estimate(graph, io) if graph is not None else input_estimate(io, gate_cases=gate_cases)
    limit = int(memory_limit * GIB) if memory_limit is not None else available_bytes()
    if est is None or limit is None or est.total <= limit:
        return est
    t = est.largest
    ranges = ", ".join(f"{d}={io.dims[d]}" for d in dict.fromkeys(t.dims) if d in io.dims)
    have = (f"--memory-limit is {memory_limit:g} GiB" if memory_limit is not None
            else f"this machine has {limit / GIB:.1f} GiB available")
    raise UsageError(
        f"Expected the dim ranges to fit in memory, but at their max shapes {est.what} need at least "
        f"{est.total / GIB:.1f} GiB: {t.name} {t.dtype}[{', '.join(map(str, t.shape))}] alone is "
        f"{t.nbytes / GIB:.1f} GiB" + (f" (from {ranges})" if ranges else "") + f", and {have}. Narrow the ranges "
        "with smaller --shapes maxima, or pass --memory-limit GIB (e.g. --memory-limit "
        f"{math.ceil(est.total / GIB)}) if that memory will be there; nothing large was allocated"
        + (", nothing was built." if graph is not None else ", nothing was exported.")
    )
