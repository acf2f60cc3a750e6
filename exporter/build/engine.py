"""Building the engine (the pipeline's build stage): ONNX → an ORT bundle (with ORT's fusions) or a
TensorRT plan, through runtimes/*/build.py; and the TensorRT hand-off where the builder is missing."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from exporter.lower.precision import Lowered
from exporter.options import BuildOptions, build_command
from exporter.source.spec import LoadedSource
from exporter.timing import Progress
from runtimes.manifest import IOSpec


def build_engine(onnx_path: Path, bundle: Path, options: BuildOptions, io: IOSpec, output: Path,
                 progress: Progress, *, low_precision: bool = False, work: Path | None = None) -> Any:
    """The engine files in `bundle` and their runtimes.manifest.Target. ORT: the graph through
    transformers' ORT fusion pass first (exporter/build/ortfuse.py; a failure builds it unfused and says so)."""
    if options.target == "ort":
        from runtimes.ort.build import OrtBuildOptions, build_ort_engine

        fusion: dict[str, Any] = {"enabled": options.ort_fusions}
        if options.ort_fusions and work is not None:
            from exporter.build.ortfuse import fuse_for_ort

            fused_path = work / f"{onnx_path.stem}.ort-{options.device}.onnx"
            try:
                fusion.update(fuse_for_ort(onnx_path, fused_path, options.device))
                onnx_path = fused_path
            except Exception as exc:  # the fusion pass is best effort: an unfused engine is still correct
                fusion["error"] = f"{type(exc).__name__}: {str(exc)[:200]}; built unfused"
        target = build_ort_engine(onnx_path, bundle, OrtBuildOptions(device=options.device, low_precision=low_precision))
        target.options["fusions"] = fusion
        return target
    from runtimes.trt.build import TIMING_CACHE_FILE, build_trt_engine

    # The bundle this build replaces (--force) tuned the same graph: its timing cache saves time.
    return build_trt_engine(onnx_path, bundle, options.trt, io, previous_cache=output / TIMING_CACHE_FILE,
                            progress=progress)


def check_tensorrt(loaded: LoadedSource, onnx_path: Path, lowered: Lowered, options: BuildOptions,
                   output: Path) -> None:
    """Stop a TensorRT build that cannot run here, keeping the lowered ONNX and saying how to
    finish the build on a machine with TensorRT (exporter/build/handoff.py)."""
    from exporter.build.handoff import keep_lowered, kept_folder, tensorrt_missing
    from runtimes.trt.build import tensorrt_unavailable

    reason = tensorrt_unavailable()
    if reason is None:
        return
    dest = kept_folder(output)
    if dest.resolve() in Path(lowered.path).resolve().parents:
        kept = Path(lowered.path)  # building from the kept ONNX itself: it is already there
    else:
        reference = loaded.reference_onnx or (Path(onnx_path) if Path(lowered.path) != Path(onnx_path) else None)
        kept = keep_lowered(Path(lowered.path), reference, loaded.io, options.precision, dest)
    finish = build_command(f"onnx:{kept}", options, output, loaded.io.dims)  # as given: the command runs elsewhere
    raise tensorrt_missing(reason, kept, shlex.join(finish))


def realised(lowered: Lowered, target: Any) -> dict[str, Any]:
    """What the lowering put in the graph, plus what the engine computes in where the backend can
    say (TensorRT's engine inspector: layers per output type)."""
    layers = target.options.get("layers") if target.backend == "trt" else None
    return {**lowered.realised, **({"engine_layers": layers} if layers else {})}


def torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def has_cuda_provider() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    from runtimes.device import gpu_info

    return "CUDAExecutionProvider" in ort.get_available_providers() and gpu_info() is not None
