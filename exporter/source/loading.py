"""Loading a source (the pipeline's first stage): `load_source(spec)` dispatches to the loader of
its kind (hf: exporter/source/hf.py; py:, timm:, onnx: here), and `prepare_dims` applies --shapes and
--dynamic to the loaded source's default dim ranges."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from exporter.source.families import BATCH
from exporter.source.shapes import merge_dims
from exporter.source.spec import LoadedSource, SourceSpec, make_wrapper, model_name
from runtimes.errors import SourceError, UsageError
from runtimes.manifest import DimRange, IOSpec, TensorSpec


def load_source(spec: SourceSpec) -> LoadedSource:
    if spec.kind == "hf":
        from exporter.source.hf import load_hf

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
    from exporter.export.onnxutil import (
        METADATA_LOWERED,
        METADATA_REFERENCE,
        io_from_onnx,
        load_onnx_checked,
        recorded_dims,
    )

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


def prepare_dims(loaded: LoadedSource, shapes: dict[str, DimRange], dynamic: list[str] | None) -> IOSpec:
    """The source's default dim ranges with --shapes and --dynamic applied. An onnx: source may name
    graph dims that have no default range; each of those must get one from --shapes."""
    named = [d for s in loaded.io.inputs for d in s.shape if isinstance(d, str)]
    unranged = {k: v for k, v in shapes.items() if k in named and k not in loaded.io.dims}
    ranged = {k: v for k, v in shapes.items() if k not in unranged}
    dims = merge_dims(loaded.io.dims, ranged, dynamic) if loaded.io.dims or ranged else {}
    dims.update(unranged)
    missing = sorted({d for d in named if d not in dims})
    if missing:
        raise UsageError(
            f"Expected a range for every dynamic dim of the ONNX inputs, but {missing} have none. Give them "
            "with --shapes, e.g. --shapes " + ",".join(f"{d}=1:64:128" for d in missing) + "."
        )
    return replace(loaded.io, dims=dims)


def processor_dir(loaded: LoadedSource) -> Path | None:
    """Where texts are tokenized and images preprocessed from: the tokenizer's folder, or the hf:
    folder itself (its preprocessor_config.json) for vision models without a tokenizer."""
    if loaded.tokenizer_dir is not None:
        return loaded.tokenizer_dir
    spec = loaded.spec
    return Path(spec.location) if spec.kind == "hf" and Path(spec.location).is_dir() else None
