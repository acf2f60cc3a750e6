"""Bundles cannot reach outside themselves: every path a manifest names is relative, normalised and
inside the bundle, and every engine file is listed with its sha256 (issue 16, items 1 and 5).

Each test copies a real bundle built by an older enginekit (tests/data/bundles) and alters its
manifest the way an attacker would; the loader must refuse with one paragraph, without reading the
named file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import runtimes
from runtimes.errors import IncompatibleEngine, InvalidInput
from runtimes.manifest import Manifest
from tests.conftest import run_cli

DATA = Path(__file__).resolve().parents[1] / "data" / "bundles"


def _copy(tmp_path: Path, name: str = "convnet-ort-fp32") -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(DATA / name, dest)
    return dest


def _edit(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """An ONNX file outside the bundle: the same model, so only confinement can stop it loading."""
    path = tmp_path / "outside.onnx"
    shutil.copy(DATA / "convnet-ort-fp32" / "model.onnx", path)
    return path


@pytest.mark.parametrize("case", ["absolute", "dotdot", "unlisted", "no-files"])
def test_engine_files_outside_or_unlisted_are_refused(tmp_path, outside, case):
    bundle = _copy(tmp_path)
    digest = _sha(outside)

    def change(raw):
        if case == "absolute":
            raw["target"]["engine_files"] = [str(outside)]
            raw["files"] = {str(outside): digest}
        elif case == "dotdot":
            raw["target"]["engine_files"] = ["../outside.onnx"]
            raw["files"] = {"../outside.onnx": digest}
        elif case == "unlisted":
            raw["target"]["engine_files"] = ["../outside.onnx"]
        else:
            raw["files"] = {}

    _edit(bundle, change)
    for verify in (True, False):  # verify=False skips hashing, never confinement
        with pytest.raises(IncompatibleEngine) as err:
            runtimes.load(bundle, verify=verify)
        text = str(err.value)
        assert "\n" not in text and ("inside the bundle" in text or "not listed" in text), text


def test_listed_files_outside_are_never_opened(tmp_path, monkeypatch):
    bundle = _copy(tmp_path)
    _edit(bundle, lambda raw: raw["files"].update({"/etc/shadow": "0" * 64}))
    opened = []
    monkeypatch.setattr("runtimes.manifest.file_sha256", lambda p, *a: opened.append(p) or "0" * 64)
    with pytest.raises(IncompatibleEngine, match="'/etc/shadow'"):
        runtimes.load(bundle)
    assert opened == []


def test_a_symlink_out_of_the_bundle_is_refused_even_with_the_right_hash(tmp_path, outside):
    bundle = _copy(tmp_path)
    (bundle / "model.onnx").unlink()
    (bundle / "model.onnx").symlink_to(outside)  # same bytes, so the sha256 still matches
    with pytest.raises(IncompatibleEngine, match="inside the bundle"):
        runtimes.load(bundle)


@pytest.mark.parametrize("change, found", [
    (lambda raw: raw["target"].update(engine_files=[]), "engine_files is empty"),
    (lambda raw: raw["target"].update(engine_files=None), "not a list"),
    (lambda raw: raw["io"]["inputs"][0].update(dtype="notadtype"), "'notadtype'"),
    (lambda raw: raw["io"]["dims"]["batch"].update(max="4"), "malformed"),
    (lambda raw: raw.update(files=[]), "'files' is not a map"),
])
def test_malformed_manifests_give_one_paragraph(tmp_path, change, found):
    bundle = _copy(tmp_path)
    _edit(bundle, change)
    with pytest.raises(IncompatibleEngine) as err:
        runtimes.load(bundle)
    assert found in str(err.value) and "Rebuild it with `enginekit build`" in str(err.value)


@pytest.mark.parametrize("command", [["inspect"], ["serve", "--port", "0"], ["bench", "--baseline", "none"]])
def test_the_cli_refuses_a_malformed_manifest_without_a_traceback(tmp_path, command):
    bundle = _copy(tmp_path)
    _edit(bundle, lambda raw: raw["io"]["inputs"][0].update(dtype="notadtype"))
    proc = run_cli(command[0], str(bundle), *command[1:], timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "'notadtype'" in proc.stderr


def test_triton_does_not_copy_a_file_from_outside(tmp_path):
    from exporter.triton import export_triton

    bundle = _copy(tmp_path)
    _edit(bundle, lambda raw: raw["target"].update(engine_files=["/etc/hostname"]))
    with pytest.raises(IncompatibleEngine):
        export_triton(bundle, tmp_path / "repo")
    assert not any((tmp_path / "repo").rglob("*")) if (tmp_path / "repo").exists() else True


def test_a_zero_shot_bundle_cannot_name_a_tower_outside(tmp_path):
    bundle = _copy(tmp_path)
    _edit(bundle, lambda raw: raw["target"].update(backend="zero-shot", engine_files=[],
                                                   options={"parts": {"image": "../elsewhere", "text": "text"}}))
    with pytest.raises(IncompatibleEngine, match="tower folder"):
        runtimes.load(bundle)


def test_generation_json_cannot_name_an_unlisted_engine(tmp_path):
    from runtimes.generate import load_generator

    bundle = _copy(tmp_path, "qwen2-gen-ort-fp32")
    spec = json.loads((bundle / "generation.json").read_text())
    spec["components"]["decode"]["file"] = "../outside/model.onnx"
    (bundle / "generation.json").write_text(json.dumps(spec))
    # the attacker re-hashes generation.json, so only the listing rule can stop it
    _edit(bundle, lambda raw: raw["files"].update({"generation.json": _sha(bundle / "generation.json")}))
    with pytest.raises(IncompatibleEngine, match="name only the bundle's engine files"):
        load_generator(bundle)


def test_negative_token_ids_are_refused_in_generation(tmp_path):
    from runtimes.generate import load_generator

    with load_generator(DATA / "qwen2-gen-ort-fp32") as gen:
        vocab = gen.vocab_size()
        assert vocab is not None and vocab > 10
        for bad in (-1, -vocab, vocab):
            with pytest.raises(InvalidInput, match=r"Expected token ids in 0\.\."):
                gen.generate_ids([[1, 2, bad]])


def _gather_bundle(tmp_path: Path, vocab: int = 10) -> Path:
    """A one-Gather embedding lookup as a bundle, written the way exporter.bundle writes one."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(vocab * 4, dtype=np.float32).reshape(vocab, 4), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["embeds"])], "lookup",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("embeds", TensorProto.FLOAT, ["batch", "sequence", 4])], [table])
    bundle = tmp_path / "lookup"
    bundle.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), bundle / "model.onnx")
    raw = json.loads((DATA / "convnet-ort-fp32" / "manifest.json").read_text())
    raw["name"] = "lookup"
    raw["io"] = {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
                 "outputs": [{"name": "embeds", "dtype": "float32", "shape": ["batch", "sequence", 4]}],
                 "dims": {"batch": {"min": 1, "opt": 2, "max": 4}, "sequence": {"min": 1, "opt": 4, "max": 8}},
                 "values": {"input_ids": {"kind": "randint", "low": 0, "high": vocab}}}
    raw["files"] = {"model.onnx": _sha(bundle / "model.onnx")}
    (bundle / "manifest.json").write_text(json.dumps(raw))
    return bundle


