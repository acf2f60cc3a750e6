"""`enginekit parity BUNDLE`: a manifest is data, never code, and bad --data is one paragraph (issue 16)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from exporter.cli import app
from exporter.gate.recheck import check_bundle
from runtimes.errors import UsageError

DATA = Path(__file__).resolve().parents[2] / "data" / "bundles"
runner = CliRunner()


def _bundle_recording(tmp_path: Path, spec: str) -> Path:
    bundle = tmp_path / "convnet"
    shutil.copytree(DATA / "convnet-ort-fp32", bundle)
    path = bundle / "manifest.json"
    raw = json.loads(path.read_text())
    raw["source"]["spec"] = spec
    path.write_text(json.dumps(raw))
    return bundle


def test_a_recorded_py_source_is_never_imported(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('x')\ndef f():\n    raise SystemExit(7)\n")
    bundle = _bundle_recording(tmp_path, f"py:{evil}:f")
    with pytest.raises(UsageError, match="a manifest is data") as err:
        check_bundle(bundle)
    assert "--reference" in str(err.value) and not marker.exists()
    res = runner.invoke(app, ["parity", str(bundle)])
    assert res.exit_code == 2 and not marker.exists() and "Traceback" not in res.output


def test_a_recorded_folder_is_not_read_unless_named(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    bundle = _bundle_recording(tmp_path, f"hf:{folder}")
    with pytest.raises(UsageError, match="a path on this machine"):
        check_bundle(bundle)


def test_the_reference_named_by_the_user_is_used(tmp_path):
    bundle = _bundle_recording(tmp_path, "py:/nonexistent/evil.py:f")
    report = check_bundle(bundle, reference="py:tests/models/convnet.py:make")
    assert report.passed
    # and the documented opt-in uses the recorded one (here: the real model again)
    bundle = _bundle_recording(tmp_path / "b", "py:tests/models/convnet.py:make")
    assert check_bundle(bundle, trust_recorded=True).passed


def test_hub_ids_and_timm_names_are_names_not_paths(tmp_path):
    from exporter.gate.recheck import reference_source
    from runtimes.manifest import Manifest

    for spec in ("hf:org/model", "hf:bert-base-uncased#fill-mask", "timm:resnet50"):
        bundle = _bundle_recording(tmp_path / spec.replace("/", "_").replace(":", "_"), spec)
        assert reference_source(bundle, Manifest.read(bundle), None, False) == spec
    for spec in ("hf:../up", "hf:/abs", "onnx:model.onnx", "py:pkg.mod:make"):
        bundle = _bundle_recording(tmp_path / spec.replace("/", "_").replace(":", "_").replace(".", "d"), spec)
        with pytest.raises(UsageError):
            reference_source(bundle, Manifest.read(bundle), None, False)


@pytest.mark.parametrize("make, found", [
    (lambda d: d.write_bytes(b"a good line\n\xff\xfe not utf-8\n"), "not valid UTF-8"),
    (lambda d: np.savez(d, input_ids=np.full((1, 8), 10**6, np.int64), attention_mask=np.ones((1, 8), np.int64),
                        token_type_ids=np.zeros((1, 8), np.int64)), "outside the valid range"),
    (lambda d: np.savez(d, input_ids=np.full((1, 8), -3, np.int64), attention_mask=np.ones((1, 8), np.int64),
                        token_type_ids=np.zeros((1, 8), np.int64)), "outside the valid range"),
    (lambda d: np.savez(d, input_ids=np.ones((1, 4096), np.int64), attention_mask=np.ones((1, 4096), np.int64),
                        token_type_ids=np.zeros((1, 4096), np.int64)), "axis 1 is 4096"),
])
def test_bad_parity_data_is_one_paragraph(bert_bundle, tiny_bert_dir, tmp_path, make, found):
    data = tmp_path / ("bad.txt" if found == "not valid UTF-8" else "bad.npz")
    make(data)
    res = runner.invoke(app, ["parity", str(bert_bundle), "--reference", f"hf:{tiny_bert_dir}", "--data", str(data)])
    assert res.exit_code == 2, res.output
    assert found in " ".join(res.output.split()) and "Traceback" not in res.output


def test_a_tolerance_for_an_output_the_bundle_lacks_is_refused(tmp_path):
    bundle = _bundle_recording(tmp_path, "py:tests/models/convnet.py:make")
    with pytest.raises(UsageError, match="'nosuchoutput'.*output"):
        check_bundle(bundle, tolerances=["nosuchoutput:rel_l2=1e-3"], trust_recorded=True)
    assert check_bundle(bundle, tolerances=["output:rel_l2=1e-3"], trust_recorded=True).passed
