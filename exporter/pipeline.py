"""`enginekit build`: source → ONNX → lowered ONNX → engine → parity gate → bundle.

The bundle is assembled in a hidden sibling folder and renamed into place only after the gate
passes, so a killed or failed build leaves nothing half-written at the output path. A bundle that
fails the gate is kept, for inspection, at `<output>.rejected`.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from calibration.images import ImageOptions
from runtimes._version import __version__
from runtimes.errors import BuildError, IncompatibleEngine, MissingDependency, ParityError, UsageError
from runtimes.manifest import DimRange, IOSpec, Manifest, file_sha256

from .gate import gate_cases, run_gate
from .parity import ParityReport, TolerancePolicy, format_failures
from .precision import check_precision, lower_precision
from .report import write_html
from .shapes import merge_dims
from .sources import LoadedSource, load_source, model_name, parse_source

TARGETS = ("ort", "trt")
DEVICES = ("cpu", "cuda")
Progress = Callable[[str], None]


@dataclass
class BuildOptions:
    """Defaults: ORT on the CPU in FP32, output engines/<model>-<target>-<precision>, dims from the
    model family (--shapes/--dynamic narrow them), inputs generated at min/opt/max for the gate."""

    target: str = "ort"
    device: str = "cpu"
    precision: str = "fp32"
    output: Path | None = None
    force: bool = False
    shapes: dict[str, DimRange] = field(default_factory=dict)
    dynamic: list[str] | None = None
    opset: int | None = None
    exporter: str = "auto"
    data: Path | None = None
    tolerances: list[str] = field(default_factory=list)
    skip_parity: bool = False
    seed: int = 0
    # int8/fp8: calibration samples (texts, images, .npz feeds, or random[:N] for smoke tests), the
    # range method (minmax | entropy | percentile | all), the accuracy budget on held-out samples
    # (--data when given, else every 4th --calib sample), and image preprocessing without an HF config.
    calib: str | None = None
    calib_method: str = "percentile"
    accuracy_budget: str | None = "cosine>=0.99"
    image: ImageOptions = field(default_factory=ImageOptions)
    smooth: float | None = None  # SmoothQuant alpha (calibration/smooth.py); None: off

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise UsageError(
                f"Expected --target to be one of {', '.join(TARGETS)}, found '{self.target}'. 'ort' builds an "
                "ONNX Runtime engine, 'trt' a TensorRT plan."
            )
        if self.device not in DEVICES:
            raise UsageError(f"Expected --device cpu or cuda, found '{self.device}'.")
        if self.target == "trt" and self.device != "cuda":
            self.device = "cuda"  # TensorRT only runs on NVIDIA GPUs
        if self.exporter not in ("auto", "torch", "transformers"):
            raise UsageError(f"Expected --exporter auto, torch or transformers, found '{self.exporter}'.")
        check_precision(self.precision)
        self._validate_calibration()

    def _validate_calibration(self) -> None:
        from calibration.budget import parse_budget
        from calibration.quantize import check_method

        quantized = self.precision in ("int8", "fp8")
        if quantized and self.calib is None:
            raise UsageError(
                f"Expected --calib DATA with --precision {self.precision}: Q/DQ scales come from real inputs (a .txt/"
                ".jsonl of texts, a folder of images or of .npz feed dicts). --calib random is for smoke tests only."
            )
        if self.calib is not None and not quantized:
            raise UsageError(f"Expected --calib only with --precision int8 or fp8, found --precision {self.precision}.")
        if self.precision == "fp8" and self.device == "cpu":
            raise UsageError(
                "Expected an FP8 build for a GPU (--target trt, or --target ort --device cuda), found --device cpu. "
                "FP8 tensor cores need compute capability >= 8.9 (Ada, Hopper and newer), and ONNX Runtime's CPU "
                "provider has no FP8 kernels (its optimizer rejects FP8 Q/DQ graphs). To inspect FP8 accuracy "
                "here, run `enginekit calibrate MODEL.onnx --precision fp8 --data DATA -o model.fp8.onnx`, "
                "which emulates the Q/DQ on the CPU."
            )
        if self.precision == "fp8":
            from runtimes.device import gpu_info, supports

            gpu = gpu_info()
            if gpu is not None and not supports("fp8", gpu["compute_capability"]):
                cc = ".".join(map(str, gpu["compute_capability"]))
                raise UsageError(
                    f"Expected a GPU of compute capability >= 8.9 for FP8, found {gpu['name']} ({cc}). Build with "
                    "--precision int8 (or fp16) for this GPU, or build FP8 on an Ada/Hopper/Blackwell machine."
                )
        check_method(self.calib_method, allow_all=True)
        parse_budget(self.accuracy_budget)
        if self.smooth is not None and not 0.0 < self.smooth <= 1.0:
            raise UsageError(f"Expected --smooth as a SmoothQuant alpha in (0, 1] (e.g. 0.7), found {self.smooth}.")


@dataclass
class BuildResult:
    bundle: Path
    manifest: Manifest
    parity: ParityReport
    timings: dict[str, float]


def default_output(source_text: str, options: BuildOptions) -> Path:
    return Path("engines") / f"{model_name(parse_source(source_text))}-{options.target}-{options.precision}"


def build_command(source: str, options: BuildOptions, output: Path, dims: dict[str, DimRange]) -> list[str]:
    cmd = ["enginekit", "build", source, "--target", options.target, "--device", options.device,
           "--precision", options.precision]
    if dims:
        cmd += ["--shapes", ",".join(f"{k}={v}" for k, v in dims.items())]
    if options.opset:
        cmd += ["--opset", str(options.opset)]
    if options.exporter != "auto":
        cmd += ["--exporter", options.exporter]
    if options.data:
        cmd += ["--data", str(Path(options.data).resolve())]
    for t in options.tolerances:
        cmd += ["--tolerance", t]
    if options.calib:
        calib = options.calib if str(options.calib).startswith("random") else str(Path(options.calib).resolve())
        cmd += ["--calib", calib, "--calib-method", options.calib_method,
                "--accuracy-budget", options.accuracy_budget or "none"]
        if options.smooth:
            cmd += ["--smooth", str(options.smooth)]
        img = options.image
        for flag, value in (("--resize", img.resize), ("--mean", img.mean), ("--std", img.std)):
            if value is not None:
                cmd += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return cmd + ["-o", str(output.resolve()), "--force"]


def build(source_text: str, options: BuildOptions, progress: Progress | None = None) -> BuildResult:
    """Build, gate and publish a bundle; raises an EnginekitError subclass on user errors."""
    say = progress or (lambda _msg: None)
    options.validate()
    spec = parse_source(source_text)
    output = Path(options.output) if options.output else default_output(source_text, options)
    if output.exists() and not options.force:
        raise BuildError(
            f"Expected the output folder '{output}' not to exist, but it does. Pass --force to replace it, or "
            "-o to choose another folder; nothing was written."
        )
    if options.target == "trt":
        from runtimes._deps import require

        require("tensorrt", extra="trt", purpose="The TensorRT target (--target trt)")
    timings: dict[str, float] = {}
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
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
    if loaded.onnx_path is None:
        from .export import export_onnx

        with _timed(timings, "export", say, "Exporting to ONNX (torch.export → torch.onnx)"):
            exported = export_onnx(loaded, work / "model.onnx", opset=options.opset, exporter=options.exporter)
        loaded.io = exported.io
        onnx_path, exporter_name, opset, onnx_sha = exported.path, exported.exporter, exported.opset, exported.sha256
    else:
        onnx_path, exporter_name = loaded.onnx_path, "none (onnx: source)"
        opset, onnx_sha = loaded.info.get("opset"), file_sha256(loaded.onnx_path)
    with _timed(timings, "lower", say, f"Lowering precision to {options.precision}"):
        lowered = lower_precision(onnx_path, options.precision, work, _calibration(loaded, options, output, say))
    engine_onnx = lowered.path
    if options.precision == "int8" and options.target == "ort" and options.device == "cpu":
        from calibration.quantize import to_ort_cpu_form

        engine_onnx = work / "model.int8.ort-cpu.onnx"
        pairs = to_ort_cpu_form(lowered.path, engine_onnx)
        lowered.realised["ort_cpu_form"] = (
            f"{pairs} activation Q/DQ pairs stored as uint8 with zero point 128 (the same values as int8 with zero "
            "point 0): x86 ONNX Runtime has fast integer kernels only for u8 activations")
    with _timed(timings, "build", say, f"Building the {options.target} engine ({options.device})"):
        target = _build_engine(engine_onnx, bundle, options)
    manifest = Manifest(
        name=output.name,
        source={"spec": str(spec), "kind": spec.kind, "exporter": exporter_name, "opset": opset,
                "onnx_sha256": onnx_sha, **loaded.info},
        io=loaded.io,
        precision={"requested": options.precision, "realised": lowered.realised},
        target=target,
        build_command=build_command(source_text if spec.kind == "py" else str(spec), options, output, loaded.io.dims),
        enginekit_version=__version__,
    )
    manifest.source["timings_s"] = timings
    held_out = None
    if lowered.calibration is not None:
        from .quant import measure_speedup

        if options.target == "ort" and options.device == "cpu" and options.precision == "int8":
            say("Measuring CPU latency: FP32 vs INT8")
            lowered.calibration.speed = measure_speedup(onnx_path, bundle / target.engine_files[0],
                                                        lowered.calibration.split.evaluation[0])
        manifest.calibration = lowered.calibration.manifest_entry()
        held_out = None if options.data else lowered.calibration.split.evaluation
    report = _gate(loaded, manifest, bundle, options, say, timings, held_out)
    manifest.parity = report.summary()
    (bundle / "parity.json").write_text(report.to_json() + "\n", encoding="utf-8")
    write_html(report, bundle / "report.html", title=f"Parity: {manifest.name}",
               context={"source": manifest.source["spec"], "target": f"{target.backend} ({target.device})",
                        "precision": options.precision, "enginekit": __version__})
    manifest.files = {f: file_sha256(bundle / f) for f in target.engine_files}
    manifest.write(bundle)
    if report.status == "failed":
        rejected = output.with_name(output.name + ".rejected")
        shutil.rmtree(rejected, ignore_errors=True)
        os.replace(bundle, rejected)
        raise ParityError(
            f"Expected the {options.precision} engine to match the reference within tolerance, but the parity gate "
            f"failed: {format_failures(report)}. Nothing was written to '{output}'; the rejected bundle and its "
            f"report are in '{rejected}' (open report.html). Loosen a tolerance with --tolerance "
            "[OUTPUT:]METRIC=VALUE only if the difference is acceptable for your use."
        )
    _publish(bundle, output)
    return BuildResult(output, manifest, report, timings)


def _build_engine(onnx_path: Path, bundle: Path, options: BuildOptions) -> Any:
    if options.target == "ort":
        from runtimes.ort.build import OrtBuildOptions, build_ort_engine

        return build_ort_engine(onnx_path, bundle, OrtBuildOptions(device=options.device))
    raise MissingDependency(
        "The TensorRT target is not available in this version of enginekit; build with --target ort."
    )


def _calibration(loaded: LoadedSource, options: BuildOptions, output: Path, say: Progress) -> dict[str, Any] | None:
    """quantize_model's arguments for int8/fp8: the ranges cache sits next to the bundle, so it
    survives a --force rebuild; --data, when given, is the held-out evaluation set."""
    if options.precision not in ("int8", "fp8"):
        return None
    from calibration.calibrate import CalibOptions

    calib = CalibOptions(data=options.calib, method=options.calib_method, budget=options.accuracy_budget,
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


def _gate(loaded: LoadedSource, manifest: Manifest, bundle: Path, options: BuildOptions, say: Progress,
          timings: dict[str, float], held_out: list[dict[str, Any]] | None = None) -> ParityReport:
    policy = TolerancePolicy.for_precision(options.precision, options.tolerances)
    if options.skip_parity:
        report = ParityReport(options.precision, policy, notes=["parity not checked: --skip-parity"])
        return report.finish()
    from runtimes import open_runner

    with _timed(timings, "gate", say, "Parity gate: reference vs engine"):
        cases = gate_cases(manifest.io, data=options.data, tokenizer_dir=_processor_dir(loaded), seed=options.seed,
                           feeds=held_out, image_options=options.image)
        try:
            runner = open_runner(bundle, manifest, device=options.device)
        except (IncompatibleEngine, MissingDependency) as exc:
            if options.precision != "fp8":
                raise
            # FP8 needs hardware this machine may lack: the gate says so, it never claims a pass.
            return ParityReport(options.precision, policy, notes=[f"parity not checked: the FP8 engine cannot run "
                                                                   f"here ({exc})"]).finish()
        try:
            report = run_gate(loaded.reference, runner, cases, policy, options.precision,
                              on_case=lambda label: say(f"Parity gate: {label}"))
        finally:
            runner.close()
    if held_out:
        report.notes.append("real inputs: the calibration data's held-out evaluation samples (never calibrated on)")
    elif options.data is None:
        report.notes.append("inputs generated from the input specs (random, seeded); pass --data for real inputs")
    return report


def _publish(bundle: Path, output: Path) -> None:
    """Rename the finished bundle into place; an existing one (--force) is swapped out, then removed."""
    trash = None
    if output.exists():
        trash = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(output, trash)
    os.replace(bundle, output)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


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
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
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
