"""`enginekit build` refuses what it can tell is wrong before the export (tens of seconds for a large
model), in-process through typer's CliRunner: one paragraph, exit 2, nothing written."""

from __future__ import annotations

import time
import tracemalloc

import pytest
from typer.testing import CliRunner

from exporter.cli import app
from runtimes.trt.build import tensorrt_unavailable

runner = CliRunner()


@pytest.fixture
def no_export(monkeypatch):
    """Fail the test if the build gets as far as exporting (or, for an onnx: source, building)."""
    import exporter.build.engine
    import exporter.export.graph
    import exporter.recipes.plain

    def export_called(*_args, **_kwargs):
        raise AssertionError("the export ran: this check belongs before it")

    monkeypatch.setattr(exporter.export.graph, "export_onnx", export_called)
    monkeypatch.setattr(exporter.recipes.plain, "build_engine", export_called)
    return export_called


def _refused(res, *needles: str) -> str:
    text = " ".join(res.output.split())
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert "error:" in text and "Traceback" not in text and "AssertionError" not in text, res.output
    for needle in needles:
        assert needle in text, (needle, res.output)
    return text


def test_the_oom_shapes_are_refused_before_export_without_allocating(tiny_bert_dir, tmp_path, no_export):
    tracemalloc.start()  # numpy's allocations are traced: the gate's inputs would be 143 GiB of them
    start = time.perf_counter()
    res = runner.invoke(app, ["build", f"hf:{tiny_bert_dir}", "--shapes", "batch=1:1:100000000", "-o", str(tmp_path / "b")])
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    _refused(res, "Expected the dim ranges to fit in memory", "input_ids int64[100000000, 64]", "--memory-limit")
    assert seconds < 5 and peak < 200 << 20, (seconds, peak)  # 0.9 s and a few MiB here
    assert list(tmp_path.iterdir()) == []


def test_a_nan_tolerance_is_refused_not_a_gate_switched_off(tiny_bert_dir, tmp_path, no_export):
    res = runner.invoke(app, ["build", f"hf:{tiny_bert_dir}", "--tolerance", "max_abs=nan", "-o", str(tmp_path / "b")])
    _refused(res, "finite", "'max_abs=nan'")
    res = runner.invoke(app, ["build", f"hf:{tiny_bert_dir}", "--tolerance", "rel_l2=inf", "-o", str(tmp_path / "b")])
    _refused(res, "finite", "'rel_l2=inf'")


def test_a_tolerance_for_an_output_the_model_lacks_lists_its_outputs(tiny_bert_dir, tmp_path, no_export):
    res = runner.invoke(app, ["build", f"hf:{tiny_bert_dir}", "--tolerance", "nosuchoutput:rel_l2=1e-3",
                              "-o", str(tmp_path / "b")])
    _refused(res, "'nosuchoutput'", "last_hidden_state, pooler_output")


@pytest.mark.parametrize("flag", ["--calib", "--data"])
def test_a_missing_data_file_is_reported_before_the_model_is_loaded(flag, tiny_bert_dir, tmp_path, monkeypatch,
                                                                    no_export):
    import exporter.recipes.plain

    monkeypatch.setattr(exporter.recipes.plain, "load_source", no_export)
    args = ["build", f"hf:{tiny_bert_dir}", flag, str(tmp_path / "nosuch.txt"), "-o", str(tmp_path / "b")]
    res = runner.invoke(app, args + (["--precision", "fp16"] if flag == "--calib" else []))
    _refused(res, f"Expected {flag} to name a data file or folder", "nosuch.txt")
    assert not (tmp_path / "b").exists()


def test_bad_shapes_are_quoted_as_given_and_the_wrong_part_named(tiny_bert_dir, tmp_path):
    res = runner.invoke(app, ["build", f"hf:{tiny_bert_dir}", "--shapes", "batch=a:b:c", "-o", str(tmp_path / "b")])
    text = _refused(res, "found 'batch=a:b:c'", "MIN 'a' is not a whole number")
    assert "🅱" not in text
    res = runner.invoke(app, ["build", f"hf:{tiny_bert_dir}", "--shapes", "batch=1:8:32,sequence=1:2:3:4"])
    _refused(res, "'sequence=1:2:3:4' of --shapes 'batch=1:8:32,sequence=1:2:3:4'", "4 numbers")


@pytest.mark.skipif(tensorrt_unavailable() is None, reason="TensorRT is here: the build does not hand off")
def test_a_trt_build_without_tensorrt_says_so_before_the_export(tiny_bert_dir, tmp_path, monkeypatch):
    import exporter.export.graph
    from runtimes.errors import ExportError

    def stop(*_args, **_kwargs):
        raise ExportError("stopped at the export by the test")

    monkeypatch.setattr(exporter.export.graph, "export_onnx", stop)
    res = runner.invoke(app, ["build", f"hf:{tiny_bert_dir}", "--target", "trt", "-o", str(tmp_path / "t")])
    text = _refused(res, "stopped at the export by the test")
    note = text.index("TensorRT cannot build here")
    assert note < text.index("Loading") < text.index("stopped at the export")
    assert f"'{tmp_path / 't.lowered'}/'" in text
