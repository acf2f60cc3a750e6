"""The plain-graph recipe: one model, one graph, one engine (encoders, vision models, classifiers,
detectors, py:/timm:/onnx: sources). Stages: load → export → lower (mixed precision with the
parity-driven FP32 fallback, or Q/DQ from calibration) → build → gate → bundle; the gate's failure
sends FP16/BF16 builds back to lowering with more nodes kept in FP32, until it passes or the
fallback budget is spent.

For --target trt, export and lowering run first; where TensorRT or a GPU is missing the build
stops there, keeps the lowered ONNX at `<output>.lowered/` and names the command that finishes
it on a TensorRT machine (exporter/build/handoff.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from exporter.build.engine import (
    build_engine,
    check_tensorrt,
    has_cuda_provider,
    realised,
    torch_cuda,
    unfuse_reason,
)
from exporter.bundle.assemble import BuildResult, finish_bundle
from exporter.export import detector as detect
from exporter.export.memory import check_memory
from exporter.gate.cases import (
    RUN_FAILED,
    CachedReference,
    Feeds,
    gate_cases,
    not_runnable_here,
    run_gate,
    shrink,
)
from exporter.gate.parity import ParityReport
from exporter.gate.task import check_tolerance_outputs, gate_policy
from exporter.lower.emulate import emulated_runner
from exporter.lower.mixed import MixedOptions, keep_unrunnable_op, mixed_options
from exporter.lower.precision import Lowered, census, lower_precision
from exporter.options import BuildOptions, build_command
from exporter.source.loading import load_source, prepare_dims, processor_dir
from exporter.source.spec import LoadedSource, SourceSpec
from exporter.timing import Progress, timed
from runtimes._version import __version__
from runtimes.choices import Precision
from runtimes.errors import BuildError, IncompatibleEngine, MissingDependency, UsageError
from runtimes.manifest import IOSpec, Manifest, file_sha256


@dataclass
class _Run:
    """One plain build in progress: what the stages hand each other."""

    spec: SourceSpec
    source_text: str
    options: BuildOptions
    output: Path
    work: Path
    bundle: Path
    say: Progress
    timings: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # the FP32 fallback's rounds
    unfused_because: str | None = None  # why ORT's fusions were switched off after a failed gate
    extra_files: list[str] = field(default_factory=list)  # bundle files beside the engine (ctc.json)


def build_plain(spec: SourceSpec, source_text: str, options: BuildOptions, output: Path, staging: Path,
                say: Progress) -> BuildResult:
    """Build, gate and publish a plain bundle at `output`, assembling it in `staging`."""
    run = _Run(spec, source_text, options, output, staging / "work", staging / "bundle", say)
    run.work.mkdir()
    run.bundle.mkdir()
    loaded, onnx_info = _load_and_export(run)
    cases = gate_cases(loaded.io, data=options.data, tokenizer_dir=processor_dir(loaded), seed=options.seed,
                       image_options=options.image)
    if options.device.gpu and loaded.module is not None and torch_cuda():
        loaded.device = "cuda"
    reference = CachedReference(loaded.reference)
    mixed = mixed_options(options)
    if mixed and detect.detection(loaded.info):
        mixed.fp32_ops = sorted(set(mixed.fp32_ops) | set(detect.FP32_OPS))
        mixed.op_reasons.update({op: "detector post-processing (exporter/export/detector.py FP32_OPS)" for op in detect.FP32_OPS})
    calibration = _calibration_feeds(loaded, options, cases) if mixed else []
    while True:
        built = _lower_and_build(run, loaded, onnx_info["path"], mixed, calibration)
        if built is None:  # an op the provider cannot run in the lowered dtype: lowered again, kept in FP32
            continue
        lowered, target = built
        manifest = _manifest(run, loaded, onnx_info, lowered, target, mixed)
        cases, held_out = _tune_and_hold_out(run, loaded, manifest, lowered, onnx_info["path"], cases)
        report = _gate(reference, manifest, run.bundle, lowered.path, cases, options, run.say, run.timings)
        if held_out:
            report.notes.append("real inputs: the calibration data's held-out evaluation samples (never calibrated on)")
        if unfuse_after_failure(report, run, manifest.target):
            continue
        if not _next_fallback(report, mixed, onnx_info["path"], lowered.path, cases, loaded.io, run.history, run.say):
            break
    if run.unfused_because:
        manifest.target.options["fusions"]["fallback"] = run.unfused_because
    _ship_ctc(run, loaded, manifest)
    return _finish(run, manifest, report, mixed)


def _ship_ctc(run: _Run, loaded: LoadedSource, manifest: Manifest) -> None:
    """A CTC speech model's vocabulary and features for decoding in the runtime (exporter/export/ctc.py)."""
    from exporter.export.ctc import CTC_TASK, ctc_vocabulary, write_ctc

    if loaded.info.get("task") != CTC_TASK:
        return
    folder = processor_dir(loaded)
    config = getattr(loaded.hf_model, "config", None)
    if config is None and folder is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder))
    spec = ctc_vocabulary(folder, config)
    if spec is None:
        run.say("No CTC tokenizer (vocab.json) in the model folder: the bundle returns logits, runtimes.speech cannot decode them")
        return
    manifest.source["ctc"] = write_ctc(run.bundle, spec)
    run.extra_files.append(manifest.source["ctc"])


