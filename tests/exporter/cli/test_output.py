"""What a user sees (issue 21): output that survives a CI log, JSON errors under --json, --version,
-q/-v, help without type tags on flags, inspect --layers for bundles, short failure paragraphs, no
empty table for --skip-parity, and no ONNX Runtime log line for an input the runner refuses.

Every test runs the real console script in a subprocess whose stdout and stderr are pipes, as in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

EXE = Path(sys.executable).with_name("enginekit")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The console script with a CI-like environment: pipes, no COLUMNS (rich's default is then 80)."""
    base = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "CI", "NO_COLOR")}
    cmd = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "exporter"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300,
                          env=dict(base, PYTHONPATH=str(ROOT), **(env or {})))


def test_tables_in_a_log_are_never_cut(bert_bundle, tiny_bert_dir):
    proc = cli("parity", str(bert_bundle), "--reference", f"hf:{tiny_bert_dir}")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "last_hidden_state" in line or "pooler_output" in line]
    assert len(rows) == 2 and "…" not in proc.stdout
    for row in rows:  # one line per output, every number whole (1 − cosine in scientific notation)
        assert row.rstrip().endswith("│") and "pass" in row and ("e-" in row or " 0 " in row), row
    assert max(len(line) for line in proc.stdout.splitlines()) > 80  # wider than rich's default, not folded


def test_errors_under_json_are_one_json_document(tmp_path):
    for args, code in ((["parity", str(tmp_path / "nothing"), "--json"], 2),
                       (["inspect", str(tmp_path / "nothing"), "--json"], 2),
                       (["build", "hf:" + str(tmp_path / "missing"), "--json"], 2)):
        proc = cli(*args)
        assert proc.returncode == code, proc.stdout + proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["exit_code"] == code and doc["kind"] in ("IncompatibleEngine", "SourceError") and "Expected" in doc["error"]
        assert "Traceback" not in proc.stderr


def test_version_quiet_verbose_and_help(bert_bundle, tiny_bert_dir):
    from runtimes import __version__

    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"enginekit {__version__}"
    quiet = cli("-q", "parity", str(bert_bundle), "--reference", f"hf:{tiny_bert_dir}")
    loud = cli("parity", str(bert_bundle), "--reference", f"hf:{tiny_bert_dir}")
    assert quiet.returncode == loud.returncode == 0
    assert "✓" in loud.stderr and "✓" not in quiet.stderr and "parity gate: passed" in quiet.stdout
    both = cli("-q", "-v", "doctor")
    assert both.returncode == 2 and "contradict" in both.stderr
    for command in ("build", "parity", "serve", "bench"):
        text = cli(command, "--help", env={"COLUMNS": "200"}).stdout
        assert "<bool>" not in text and "--help" in text, command
    assert "<int>" in cli("build", "--help", env={"COLUMNS": "200"}).stdout  # valued options keep their type


def test_inspect_layers_lists_a_bundles_nodes(bert_bundle):
    proc = cli("inspect", str(bert_bundle), "--layers")
    assert proc.returncode == 0, proc.stderr
    assert "model.onnx" in proc.stdout and proc.stdout.count("Node ") > 10
    assert "input_ids: int64[batch, sequence]" in proc.stdout  # dims in brackets are not read as markup
    data = json.loads(cli("inspect", str(bert_bundle), "--layers", "--json").stdout)
    assert list(data["layers"]) == ["model.onnx"] and "Node" in data["layers"]["model.onnx"]


def test_a_parity_failure_is_a_short_paragraph(bert_bundle, tiny_bert_dir):
    proc = cli("parity", str(bert_bundle), "--reference", f"hf:{tiny_bert_dir}", "--tolerance", "rel_l2=1e-30")
    assert proc.returncode == 1
    line = next(line for line in proc.stderr.splitlines() if line.startswith("parity failed:"))
    assert len(line) < 400 and "more" in line and "cases failed" in line, line


def test_skip_parity_prints_no_empty_table(tiny_bert_dir, tmp_path):
    proc = cli("build", f"hf:{tiny_bert_dir}", "--skip-parity", "--shapes", "batch=1:1:2,sequence=1:8:8",
               "-o", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    assert "parity gate: not-checked (no case was run)" in proc.stdout and "┃ output" not in proc.stdout
    assert "note: parity not checked: --skip-parity" in proc.stdout


def test_an_input_onnx_runtime_refuses_prints_no_log_line(bert_bundle):
    """Without a recorded vocabulary range, ORT itself refuses an id beyond the table: the caller gets
    InvalidInput, and stderr gets nothing from ORT's own logger (it used to print a red line per call)."""
    code = f"""
import runtimes
from runtimes.errors import InvalidInput
from runtimes.samples import generate_feeds
r = runtimes.load({str(bert_bundle)!r})
del r.manifest.io.values["input_ids"]
feeds = generate_feeds(r.manifest.io, "min")
feeds["input_ids"] = feeds["input_ids"] + 10_000
try:
    r.infer(feeds)
except InvalidInput as exc:
    print("refused:", "Gather" in str(exc))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout.strip() == "refused: True", proc.stdout + proc.stderr
    assert "onnxruntime" not in proc.stderr, proc.stderr
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), ENGINEKIT_ORT_LOG_LEVEL="3"))
    assert "[E:onnxruntime" in loud.stderr  # the line is ORT's, and the variable brings it back


def test_the_help_patch_leaves_an_older_typer_alone(monkeypatch):
    """typer 0.27 (the GPU machine's) has no TyperOption.display_type_rich and tags nothing: the patch
    must not touch it (the GPU smoke found every CLI step failing at import when it did)."""
    import typer.core

    from exporter.cli.common import flags_without_type_tags

    class OldOption:  # what typer 0.27's TyperOption offers for this purpose: nothing
        pass

    monkeypatch.setattr(typer.core, "TyperOption", OldOption)
    flags_without_type_tags()
    assert not hasattr(OldOption, "display_type_rich")
