"""`enginekit build`: source → ONNX → lowered ONNX → engine → parity gate → bundle.

The bundle is assembled in a hidden sibling folder and renamed into place only after the gate
passes, so a killed or failed build leaves nothing half-written at the output path. A bundle that
fails the gate is kept, for inspection, at `<output>.rejected`.

For --target trt, export and lowering run first; where TensorRT or a GPU is missing the build
stops there, keeps the lowered ONNX at `<output>.lowered/` and names the command that finishes
it on a TensorRT machine (exporter/handoff.py).
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from runtimes._version import __version__
from runtimes.errors import BuildError, IncompatibleEngine, MissingDependency, ParityError, UsageError
from runtimes.manifest import IOSpec, Manifest, file_sha256

from . import detect
from .emulate import emulated_runner
from .gate import CachedReference, Feeds, gate_cases, run_gate, shrink
from .mixed import MixedOptions, keep_unrunnable_op
from .options import DEVICES, TARGETS, BuildOptions, build_command, default_output  # noqa: F401 (re-exported)
from .parity import ParityReport, format_failures
from .precision import Lowered, census, lower_precision
from .report import write_html
from .shapes import merge_dims
from .sources import LoadedSource, load_source, parse_source
from .staging import keep_rejected, new_staging, publish
from .taskparity import gate_policy

Progress = Callable[[str], None]



@dataclass
class BuildResult:
    bundle: Path
    manifest: Manifest
    parity: ParityReport
    timings: dict[str, float]


def build(source_text: str, options: BuildOptions, progress: Progress | None = None) -> BuildResult:
    """Build, gate and publish a bundle; raises an EnginekitError subclass on user errors."""
    say = progress or (lambda _msg: None)
    spec = parse_source(source_text)
    # -- issue 8: causal LMs build a generation bundle (exporter/generation.py) ---------------------
    from .generation import build_generation, is_generation_source

    if is_generation_source(spec):
        return build_generation(spec, source_text, options, say)
    # -- end issue 8 ------------------------------------------------------------------------------------
    options.validate()
    output = Path(options.output) if options.output else default_output(source_text, options)
    if output.exists() and not options.force:
        raise BuildError(
            f"Expected the output folder '{output}' not to exist, but it does. Pass --force to replace it, or "
            "-o to choose another folder; nothing was written."
        )
    from .clip import build_dual_encoder, is_dual_encoder

    if is_dual_encoder(spec):  # CLIP: one engine per tower in a zero-shot bundle (exporter/clip.py)
        return build_dual_encoder(source_text, spec, options, output, say)  # type: ignore[no-any-return]
    timings: dict[str, float] = {}
    staging = new_staging(output)
    try:
        return _build_into(spec, source_text, options, output, staging, say, timings)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _timed(timings: dict[str, float], key: str, say: Progress, msg: str) -> Any:
    class _T:
        def __enter__(self) -> None:
            say(msg)
            self.t = time.perf_counter()

        def __exit__(self, *exc: object) -> None:
            timings[key] = round(time.perf_counter() - self.t, 3)

    return _T()


def prepare_dims(loaded: LoadedSource, options: BuildOptions) -> IOSpec:
    """The source's default dim ranges with --shapes and --dynamic applied. An onnx: source may name
    graph dims that have no default range; each of those must get one from --shapes."""
    named = [d for s in loaded.io.inputs for d in s.shape if isinstance(d, str)]
    unranged = {k: v for k, v in options.shapes.items() if k in named and k not in loaded.io.dims}
    ranged = {k: v for k, v in options.shapes.items() if k not in unranged}
    dims = merge_dims(loaded.io.dims, ranged, options.dynamic) if loaded.io.dims or ranged else {}
    dims.update(unranged)
    missing = sorted({d for d in named if d not in dims})
    if missing:
        raise UsageError(
            f"Expected a range for every dynamic dim of the ONNX inputs, but {missing} have none. Give them "
            "with --shapes, e.g. --shapes " + ",".join(f"{d}=1:64:128" for d in missing) + "."
        )
    return replace(loaded.io, dims=dims)


def _build_into(spec: Any, source_text: str, options: BuildOptions, output: Path, staging: Path,
                say: Progress, timings: dict[str, float]) -> BuildResult:
    work = staging / "work"
    work.mkdir()
    bundle = staging / "bundle"
    bundle.mkdir()
    with _timed(timings, "load", say, f"Loading {spec}"):
        loaded = load_source(spec)
        loaded.io = prepare_dims(loaded, options)
        detect.set_outputs(loaded, options.detector_outputs)
    if loaded.onnx_path is None:
        from .export import export_onnx

        with _timed(timings, "export", say, "Exporting to ONNX (torch.export → torch.onnx)"):
            exported = export_onnx(loaded, work / "model.onnx", opset=options.opset, exporter=options.exporter)
        loaded.io = exported.io
        onnx_path, exporter_name, opset, onnx_sha = exported.path, exported.exporter, exported.opset, exported.sha256
    else:
        onnx_path, exporter_name = loaded.onnx_path, "none (onnx: source)"
        opset, onnx_sha = loaded.info.get("opset"), file_sha256(loaded.onnx_path)
    cases = gate_cases(loaded.io, data=options.data, tokenizer_dir=_processor_dir(loaded), seed=options.seed,
                       image_options=options.image)
    if options.device == "cuda" and loaded.module is not None and _torch_cuda():
        loaded.device = "cuda"
    reference = CachedReference(loaded.reference)
    mixed = _mixed_options(options)
    if mixed and detect.detection(loaded.info):
        mixed.fp32_ops = sorted(set(mixed.fp32_ops) | set(detect.FP32_OPS))
        mixed.op_reasons.update({op: "detector post-processing (exporter/detect.py FP32_OPS)" for op in detect.FP32_OPS})
    calibration = _calibration_feeds(loaded, options, cases) if mixed else []
    history: list[dict[str, Any]] = []
    while True:
        with _timed(timings, "lower", say, f"Lowering precision to {options.precision}"):
            lowered = _lower(loaded, onnx_path, options.precision, work, mixed, calibration,
                             quantize=_calibration(loaded, options, output, say))
        if options.target == "trt":
            say("Looking for TensorRT and a GPU")
            _check_tensorrt(loaded, onnx_path, lowered, options, output)
        hidden = detect.hidden_outputs(loaded.info)  # a detector's raw outputs: for the gate, not shipped
        engine_onnx = detect.engine_graph(lowered.path, hidden)
        if options.precision == "int8" and options.target == "ort" and options.device == "cpu":
            from calibration.quantize import to_ort_cpu_form

            pairs = to_ort_cpu_form(engine_onnx, work / "model.int8.ort-cpu.onnx")
            engine_onnx = work / "model.int8.ort-cpu.onnx"
            lowered.realised["ort_cpu_form"] = (
                f"{pairs} activation Q/DQ pairs stored as uint8 with zero point 128 (the same values as int8 with zero "
                "point 0): x86 ONNX Runtime has fast integer kernels only for u8 activations")
        stage = f"Building the {options.target} engine ({options.device})"
        with _timed(timings, "build", say, stage):
            shutil.rmtree(bundle, ignore_errors=True)
            bundle.mkdir()
            try:
                target = _build_engine(engine_onnx, bundle, options, loaded.io, output,
                                       lambda detail, stage=stage: say(f"{stage}: {detail}"),
                                       low_precision=options.precision != "fp32", work=work)
            except BuildError as exc:
                if not (mixed and keep_unrunnable_op(exc, mixed, history, say)):
                    raise
                continue
        io = _lowered_io(loaded.io, lowered.path) if mixed and not mixed.keep_io_types else loaded.io
        io = detect.engine_io(io, hidden)
        manifest = Manifest(
            name=output.name,
            source={"spec": str(spec), "kind": spec.kind, "exporter": exporter_name, "opset": opset,
                    "onnx_sha256": onnx_sha, **loaded.info},
            io=io,
            precision={"requested": options.precision, "realised": _realised(lowered, target)},
            target=target,
            build_command=build_command(source_text if spec.kind == "py" else str(spec), options, output, io.dims),
            enginekit_version=__version__,
        )
        if options.target == "ort" and options.device == "cuda" and _has_cuda_provider():
            from .tune import tune_cuda

            with _timed(timings, "tune", say, "Choosing CUDA provider options by measurement"):
                tuning = tune_cuda(bundle, manifest)
            manifest.target.options["cuda_provider_options"] = tuning["chosen"]
            manifest.target.options["tuning"] = tuning
        held_out = None
        if lowered.calibration is not None:
            from .quant import measure_speedup

            if options.target == "ort" and options.device == "cpu" and options.precision == "int8":
                say("Measuring CPU latency: FP32 vs INT8")
                lowered.calibration.speed = measure_speedup(onnx_path, bundle / target.engine_files[0],
                                                            lowered.calibration.split.evaluation[0])
            manifest.calibration = lowered.calibration.manifest_entry()
            held_out = None if options.data else lowered.calibration.split.evaluation
            if held_out:  # the gate measures accuracy on the held-out samples, never on the calibration set
                cases = gate_cases(manifest.io, data=options.data, tokenizer_dir=_processor_dir(loaded),
                                   seed=options.seed, feeds=held_out, image_options=options.image)
        report = _gate(reference, manifest, bundle, lowered.path, cases, options, say, timings)
        if held_out:
            report.notes.append("real inputs: the calibration data's held-out evaluation samples (never calibrated on)")
        culprits = _next_fallback(report, mixed, onnx_path, lowered.path, cases, loaded.io, history, say)
        if not culprits:
            break
    manifest.source["timings_s"] = timings
    if history:
        manifest.precision["fallback"] = history
    manifest.parity = report.summary()
    (bundle / "parity.json").write_text(report.to_json() + "\n", encoding="utf-8")
    write_html(report, bundle / "report.html", title=f"Parity: {manifest.name}",
               context={"source": manifest.source["spec"], "target": f"{target.backend} ({target.device})",
                        "precision": options.precision, "enginekit": __version__})
    manifest.files = {f: file_sha256(bundle / f) for f in target.engine_files}
    manifest.write(bundle)
    if report.status == "failed":
        rejected = keep_rejected(bundle, output)
        tried = (f" The FP32 fallback kept {sum(len(h['kept_fp32']) for h in history)} node(s) in FP32 over "
                 f"{len(history)} round(s) and stopped ({history[-1]['stopped'] if history else 'no candidates'}).")
        raise ParityError(
            f"Expected the {options.precision} engine to match the reference within tolerance, but the parity gate "
            f"failed: {format_failures(report)}.{tried if mixed else ''} Nothing was written to '{output}'; the "
            f"rejected bundle and its report are in '{rejected}' (open report.html). "
            + ("Raise the fallback budget (--fallback-budget), keep nodes in FP32 with --fp32-nodes/--fp32-ops, or "
               if mixed else "")
            + "loosen a tolerance with --tolerance [OUTPUT:]METRIC=VALUE only if the difference is acceptable."
        )
    publish(bundle, output)
    return BuildResult(output, manifest, report, timings)


def _lower(loaded: LoadedSource, onnx_path: Path, precision: str, work: Path, mixed: MixedOptions | None = None,
           calibration: list[Feeds] | None = None, *, quantize: dict[str, Any] | None = None) -> Lowered:
    """Lower the graph, unless it is an ONNX that enginekit already lowered (the kept ONNX of a
    TensorRT build handed over to another machine): lowering it again would change it twice."""
    already = loaded.info.get("lowered")
    if not already:
        return lower_precision(onnx_path, precision, work, mixed=mixed, calibration=calibration or [], quantize=quantize)
    if already != precision:
        raise UsageError(
            f"Expected --precision {already} for '{onnx_path}', which enginekit already lowered to {already} "
            f"(its metadata says so), found --precision {precision}. Build it with --precision {already}, or start "
            "from the FP32 model."
        )
    return Lowered(Path(onnx_path), {"requested": precision, "lowered_before": True, **census(Path(onnx_path))})


def _check_tensorrt(loaded: LoadedSource, onnx_path: Path, lowered: Lowered, options: BuildOptions,
                    output: Path) -> None:
    """Stop a TensorRT build that cannot run here, keeping the lowered ONNX and saying how to
    finish the build on a machine with TensorRT (exporter/handoff.py)."""
    from runtimes.trt.build import tensorrt_unavailable

    from .handoff import keep_lowered, kept_folder, tensorrt_missing

    reason = tensorrt_unavailable()
    if reason is None:
        return
    dest = kept_folder(output)
    if dest.resolve() in Path(lowered.path).resolve().parents:
        kept = Path(lowered.path)  # building from the kept ONNX itself: it is already there
    else:
        reference = loaded.reference_onnx or (Path(onnx_path) if Path(lowered.path) != Path(onnx_path) else None)
        kept = keep_lowered(Path(lowered.path), reference, loaded.io, options.precision, dest)
    finish = build_command(f"onnx:{kept.resolve()}", options, output, loaded.io.dims)
    raise tensorrt_missing(reason, kept, shlex.join(finish))


def _build_engine(onnx_path: Path, bundle: Path, options: BuildOptions, io: IOSpec, output: Path,
                  progress: Progress, *, low_precision: bool = False, work: Path | None = None) -> Any:
    if options.target == "ort":
        from runtimes.ort.build import OrtBuildOptions, build_ort_engine

        fusion: dict[str, Any] = {"enabled": options.ort_fusions}
        if options.ort_fusions and work is not None:
            from .ortfuse import fuse_for_ort

            fused_path = work / f"{onnx_path.stem}.ort-{options.device}.onnx"
            try:
                fusion.update(fuse_for_ort(onnx_path, fused_path, options.device))
                onnx_path = fused_path
            except Exception as exc:
                fusion["error"] = f"{type(exc).__name__}: {str(exc)[:200]}; built unfused"
        target = build_ort_engine(onnx_path, bundle, OrtBuildOptions(device=options.device, low_precision=low_precision))
        target.options["fusions"] = fusion
        return target
    from runtimes.trt.build import TIMING_CACHE_FILE, build_trt_engine

    # The bundle this build replaces (--force) tuned the same graph: its timing cache saves time.
    return build_trt_engine(onnx_path, bundle, options.trt, io, previous_cache=output / TIMING_CACHE_FILE,
                            progress=progress)


def _realised(lowered: Lowered, target: Any) -> dict[str, Any]:
    """What the lowering put in the graph, plus what the engine computes in where the backend can
    say (TensorRT's engine inspector: layers per output type)."""
    layers = target.options.get("layers") if target.backend == "trt" else None
    return {**lowered.realised, **({"engine_layers": layers} if layers else {})}


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _has_cuda_provider() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    from runtimes.device import gpu_info

    return "CUDAExecutionProvider" in ort.get_available_providers() and gpu_info() is not None


def _mixed_options(options: BuildOptions) -> MixedOptions | None:
    if options.precision not in ("fp16", "bf16"):
        return None
    return MixedOptions(
        precision=options.precision, keep_io_types=not options.native_io, fp32_nodes=list(options.fp32_nodes),
        fp32_ops=list(options.fp32_ops), range_rules=options.range_rules,
        max_fp32_nodes=options.fallback_budget, max_iterations=options.fallback_rounds,
    )


def _calibration_feeds(loaded: LoadedSource, options: BuildOptions, cases: list[tuple[str, Feeds]]) -> list[Feeds]:
    """Range data for AutoCast: --calib, else the --data batches, else the generated min/opt cases
    (max shapes are left out: AutoCast holds every intermediate of every batch in memory)."""
    if options.calib is not None and not str(options.calib).startswith("random"):
        from calibration.data import load_feeds

        batch_dim = next((d for s in loaded.io.inputs for d in s.shape[:1] if isinstance(d, str)), None)
        batch = min(8, loaded.io.dims[batch_dim].max) if batch_dim in loaded.io.dims else 1
        return load_feeds(options.calib, loaded.io, tokenizer_dir=_processor_dir(loaded), batch_size=batch,
                          image_options=options.image)[:4]
    data = [f for label, f in cases if label.startswith("data[")]
    return data[:4] if data else [f for label, f in cases if label.startswith(("min", "opt"))]


def _lowered_io(io: IOSpec, lowered: Path) -> IOSpec:
    """The io with the lowered graph's dtypes (native FP16/BF16 inputs and outputs)."""
    from .onnxutil import io_from_onnx

    ins, outs, _, _ = io_from_onnx(onnx.load(str(lowered), load_external_data=False))
    dt = {t.name: t.dtype for t in ins + outs}
    return replace(io, inputs=[replace(t, dtype=dt.get(t.name, t.dtype)) for t in io.inputs],
                   outputs=[replace(t, dtype=dt.get(t.name, t.dtype)) for t in io.outputs])


def _as_engine_dtypes(io: IOSpec, fn: Callable[[Feeds], Any]) -> Callable[[Feeds], Any]:
    dtypes = {s.name: s.dtype for s in io.inputs}

    def call(feeds: Feeds) -> Any:
        return fn({k: np.asarray(v).astype(dtypes.get(k, np.asarray(v).dtype), copy=False) for k, v in feeds.items()})

    return call


def _calibration(loaded: LoadedSource, options: BuildOptions, output: Path, say: Progress) -> dict[str, Any] | None:
    """quantize_model's arguments for int8/fp8: the ranges cache sits next to the bundle, so it
    survives a --force rebuild; --data, when given, is the held-out evaluation set."""
    if options.precision not in ("int8", "fp8"):
        return None
    from calibration.calibrate import CalibOptions

    calib = CalibOptions(data=options.calib, method=options.calib_method,
                         budget=detect.accuracy_budget(loaded.info, options.accuracy_budget),
                         eval_data=options.data, cache_dir=output.parent / f"{output.name}.calib", image=options.image,
                         seed=options.seed, smooth=options.smooth)
    return {"io": loaded.io, "options": calib, "tokenizer_dir": _processor_dir(loaded), "progress": say}


def _processor_dir(loaded: LoadedSource) -> Path | None:
    """Where texts are tokenized and images preprocessed from: the tokenizer's folder, or the hf:
    folder itself (its preprocessor_config.json) for vision models without a tokenizer."""
    if loaded.tokenizer_dir is not None:
        return loaded.tokenizer_dir
    spec = loaded.spec
    return Path(spec.location) if spec.kind == "hf" and Path(spec.location).is_dir() else None


def _gate(reference: Any, manifest: Manifest, bundle: Path, lowered: Path, cases: list[tuple[str, Feeds]],
          options: BuildOptions, say: Progress, timings: dict[str, float]) -> ParityReport:
    """Gate the engine on its own device. For FP16/BF16 where the engine cannot show low-precision
    numerics (the CPU provider computes FP16 in FP32; a CUDA engine cannot run without a GPU), the
    lowered graph also runs through the storage emulation, and must pass too. An engine that cannot
    run here (FP8 without the hardware, a CUDA engine on a CPU machine) is 'not checked', never passed."""
    policy, task = gate_policy(options.precision, options.tolerances, manifest.source, [o.name for o in manifest.io.outputs])
    if options.skip_parity:
        return ParityReport(options.precision, policy, notes=["parity not checked: --skip-parity"]).finish()
    from runtimes import open_runner

    notes = []
    runner = None
    try:
        runner = open_runner(bundle, manifest, device=options.device)
    except (IncompatibleEngine, MissingDependency) as exc:
        if options.device == "cpu" and options.precision != "fp8":
            raise
        notes.append(f"parity not checked: the {options.precision} engine cannot run here "
                     f"({str(exc).split('. ')[0]}); run `enginekit parity` on a machine with the GPU")
    emulated = options.precision in ("fp16", "bf16") and (runner is None or options.device == "cpu")
    if runner is None and not emulated:
        return ParityReport(options.precision, policy, notes=notes).finish(engine_checked=False)
    with _timed(timings, "gate", say, "Parity gate: reference vs engine"):
        emulator = emulated_runner(lowered) if emulated else None
        try:
            engine = _as_engine_dtypes(manifest.io, runner.infer) if runner else None
            hidden = detect.hidden_outputs(manifest.source)
            if engine is not None and hidden:
                graph = bundle / manifest.target.engine_files[0] if manifest.target.backend == "ort" else lowered
                engine, note = detect.with_raw_outputs(engine, graph, hidden, options.device)
                if note and task is not None:
                    notes.append(note)
                    task = replace(task, ungated=task.ungated | set(hidden))
            report = run_gate(reference, engine, cases, policy, options.precision,
                              emulator=_as_engine_dtypes(manifest.io, emulator) if emulator else None,
                              on_case=lambda label: say(f"Parity gate: {label}"), task=task)
        finally:
            if runner is not None:
                runner.close()
    if emulated:
        report.notes.append(f"'{options.precision}-emulated' cases run the lowered graph with FP32 compute and "
                            f"{options.precision} storage on the CPU (what a GPU computes); "
                            + ("the CPU engine itself computes FP16 nodes in FP32" if runner else "the engine was not run"))
    report.notes = notes + report.notes
    if options.data is None and not any(label.startswith("eval[") for label, _ in cases):
        report.notes.append("inputs generated from the input specs (random, seeded); pass --data for real inputs")
    return report


def _next_fallback(report: ParityReport, mixed: MixedOptions | None, fp32_path: Path, lowered: Path,
                   cases: list[tuple[str, Feeds]], io: IOSpec, history: list[dict[str, Any]], say: Progress) -> list[Any]:
    """After a failed gate: the next nodes to keep in FP32 (recorded in `mixed.excluded` and
    `history`), or [] when the gate passed, there is no fallback, or its budget is spent."""
    if report.status != "failed" or mixed is None:
        return []
    from .fallback import find_culprits

    entry: dict[str, Any] = {"round": len(history) + 1, "failures": report.failures()[:6], "kept_fp32": [], "stopped": None}
    history.append(entry)
    left = mixed.max_fp32_nodes - len(mixed.excluded)
    if len(history) > mixed.max_iterations or left <= 0:
        entry["stopped"] = "fallback budget spent (--fallback-budget / rounds)"
        return []
    failing = next(c.label for c in report.cases if not c.passed).removeprefix(f"{mixed.precision}-emulated ")
    feeds = dict(cases)[failing]
    say(f"Parity fallback round {entry['round']}: locating the nodes that break {mixed.precision} parity")
    culprits = find_culprits(fp32_path, lowered, shrink(io, feeds), mixed.precision, excluded=set(mixed.excluded), limit=left)
    if not culprits:
        culprits = find_culprits(fp32_path, lowered, feeds, mixed.precision, excluded=set(mixed.excluded), limit=left)
    if not culprits:
        entry["stopped"] = "no node left to blame: the error is not from low-precision storage"
        return []
    for c in culprits:
        mixed.excluded[c.node] = f"parity fallback round {entry['round']}: {c.reason}"
        entry["kept_fp32"].append({"node": c.node, "op": c.op, "reason": c.reason})
    return culprits


def export_model(source_text: str, output: Path, options: BuildOptions, progress: Progress | None = None) -> Any:
    """`enginekit export`: source → checked ONNX at `output` (+ `<output>.data` for large models),
    written beside the target first and renamed into place."""
    from .export import export_onnx

    say = progress or (lambda _msg: None)
    spec = parse_source(source_text)
    if spec.kind == "onnx":
        raise UsageError(f"Expected a torch source (hf:, py:, timm:), found '{source_text}', which is already ONNX.")
    output = Path(output)
    if output.exists() and not options.force:
        raise BuildError(f"Expected '{output}' not to exist, but it does. Pass --force to replace it; nothing was written.")
    staging = new_staging(output)
    try:
        say(f"Loading {spec}")
        loaded = load_source(spec)
        loaded.io = prepare_dims(loaded, options)
        say("Exporting to ONNX (torch.export → torch.onnx)")
        result = export_onnx(loaded, staging / output.name, opset=options.opset, exporter=options.exporter)
        for f in sorted(staging.iterdir(), key=lambda p: p.name != output.name + ".data"):
            os.replace(f, output.parent / f.name)  # the data file first: the graph never points at nothing
        result.path = output
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)
