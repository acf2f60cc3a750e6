"""The `enginekit` command line (typer). Each command parses options and calls one library function.

User errors (EnginekitError) print as one paragraph on stderr without a traceback and exit
non-zero (2; the parity gate's failure exits 1). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from exporter.cli import run as cli_run
from exporter.cli.common import _console, _print_json, _quiet_libraries, handle_errors, stages
from exporter.cli.printing import _print_calibration, _print_parity, _print_precision
from runtimes._deps import require_build_toolchain

app = typer.Typer(
    name="enginekit",
    help="Export PyTorch models to ONNX, lower precision, build ONNX Runtime / TensorRT engines, prove parity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# -- shared options -----------------------------------------------------------------------------------
ShapesOpt = typer.Option(None, "--shapes", help="Dim ranges NAME=MIN:OPT:MAX, comma-separated (e.g. batch=1:8:32,sequence=1:128:512).")
DynamicOpt = typer.Option(None, "--dynamic", help="Dims to keep dynamic, comma-separated (others fixed at opt); 'none' for static.")
OpsetOpt = typer.Option(None, "--opset", help="ONNX opset (default: the exporter's recommended one).")
ExporterOpt = typer.Option("auto", "--exporter", help="auto | torch | transformers (auto: torch.onnx, then transformers' exporter for HF models).")


CalibMethodOpt = typer.Option("percentile", "--calib-method", "--method",
                              help="minmax | entropy | percentile | all (all: compare them, keep the best).")
BudgetOpt = typer.Option("cosine>=0.99", "--accuracy-budget",
                         help="[OUTPUT:]METRIC>=VALUE on held-out samples, METRIC cosine (worst sample) or top1; "
                              "the most sensitive layers stay in float until it holds. 'none': quantize all.")
ResizeOpt = typer.Option(None, "--resize", help="Images without a preprocessor_config.json: shortest edge before the center crop.")
MeanOpt = typer.Option(None, "--mean", help="Images without a preprocessor_config.json: per-channel mean of [0,1] pixels, e.g. 0.485,0.456,0.406.")
SmoothOpt = typer.Option(None, "--smooth", help="SmoothQuant alpha in (0,1]: move activation outliers into the weights before "
                         "quantizing (helps transformers; e.g. 0.7). Default: off.")
StdOpt = typer.Option(None, "--std", help="Images without a preprocessor_config.json: per-channel std, e.g. 0.229,0.224,0.225.")


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        from runtimes.errors import UsageError

        raise UsageError(f"Expected {flag} as comma-separated numbers (e.g. 0.485,0.456,0.406), found '{text}'.") from None


def _image_options(resize: int | None, mean: str | None, std: str | None) -> Any:
    from calibration.images import ImageOptions

    return ImageOptions(resize=resize, mean=_floats(mean, "--mean"), std=_floats(std, "--std"))


def _build_options(**kw: Any) -> Any:
    from exporter.pipeline import BuildOptions
    from exporter.source.shapes import parse_shapes

    dynamic = kw.pop("dynamic")
    if dynamic is not None:
        dynamic = [] if dynamic.strip().lower() == "none" else [d.strip() for d in dynamic.split(",") if d.strip()]
    return BuildOptions(shapes=parse_shapes(kw.pop("shapes")), dynamic=dynamic, **kw)


# -- commands -----------------------------------------------------------------------------------------
@app.command()
@handle_errors
def doctor(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """GPU, compute capability, BF16/FP8 support and backend versions."""
    from exporter.doctor import doctor_report

    report = doctor_report()
    if as_json:
        return _print_json(report)
    from rich.table import Table

    con = _console()
    gpu = report["gpu"]
    con.print(f"python {report['python']} · {report['platform']}")
    con.print("GPU: " + (f"{gpu['name']} (compute capability {'.'.join(map(str, gpu['compute_capability']))}, "
                         f"driver {gpu['driver']})" if gpu else "none (no NVIDIA GPU answered nvidia-smi)"))
    t = Table("package", "version", box=None)
    for k, v in report["packages"].items():
        t.add_row(k, v or "[dim]not installed[/]")
    con.print(t)
    con.print("ONNX Runtime providers: " + ", ".join(report["onnxruntime_providers"] or ["none"]))
    con.print("precision: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in report["precision_support"].items()))
    con.print("targets: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in report["targets"].items()))
    from rich.markup import escape

    for note in report["notes"]:
        con.print(f"[yellow]•[/] {escape(note)}")  # notes name extras such as 'enginekit[trt]'


@app.command()
@handle_errors
def export(
    source: str = typer.Argument(..., help="hf:<folder or hub id>[#task] | py:<module>:<factory> | timm:<name>"),
    output: Path = typer.Option(..., "-o", "--output", help="The .onnx file to write (+ .onnx.data for large models)."),
    shapes: str | None = ShapesOpt,
    dynamic: str | None = DynamicOpt,
    opset: int | None = OpsetOpt,
    exporter: str = ExporterOpt,
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Export a model to a checked ONNX graph with named dynamic dims (ranges recorded in its metadata)."""
    require_build_toolchain("export")
    _quiet_libraries()
    from exporter.pipeline import export_model

    opts = _build_options(shapes=shapes, dynamic=dynamic, opset=opset, exporter=exporter, force=force)
    with stages(not as_json) as say:
        result = export_model(source, output, opts, say)
    data = {"onnx": str(result.path), "exporter": result.exporter, "opset": result.opset, "seconds": round(result.seconds, 2),
            "inputs": [s.describe() for s in result.io.inputs], "outputs": [s.describe() for s in result.io.outputs],
            "dims": {k: str(v) for k, v in result.io.dims.items()}, "external_data": result.external_data}
    if as_json:
        return _print_json(data)
    con = _console()
    con.print(f"wrote [bold]{result.path}[/] ({result.exporter}, opset {result.opset})")
    for s in result.io.inputs:
        con.print(f"  in   {s.describe()}")
    for s in result.io.outputs:
        con.print(f"  out  {s.describe()}")
    if result.io.dims:
        con.print("  dims " + ", ".join(f"{k}={v}" for k, v in result.io.dims.items()) + "  (min:opt:max)")


