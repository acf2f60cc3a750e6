"""ONNX → ONNX Runtime engine: an offline-optimized ONNX graph for one execution provider.

ORT's offline optimization is the documented way to pay graph-rewrite costs once at build time
instead of at every session start. Three facts shape what is saved:
- ORT_ENABLE_ALL adds layout transforms (NCHWc) specific to the build machine's CPU, and ORT's
  docs say a model saved at that level may only run on the same hardware; so the saved model stops
  at EXTENDED and the runner applies ALL when it opens the session (cheap and portable).
- EXTENDED fusions are assigned to the provider registered while optimizing: a CUDA bundle is
  optimized with the CUDA provider where this machine has one.
- A CUDA bundle may be built on a machine without a GPU. FP32 graphs are then saved at BASIC
  (provider-independent constant folding and redundant-node removal). FP16/BF16 graphs are saved
  as lowered: the CPU provider would bake its own FP16→FP32 casts (it has no FP16 kernels) into
  the graph, and it cannot load BF16 at all. The CUDA provider applies its fusions at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._deps import require
from ..errors import BuildError, UsageError
from ..manifest import Target

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
ENGINE_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# Above this many bytes of weights the optimized model keeps them in model.onnx.data: protobuf
# cannot hold a file over 2 GiB, and a separate file lets the runtime memory-map the weights.
EXTERNAL_DATA_BYTES = 1 << 30


@dataclass(frozen=True)
class OrtBuildOptions:
    """device: 'cpu' or 'cuda'. offline_level: 'basic' | 'extended' | 'none' | None (None: chosen by
    device, the providers present and `low_precision`, see the module docstring)."""

    device: str = "cpu"
    offline_level: str | None = None
    low_precision: bool = False

    def __post_init__(self) -> None:
        if self.device not in PROVIDERS:
            raise UsageError(
                f"Expected --device to be one of {sorted(PROVIDERS)}, found '{self.device}'. "
                "Use --device cpu for the CPU provider or --device cuda for an NVIDIA GPU."
            )


def _offline_plan(ort: Any, options: OrtBuildOptions) -> tuple[str, str]:
    """(level, provider used to optimize)."""
    if options.offline_level:
        provider = PROVIDERS[options.device] if options.device in ort.get_available_providers() else PROVIDERS["cpu"]
        return options.offline_level, provider
    if options.device == "cpu":
        return "extended", PROVIDERS["cpu"]
    if PROVIDERS["cuda"] in ort.get_available_providers():
        return "extended", PROVIDERS["cuda"]
    return ("none" if options.low_precision else "basic"), PROVIDERS["cpu"]


def needs_external_data(onnx_path: Path) -> bool:
    """Whether a graph with its external data files (`model.onnx*`) is past EXTERNAL_DATA_BYTES, so that a
    rewrite of it must keep its weights outside the protobuf (which cannot exceed 2 GiB)."""
    onnx_path = Path(onnx_path)
    return sum(p.stat().st_size for p in onnx_path.parent.glob(onnx_path.name + "*")) > EXTERNAL_DATA_BYTES


def build_ort_engine(onnx_path: Path, bundle_dir: Path, options: OrtBuildOptions) -> Target:
    """Optimize `onnx_path` offline into `bundle_dir/model.onnx` (+ .data) and describe the target."""
    ort = require("onnxruntime", extra="cpu", purpose="Building an ONNX Runtime engine")
    level_name, provider = _offline_plan(ort, options)
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }
    if level_name not in levels and level_name != "none":
        raise UsageError(f"Expected offline_level 'basic', 'extended' or 'none', found '{level_name}'.")
    onnx_path = Path(onnx_path)
    external = needs_external_data(onnx_path)
    if level_name == "none":
        _copy_model(onnx_path, bundle_dir / ENGINE_FILE, external)
    else:
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[level_name]
        so.optimized_model_filepath = str(bundle_dir / ENGINE_FILE)
        so.log_severity_level = 3  # errors only: ORT's build-time warnings are not actionable here
        if external:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(onnx_path), so, providers=[provider])
        except Exception as exc:  # ORT raises its own pybind exception types (Fail, InvalidGraph, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BuildError(
                f"Expected ONNX Runtime {ort.__version__} to load and optimize {onnx_path}, but it refused the "
                f"graph: {first}. Check the graph with `enginekit inspect {onnx_path}`; if an operator is "
                "unsupported, re-export with another --opset or report the model."
            ) from None
    files = [ENGINE_FILE] + ([DATA_FILE] if (bundle_dir / DATA_FILE).exists() else [])
    dynamic = data_dependent_ops(bundle_dir / ENGINE_FILE)
    return Target(
        backend="ort",
        device=options.device,
        engine_files=files,
        providers=[PROVIDERS[options.device]] + ([PROVIDERS["cpu"]] if options.device != "cpu" else []),
        options={"offline_optimization": level_name, "optimized_with": provider, "session_optimization": "all",
                 "external_data": external, **({"data_dependent_ops": dynamic} if dynamic else {})},
        versions={"onnxruntime": ort.__version__},
    )


# Ops whose output sizes depend on the data: ORT copies those sizes to the host mid-run, which a CUDA graph
# cannot capture (the YOLOX-style detector with NMS in the graph on the H200: "operation failed due to a
# previous error during capture", 2026-12-02).
UNCAPTURABLE_OPS = ("NonMaxSuppression", "NonZero", "Unique")


def data_dependent_ops(engine: Path) -> list[str]:
    """Op types of the engine whose output sizes depend on the data (NMS, NonZero): recorded in the manifest,
    because the runner cannot replay such an engine as a CUDA graph (runtimes/ort/runner.py)."""
    import onnx

    graph = onnx.load(str(engine), load_external_data=False).graph
    return sorted({n.op_type for n in graph.node if n.op_type in UNCAPTURABLE_OPS})


def _copy_model(src: Path, dst: Path, external: bool) -> None:
    """Save the graph as-is under the bundle's file names (external data re-pointed)."""
    import onnx

    model = onnx.load(str(src), load_external_data=True)
    onnx.save(model, str(dst), save_as_external_data=external, location=DATA_FILE if external else None)
