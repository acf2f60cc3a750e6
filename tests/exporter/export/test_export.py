"""torch → ONNX: named dims with recorded ranges, clear errors for what cannot be exported."""

import json

import onnx
import pytest

from exporter.export.graph import export_onnx, trace_sizes
from exporter.pipeline import BuildOptions, export_model
from exporter.source.loading import load_source
from exporter.source.shapes import parse_shapes
from exporter.source.spec import parse_source
from runtimes.errors import BuildError, ExportError, UsageError
from runtimes.manifest import DimRange
from tests.conftest import MODELS


def _dims(graph_io):
    return [d.dim_param or d.dim_value for d in graph_io.type.tensor_type.shape.dim]


def test_export_names_dims_and_records_ranges(tiny_bert_dir, tmp_path):
    out = tmp_path / "bert.onnx"
    result = export_model(f"hf:{tiny_bert_dir}", out, BuildOptions(shapes=parse_shapes("batch=1:2:8")))
    model = onnx.load(str(out))
    assert [_dims(i) for i in model.graph.input] == [["batch", "sequence"]] * 3
    assert _dims(model.graph.output[0]) == ["batch", "sequence", 32]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["enginekit.dims"])["batch"] == {"min": 1, "opt": 2, "max": 8}
    assert result.io.dims["sequence"] == DimRange(1, 64, 64)
    assert not list(tmp_path.glob(".*partial*"))  # the staging folder is gone


def test_static_dims_with_dynamic_none(tiny_bert_dir, tmp_path):
    out = tmp_path / "static.onnx"
    export_model(f"hf:{tiny_bert_dir}", out, BuildOptions(dynamic=[], shapes=parse_shapes("batch=2,sequence=8")))
    assert _dims(onnx.load(str(out)).graph.input[0]) == [2, 8]


def test_existing_output_needs_force(tiny_bert_dir, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_text("keep me")
    with pytest.raises(BuildError, match="--force"):
        export_model(f"hf:{tiny_bert_dir}", out, BuildOptions())
    assert out.read_text() == "keep me"


def test_unsupported_op_names_the_op_and_the_module(tmp_path):
    src = load_source(parse_source(f"py:{MODELS / 'convnet.py'}:make_unsupported"))
    with pytest.raises(ExportError) as err:
        export_onnx(src, tmp_path / "m.onnx")
    text = str(err.value)
    assert "linalg_eigh" in text and "module 'block'" in text and "_EigBlock" in text and "convnet.py" in text
    assert not (tmp_path / "m.onnx").exists()


def test_unknown_dims_in_options_are_usage_errors(tiny_bert_dir, tmp_path):
    with pytest.raises(UsageError, match="--shapes names dim"):
        export_model(f"hf:{tiny_bert_dir}", tmp_path / "a.onnx", BuildOptions(shapes=parse_shapes("height=1:2:3")))
    with pytest.raises(UsageError, match="--dynamic names dim"):
        export_model(f"hf:{tiny_bert_dir}", tmp_path / "a.onnx", BuildOptions(dynamic=["width"]))
    with pytest.raises(UsageError, match="NAME=MIN:OPT:MAX"):
        parse_shapes("batch=1:x")
    with pytest.raises(UsageError, match="MIN <= OPT <= MAX.*found 8:4:2. Put them in order: batch=2:4:8"):
        parse_shapes("batch=8:4:2")


def test_trace_sizes_avoid_specialization():
    sizes = trace_sizes({"a": DimRange(1, 1, 16), "b": DimRange(1, 2, 16), "c": DimRange(1, 3, 3), "d": DimRange(5, 5, 5)}, {3})
    assert sizes["a"] >= 2 and len({sizes["a"], sizes["b"]}) == 2 and sizes["c"] != 3 and sizes["d"] == 5
