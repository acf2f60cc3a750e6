"""`enginekit triton`: the model repository Triton would load, parsed back into Triton's own ModelConfig."""

from __future__ import annotations

import copy
import json

import pytest

from exporter.triton import TritonOptions, export_triton, model_config_schema, parse_config, triton_config
from runtimes.errors import BuildError, UsageError
from runtimes.manifest import DimRange, Manifest, TensorSpec, file_sha256
from tests.conftest import run_cli

pytestmark = pytest.mark.skipif(model_config_schema() is None, reason="needs tritonclient (the dev extra)")


def test_repository_layout_and_config_match_the_manifest(bert_bundle, tmp_path):
    result = export_triton(bert_bundle, tmp_path / "repo", TritonOptions(max_delay_ms=5, instances=2))
    model = tmp_path / "repo" / "bert"
    assert result["files"] == ["1/model.onnx", "config.pbtxt"] and result["validated"]
    assert file_sha256(model / "1" / "model.onnx") == file_sha256(bert_bundle / "model.onnx")
    cfg = parse_config((model / "config.pbtxt").read_text())
    schema = model_config_schema()
    assert cfg.name == "bert" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert [(i.name, schema.DataType.Name(i.data_type), list(i.dims)) for i in cfg.input] == [
        ("input_ids", "TYPE_INT64", [-1]), ("attention_mask", "TYPE_INT64", [-1]), ("token_type_ids", "TYPE_INT64", [-1])]
    assert [(o.name, schema.DataType.Name(o.data_type), list(o.dims)) for o in cfg.output] == [
        ("last_hidden_state", "TYPE_FP32", [-1, 32]), ("pooler_output", "TYPE_FP32", [32])]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 5000
    assert [(g.count, schema.ModelInstanceGroup.Kind.Name(g.kind)) for g in cfg.instance_group] == [(2, "KIND_CPU")]
    assert not list((tmp_path / "repo").glob(".*"))  # no staging folder left behind


def test_existing_model_is_kept_unless_forced(bert_bundle, tmp_path):
    export_triton(bert_bundle, tmp_path, TritonOptions())
    (tmp_path / "bert" / "config.pbtxt").write_text("edited")
    with pytest.raises(BuildError, match="--force"):
        export_triton(bert_bundle, tmp_path, TritonOptions())
    assert (tmp_path / "bert" / "config.pbtxt").read_text() == "edited"
    export_triton(bert_bundle, tmp_path, TritonOptions(force=True, name="bert-v2"))
    export_triton(bert_bundle, tmp_path, TritonOptions(force=True))
    assert parse_config((tmp_path / "bert" / "config.pbtxt").read_text()).max_batch_size == 16
    assert parse_config((tmp_path / "bert-v2" / "config.pbtxt").read_text()).name == "bert-v2"


def _variant(bert_bundle, io: dict | None = None, **target) -> Manifest:
    """The bundle's manifest with some io fields and target fields replaced (config generation reads only these)."""
    manifest = copy.deepcopy(Manifest.read(bert_bundle))
    for key, value in (io or {}).items():
        setattr(manifest.io, key, value)
    for key, value in target.items():
        setattr(manifest.target, key, value)
    return manifest


def test_engines_without_a_batch_axis_and_trt_plans(bert_bundle):
    static = _variant(bert_bundle, {"inputs": [TensorSpec("x", "float16", (1, "n")), TensorSpec("y", "bool", (3,))],
                                    "outputs": [TensorSpec("z", "float32", (1, "n"))], "dims": {"n": DimRange(1, 2, 8)}})
    cfg = parse_config(triton_config(static, TritonOptions()))
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert [list(i.dims) for i in cfg.input] == [[1, -1], [3]] and cfg.input[0].data_type == model_config_schema().TYPE_FP16
    with pytest.raises(UsageError, match="no batch axis"):
        triton_config(static, TritonOptions(max_batch=4))
    per_row = _variant(bert_bundle, {"outputs": [TensorSpec("score", "float32", ("batch",))]})
    cfg = parse_config(triton_config(per_row, TritonOptions(max_batch=8)))
    assert cfg.max_batch_size == 8 and list(cfg.output[0].dims) == [1] and list(cfg.output[0].reshape.shape) == []
    plan = _variant(bert_bundle, backend="trt", device="cuda")
    cfg = parse_config(triton_config(plan, TritonOptions()))
    assert cfg.platform == "tensorrt_plan" and cfg.instance_group[0].kind == model_config_schema().ModelInstanceGroup.KIND_GPU
    with pytest.raises(UsageError, match="between 1 and 16"):
        triton_config(plan, TritonOptions(max_batch=32))


def test_cli_writes_the_repository(bert_bundle, tmp_path):
    proc = run_cli("triton", str(bert_bundle), "--repo", str(tmp_path), "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["platform"] == "onnxruntime_onnx" and data["validated"] and (tmp_path / "bert" / "1" / "model.onnx").is_file()
    again = run_cli("triton", str(bert_bundle), "--repo", str(tmp_path), timeout=120)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