def unfuse_after_failure(report: ParityReport, run: Any, target: Any) -> bool:
    """After a failed gate on an engine built with ORT's fusions: switch them off for the next round and say so
    (exporter/build/engine.py unfuse_reason). False when the gate passed or nothing was fused."""
    why = unfuse_reason(report, [target.options.get("fusions") or {}], run.options.ort_fusions)
    if why is None:
        return False
    run.unfused_because = why
    run.options = replace(run.options, ort_fusions=False)
    run.say("The parity gate failed with ORT's fusions: building the engine again without them")
    return True


def _load_and_export(run: _Run) -> tuple[LoadedSource, dict[str, Any]]:
    options = run.options
    with timed(run.timings, "load", run.say, f"Loading {run.spec}"):
        loaded = load_source(run.spec)
        loaded.io = prepare_dims(loaded, options.shapes, options.dynamic)
        detect.set_outputs(loaded, options.detector_outputs)
    # Before export (tens of seconds for a large model): tolerances that name outputs it lacks, and
    # dim ranges whose gate inputs alone would not fit in memory.
    names = list(loaded.module.output_names) if loaded.module is not None else [o.name for o in loaded.io.outputs]
    check_tolerance_outputs(options.tolerances, names)
    check_memory(loaded.io, options.memory_limit)
    if loaded.onnx_path is not None:
        check_memory(loaded.io, options.memory_limit, graph=loaded.onnx_path)
        return loaded, {"path": loaded.onnx_path, "exporter": "none (onnx: source)", "opset": loaded.info.get("opset"),
                        "sha256": file_sha256(loaded.onnx_path)}
    from exporter.export.graph import export_onnx

    with timed(run.timings, "export", run.say, "Exporting to ONNX (torch.export → torch.onnx)"):
        exported = export_onnx(loaded, run.work / "model.onnx", opset=options.opset, exporter=options.exporter)
    loaded.io = exported.io
    check_memory(loaded.io, options.memory_limit, graph=exported.path)
    return loaded, {"path": exported.path, "exporter": exported.exporter, "opset": exported.opset,
                    "sha256": exported.sha256}


def _lower_and_build(run: _Run, loaded: LoadedSource, onnx_path: Path, mixed: MixedOptions | None,
                     calibration: list[Feeds]) -> tuple[Lowered, Any] | None:
    """Lower, then build the engine into run.bundle; None when the build refused an op in the lowered
    dtype and the lowering must run again (keep_unrunnable_op kept that op type in FP32)."""
    options, say = run.options, run.say
    with timed(run.timings, "lower", say, f"Lowering precision to {options.precision}"):
        lowered = _lower(loaded, onnx_path, options.precision, run.work, mixed, calibration,
                         quantize=_calibration(loaded, options, run.output, say),
                         dynamic=options.quantization_mode() == "dynamic")
    if options.target == "trt":
        say("Looking for TensorRT and a GPU")
        check_tensorrt(loaded, onnx_path, lowered, options, run.output)
    engine_onnx = detect.engine_graph(lowered.path, detect.hidden_outputs(loaded.info))
    if options.quantization_mode() == "static" and options.target == "ort" and not options.device.gpu:
        from calibration.quantize import to_ort_cpu_form

        pairs = to_ort_cpu_form(engine_onnx, run.work / "model.int8.ort-cpu.onnx")
        engine_onnx = run.work / "model.int8.ort-cpu.onnx"
        lowered.realised["ort_cpu_form"] = (
            f"{pairs} activation Q/DQ pairs stored as uint8 with zero point 128 (the same values as int8 with zero "
            "point 0): x86 ONNX Runtime has fast integer kernels only for u8 activations")
    stage = f"Building the {options.target} engine ({options.device})"
    with timed(run.timings, "build", say, stage):
        shutil.rmtree(run.bundle, ignore_errors=True)
        run.bundle.mkdir()
        try:
            target = build_engine(engine_onnx, run.bundle, options, loaded.io, run.output,
                                  lambda detail: say(f"{stage}: {detail}"),
                                  low_precision=options.precision.reduced, work=run.work)
        except BuildError as exc:
            if not (mixed and keep_unrunnable_op(exc, mixed, run.history, say, graph=engine_onnx)):
                raise
            return None
    return lowered, target


