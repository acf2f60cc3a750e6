"""Building the engine (the pipeline's build stage): ONNX → an ORT bundle (with ORT's fusions) or a
TensorRT plan, through runtimes/*/build.py; and the TensorRT hand-off where the builder is missing."""

from __future__ import annotations

import shlex
import shutil
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
        return _build_ort(onnx_path, bundle, options, io, low_precision, work)
    from runtimes.trt.build import TIMING_CACHE_FILE, build_trt_engine

    # The bundle this build replaces (--force) tuned the same graph: its timing cache saves time.
    return build_trt_engine(onnx_path, bundle, options.trt, io, previous_cache=output / TIMING_CACHE_FILE,
                            progress=progress)


def _build_ort(onnx_path: Path, bundle: Path, options: BuildOptions, io: IOSpec, low_precision: bool,
               work: Path | None) -> Any:
    """The ORT engine from the fused graph, unless fusing fails, or the fused engine fails to build, load
    or run, or differs from the unfused graph (exporter/build/ortfuse.py fusion_breaks): then from the
    unfused graph, with the reason recorded in target.options["fusions"]["fallback"]."""
    from runtimes.errors import BuildError
    from runtimes.ort.build import ENGINE_FILE, OrtBuildOptions, build_ort_engine

    ort_options = OrtBuildOptions(device=options.device, low_precision=low_precision)
    fusion: dict[str, Any] = {"enabled": options.ort_fusions}
    target = None
    unfused = _without_shapes(onnx_path) if low_precision and work is not None else onnx_path
    if options.ort_fusions and work is not None:
        from exporter.build.ortfuse import fuse_for_ort, fusion_breaks

        fused_path = work / f"{onnx_path.stem}.ort-{options.device}.onnx"
        reason = None
        try:
            fusion.update(fuse_for_ort(onnx_path, fused_path, options.device))  # the fusions read the shapes
            target = build_ort_engine(_without_shapes(fused_path) if low_precision else fused_path, bundle, ort_options)
            reason = fusion_breaks(unfused, bundle / ENGINE_FILE, io, options.device, str(options.precision))
        except BuildError as exc:
            reason = f"the fused graph does not build: {str(exc)[:300]}"
        except Exception as exc:  # the fusion pass is best effort: an unfused engine is still correct
            reason = f"fusing failed: {type(exc).__name__}: {str(exc)[:200]}"
        if reason is not None:
            fusion["fallback"] = f"{reason}; built unfused"
            fusion["tried_ops"] = fusion.pop("fused_ops", {})
            fusion.pop("nodes_after", None)
            target = None
            for stale in bundle.iterdir():
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    if target is None:
        target = build_ort_engine(unfused, bundle, ort_options)
    target.options["fusions"] = fusion
    return target


def _without_shapes(path: Path) -> Path:
    """A copy of the graph beside it (its external data shared) without intermediate shapes (value_info). AutoCast's
    shape inference names different sizes by one symbol, and ONNX Runtime, planning buffers by those names, fails at
    run time: "Shape mismatch attempting to re-use buffer. {1,32,4,4} != {1,16,8,8}" at the tiny detector's Resize,
    kept in FP32 between casts in its BF16 graph (H200, 12-02); the generation recipe met it in decoders. ORT infers
    the shapes itself; the fusion pass, which reads them, runs on the graph with them first."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if not model.graph.value_info:
        return path
    del model.graph.value_info[:]
    out = path.with_name(path.stem + ".noshapes.onnx")
    onnx.save(model, str(out))
    return out


def unfuse_reason(report: Any, fusions: list[dict[str, Any]], ort_fusions: bool) -> str | None:
    """After the gate: why the engines must be built again without ORT's fusions (a failed gate on engines
    where something was fused: a fusion must never make a graph worse; OPT's fused attention broke its padded
    batch), or None (the gate passed, nothing was fused, or fusions are already off)."""
    from exporter.gate.parity import format_failures

    if report.status != "failed" or not ort_fusions or not any(f.get("fused_ops") for f in fusions):
        return None
    engines = "engines" if len(fusions) > 1 else "engine"
    return f"the gate failed on the fused {engines} ({format_failures(report)}); built unfused"


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