@app.command()
@handle_errors
def build(
    source: str = typer.Argument(..., help="hf:<folder or hub id>[#task] | py:<module>:<factory> | onnx:<file> | timm:<name>"),
    target: str = typer.Option("ort", "--target", help="ort (ONNX Runtime) | trt (TensorRT)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda (for --target ort)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | bf16 | int8 | fp8."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Bundle folder (default engines/<model>-<target>-<precision>)."),
    data: Path | None = typer.Option(None, "--data", help="Real inputs for the gate: .npz, folder of .npz, .txt or .jsonl texts."),
    tolerance: list[str] = typer.Option([], "--tolerance", help="Override a gate tolerance: [OUTPUT:]METRIC=VALUE (repeatable)."),
    shapes: str | None = ShapesOpt,
    dynamic: str | None = DynamicOpt,
    opset: int | None = OpsetOpt,
    exporter: str = ExporterOpt,
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle."),
    skip_parity: bool = typer.Option(False, "--skip-parity", help="Do not run the gate (recorded as not checked)."),
    calib: str | None = typer.Option(None, "--calib", help="Calibration data for reduced precision (fp16/bf16: ranges for the lowering; int8/fp8: Q/DQ scales): .txt/.jsonl texts, a folder of images or .npz feeds, or random[:N] (smoke tests only)."),
    calib_method: str = CalibMethodOpt,
    accuracy_budget: str = BudgetOpt,
    resize: int | None = ResizeOpt,
    mean: str | None = MeanOpt,
    std: str | None = StdOpt,
    smooth: float | None = SmoothOpt,
    fp32_nodes: list[str] = typer.Option([], "--fp32-nodes", help="fp16/bf16: keep nodes whose name matches this regex in FP32 (repeatable)."),
    fp32_ops: str | None = typer.Option(None, "--fp32-ops", help="fp16/bf16: op types kept in FP32, comma-separated (e.g. LayerNormalization,Softmax)."),
    native_io: bool = typer.Option(False, "--native-io", help="fp16/bf16: graph inputs/outputs in the low precision (faster on GPU) instead of FP32."),
    range_rules: bool = typer.Option(True, "--range-rules/--no-range-rules", help="fp16/bf16: AutoCast's weight/activation range rules (off: naive cast, repaired only by the fallback)."),
    fallback_budget: int = typer.Option(64, "--fallback-budget", help="fp16/bf16: most nodes the parity-driven fallback may keep in FP32 (0: off)."),
    ort_fusions: bool = typer.Option(True, "--ort-fusions/--no-ort-fusions", help="ORT target: fuse attention, skip-LayerNorm and GELU into ORT's own ops."),
    detector_outputs: str = typer.Option("nms", "--detector-outputs", help="Detectors: nms (boxes, scores, classes, count after NMS in the graph) or raw (the head's pre-NMS boxes and scores)."),
    lowering: str = typer.Option("autocast", "--lowering", help="Causal LMs, fp16/bf16: autocast (AutoCast on the FP32 graphs) or native (exported from torch in that dtype; the fast GPU path)."),
    workspace: str | None = typer.Option(None, "--workspace", help="trt: builder workspace limit, e.g. 512MiB, 4GiB (default: all GPU memory)."),
    opt_level: int | None = typer.Option(None, "--opt-level", help="trt: builder optimization level 0..5 (default 3; 0 ignores the timing cache)."),
    hardware_compat: str = typer.Option("none", "--hardware-compat", help="trt: none | ampere+ | same-cc (which GPUs the plan runs on)."),
    version_compatible: bool = typer.Option(False, "--version-compatible", help="trt: a plan later TensorRT versions and the lean runtime can run."),
    exclude_lean_runtime: bool = typer.Option(False, "--exclude-lean-runtime", help="trt: leave the lean runtime out of a version-compatible plan."),
    timing_cache: Path | None = typer.Option(None, "--timing-cache", help="trt: timing cache file, read before and updated after the build."),
    tf32: bool = typer.Option(False, "--tf32", help="trt: allow TF32 in FP32 matmuls and convolutions (off: FP32 means FP32)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Export, lower, build and gate: writes an engine bundle only if parity passes."""
    require_build_toolchain("build")
    _quiet_libraries()
    from exporter.pipeline import build as run_build
    from runtimes.trt.build import TrtBuildOptions, parse_size

    trt = TrtBuildOptions(workspace=parse_size(workspace) if workspace else None, opt_level=opt_level,
                          hardware_compat=hardware_compat, version_compatible=version_compatible,
                          exclude_lean_runtime=exclude_lean_runtime, timing_cache=timing_cache, tf32=tf32)
    opts = _build_options(target=target, device=device, precision=precision, output=output, data=data,
                          tolerances=list(tolerance), shapes=shapes, dynamic=dynamic, opset=opset,
                          exporter=exporter, force=force, skip_parity=skip_parity, calib=calib,
                          fp32_nodes=list(fp32_nodes), fp32_ops=[o.strip() for o in (fp32_ops or "").split(",") if o.strip()],
                          native_io=native_io, range_rules=range_rules, fallback_budget=fallback_budget,
                          ort_fusions=ort_fusions, trt=trt, detector_outputs=detector_outputs,
                          lowering=lowering,
                          calib_method=calib_method, accuracy_budget=accuracy_budget,
                          image=_image_options(resize, mean, std), smooth=smooth)
    with stages(not as_json) as say:
        result = run_build(source, opts, say)
    if as_json:
        return _print_json({"bundle": str(result.bundle), "parity": result.parity.summary(),
                            "timings_s": result.timings, "manifest": result.manifest.to_dict()})
    con = _console()
    con.print(f"bundle [bold]{result.bundle}[/]  ({result.manifest.target.backend} {result.manifest.target.device}, "
              f"{opts.precision})")
    _print_precision(con, result.manifest.precision)
    if result.manifest.calibration:
        _print_calibration(con, result.manifest.calibration, result.manifest.precision.get("realised", {}))
    _print_parity(con, result.parity)
    if result.parity.status == "not-checked":
        con.print("[yellow]parity NOT CHECKED on this machine: run `enginekit parity " + str(result.bundle)
                  + "` where the engine can run before shipping it.[/]")
    con.print(f"[dim]gate report: {result.bundle / 'report.html'}[/]")


@app.command()
@handle_errors
def calibrate(
    onnx_file: Path = typer.Argument(..., help="The FP32 ONNX file to quantize."),
    data: str = typer.Option(..., "--data", help="Calibration data: .txt/.jsonl texts, a folder of images or .npz feeds, or random[:N]."),
    output: Path = typer.Option(..., "-o", "--output", help="The Q/DQ ONNX file to write (ranges cached in OUTPUT.calib/)."),
    precision: str = typer.Option("int8", "--precision", help="int8 | fp8."),
    method: str = CalibMethodOpt,
    accuracy_budget: str = BudgetOpt,
    eval_data: Path | None = typer.Option(None, "--eval-data", help="Held-out samples for accuracy (default: every 4th --data sample)."),
    processor: Path | None = typer.Option(None, "--processor", help="HF model folder with the tokenizer (texts) or preprocessor_config.json (images)."),
    shapes: str | None = ShapesOpt,
    resize: int | None = ResizeOpt,
    mean: str | None = MeanOpt,
    std: str | None = StdOpt,
    smooth: float | None = SmoothOpt,
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Quantize an ONNX graph to Q/DQ INT8/FP8 from real data, within an accuracy budget."""
    require_build_toolchain("calibrate")
    _quiet_libraries()
    from calibration.calibrate import CalibOptions
    from exporter.lower.quant import calibrate_onnx

    if precision not in ("int8", "fp8"):
        from runtimes.errors import UsageError

        raise UsageError(f"Expected --precision int8 or fp8 for calibrate, found '{precision}'.")
    calib = CalibOptions(data=data, method=method, budget=accuracy_budget, eval_data=eval_data,
                         image=_image_options(resize, mean, std), smooth=smooth)
    with stages(not as_json) as say:
        result = calibrate_onnx(onnx_file, output, precision=precision, calib=calib,
                                options=_build_options(shapes=shapes, dynamic=None), processor_dir=processor,
                                force=force, progress=say)
    entry = result.manifest_entry()
    realised = result.graph.realised()
    if as_json:
        return _print_json({"output": str(result.graph.path), "precision": precision, "realised": realised,
                            "calibration": entry})
    con = _console()
    con.print(f"wrote [bold]{result.graph.path}[/] ({precision} Q/DQ)")
    _print_calibration(con, entry, realised)
    return None


@app.command()
@handle_errors
def parity(
    bundle: Path = typer.Argument(..., help="An engine bundle folder."),
    reference: str | None = typer.Option(None, "--reference", help="Reference source (default: the one in the manifest)."),
    data: Path | None = typer.Option(None, "--data", help="Real inputs: .npz, folder of .npz, .txt or .jsonl texts."),
    tolerance: list[str] = typer.Option([], "--tolerance", help="[OUTPUT:]METRIC=VALUE (repeatable)."),
    device: str | None = typer.Option(None, "--device", help="Run the engine on cpu or cuda (default: its own)."),
    report: Path | None = typer.Option(None, "--report", help="Also write a self-contained HTML report here."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
) -> None:
    """Re-run the parity gate of a bundle against its reference; exits 1 on failure."""
    require_build_toolchain("parity")
    _quiet_libraries()
    from exporter.gate.recheck import check_bundle

    with stages(not as_json) as say:
        result = check_bundle(bundle, reference=reference, data=data, tolerances=list(tolerance), device=device,
                              html=report, progress=say)
    if as_json:
        _print_json(result.to_dict())
    else:
        _print_parity(_console(), result)
        if report:
            _console().print(f"[dim]report: {report}[/]")
    if not result.passed:
        from rich.markup import escape

        from exporter.gate.parity import format_failures

        if result.status == "not-checked":
            _console(stderr=True).print("[bold red]parity not checked:[/] " + escape("; ".join(result.notes)))
        else:
            _console(stderr=True).print(f"[bold red]parity failed:[/] {escape(format_failures(result))}")
        raise typer.Exit(1)


@app.command(name="inspect")
@handle_errors
def inspect_cmd(
    path: Path = typer.Argument(..., help="An engine bundle folder or an .onnx file."),
    layers: bool = typer.Option(False, "--layers", help="List every node (ONNX files)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a bundle's manifest (io, precision, target, parity) or an ONNX graph's summary."""
    from exporter.inspection import inspect_path

    info = inspect_path(path, layers=layers)
    if as_json:
        return _print_json(info)
    con = _console()
    if info["kind"] == "bundle":
        m = info["manifest"]
        con.print(f"[bold]{m['name']}[/]  {m['target']['backend']} / {m['target']['device']} / "
                  f"{m['precision']['requested']}  (enginekit {m['enginekit_version']}, {m['created_at']})")
        con.print(f"source: {m['source']['spec']}  task={m['source'].get('task')}  exporter={m['source'].get('exporter')}")
        for s in m["io"]["inputs"]:
            con.print(f"  in   {s['name']}: {s['dtype']}[{', '.join(map(str, s['shape']))}]")
        for s in m["io"]["outputs"]:
            con.print(f"  out  {s['name']}: {s['dtype']}[{', '.join(map(str, s['shape']))}]")
        if m["io"]["dims"]:
            con.print("  dims " + ", ".join(f"{k}={v['min']}:{v['opt']}:{v['max']}" for k, v in m["io"]["dims"].items()))
        con.print(f"versions: {m['target']['versions']}  providers: {m['target']['providers']}")
        con.print("files: " + ", ".join(f"{f} ({b / 1e6:.1f} MB)" for f, b in info["file_bytes"].items()))
        cal = m.get("calibration")
        if cal:
            realised = m["precision"].get("realised", {})
            con.print(f"calibration: {cal['method']} on {cal['samples']['calibration']} samples ({cal['data']}); "
                      f"{len(realised.get('quantized_nodes', []))} nodes quantized, "
                      f"{len(realised.get('excluded_nodes', []))} kept in float; budget {cal['budget'] or 'none'} "
                      f"{'met' if cal['budget_met'] else 'not set' if cal['budget_met'] is None else 'missed'}")
        p = m.get("parity") or {}
        con.print(f"parity: {p.get('status', 'none')}" + (f"  failures: {p['failures']}" if p.get("failures") else ""))
        con.print(f"rebuild: {' '.join(m['build_command'])}")
        return None
    con.print(f"[bold]{info['path']}[/]  opsets {info['opsets']}  {info['nodes']} nodes  "
              f"{info['initializers']} initializers ({info['weight_bytes'] / 1e6:.1f} MB)  producer {info['producer']}")
    for s in info["inputs"]:
        con.print(f"  in   {s}")
    for s in info["outputs"]:
        con.print(f"  out  {s}")
    if info["dims"]:
        con.print("  dims " + ", ".join(f"{k}={v}" for k, v in info["dims"].items()) + "  (recorded by enginekit export)")
    con.print("  ops  " + ", ".join(f"{k}×{v}" for k, v in list(info["ops"].items())[:20]))
    if layers:
        con.print(info["layers"], markup=False)
    return None


# The run-time commands live in cli_run.py as plain functions; registered here, explicitly.
for _command in (cli_run.bench, cli_run.demo, cli_run.generate, cli_run.serve, cli_run.triton):
    app.command()(_command)


def main() -> None:
    """Console-script entry point (`enginekit`, `python -m exporter`)."""
    app(prog_name="enginekit")


if __name__ == "__main__":
    main()
