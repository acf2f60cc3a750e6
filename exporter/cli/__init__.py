"""The `enginekit` command line (typer). Each command parses options and calls one library function.

User errors (EnginekitError) print as one paragraph on stderr without a traceback and exit
non-zero (2; the parity gate's failure exits 1). Anything else is a bug: one paragraph naming the file
its traceback was saved to, exit 3 (exporter/cli/common.py).
"""

from __future__ import annotations

import inspect
import shlex
from pathlib import Path
from typing import Any

import typer

from exporter.cli import run as cli_run
from exporter.cli.common import (
    _console,
    _print_json,
    _quiet_libraries,
    configure_output,
    flags_without_type_tags,
    handle_errors,
    stages,
)
from exporter.cli.printing import _print_calibration, _print_parity, _print_precision
from exporter.options import (
    BuildOptions,
    cli_parameters,
    flag_option,
    options_from_cli,
    parse_dynamic,
    parse_floats,
)
from exporter.source.shapes import parse_shapes
from runtimes._deps import require_build_toolchain

app = typer.Typer(
    name="enginekit",
    help="Export PyTorch models to ONNX, lower precision, build ONNX Runtime / TensorRT engines, prove parity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
flags_without_type_tags()


def _show_version(value: bool) -> None:
    if value:
        from runtimes import __version__

        typer.echo(f"enginekit {__version__}")
        raise typer.Exit(0)


@app.callback()
def global_options(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print enginekit's version and exit."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only errors: no progress lines, log level ERROR."),
    verbose: int = typer.Option(0, "-v", "--verbose", count=True,
                                help="More detail: -v logs INFO and ONNX Runtime's warnings, -vv DEBUG and all of ONNX Runtime's log."),
) -> None:
    """Export PyTorch models to ONNX, lower precision, build ONNX Runtime / TensorRT engines, prove parity."""
    if quiet and verbose:
        raise typer.BadParameter("-q and -v contradict each other; pass one of them.")
    configure_output(quiet, verbose)


# -- shared options: each declared once, in exporter/options.py's FLAGS ------------------------------
ShapesOpt = flag_option("shapes")
DynamicOpt = flag_option("dynamic")
OpsetOpt = flag_option("opset")
ExporterOpt = flag_option("exporter")
CalibMethodOpt = flag_option("calib_method")
BudgetOpt = flag_option("accuracy_budget")
ResizeOpt = flag_option("image.resize")
MeanOpt = flag_option("image.mean")
StdOpt = flag_option("image.std")
SmoothOpt = flag_option("smooth")


def _image_options(resize: int | None, mean: str | None, std: str | None) -> Any:
    from calibration.images import ImageOptions

    return ImageOptions(resize=resize, mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"))


def _build_options(**kw: Any) -> Any:
    """BuildOptions for the commands that take a few of build's flags (export, calibrate)."""
    return BuildOptions(shapes=parse_shapes(kw.pop("shapes")), dynamic=parse_dynamic(kw.pop("dynamic")), **kw)


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
        con.print(f"  in   {s.describe()}", markup=False)
    for s in result.io.outputs:
        con.print(f"  out  {s.describe()}", markup=False)
    if result.io.dims:
        con.print("  dims " + ", ".join(f"{k}={v}" for k, v in result.io.dims.items()) + "  (min:opt:max)")


def _build(**kw: Any) -> None:
    """Export, lower, build and gate: writes an engine bundle only if parity passes."""
    source, as_json = kw.pop("source"), kw.pop("as_json")
    require_build_toolchain("build")
    _quiet_libraries()
    from exporter.pipeline import build as run_build

    opts = options_from_cli(kw)
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


build = handle_errors(_build)
# The parameters come from the flag table (exporter/options.py FLAGS), not from a hand-written list.
build.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("source", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str, default=typer.Argument(
        ..., help="hf:<folder or hub id>[#task] | py:<module>:<factory> | onnx:<file> | timm:<name>")),
    *cli_parameters(),
    inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(False, "--json", help="Print JSON.")),
])
build.__annotations__ = {p.name: p.annotation for p in build.__signature__.parameters.values()}  # type: ignore[attr-defined]
app.command(name="build")(build)


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
    reference: str | None = typer.Option(None, "--reference", help="Reference source (default: the one the manifest records, when it is a hub id or timm name; a recorded py: or path source must be named here)."),
    trust_recorded: bool = typer.Option(False, "--trust-recorded-source", help="Use the manifest's recorded source even when it is py: code or a path (it will be imported or read)."),
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
                              html=report, progress=say, trust_recorded=trust_recorded)
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
    layers: bool = typer.Option(False, "--layers", help="List every node (an ONNX file, or each ONNX engine of a bundle)."),
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
            con.print(f"  in   {s['name']}: {s['dtype']}[{', '.join(map(str, s['shape']))}]", markup=False)
        for s in m["io"]["outputs"]:
            con.print(f"  out  {s['name']}: {s['dtype']}[{', '.join(map(str, s['shape']))}]", markup=False)
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
        con.print(f"rebuild: {shlex.join(m['build_command'])}")
        for name, text in info.get("layers", {}).items():
            con.print(f"\n[bold]{name}[/]")
            con.print(text, markup=False)
        return None
    con.print(f"[bold]{info['path']}[/]  opsets {info['opsets']}  {info['nodes']} nodes  "
              f"{info['initializers']} initializers ({info['weight_bytes'] / 1e6:.1f} MB)  producer {info['producer']}")
    for s in info["inputs"]:
        con.print(f"  in   {s}", markup=False)
    for s in info["outputs"]:
        con.print(f"  out  {s}", markup=False)
    if info["dims"]:
        con.print("  dims " + ", ".join(f"{k}={v}" for k, v in info["dims"].items()) + "  (recorded by enginekit export)")
    con.print("  ops  " + ", ".join(f"{k}×{v}" for k, v in list(info["ops"].items())[:20]))
    if layers:
        con.print(info["layers"], markup=False)
    return None


# The run-time commands live in cli_run.py as plain functions; registered here, explicitly.
for _command in (cli_run.bench, cli_run.demo, cli_run.generate, cli_run.transcribe, cli_run.serve, cli_run.triton):
    app.command()(_command)


def main() -> None:
    """Console-script entry point (`enginekit`, `python -m exporter`)."""
    app(prog_name="enginekit")


if __name__ == "__main__":
    main()
