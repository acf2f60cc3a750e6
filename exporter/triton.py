"""`enginekit triton`: an engine bundle as a model in a Triton Inference Server model repository.

    REPO/<name>/config.pbtxt        platform, max_batch_size, inputs/outputs, dynamic batching, instances
    REPO/<name>/1/model.onnx        (onnxruntime_onnx; + model.onnx.data) or model.plan (tensorrt_plan)
    REPO/<name>/1/model.py + bundle/ (--backend python: enginekit's runtime inside Triton; exporter/triton_python.py)

Triton's convention: with max_batch_size > 0 the batch dim is implicit and left out of `dims`;
every other dynamic dim is -1. An engine without a batch axis shared by all inputs and outputs
gets max_batch_size 0 and full shapes. The model folder is assembled beside its destination and
renamed into place, so Triton polling the repository never sees half a model. The text is checked
against Triton's own ModelConfig protobuf when the `tritonclient` package is installed.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from exporter.bundle.staging import new_staging, publish
from exporter.triton_python import check_python_bundle, env_parameter, write_python_model
from runtimes.choices import Kind
from runtimes.errors import BuildError, UsageError
from runtimes.manifest import Manifest, TensorSpec, verify_files
from runtimes.serve.app import batch_dim
from runtimes.serve.kserve import TO_DATATYPE

# backend → (Triton platform, file name Triton loads from the version folder)
PLATFORMS = {"ort": ("onnxruntime_onnx", "model.onnx"), "trt": ("tensorrt_plan", "model.plan")}
# Triton's config data types are the KServe v2 datatypes (runtimes/serve/kserve.py) with TYPE_ in front, plus
# BF16, which Triton has and the service's KServe body carries as FP32.
TRITON_TYPES = {**{dtype: f"TYPE_{name}" for dtype, name in TO_DATATYPE.items()}, "bfloat16": "TYPE_BF16"}
BACKENDS = {"onnxruntime": "ort", "tensorrt": "trt", "python": None}  # --backend → the bundle backend it needs
NAME_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class TritonOptions:
    """Defaults: the bundle's name, max_batch_size = the engine's max batch, 2 ms queue delay, one instance."""

    name: str | None = None
    max_batch: int | None = None
    max_delay_ms: float = 2.0
    instances: int = 1
    force: bool = False
    backend: str | None = None  # onnxruntime | tensorrt | python; None: the bundle's own (onnxruntime or tensorrt)
    python_env: Path | None = None  # --backend python: the venv the python backend's stub activates


def triton_backend(manifest: Manifest, options: TritonOptions) -> str:
    """The Triton backend the model is written for: options.backend, else the one of the bundle's backend."""
    own = {v: k for k, v in BACKENDS.items() if v}.get(manifest.target.backend)
    chosen = options.backend or own
    if chosen not in BACKENDS or (BACKENDS[chosen] and chosen != own):
        raise UsageError(f"Expected --backend {' or '.join(b for b in BACKENDS if b in (own, 'python'))} for the "
                         f"'{manifest.target.backend}' bundle '{manifest.name}', found '{chosen}'.")
    if options.python_env is not None and chosen != "python":
        raise UsageError(f"Expected --python-env only with --backend python, found it with '{chosen}'.")
    return chosen


def triton_config(manifest: Manifest, options: TritonOptions) -> str:
    """config.pbtxt for the bundle described by `manifest` (protobuf text format)."""
    backend = manifest.target.backend
    if backend not in PLATFORMS:
        raise UsageError(f"Expected a bundle for backend {' or '.join(PLATFORMS)}, found '{backend}'.")
    if options.instances < 1 or options.max_delay_ms < 0:
        raise UsageError(f"Expected --instances >= 1 and --max-delay-ms >= 0, found {options.instances} and "
                         f"{options.max_delay_ms}.")
    io = manifest.io
    batch, max_batch = triton_batching(manifest, options)
    chosen = triton_backend(manifest, options)
    platform = f"backend: {_quote('python')}" if chosen == "python" else f"platform: {_quote(PLATFORMS[backend][0])}"
    kind = "KIND_GPU" if manifest.target.device == "cuda" or backend == "trt" else "KIND_CPU"
    lines = [
        (f"# Written by enginekit {manifest.enginekit_version or ''} from bundle '{manifest.name}' "
         f"({backend}/{manifest.target.device}/{manifest.precision.get('requested', '?')})."),
        f"name: {_quote(options.name or manifest.name)}",
        platform,
        f"max_batch_size: {max_batch}",
        _tensors("input", io.inputs, batch is not None, manifest),
        _tensors("output", io.outputs, batch is not None, manifest),
    ]
    if batch is not None:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {round(options.max_delay_ms * 1000)}", "}"]
    lines += ["instance_group [", "  {", f"    count: {options.instances}", f"    kind: {kind}", "  }", "]"]
    if chosen == "python" and options.python_env is not None:
        lines.append(env_parameter(options.python_env))
    return "\n".join(lines) + "\n"


def triton_batching(manifest: Manifest, options: TritonOptions) -> tuple[str | None, int]:
    """The engine's batch dim (None without one) and the max_batch_size Triton gets (0 without one)."""
    batch = batch_dim(manifest.io)
    if batch is None:
        if options.max_batch:
            raise UsageError(f"Expected no --max-batch: engine '{manifest.name}' has no batch axis shared by all its "
                             "inputs and outputs, so Triton gets max_batch_size 0 (each request one engine run).")
        return None, 0
    engine_max = manifest.io.dims[batch].max
    max_batch = options.max_batch or engine_max
    if not 1 <= max_batch <= engine_max:
        raise UsageError(f"Expected --max-batch between 1 and {engine_max} (the engine's '{batch}' range), found "
                         f"{options.max_batch}. Rebuild with a wider range (--shapes {batch}=MIN:OPT:MAX) for more.")
    return batch, max_batch


