"""torch → ONNX with torch.onnx.export (dynamo), explicit dynamic dims, checker and shape inference.

The model is first traced with torch.export (non-strict) so tracing errors and conversion errors
can be told apart; dims keep their names in the ONNX graph ('batch', 'sequence') because the same
dynamic_shapes are handed to the ONNX conversion. When the conversion fails on an HF model,
transformers' own exporter (transformers.exporters.OnnxExporter, which patches ops that ONNX
cannot lower) is tried before giving up.
"""

from __future__ import annotations

import contextlib
import io as _io
import json
import logging
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from exporter.export.onnxutil import METADATA_DIMS, METADATA_VALUES, dtype_name
from exporter.source.spec import LoadedSource
from runtimes.errors import ExportError
from runtimes.manifest import DimRange, IOSpec, TensorSpec, file_sha256
from runtimes.samples import generate_feeds

# Above this many bytes of weights the model is saved with external data (model.onnx.data).
EXTERNAL_DATA_BYTES = 1 << 30
_NO_FUNCTION = re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>")


@dataclass
class ExportResult:
    path: Path
    io: IOSpec
    exporter: str
    opset: int
    external_data: bool
    seconds: float
    sha256: str


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' progress prints, warnings and info logs for the duration."""
    names = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo", "onnxscript", "transformers")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(_io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def trace_sizes(dims: Mapping[str, DimRange], static_sizes: set[int]) -> dict[str, int]:
    """Example sizes for tracing: opt, but never 0/1 (torch.export specializes those), never equal
    to another dim's size or to a static size (it would assume they are the same symbol)."""
    used = set(static_sizes)
    out = {}
    for name, r in dims.items():
        if r.min == r.max:
            out[name] = r.min
            continue
        v = min(max(2, r.opt), r.max)
        while v in used and v < r.max:
            v += 1
        while v in used and v > max(2, r.min):
            v -= 1
        used.add(v)
        out[name] = v
    return out


def export_onnx(source: LoadedSource, path: Path, *, opset: int | None = None, exporter: str = "auto") -> ExportResult:
    """Export `source.module` with dims `source.io.dims` to `path`; returns the IOSpec with outputs."""
    import torch

    if source.module is None:
        raise ExportError(f"Source '{source.spec}' is already ONNX; it needs no export.")
    io = source.io
    static = {d for s in io.inputs for d in s.shape if isinstance(d, int)}
    sizes = trace_sizes(io.dims, static)
    feeds = generate_feeds(io, sizes)
    args = tuple(torch.from_numpy(feeds[s.name]) for s in io.inputs)
    torch_dims = {n: torch.export.Dim(n.replace("-", "_"), min=r.min, max=r.max) for n, r in io.dims.items() if r.min < r.max}
    dynamic_shapes = {"args": tuple(
        {axis: torch_dims[d] for axis, d in enumerate(s.shape) if isinstance(d, str) and d in torch_dims} or None
        for s in io.inputs
    )}
    input_names = [s.name for s in io.inputs]
    output_names = list(source.module.output_names)
    path = Path(path)
    start = time.perf_counter()
    used = "torch.onnx.export (dynamo)"
    try:
        program = _torch_export(source.module, args, dynamic_shapes, input_names, output_names, opset)
    except ExportError:
        if exporter == "torch" or source.hf_model is None:
            raise
        program = None
    if program is None or exporter == "transformers":
        program = _transformers_export(source, feeds, torch_dims, opset)
        used = "transformers.exporters.OnnxExporter"
    weight_bytes = sum(p.numel() * p.element_size() for p in source.module.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    with quiet():
        program.save(str(path), external_data=external)
    _finalize_graph(path, io)
    try:
        onnx.checker.check_model(str(path))
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
    except Exception as exc:  # checker ValidationError / shape inference errors
        raise ExportError(
            f"Expected the exported graph to pass the ONNX checker and shape inference, but: "
            f"{str(exc).strip().splitlines()[0][:300]}. This is an exporter bug for this model; try "
            "another --opset or --exporter, and report it."
        ) from None
    graph = onnx.load(str(path), load_external_data=False)
    outputs = [
        TensorSpec(o.name, dtype_name(o.type.tensor_type.elem_type),
                   tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in o.type.tensor_type.shape.dim))
        for o in graph.graph.output
    ]
    if [o.name for o in outputs] != output_names:
        raise ExportError(
            f"Expected the exported outputs {output_names}, found {[o.name for o in outputs]}. The exporter "
            "renamed or dropped outputs; report this model."
        )
    return ExportResult(
        path=path,
        io=replace(io, outputs=outputs),
        exporter=used,
        opset=next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
        external_data=external,
        seconds=time.perf_counter() - start,
        sha256=file_sha256(path),
    )


