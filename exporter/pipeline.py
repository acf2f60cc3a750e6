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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from runtimes._version import __version__
from runtimes.errors import BuildError, ParityError, UsageError
from runtimes.manifest import DimRange, IOSpec, Manifest, file_sha256
from runtimes.trt.build import TrtBuildOptions

from .gate import gate_cases, run_gate
from .parity import ParityReport, TolerancePolicy, format_failures
from .precision import Lowered, census, check_precision, lower_precision
from .report import write_html
from .shapes import merge_dims
from .sources import LoadedSource, load_source, model_name, parse_source

TARGETS = ("ort", "trt")
DEVICES = ("cpu", "cuda")
Progress = Callable[[str], None]


@dataclass
class BuildOptions:
    """Defaults: ORT on the CPU in FP32, output engines/<model>-<target>-<precision>, dims from the
    model family (--shapes/--dynamic narrow them), inputs generated at min/opt/max for the gate.
    trt: TensorRT builder settings (runtimes.trt.build.TrtBuildOptions), for --target trt only."""

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
    trt: TrtBuildOptions = field(default_factory=TrtBuildOptions)

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
        if self.target != "trt" and not self.trt.is_default():
            raise UsageError(
                f"Expected TensorRT options (--workspace, --opt-level, --hardware-compat, --version-compatible, "
                f"--exclude-lean-runtime, --timing-cache, --tf32) only with --target trt, found them with --target "
                f"{self.target}. Drop them, or build with --target trt."
            )
        if self.exporter not in ("auto", "torch", "transformers"):
            raise UsageError(f"Expected --exporter auto, torch or transformers, found '{self.exporter}'.")
        check_precision(self.precision)


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
    if options.target == "trt":
        cmd += options.trt.cli_args()
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
        lowered = _lower(loaded, onnx_path, options.precision, work)
    if options.target == "trt":
        say("Looking for TensorRT and a GPU")
        _check_tensorrt(loaded, onnx_path, lowered, options, output)
    stage = f"Building the {options.target} engine ({options.device})"
    with _timed(timings, "build", say, stage):
        target = _build_engine(lowered.path, bundle, options, loaded.io, output,
                               lambda detail: say(f"{stage}: {detail}"))
    manifest = Manifest(
        name=output.name,
        source={"spec": str(spec), "kind": spec.kind, "exporter": exporter_name, "opset": opset,
                "onnx_sha256": onnx_sha, **loaded.info},
        io=loaded.io,
        precision={"requested": options.precision, "realised": _realised(lowered, target)},
        target=target,
        build_command=build_command(source_text if spec.kind == "py" else str(spec), options, output, loaded.io.dims),
        enginekit_version=__version__,
    )
    manifest.source["timings_s"] = timings
    report = _gate(loaded, manifest, bundle, options, say, timings)
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


def _lower(loaded: LoadedSource, onnx_path: Path, precision: str, work: Path) -> Lowered:
    """Lower the graph, unless it is an ONNX that enginekit already lowered (the kept ONNX of a
    TensorRT build handed over to another machine): lowering it again would change it twice."""
    already = loaded.info.get("lowered")
    if not already:
        return lower_precision(onnx_path, precision, work)
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
                  progress: Progress) -> Any:
    if options.target == "ort":
        from runtimes.ort.build import OrtBuildOptions, build_ort_engine

        return build_ort_engine(onnx_path, bundle, OrtBuildOptions(device=options.device))
    from runtimes.trt.build import TIMING_CACHE_FILE, build_trt_engine

    # The bundle this build replaces (--force) tuned the same graph: its timing cache saves time.
    return build_trt_engine(onnx_path, bundle, options.trt, io, previous_cache=output / TIMING_CACHE_FILE,
                            progress=progress)


def _realised(lowered: Lowered, target: Any) -> dict[str, Any]:
    """What the lowering put in the graph, plus what the engine computes in where the backend can
    say (TensorRT's engine inspector: layers per output type)."""
    layers = target.options.get("layers") if target.backend == "trt" else None
    return {**lowered.realised, **({"engine_layers": layers} if layers else {})}


def _gate(loaded: LoadedSource, manifest: Manifest, bundle: Path, options: BuildOptions, say: Progress,
          timings: dict[str, float]) -> ParityReport:
    policy = TolerancePolicy.for_precision(options.precision, options.tolerances)
    if options.skip_parity:
        report = ParityReport(options.precision, policy, notes=["parity not checked: --skip-parity"])
        return report.finish()
    from runtimes import open_runner

    with _timed(timings, "gate", say, "Parity gate: reference vs engine"):
        cases = gate_cases(manifest.io, data=options.data, tokenizer_dir=loaded.tokenizer_dir, seed=options.seed)
        runner = open_runner(bundle, manifest, device=options.device)
        try:
            report = run_gate(loaded.reference, runner, cases, policy, options.precision,
                              on_case=lambda label: say(f"Parity gate: {label}"))
        finally:
            runner.close()
    if options.data is None:
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
