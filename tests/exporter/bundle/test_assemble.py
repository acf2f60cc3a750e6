"""A build error that names a file of the staging folder (ONNX Runtime refusing a graph names the graph)
names a copy that still exists when the user reads it, at `<output>.rejected/`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.bundle.assemble import keep_named_files
from exporter.bundle.staging import new_staging, remove_staging
from exporter.pipeline import BuildOptions, build
from exporter.source.shapes import parse_shapes
from runtimes.errors import BuildError


def _unknown_op_graph(path: Path) -> None:
    """x[batch, 4] → Relu → my.custom:FancyOp (no runtime implements it) → y[batch, 4]."""
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("FancyOp", ["h"], ["y"], domain="my.custom")]
    graph = helper.make_graph(nodes, "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.custom", 1)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_the_unknown_op_error_names_a_graph_that_still_exists(tmp_path):
    _unknown_op_graph(tmp_path / "custom.onnx")
    out = tmp_path / "engines" / "custom"
    with pytest.raises(BuildError) as err:
        build(f"onnx:{tmp_path / 'custom.onnx'}", BuildOptions(output=out, shapes=parse_shapes("batch=1:2:4")))
    text = str(err.value)
    assert "FancyOp" in text and ".partial-" not in text
    named = {Path(p) for p in re.findall(r"inspect (\S+)`", text)}
    assert len(named) == 1
    (kept,) = named
    # The fused graph failed to build, so the build fell back to the unfused one (exporter/build/engine.py),
    # which is the source file itself here: the error names it, and it is still there.
    assert kept == tmp_path / "custom.onnx" and kept.is_file()
    assert [n.op_type for n in onnx.load(str(kept)).graph.node] == ["Relu", "FancyOp"]
    assert not out.exists() and not list(out.parent.glob(".*partial*"))  # no staging folder left


def test_a_named_onnx_file_moves_with_its_external_data_and_other_errors_pass_through(tmp_path):
    out = tmp_path / "b"
    staging = new_staging(out)
    try:
        w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
        (staging / "work").mkdir()
        onnx.save(helper.make_model(graph), str(staging / "work" / "m.onnx"), save_as_external_data=True,
                  location="m.onnx.data", size_threshold=0)
        exc = BuildError(f"Expected ... to load {staging / 'work' / 'm.onnx'}, but it refused; see "
                         f"{staging / 'work' / 'gone.log'}.")
        moved = keep_named_files(exc, staging, out)
        assert keep_named_files(BuildError("no path here"), staging, out) is None
    finally:
        remove_staging(staging)
    rejected = tmp_path / "b.rejected"
    assert isinstance(moved, BuildError) and str(rejected / "m.onnx") in str(moved) and str(staging) not in str(moved)
    assert "removed with it" in str(moved)  # gone.log never existed: not named as if it did
    assert sorted(p.name for p in rejected.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert onnx.load(str(rejected / "m.onnx")).graph.initializer[0].dims == [4, 4]  # the weights came along
