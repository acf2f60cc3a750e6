"""Model sources: `hf:<dir or hub id>[#task]`, `py:<module or file.py>:<factory>`, `onnx:<path>`,
`timm:<name>[#pretrained]`, each loaded into a `LoadedSource` the pipeline can export and check.

A LoadedSource carries the torch module to export (a wrapper whose forward takes the inputs in
IOSpec order and returns a tuple of named outputs), the IOSpec (inputs, dims, value hints), and
computes reference outputs (torch fp32; for onnx: sources, ONNX Runtime on the fp32 ONNX).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.errors import SourceError
from runtimes.manifest import DimRange, IOSpec, TensorSpec

from .families import BATCH

KINDS = ("hf", "py", "onnx", "timm")


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    location: str
    task: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.location}" + (f"#{self.task}" if self.task else "")


def parse_source(text: str) -> SourceSpec:
    """Parse a SOURCE argument. Without a prefix, '*.onnx' means onnx: and a folder means hf:."""
    raw = text.strip()
    kind, sep, rest = raw.partition(":")
    if not sep or kind not in KINDS or (len(kind) == 1 and os.name == "nt"):
        if raw.endswith(".onnx"):
            kind, rest = "onnx", raw
        elif Path(raw).is_dir():
            kind, rest = "hf", raw
        else:
            raise SourceError(
                f"Expected SOURCE as hf:<folder or hub id>[#task], py:<module>:<factory>, onnx:<file> or "
                f"timm:<name>, found '{text}'. Example: enginekit build hf:./my-model --target ort."
            )
    location, _, task = rest.partition("#") if kind in ("hf", "timm") else (rest, "", "")
    if not location:
        raise SourceError(f"Expected a location after '{kind}:' in SOURCE '{text}', found nothing.")
    if kind in ("hf", "onnx") and Path(location).expanduser().exists():
        location = str(Path(location).expanduser().resolve())
    return SourceSpec(kind, location, task or None)


@dataclass
class LoadedSource:
    spec: SourceSpec
    name: str
    io: IOSpec  # outputs are filled in by the export
    module: Any | None = None  # torch.nn.Module wrapper; None for onnx: sources
    onnx_path: Path | None = None  # onnx: sources only
    info: dict[str, Any] = field(default_factory=dict)  # task, family, class: recorded in the manifest
    tokenizer_dir: Path | None = None  # where text data is tokenized from
    hf_model: Any | None = None  # the PreTrainedModel, for transformers' own exporter
    device: str = "cpu"  # where the torch reference runs ("cuda" for GPU builds: strict FP32, no TF32)
    reference_onnx: Path | None = None  # onnx: sources whose metadata names an FP32 reference beside them

    def reference(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """FP32 reference outputs for `feeds`: the torch module, or ORT on the source ONNX."""
        if self.module is not None:
            return run_torch(self.module, self.io, feeds, device=self.device)
        from runtimes._deps import require

        ort = require("onnxruntime", extra="cpu", purpose="The reference run of an onnx: source")
        if not hasattr(self, "_ref_session"):
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            so.log_severity_level = 3
            self._ref_session = ort.InferenceSession(str(self.reference_onnx or self.onnx_path), so,
                                                     providers=["CPUExecutionProvider"])
        names = [o.name for o in self.io.outputs]
        return dict(zip(names, self._ref_session.run(names, dict(feeds))))


def run_torch(module: Any, io: IOSpec, feeds: Mapping[str, np.ndarray], device: str = "cpu") -> dict[str, np.ndarray]:
    import torch

    dtypes = {s.name: s.dtype for s in io.inputs}
    # The reference is FP32 whatever the engine takes (native FP16 I/O casts back here).
    args = tuple(torch.from_numpy(np.ascontiguousarray(np.asarray(feeds[n]).astype(np.float32)
                                                       if np.asarray(feeds[n]).dtype.kind == "f" else feeds[n]))
                 for n in dtypes)
    if device == "cuda":
        module.to("cuda")
        args = tuple(a.to("cuda") for a in args)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # strict FP32 reference
    try:
        with torch.inference_mode():
            outs = module(*args)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    names = module.output_names
    return {n: (o.detach().float() if o.dtype == torch.bfloat16 else o.detach()).cpu().numpy() for n, o in zip(names, outs)}


def named_outputs(out: Any, prefix: str = "output") -> dict[str, Any]:
    """Flatten a model's return value into {name: tensor}: ModelOutput/dict keys keep their names,
    tuples become output_0, output_1...; nested model outputs, caches and None are dropped."""
    import torch

    if isinstance(out, torch.Tensor):
        return {prefix: out}
    if isinstance(out, Mapping):
        return {str(k): v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        flat: dict[str, Any] = {}
        for i, v in enumerate(out):
            if isinstance(v, torch.Tensor):
                flat[f"{prefix}_{i}"] = v
            elif isinstance(v, (tuple, list)):
                flat.update(named_outputs(v, f"{prefix}_{i}"))
        return flat
    return {}


def make_wrapper(model: Any, input_names: list[str], call: Callable[[Any, dict[str, Any]], Any], example: Mapping[str, np.ndarray]) -> Any:
    """Wrap `model` so forward(*inputs in order) returns a tuple of named tensor outputs."""
    import torch

    class OutputsAsTuple(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.input_names = list(input_names)
            self.output_names: list[str] = []

        def forward(self, *args: Any) -> tuple[Any, ...]:
            outs = named_outputs(call(self.model, dict(zip(self.input_names, args))))
            return tuple(outs[n] for n in self.output_names)

    wrapper = OutputsAsTuple().eval()
    with torch.inference_mode():
        first = named_outputs(call(model, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in example.items()}))
    if not first:
        raise SourceError(
            f"Expected the model ({type(model).__name__}) to return tensors (a tensor, a tuple or a dict of "
            "them), found none in its output. Return the tensors to export from forward()."
        )
    wrapper.output_names = list(first)
    return wrapper


def model_name(spec: SourceSpec) -> str:
    """A short name for default bundle folders: the folder, file or factory name."""
    if spec.kind == "py":
        base = spec.location.rsplit(":", 1)[-1]
    else:
        base = Path(spec.location.rstrip("/")).name
        base = base[: -len(".onnx")] if base.endswith(".onnx") else base
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-").lower() or "model"


def load_source(spec: SourceSpec) -> LoadedSource:
    if spec.kind == "hf":
        from .hf import load_hf

        return load_hf(spec)
    if spec.kind == "onnx":
        return load_onnx_source(spec)
    if spec.kind == "timm":
        return load_timm(spec)
    return load_py(spec)


# -- py:<module>:<factory> ----------------------------------------------------------------------------
def _import_module(location: str) -> Any:
    if location.endswith(".py") or os.sep in location:
        path = Path(location).expanduser()
        if not path.is_file():
            raise SourceError(f"Expected a Python file at '{location}' for the py: source, found nothing there.")
        name = f"_enginekit_src_{path.stem}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        mod_spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path:  # like `python -m`: modules next to where the command runs
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(location)
    except ImportError as exc:
        raise SourceError(
            f"Expected an importable Python module '{location}' for the py: source, but importing it failed "
            f"({exc}). Run from the folder that holds it, add it to PYTHONPATH, or give a file path "
            "(py:path/to/file.py:factory)."
        ) from None


def load_py(spec: SourceSpec) -> LoadedSource:
    import torch

    module_part, sep, factory_name = spec.location.rpartition(":")
    if not sep or not module_part or not factory_name:
        raise SourceError(
            f"Expected py:<module or file.py>:<factory>, found 'py:{spec.location}'. The factory is a function "
            "returning (model, example_inputs) or (model, example_inputs, dynamic_dims)."
        )
    factory = getattr(_import_module(module_part), factory_name, None)
    if not callable(factory):
        raise SourceError(f"Expected a callable '{factory_name}' in '{module_part}', found none.")
    result = factory()
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise SourceError(
            f"Expected {factory_name}() to return (model, example_inputs[, dynamic_dims]), found "
            f"{type(result).__name__}. example_inputs is a dict name -> tensor (or a tuple of tensors); "
            "dynamic_dims maps input name -> {axis: dim name}, e.g. {'x': {0: 'batch'}}."
        )
    model, example, dynamic = (list(result) + [None])[:3]
    if not isinstance(model, torch.nn.Module):
        raise SourceError(f"Expected {factory_name}() to return a torch.nn.Module first, found {type(model).__name__}.")
    if isinstance(example, torch.Tensor):
        example = (example,)
    if isinstance(example, (tuple, list)):
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params][: len(example)]
        names += [f"input_{i}" for i in range(len(names), len(example))]
        example = dict(zip(names, example))
        call: Callable[[Any, dict[str, Any]], Any] = lambda m, kw: m(*kw.values())
    else:
        call = lambda m, kw: m(**kw)
    if not isinstance(example, Mapping) or not all(isinstance(v, torch.Tensor) for v in example.values()):
        raise SourceError(f"Expected {factory_name}()'s example inputs to be tensors, found {type(example).__name__}.")
    feeds = {k: v.detach().cpu().numpy() for k, v in example.items()}
    if dynamic is None:
        firsts = {v.shape[0] for v in feeds.values() if v.ndim >= 1}
        dynamic = {k: {0: "batch"} for k, v in feeds.items() if v.ndim >= 1} if len(firsts) == 1 else {}
    specs, dims = [], {}
    for name, arr in feeds.items():
        axes = dict(dynamic.get(name, {}))
        shape = tuple(axes.get(i, arr.shape[i]) for i in range(arr.ndim))
        specs.append(TensorSpec(name, arr.dtype.name, shape))
        for axis, dim in axes.items():
            size = int(arr.shape[axis])
            default = DimRange(1, size, max(size, BATCH[2])) if "batch" in dim else DimRange(1, size, size)
            dims.setdefault(dim, default)
    io = IOSpec(inputs=specs, outputs=[], dims=dims, values={})
    wrapper = make_wrapper(model.eval(), list(feeds), call, feeds)
    # A model may describe itself for the manifest (exporter.nms.Detector: task and NMS settings).
    own = dict(getattr(model, "enginekit_info", None) or {})
    return LoadedSource(spec, model_name(spec), io, module=wrapper,
                        info={"task": "custom", "family": "py", "class": type(model).__name__, **own})


# -- timm:<name> --------------------------------------------------------------------------------------
def load_timm(spec: SourceSpec) -> LoadedSource:
    from runtimes._deps import require

    timm = require("timm", extra="timm", purpose="A timm: source")
    pretrained = spec.task == "pretrained"
    try:
        model = timm.create_model(spec.location, pretrained=pretrained).eval()
    except Exception as exc:  # timm raises RuntimeError for unknown names, hub errors for weights
        raise SourceError(
            f"Expected '{spec.location}' to be a timm model name{' with downloadable weights' if pretrained else ''}, "
            f"but timm failed: {exc}. List names with timm.list_models('{spec.location[:4]}*')."
        ) from None
    cfg = timm.data.resolve_data_config({}, model=model)
    c, h, w = cfg["input_size"]
    io = IOSpec(
        inputs=[TensorSpec("pixel_values", "float32", ("batch", int(c), int(h), int(w)))],
        outputs=[], dims={"batch": DimRange(*BATCH)}, values={"pixel_values": {"kind": "normal", "std": 1.0}},
    )
    from runtimes.samples import generate_feeds

    wrapper = make_wrapper(model, ["pixel_values"], lambda m, kw: {"logits": m(kw["pixel_values"])}, generate_feeds(io, "opt"))
    return LoadedSource(spec, model_name(spec), io, module=wrapper,
                        info={"task": "image-classification", "family": "timm", "class": type(model).__name__,
                              "weights": "pretrained" if pretrained else "random"})


# -- onnx:<path> --------------------------------------------------------------------------------------
def load_onnx_source(spec: SourceSpec) -> LoadedSource:
    from .onnxutil import METADATA_LOWERED, METADATA_REFERENCE, io_from_onnx, load_onnx_checked, recorded_dims

    path = Path(spec.location)
    model = load_onnx_checked(path)
    inputs, outputs, dim_names, hints = io_from_onnx(model)
    recorded = recorded_dims(model)
    dims = {d: recorded.get(d, DimRange(*BATCH)) for d in dim_names
            if d in recorded or "batch" in d.lower() or d in ("N", "n")}
    io = IOSpec(inputs=inputs, outputs=outputs, dims=dims, values=hints)
    missing = [d for d in dim_names if d not in dims]
    meta = {p.key: p.value for p in model.metadata_props}
    info = {"task": "custom", "family": "onnx", "dims_without_range": missing,
            "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)}
    if meta.get(METADATA_LOWERED):
        info["lowered"] = meta[METADATA_LOWERED]
    reference = path.parent / meta[METADATA_REFERENCE] if meta.get(METADATA_REFERENCE) else None
    if reference is not None and not reference.is_file():
        raise SourceError(
            f"Expected the FP32 reference ONNX that '{path}' names in its metadata at '{reference}', found nothing "
            "there. Copy the whole folder that `enginekit build` kept, not only the model file."
        )
    return LoadedSource(spec, model_name(spec), io, onnx_path=path, info=info, reference_onnx=reference)
