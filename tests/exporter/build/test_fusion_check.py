"""ORT's fusions may never make a graph worse: exporter/build/ortfuse.py fusion_breaks compares the fused
engine with the unfused graph in ONNX Runtime; the build falls back to the unfused graph on any reason."""

import onnx
from onnx import TensorProto, helper

from exporter.build.ortfuse import fusion_breaks
from runtimes.manifest import DimRange, IOSpec, TensorSpec


def _graph(path, nodes, inits=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], list(inits)),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _io():
    return IOSpec(inputs=[TensorSpec("x", "float32", ("batch", 4))], outputs=[TensorSpec("y", "float32", ("batch", 4))],
                  dims={"batch": DimRange(1, 2, 3)})


def _scale(value):
    return helper.make_tensor("s", TensorProto.FLOAT, [], [value])


def test_a_faithful_fused_graph_is_kept(tmp_path):
    plain = _graph(tmp_path / "a.onnx", [helper.make_node("Mul", ["x", "s"], ["y"])], [_scale(2.0)])
    same = _graph(tmp_path / "b.onnx", [helper.make_node("Add", ["x", "x"], ["y"])])
    assert fusion_breaks(plain, same, _io(), "cpu", "fp32") is None


def test_a_fused_graph_that_differs_or_fails_is_named(tmp_path):
    plain = _graph(tmp_path / "a.onnx", [helper.make_node("Mul", ["x", "s"], ["y"])], [_scale(2.0)])
    off = _graph(tmp_path / "b.onnx", [helper.make_node("Mul", ["x", "s"], ["y"])], [_scale(2.001)])
    reason = fusion_breaks(plain, off, _io(), "cpu", "fp32")
    assert reason is not None and "differs from the unfused one at the min shapes: y: rel_l2" in reason
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2, 4])  # fine at batch 2 only: fails at batch 1
    breaks = _graph(tmp_path / "c.onnx", [helper.make_node("Reshape", ["x", "shape"], ["y"])], [shape])
    assert "fails at the min shapes" in fusion_breaks(plain, breaks, _io(), "cpu", "fp32")
    (tmp_path / "d.onnx").write_bytes(b"not a graph")
    assert "does not load" in fusion_breaks(plain, tmp_path / "d.onnx", _io(), "cpu", "fp32")


def test_engines_are_built_from_graphs_without_stale_intermediate_shapes(tmp_path):
    """AutoCast's value_info can give different sizes one symbol, which ORT's buffer planner trusts (the tiny BF16
    detector failed at run time on the H200): the ORT engine is built from a copy without them."""
    from exporter.build.engine import _without_shapes

    path = _graph(tmp_path / "m.onnx", [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Relu", ["h"], ["y"])])
    assert _without_shapes(path) == path  # nothing to drop: the graph itself
    model = onnx.load(str(path))
    model.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["unk__1", 4]))
    onnx.save(model, str(path))
    copy = _without_shapes(path)
    assert copy != path and copy.parent == path.parent
    assert not onnx.load(str(copy)).graph.value_info and onnx.load(str(path)).graph.value_info  # the original stays
    assert [n.op_type for n in onnx.load(str(copy)).graph.node] == ["Relu", "Relu"]


def test_skip_layernorm_splits_into_add_and_layernorm_with_the_same_numbers(tmp_path):
    """Dynamic INT8 on the CPU: SkipLayerNormalization goes back to Add (+ bias) and LayerNormalization
    (measured faster there, ortfuse.SPLIT_REASON); both run in ORT and must agree, and the sum output stays
    available to its consumers."""
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort

    from exporter.build.ortfuse import _split_skip_layernorms

    rng = np.random.default_rng(0)
    consts = [helper.make_tensor(n, TensorProto.FLOAT, [4], rng.normal(size=4).astype(np.float32))
              for n in ("gamma", "beta", "bias")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 3, 4]) for n in ("x", "skip")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "twice")]
    nodes = [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"], ["norm", "mean", "", "sum"],
                              domain="com.microsoft", epsilon=1e-5),
             helper.make_node("Add", ["sum", "sum"], ["twice"]), helper.make_node("Relu", ["norm"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, consts),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(tmp_path / "fused.onnx"))
    feeds = {"x": rng.normal(size=(2, 3, 4)).astype(np.float32), "skip": rng.normal(size=(2, 3, 4)).astype(np.float32)}
    want = ort.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    graph = ir.load(str(tmp_path / "fused.onnx"))
    assert _split_skip_layernorms(graph) == 1
    ir.save(graph, str(tmp_path / "split.onnx"))
    assert sorted(n.op_type for n in onnx.load(str(tmp_path / "split.onnx")).graph.node) == [
        "Add", "Add", "Add", "LayerNormalization", "Relu"]
    got = ort.InferenceSession(str(tmp_path / "split.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(want, got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
