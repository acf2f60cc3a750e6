"""The CLI, in-process (typer's CliRunner) and as the real console script in a subprocess."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from exporter.cli import app
from tests.conftest import run_cli

runner = CliRunner()


def test_help_and_module_entry_point():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("doctor", "export", "build", "parity", "inspect", "demo"):
        assert cmd in proc.stdout
    import subprocess
    import sys

    mod = subprocess.run([sys.executable, "-m", "exporter", "build", "--help"], capture_output=True, text=True)
    assert mod.returncode == 0 and "--precision" in mod.stdout


def test_doctor_json():
    res = runner.invoke(app, ["doctor", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["targets"]["ort-cpu"] is True and "bf16" in data["precision_support"]
    # ["enginekit"] where installed (make install), [] where run from a checkout on PYTHONPATH (the GPU machine)
    assert set(data["import_packages"]) == {"exporter", "calibration", "runtimes"}
    assert all(v in ([], ["enginekit"]) for v in data["import_packages"].values()), data["import_packages"]
    assert not [n for n in data["notes"] if "also provided by" in n]


def test_doctor_names_a_distribution_that_clashes_with_an_import_package(monkeypatch):
    import importlib.metadata as md

    from exporter import doctor

    real = md.packages_distributions()
    monkeypatch.setattr(doctor.md, "packages_distributions", lambda: {**real, "runtimes": ["enginekit", "runtimes"]})
    notes = [n for n in doctor.doctor_report()["notes"] if "also provided by" in n]
    assert notes == ["The import package 'runtimes' is also provided by runtimes here, which overwrites enginekit's "
                     "files: uninstall runtimes or install enginekit into its own venv."]


@pytest.mark.slow
def test_build_inspect_parity_in_a_subprocess(tiny_bert_dir, tmp_path):
    out = tmp_path / "bundle"
    proc = run_cli("build", f"hf:{tiny_bert_dir}", "-o", str(out), "--shapes", "batch=1:2:4", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["parity"]["status"] == "passed" and Path(data["bundle"]) == out
    proc = run_cli("inspect", str(out))
    assert proc.returncode == 0 and "last_hidden_state" in proc.stdout and "parity: passed" in proc.stdout
    report = tmp_path / "again.html"
    proc = run_cli("parity", str(out), "--report", str(report))  # the recorded source is a folder: named, not read
    assert proc.returncode == 2 and "--reference" in proc.stderr and "Traceback" not in proc.stderr
    assert not report.exists()
    proc = run_cli("parity", str(out), "--report", str(report), "--reference", f"hf:{tiny_bert_dir}")
    assert proc.returncode == 0, proc.stderr
    assert "passed" in proc.stdout and report.read_text().startswith("<!doctype html>")


def test_parity_failure_exits_1(bert_bundle, tmp_path):
    res = runner.invoke(app, ["parity", str(bert_bundle), "--tolerance", "cosine=1.5", "--trust-recorded-source"])
    assert res.exit_code == 1
    assert "parity failed" in res.output and "last_hidden_state" in res.output


def test_export_and_inspect_onnx(tiny_bert_dir, tmp_path):
    out = tmp_path / "m.onnx"
    res = runner.invoke(app, ["export", f"hf:{tiny_bert_dir}", "-o", str(out), "--shapes", "sequence=1:16:32"])
    assert res.exit_code == 0, res.output
    assert "sequence=1:16:32" in res.output
    res = runner.invoke(app, ["inspect", str(out), "--layers"])
    assert res.exit_code == 0 and "recorded by enginekit export" in res.output and "Node(s)" in res.output


BAD = [
    (["build", "hf:/no/such/model"], "found nothing there"),
    (["build", "{tmp}"], "config.json"),
    (["build", "onnx:{tmp}/corrupt.onnx"], "cannot be parsed"),
    (["build", "onnx:{tmp}/truncated.onnx"], "ONNX"),
    (["build", "{bert}", "--precision", "fp12"], "--precision"),
    (["build", "{bert}", "--target", "tpu"], "--target"),
    (["build", "{bert}", "-o", "{existing}"], "--force"),
    (["build", "{bert}", "--shapes", "batch=1:x"], "NAME=MIN:OPT:MAX"),
    (["build", "{bert}", "--tolerance", "wat"], "--tolerance"),
    (["build", "{bert}", "--workspace", "1GiB"], "only with --target trt"),
    (["build", "{bert}", "--target", "trt", "--workspace", "lots"], "512MiB or 4GiB"),
    (["build", "{bert}", "--target", "trt", "--exclude-lean-runtime"], "only applies with --version-compatible"),
    (["build", "py:tests.models.convnet:make_unsupported", "-o", "{tmp}/u"], "linalg_eigh"),
    (["parity", "{tmp}/nothing"], "does not exist"),
    (["inspect", "{tmp}/nothing.onnx"], "Expected an engine bundle"),
    (["parity", "{altered}"], "modified after the build"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_bad_inputs_exit_nonzero_with_one_paragraph(args, message, tmp_path, tiny_bert_dir, bert_bundle):
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07garbage\xff\xff")
    (tmp_path / "truncated.onnx").write_bytes((bert_bundle / "model.onnx").read_bytes()[:5000])
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("keep")
    altered = tmp_path / "altered"
    shutil.copytree(bert_bundle, altered)
    with open(altered / "model.onnx", "ab") as f:
        f.write(b"x")
    subs = {"{tmp}": str(tmp_path), "{bert}": f"hf:{tiny_bert_dir}", "{existing}": str(existing), "{altered}": str(altered)}
    argv = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        argv.append(a)
    res = runner.invoke(app, argv)
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert "error:" in res.output and message in res.output.replace("\n", " ")
    assert "Traceback" not in res.output
    assert (existing / "keep.txt").read_text() == "keep" and sorted(p.name for p in existing.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".*partial*"))


def test_bad_input_in_a_real_subprocess_has_no_traceback(tmp_path):
    proc = run_cli("build", "hf:/no/such/model", "-o", str(tmp_path / "x"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "found nothing there" in proc.stderr


def test_an_internal_error_is_one_paragraph_with_the_saved_traceback(monkeypatch, tmp_path):
    from exporter import doctor

    def broken() -> None:
        raise RuntimeError("planted bug")

    monkeypatch.setattr(doctor, "doctor_report", broken)
    monkeypatch.setenv("ENGINEKIT_CRASH_DIR", str(tmp_path))
    res = runner.invoke(app, ["doctor"])
    assert res.exit_code == 3 and "Traceback" not in res.output
    text = " ".join(res.output.split())
    assert "internal error: RuntimeError: planted bug" in text and "This is a bug in enginekit" in text
    (saved,) = tmp_path.glob("*.txt")
    assert str(saved) in text.replace(" ", "") or saved.name in text
    assert "Traceback" in saved.read_text() and "planted bug" in saved.read_text()


def test_every_build_flag_round_trips_through_the_rebuild_command(tmp_path):
    """build_command writes every non-default option as flags that `enginekit build` parses back into
    the same BuildOptions (the flag table is the one declaration of both directions)."""
    import typer.main

    from calibration.images import ImageOptions
    from exporter.options import FLAGS, BuildOptions, build_command, options_from_cli
    from exporter.source.shapes import parse_shapes
    from runtimes.trt.build import TrtBuildOptions

    data, cache = tmp_path / "held-out.txt", tmp_path / "timing.cache"
    cases = [
        BuildOptions(precision="int8", calib=str(tmp_path / "calib.txt"), calib_method="entropy",
                     accuracy_budget="top1>=0.98", smooth=0.7, data=data, tolerances=["logits:rel_l2=0.05", "cosine=0.9"],
                     image=ImageOptions(resize=256, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)), opset=18,
                     exporter="torch", detector_outputs="raw", memory_limit=48.0),
        BuildOptions(precision="fp16", device="cuda", fp32_nodes=["/attn/.*", "LayerNorm_1"], fp32_ops=["Softmax", "Pow"],
                     native_io=True, range_rules=False, fallback_budget=8, ort_fusions=False, lowering="native"),
        BuildOptions(target="trt", device="cuda", precision="bf16",
                     trt=TrtBuildOptions(workspace=1 << 30, opt_level=5, hardware_compat="ampere+",
                                         version_compatible=True, exclude_lean_runtime=True, timing_cache=cache,
                                         tf32=True)),
    ]
    command = typer.main.get_command(app).commands["build"]  # type: ignore[attr-defined]
    dims = parse_shapes("batch=1:4:16")
    for options in cases:
        args = build_command("hf:./m", options, tmp_path / "out", dims)
        ctx = command.make_context("build", args[2:])
        params = dict(ctx.params)
        params.pop("source"), params.pop("as_json")
        again = options_from_cli(params)
        expected = options.__class__(**{**options.__dict__, "output": tmp_path / "out", "force": True,
                                        "shapes": dims})
        assert again == expected, [f.path for f in FLAGS if getattr(again, f.path.split(".")[0]) !=
                                   getattr(expected, f.path.split(".")[0])]


def test_an_internal_error_during_a_build_names_its_stage(monkeypatch, tmp_path, tiny_bert_dir):
    """The contract: 0 built, 1 gate failed, 2 user error, 3 a bug; a bug's paragraph names the stage it
    happened in, the exception and the saved traceback, and nothing is written where the bundle would go."""
    from exporter.export import graph

    def broken(*_a, **_k):
        raise KeyError("planted export bug")

    monkeypatch.setattr(graph, "export_onnx", broken)
    monkeypatch.setenv("ENGINEKIT_CRASH_DIR", str(tmp_path / "crash"))
    res = runner.invoke(app, ["build", f"hf:{tiny_bert_dir}", "-o", str(tmp_path / "out")])
    text = " ".join(res.output.split())
    assert res.exit_code == 3 and "Traceback" not in res.output
    assert "While 'Exporting to ONNX (torch.export → torch.onnx)', KeyError: 'planted export bug'" in text
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