def _manifest(run: _Run, loaded: LoadedSource, onnx_info: dict[str, Any], lowered: Lowered, target: Any,
              mixed: MixedOptions | None) -> Manifest:
    options, spec = run.options, run.spec
    io = _lowered_io(loaded.io, lowered.path) if mixed and not mixed.keep_io_types else loaded.io
    io = detect.engine_io(io, detect.hidden_outputs(loaded.info))
    return Manifest(
        name=run.output.name,
        source={"spec": str(spec), "kind": spec.kind, "exporter": onnx_info["exporter"], "opset": onnx_info["opset"],
                "onnx_sha256": onnx_info["sha256"], **loaded.info},
        io=io,
        precision={"requested": options.precision, "realised": realised(lowered, target)},
        target=target,
        build_command=build_command(run.source_text, options, run.output, io.dims),
        enginekit_version=__version__,
    )


def _tune_and_hold_out(run: _Run, loaded: LoadedSource, manifest: Manifest, lowered: Lowered, onnx_path: Path,
                       cases: list[tuple[str, Feeds]]) -> tuple[list[tuple[str, Feeds]], bool]:
    """CUDA provider options chosen by measurement (ORT CUDA); for a calibrated build, its speed on the
    CPU and the gate's cases from the held-out samples (never the calibration set). Returns the cases
    and whether they are those held-out samples."""
    options = run.options
    if options.target == "ort" and options.device.gpu and has_cuda_provider():
        from exporter.build.tune import tune_cuda

        with timed(run.timings, "tune", run.say, "Choosing CUDA provider options by measurement"):
            tuning = tune_cuda(run.bundle, manifest)
        manifest.target.options["cuda_provider_options"] = tuning["chosen"]
        manifest.target.options["tuning"] = tuning
    if lowered.calibration is None:
        return cases, False
    from exporter.lower.quant import measure_speedup

    if options.target == "ort" and not options.device.gpu and options.precision is Precision.INT8:
        run.say("Measuring CPU latency: FP32 vs INT8")
        lowered.calibration.speed = measure_speedup(onnx_path, run.bundle / manifest.target.engine_files[0],
                                                    lowered.calibration.split.evaluation[0])
    elif options.target == "ort" and options.device.gpu and options.precision is Precision.INT8 and has_cuda_provider():
        _int8_on_cuda(run, manifest, lowered, onnx_path)
    manifest.calibration = lowered.calibration.manifest_entry()
    held_out = None if options.data else lowered.calibration.split.evaluation
    if not held_out:
        return cases, False
    return gate_cases(manifest.io, data=options.data, tokenizer_dir=processor_dir(loaded), seed=options.seed,
                      feeds=held_out, image_options=options.image), True


def _int8_on_cuda(run: _Run, manifest: Manifest, lowered: Lowered, onnx_path: Path) -> None:
    """INT8 never ships slower than FP16 on ORT CUDA without saying so: measured at the opt shape, recorded
    as calibration.speed, and a warning paragraph (calibration notes, printed by the build) when slower."""
    from exporter.build.tune import int8_vs_fp16, slow_int8_paragraph
    from runtimes.samples import generate_feeds

    if lowered.calibration is None:
        return
    options = {"device_id": 0, **manifest.target.options.get("cuda_provider_options", {})}
    with timed(run.timings, "int8_speed", run.say, "Measuring CUDA latency: FP16 vs INT8"):
        try:
            speed = int8_vs_fp16(onnx_path, run.bundle / manifest.target.engine_files[0],
                                 generate_feeds(manifest.io, "opt", seed=7), options, run.work)
        except Exception as exc:  # ORT's own exception types: the timing-only FP16 graph may not load
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            lowered.calibration.speed = {"device": "cuda", "error": text}
            lowered.calibration.notes.append(f"INT8 was not timed against FP16 on ORT CUDA ({text}): ORT's CUDA "
                                             "provider runs Q/DQ graphs without fused INT8 kernels, often slower than FP16")
            return
    lowered.calibration.speed = speed
    if speed["int8_over_fp16"] > 1.0:
        lowered.calibration.notes.append(slow_int8_paragraph(speed))


