"""The recorded and printed `enginekit build` commands (exporter/options.py build_command) write paths as
the user gave them, or relative to the current folder: never the build machine's absolute paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from exporter.options import BuildOptions, build_command, command_source, shown_path
from exporter.source.shapes import parse_shapes
from runtimes.trt.build import TrtBuildOptions


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_paths_stay_as_given_or_become_relative_to_the_current_folder(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "models" / "bert").mkdir(parents=True)
    (work / "texts.txt").write_text("a sentence\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "m.onnx").write_bytes(b"")
    monkeypatch.chdir(work)
    options = BuildOptions(target="trt", precision="int8", calib=str(work / "texts.txt"), data=Path("held-out.txt"),
                           trt=TrtBuildOptions(timing_cache=work / "cache" / "timing.cache"))
    cmd = build_command(f"hf:{work}/models/bert", options, work / "engines" / "b", parse_shapes("batch=1:2:4"))
    assert cmd[2] == "hf:models/bert"
    assert _flag(cmd, "--calib") == "texts.txt" and _flag(cmd, "--data") == "held-out.txt"
    assert _flag(cmd, "--timing-cache") == str(Path("cache") / "timing.cache")
    assert _flag(cmd, "-o") == str(Path("engines") / "b")
    assert not [a for a in cmd if str(work) in a]
    # Relative paths outside the current folder are kept as written, never expanded.
    cmd = build_command("onnx:../elsewhere/m.onnx", BuildOptions(), Path("../out/b"), {})
    assert cmd[2] == "onnx:../elsewhere/m.onnx" and _flag(cmd, "-o") == "../out/b"
    # An absolute path outside it stays absolute (there is nothing shorter that means the same).
    assert shown_path(tmp_path / "elsewhere") == str(tmp_path / "elsewhere")
    assert command_source(f"hf:{work}/models/bert#feature-extraction") == "hf:models/bert#feature-extraction"
    assert command_source(str(work / "models" / "bert")) == "hf:models/bert"  # a bare folder is an hf: source
    assert command_source("hf:sentence-transformers/all-MiniLM-L6-v2") == "hf:sentence-transformers/all-MiniLM-L6-v2"


def test_a_built_bundle_records_its_rebuild_command_with_relative_paths(tiny_bert_dir, tmp_path, monkeypatch):
    from exporter.pipeline import build

    shutil.copytree(tiny_bert_dir, tmp_path / "models" / "bert")
    monkeypatch.chdir(tmp_path)
    result = build("hf:./models/bert", BuildOptions(output=tmp_path / "engines" / "bert", dynamic=[],
                                                    shapes=parse_shapes("batch=1,sequence=8")))
    cmd = json.loads((result.bundle / "manifest.json").read_text())["build_command"]
    assert cmd[2] == "hf:models/bert" and _flag(cmd, "-o") == str(Path("engines") / "bert")
    assert not [a for a in cmd if str(tmp_path) in a], cmd