def _torch_export(module: Any, args: tuple[Any, ...], dynamic_shapes: Any, input_names: list[str],
                  output_names: list[str], opset: int | None) -> Any:
    import torch

    with quiet():
        try:
            ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:  # torch.export raises many types (UserError, GuardOnDataDependentSymNode...)
            raise ExportError(
                "Expected torch.export to trace the model with the requested dynamic dims, but it failed: "
                f"{_condense(exc)} Fix the model code it points at, or narrow the dims (--dynamic, --shapes)."
            ) from None
        try:
            return torch.onnx.export(
                ep, args, dynamic_shapes=dynamic_shapes, input_names=input_names, output_names=output_names,
                opset_version=opset, dynamo=True, verbose=False, optimize=True,
                custom_translation_table=_translations(),
            )
        except Exception as exc:  # torch.onnx.OnnxExporterError and its causes
            raise _conversion_error(exc, ep, opset) from None


def _translations() -> dict[Any, Any]:
    """ONNX translations of enginekit's own custom ops (NMS in the graph: exporter/export/nms.py)."""
    from exporter.export.nms import onnx_translations

    return onnx_translations()


def _condense(exc: BaseException, limit: int = 900) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return (text[:limit] + " …") if len(text) > limit else text


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _conversion_error(exc: BaseException, ep: Any, opset: int | None) -> ExportError:
    import torch

    op = None
    for e in _chain(exc):
        m = _NO_FUNCTION.search(str(e))
        if m:
            op = m.group(1)
            break
    if op is None:
        return ExportError(
            "Expected torch.onnx to convert the traced model to ONNX, but it failed: "
            f"{_condense(exc)} Try another --opset, or --exporter transformers for Hugging Face models."
        )
    where = _locate_op(ep, op)
    return ExportError(
        f"Expected every operator of the model to have an ONNX translation, but '{op}'{where} has none in "
        f"torch {torch.__version__}'s ONNX exporter (opset {opset or 'default'}). Replace that operation in the "
        "model, register a translation with torch.onnx.export(custom_translation_table=...), or try another "
        "--opset."
    )


def _locate_op(ep: Any, op: str) -> str:
    """' (in module block: Inner, at file.py:5)' for the first node of `op`, searched before and
    after decomposition (torch.onnx decomposes first, so the failing op may only exist after)."""
    base = op.split(".")[-1].lstrip("_")
    for program in (ep, None):
        try:
            graph = (program or ep.run_decompositions()).graph
        except Exception:
            continue
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            target = str(node.target)
            if not (target.startswith(op + ".") or target.split(".")[-2:-1] == [base] or base in target):
                continue
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            # "model." is enginekit's wrapper attribute, not part of the user's module path.
            path = stack[-1][0].removeprefix("model.") if stack else ""
            module = f" in module '{path}' ({stack[-1][1].rsplit('.', 1)[-1]})" if stack else ""
            frames = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s+(.+)', node.meta.get("stack_trace") or "")
            at = f", at {Path(frames[-1][0]).name}:{frames[-1][1]} `{frames[-1][2].strip()}`" if frames else ""
            if module or at:
                return f" ({module.strip()}{at})"
    return ""


def _transformers_export(source: LoadedSource, feeds: Mapping[str, Any], torch_dims: Mapping[str, Any], opset: int | None) -> Any:
    """transformers.exporters.OnnxExporter on the HF model; returns an object with .save()."""
    import torch

    try:
        from transformers.exporters import OnnxConfig, OnnxExporter
    except ImportError as exc:
        raise ExportError(f"transformers' exporter is not available here ({exc}); upgrade transformers to 5.x.") from None
    kwargs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    ds = {s.name: {a: torch_dims[d] for a, d in enumerate(s.shape) if isinstance(d, str) and d in torch_dims}
          for s in source.io.inputs}
    with quiet():
        try:
            exported = OnnxExporter().export(
                source.hf_model, kwargs, OnnxConfig(dynamic_shapes=ds, opset_version=opset,
                                                     prefer_deferred_runtime_asserts_over_guards=True))
        except Exception as exc:  # the exporter wraps torch errors in RuntimeError
            raise ExportError(
                f"Expected torch.onnx or transformers' exporter to convert the model, but both failed; "
                f"transformers said: {_condense(exc)}"
            ) from None

    class _Saver:
        def save(self, dest: str, external_data: bool = False) -> None:
            import onnx_ir

            onnx_ir.save(exported.program, dest, external_data=(Path(dest).name + ".data") if external_data else None)

    return _Saver()


def _finalize_graph(path: Path, io: IOSpec) -> None:
    """Give symbolic dims our names where an exporter chose its own (s0, s1...), and record the
    dim ranges and input value hints in the model's metadata so `onnx:` builds can reuse them."""
    model = onnx.load(str(path), load_external_data=False)
    mapping: dict[str, str] = {}
    for vi in model.graph.input:
        spec = next((s for s in io.inputs if s.name == vi.name), None)
        if spec is None:
            continue
        for d, want in zip(vi.type.tensor_type.shape.dim, spec.shape):
            if isinstance(want, str) and d.dim_param and d.dim_param != want:
                mapping[d.dim_param] = want
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in mapping:
                d.dim_param = mapping[d.dim_param]
    set_metadata(model, {
        METADATA_DIMS: json.dumps({k: asdict(v) for k, v in io.dims.items()}),
        METADATA_VALUES: json.dumps(io.values),
    })
    onnx.save(model, str(path))  # weights stay where they are: only the graph proto is rewritten


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