def _finish(run: _Run, manifest: Manifest, report: ParityReport, mixed: MixedOptions | None) -> BuildResult:
    options, history, target = run.options, run.history, manifest.target
    manifest.source["timings_s"] = run.timings
    if history:
        manifest.precision["fallback"] = history
    manifest.files = {f: file_sha256(run.bundle / f) for f in [*target.engine_files, *run.extra_files]}

    def failure(failures: str, rejected: Path) -> str:
        tried = (f" The FP32 fallback kept {sum(len(h['kept_fp32']) for h in history)} node(s) in FP32 over "
                 f"{len(history)} round(s) and stopped ({history[-1]['stopped'] if history else 'no candidates'}).")
        return (
            f"Expected the {options.precision} engine to match the reference within tolerance, but the parity gate "
            f"failed: {failures}.{tried if mixed else ''} Nothing was written to '{run.output}'; the "
            f"rejected bundle and its report are in '{rejected}' (open report.html). "
            + ("Raise the fallback budget (--fallback-budget), keep nodes in FP32 with --fp32-nodes/--fp32-ops, or "
               if mixed else "")
            + "loosen a tolerance with --tolerance [OUTPUT:]METRIC=VALUE only if the difference is acceptable."
        )

    return finish_bundle(run.bundle, run.output, manifest, report, title=f"Parity: {manifest.name}",
                         context={"source": manifest.source["spec"], "target": f"{target.backend} ({target.device})",
                                  "precision": options.precision, "enginekit": __version__},
                         timings=run.timings, failure=failure)


def _lower(loaded: LoadedSource, onnx_path: Path, precision: str, work: Path, mixed: MixedOptions | None = None,
           calibration: list[Feeds] | None = None, *, quantize: dict[str, Any] | None = None,
           dynamic: bool = False) -> Lowered:
    """Lower the graph, unless it is an ONNX that enginekit already lowered (the kept ONNX of a
    TensorRT build handed over to another machine): lowering it again would change it twice."""
    already = loaded.info.get("lowered")
    if not already:
        return lower_precision(onnx_path, precision, work, mixed=mixed, calibration=calibration or [], quantize=quantize,
                               dynamic=dynamic)
    if already != precision:
        raise UsageError(
            f"Expected --precision {already} for '{onnx_path}', which enginekit already lowered to {already} "
            f"(its metadata says so), found --precision {precision}. Build it with --precision {already}, or start "
            "from the FP32 model."
        )
    return Lowered(Path(onnx_path), {"requested": precision, "lowered_before": True, **census(Path(onnx_path))})


def _calibration_feeds(loaded: LoadedSource, options: BuildOptions, cases: list[tuple[str, Feeds]]) -> list[Feeds]:
    """Range data for AutoCast: --calib, else the --data batches, else the generated min/opt cases
    (max shapes are left out: AutoCast holds every intermediate of every batch in memory)."""
    if options.calib is not None and not str(options.calib).startswith("random"):
        from calibration.data import load_feeds

        batch_dim = next((d for s in loaded.io.inputs for d in s.shape[:1] if isinstance(d, str)), None)
        batch = min(8, loaded.io.dims[batch_dim].max) if batch_dim in loaded.io.dims else 1
        return load_feeds(options.calib, loaded.io, tokenizer_dir=processor_dir(loaded), batch_size=batch,
                          image_options=options.image)[:4]
    data = [f for label, f in cases if label.startswith("data[")]
    return data[:4] if data else [f for label, f in cases if label.startswith(("min", "opt"))]


def _lowered_io(io: IOSpec, lowered: Path) -> IOSpec:
    """The io with the lowered graph's dtypes (native FP16/BF16 inputs and outputs)."""
    from exporter.export.onnxutil import io_from_onnx

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
    mode = options.quantization_mode()
    if mode == "dynamic":
        return {"feeds": _ranking_feeds(loaded, options), "budget": options.accuracy_budget, "smooth": options.smooth,
                "range_feeds": _max_shape_feeds(loaded, options), "progress": say}
    if mode != "static":
        return None
    from calibration.calibrate import CalibOptions

    calib = CalibOptions(data=options.calib, method=options.calib_method,
                         budget=detect.accuracy_budget(loaded.info, options.accuracy_budget),
                         eval_data=options.data, cache_dir=output.parent / f"{output.name}.calib", image=options.image,
                         seed=options.seed, smooth=options.smooth)
    return {"io": loaded.io, "options": calib, "tokenizer_dir": processor_dir(loaded), "progress": say}