def _tensors(field: str, specs: list[TensorSpec], batched: bool, manifest: Manifest) -> str:
    blocks = []
    for s in specs:
        if s.dtype not in TRITON_TYPES:
            raise UsageError(f"Expected a dtype Triton knows for '{s.name}', found {s.dtype} in '{manifest.name}'.")
        dims = [d if isinstance(d, int) else -1 for d in (s.shape[1:] if batched else s.shape)]
        # Triton wants at least one dim; a per-row scalar is dims [1] reshaped to [] for the engine.
        shape = f"    dims: [ {', '.join(map(str, dims or [1]))} ]" + ("" if dims else "\n    reshape: { shape: [ ] }")
        blocks.append(f"  {{\n    name: {_quote(s.name)}\n    data_type: {TRITON_TYPES[s.dtype]}\n{shape}\n  }}")
    return f"{field} [\n" + ",\n".join(blocks) + "\n]"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def model_config_schema() -> ModuleType | None:
    """Triton's ModelConfig protobuf module (tritonclient/grpc/model_config_pb2.py), or None if absent.

    Loaded from its file: importing `tritonclient.grpc` needs grpcio, which the schema does not."""
    name = "_enginekit_triton_model_config_pb2"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    file_spec = importlib.util.spec_from_file_location(name, path)
    if not path.is_file() or file_spec is None or file_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except Exception:
        return None
    sys.modules[name] = module
    return module


def parse_config(text: str) -> Any:
    """`text` parsed into Triton's ModelConfig message; None when tritonclient is not installed."""
    schema = model_config_schema()
    if schema is None:
        return None
    from google.protobuf import text_format  # type: ignore[import-untyped]

    try:
        return text_format.Parse(text, schema.ModelConfig())
    except text_format.ParseError as exc:
        raise BuildError(f"Expected a config.pbtxt that Triton's ModelConfig schema accepts, but it does not "
                         f"({exc}). This is a bug in enginekit; please report it with the bundle's manifest.") from None


def export_triton(bundle: Path, repo: Path, options: TritonOptions | None = None) -> dict[str, Any]:
    """Write REPO/<name>/ (config.pbtxt + 1/<model file>) from a bundle; returns what was written."""
    options = options or TritonOptions()
    bundle, repo = Path(bundle), Path(repo)
    manifest = Manifest.read(bundle)
    verify_files(bundle, manifest)
    python = options.backend == "python"
    parts = manifest.target.options.get("parts") if manifest.kind is Kind.ZERO_SHOT else None
    if parts:
        flags = " --backend python" if python else ""
        raise UsageError(
            f"Expected a bundle with one engine, found the zero-shot bundle '{bundle}' with one per tower "
            f"({', '.join(parts)}). Export each tower as its own Triton model: "
            + " and ".join(f"enginekit triton {bundle / p} --repo {repo}{flags}" for p in parts.values())
            + " (the similarity is a matrix product on the client)."
        )
    check_python_bundle(bundle, manifest)
    name = options.name or manifest.name
    if not NAME_OK.match(name):
        raise UsageError(f"Expected a model name of letters, digits, '_', '.', '-' (a folder name for Triton), found "
                         f"'{name}'. Pass --name.")
    config = triton_config(manifest, options)
    parsed = parse_config(config)
    destination = repo / name
    if destination.exists() and not options.force:
        raise BuildError(f"Expected '{destination}' not to exist, but it does. Pass --force to replace it; nothing "
                         "was written.")
    staging = new_staging(destination)
    try:
        version = staging / "1"
        version.mkdir(parents=True)
        if python:
            write_python_model(bundle, manifest, version)
        else:
            model_file = PLATFORMS[manifest.target.backend][1]
            engine_files = manifest.target.engine_files
            # The first engine file is the model; the rest (external data) keep the names it refers to.
            shutil.copy2(manifest.file(bundle, engine_files[0], "engine file"), version / model_file)
            for extra in engine_files[1:]:
                shutil.copy2(manifest.file(bundle, extra, "engine file"), version / extra)
        (staging / "config.pbtxt").write_text(config, encoding="utf-8")
        publish(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"model_dir": str(destination), "config": str(destination / "config.pbtxt"),
            "platform": "python" if python else PLATFORMS[manifest.target.backend][0],
            "max_batch_size": triton_batching(manifest, options)[1],
            "files": sorted(str(p.relative_to(destination)) for p in destination.rglob("*") if p.is_file()),
            "validated": parsed is not None, "notes": _notes(manifest, options, parsed is not None)}


def _notes(manifest: Manifest, options: TritonOptions, validated: bool) -> list[str]:
    trt = manifest.target.backend == "trt"
    versions = ", ".join(f"{k} {v}" for k, v in manifest.target.versions.items()) or "versions not recorded"
    if options.backend == "python":
        where = (f"the venv {Path(options.python_env).expanduser().resolve()} (EXECUTION_ENV_PATH)"
                 if options.python_env else "the server's Python (pass --python-env VENV to use a venv instead)")
        notes = [f"{where} must have numpy, {'tensorrt' if trt else 'onnxruntime'} and enginekit's runtime "
                 f"(the `runtimes` package) installed, matching the build ({versions}); Triton's python backend "
                 "stub must be built for that Python version."]
    else:
        notes = [f"Triton's {'TensorRT' if trt else 'ONNX Runtime'} should match the build's ({versions}): "
                 + ("a plan runs only on the TensorRT version it was built with." if trt
                    else "the ONNX was offline-optimized by that version.")]
    if not validated:
        notes.append("config.pbtxt not checked against Triton's schema: pip install tritonclient to check it.")
    return notes