def test_token_ids_outside_the_vocabulary_are_refused_by_the_runner(tmp_path):
    bundle = _gather_bundle(tmp_path)
    with runtimes.load(bundle) as r:
        ok = r.infer({"input_ids": np.array([[0, 9]], np.int64)})["embeds"]
        assert ok[0, 1, 0] == 36.0  # row 9
        for bad in (-1, -10, 10):
            with pytest.raises(InvalidInput, match=r"outside the valid range 0\.\.9"):
                r.infer({"input_ids": np.array([[0, bad]], np.int64)})


def test_the_service_answers_422_for_negative_token_ids(tmp_path):
    import sys

    import httpx

    from bench.loadtest import serve_process

    bundle = _gather_bundle(tmp_path)
    with serve_process([sys.executable, "-m", "exporter", "serve", str(bundle), "--port", "0", "--threads", "1"]) as server:
        def post(ids):
            return httpx.post(f"{server.url}/v2/models/lookup/infer", json={"inputs": {"input_ids": [ids]}}, timeout=30)

        assert post([1, 2]).status_code == 200
        resp = post([1, -1])
        assert resp.status_code == 422 and "outside the valid range 0..9" in resp.json()["error"]


def test_manifest_read_refuses_before_the_runtime_sees_it(tmp_path):
    bundle = _copy(tmp_path)
    _edit(bundle, lambda raw: raw["target"].update(engine_files=["../x.onnx"]))
    with pytest.raises(IncompatibleEngine, match="not listed with a sha256"):
        Manifest.read(bundle)