def _ranking_feeds(loaded: LoadedSource, options: BuildOptions) -> list[Feeds]:
    """Dynamic INT8's samples for ranking MatMuls against the accuracy budget (no scales come from them):
    --calib when given; else, for a text model with a tokenizer, 48 of enginekit's own calibration sentences
    (exporter/data/calibration_sentences.txt, never the gate's --data); else four generated batches at the opt
    shapes with every position attended (padded positions would weigh values no one reads)."""
    from calibration.data import load_feeds

    tokenizer = processor_dir(loaded)
    text = any(s.name == "input_ids" for s in loaded.io.inputs)
    if options.calib is not None and not str(options.calib).startswith("random"):
        return load_feeds(options.calib, loaded.io, tokenizer_dir=tokenizer, batch_size=8, image_options=options.image)[:8]
    if text and tokenizer is not None:
        sentences = Path(__file__).resolve().parents[1] / "data" / "calibration_sentences.txt"
        return load_feeds(sentences, loaded.io, tokenizer_dir=tokenizer, batch_size=8)[:6]
    return _attended(loaded, "opt", [options.seed + 50 + i for i in range(4)])


def _attended(loaded: LoadedSource, point: Any, seeds: Sequence[int]) -> list[Feeds]:
    """One generated batch at `point` per seed, every position attended (padded positions would weigh values
    no one reads)."""
    from runtimes.samples import generate_feeds

    batches = [generate_feeds(loaded.io, point, seed=seed) for seed in seeds]
    for feeds in batches:
        if "attention_mask" in feeds:
            feeds["attention_mask"] = np.ones_like(feeds["attention_mask"])
    return batches


def _max_shape_feeds(loaded: LoadedSource, options: BuildOptions) -> list[Feeds]:
    """Generated inputs at the profile's largest shapes (16 rows at most, in batches of 2 to bound the memory of
    the activation probe; every position attended): dynamic INT8's smoothing statistics must cover the longest
    inputs the bundle admits, not only the ranking samples. On all-MiniLM-L6-v2, with maxima from 2 such rows
    the worst held-out cosine varied with the draw (0.9879-0.9926 over 3 seeds); from 8 rows 0.9907-0.9933; 16
    rows 0.9923."""
    sizes = {name: dim.at("max") for name, dim in loaded.io.dims.items()}
    rows = min(16, sizes.get("batch", 2))
    if "batch" in sizes:
        sizes["batch"] = min(2, rows)
    return _attended(loaded, sizes, [options.seed + 70 + i for i in range(max(1, rows // 2))])


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
        runner = open_runner(bundle, manifest.hashed(bundle), device=options.device)
    except (IncompatibleEngine, MissingDependency) as exc:
        notes.append(f"parity not checked: the {options.precision} engine cannot run here "
                     f"({not_runnable_here(exc, options.device, options.precision)}); run `enginekit parity` on a "
                     "machine with the GPU")
    emulated = options.precision.mixed and (runner is None or not options.device.gpu)
    if runner is None and not emulated:
        return ParityReport(options.precision, policy, notes=notes).finish(engine_checked=False)
    with timed(timings, "gate", say, "Parity gate: reference vs engine"):
        emulator = emulated_runner(lowered) if emulated else None
        try:
            engine = _as_engine_dtypes(manifest.io, runner.infer) if runner else None
            hidden = detect.hidden_outputs(manifest.source)
            if engine is not None and hidden:
                graph = bundle / manifest.target.engine_files[0] if manifest.target.backend == "ort" else lowered
                engine, note = detect.with_raw_outputs(engine, graph, hidden, options.device,
                                                       getattr(runner, "cuda_options", None))
                if note and task is not None:
                    notes.append(note)
                    task = replace(task, ungated=task.ungated | set(hidden))
            report = run_gate(reference, engine, cases, policy, options.precision,
                              calibrated=options.quantization_mode() != "dynamic",
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
    from exporter.lower.fallback import find_culprits

    entry: dict[str, Any] = {"round": len(history) + 1, "failures": report.failures()[:6], "kept_fp32": [], "stopped": None}
    history.append(entry)
    left = mixed.max_fp32_nodes - len(mixed.excluded)
    if len(history) > mixed.max_iterations or left <= 0:
        entry["stopped"] = "fallback budget spent (--fallback-budget / rounds)"
        return []
    failed_case = next(c for c in report.cases if not c.passed)
    if any(o.name == RUN_FAILED for o in failed_case.outputs):
        entry["stopped"] = "the engine failed to run: no numeric difference to trace to a node"
        return []
    failing = failed_case.label.removeprefix(f"{mixed.precision}-emulated ")
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
