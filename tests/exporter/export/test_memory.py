"""The memory bound on dim ranges (exporter/export/memory.py): estimates from the IOSpec before export
and from the ONNX graph after it, refused with the numbers and the way out."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.export.memory import GIB, available_bytes, check_memory, graph_estimate, input_estimate
from runtimes.errors import UsageError
from runtimes.manifest import DimRange, IOSpec, TensorSpec


def _text_io(batch: DimRange, sequence: DimRange = DimRange(1, 64, 64)) -> IOSpec:
    names = ("input_ids", "attention_mask", "token_type_ids")
    return IOSpec([TensorSpec(n, "int64", ("batch", "sequence")) for n in names], [],
                  {"batch": batch, "sequence": sequence})


def test_the_inputs_estimate_sums_every_generated_gate_case():
    est = input_estimate(_text_io(DimRange(1, 2, 4), DimRange(1, 8, 16)))
    # min (1x1), opt (2x8), max (4x16): three int64 inputs each, all held by gate_cases at once
    assert est.total == 3 * 8 * (1 * 1 + 2 * 8 + 4 * 16)
    assert est.largest.shape == (4, 16) and "3 cases" in est.what
    same = input_estimate(_text_io(DimRange(1, 1, 4), DimRange(8, 8, 8)))  # min == opt: one case, not two
    assert same.total == 3 * 8 * (1 * 8 + 4 * 8) and "2 cases" in same.what


def test_the_oom_shapes_are_refused_with_the_estimate_and_the_override():
    io = _text_io(DimRange(1, 1, 100_000_000))
    with pytest.raises(UsageError) as err:
        check_memory(io, None)
    text = str(err.value)
    assert "143.1 GiB" in text and "input_ids int64[100000000, 64]" in text and "batch=1:1:100000000" in text
    assert "available" in text and "--memory-limit" in text and "--shapes" in text
    assert check_memory(io, 200.0).total > 140 * GIB  # --memory-limit 200 lets it through


def test_ordinary_ranges_pass_and_the_available_memory_is_read():
    avail = available_bytes()
    assert avail is not None and avail > 64 << 20
    est = check_memory(_text_io(DimRange(1, 4, 16)), None)
    assert est is not None and est.total < 1 << 20


def _wide_graph(path, width: int) -> None:
    """x[batch, 8] → MatMul with [8, width] → h[batch, width] → ReduceSum → y[batch, 1]."""
    w = numpy_helper.from_array(np.zeros((8, width), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("ReduceSum", ["h"], ["y"], keepdims=1, axes=[1])]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]), str(path))


def test_the_graph_estimate_counts_the_largest_intermediate_at_the_max_shape(tmp_path):
    path = tmp_path / "wide.onnx"
    _wide_graph(path, 100_000)
    io = IOSpec([TensorSpec("x", "float32", ("batch", 8))], [TensorSpec("y", "float32", ("batch", 1))],
                {"batch": DimRange(1, 10, 1000)})
    est = graph_estimate(path, io)
    assert est.largest.name == "h" and est.largest.shape == (1000, 100_000)
    assert est.total == 4 * (1000 * 8 + 1000 * 1 + 1000 * 100_000)
    assert input_estimate(io).total < 1 << 20  # the inputs alone would not have shown it
    with pytest.raises(UsageError, match=r"h float32\[1000, 100000\] alone is 0\.4 GiB.*nothing was built"):
        check_memory(io, 0.1, graph=path)
    assert check_memory(io, 1.0, graph=path) is not None
