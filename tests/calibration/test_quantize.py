"""Q/DQ quantization in the form TensorRT takes, its ORT CPU form, the ranges cache, the accuracy
budget and SmoothQuant, on a small hand-built ONNX graph (Conv, Gemm, MatMul; no torch)."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.budget import accuracy, check_budget, parse_budget, run_outputs
from calibration.calibrate import CalibOptions, ort_session, quantize_model
from calibration.quantize import compute_ranges, prepare_model, quantize_graph, to_ort_cpu_form
from runtimes.errors import BuildError, DataError, UsageError
from runtimes.manifest import DimRange, IOSpec, TensorSpec

IO = IOSpec(inputs=[TensorSpec("x", "float32", ("batch", 3, 12, 12))],
            outputs=[TensorSpec("logits", "float32", ("batch", 10))], dims={"batch": DimRange(1, 4, 8)})


def make_model(path, seed=0):
    """Conv → Relu → Conv → GlobalAveragePool → Flatten → Gemm(transB) → MatMul: logits."""
    rng = np.random.default_rng(seed)
    w = lambda *s: numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32))
    inits = [w(8, 3, 3, 3), w(8), w(16, 8, 3, 3), w(16), w(12, 16), w(12), w(12, 10)]
    for t, name in zip(inits, ["w1", "b1", "w2", "b2", "wg", "bg", "wm"]):
        t.name = name
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], strides=[2, 2], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["g"], transB=1, name="gemm"),
        helper.make_node("MatMul", ["g", "wm"], ["logits"], name="matmul"),
    ]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 12, 12])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def feeds(n, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 3, 12, 12)).astype(np.float32)} for _ in range(n)]


@pytest.fixture
def model(tmp_path):
    return make_model(tmp_path / "small.onnx")


def _npz_folder(folder, n=12, seed=1):
    folder.mkdir()
    for i, f in enumerate(feeds(n, seed)):
        np.savez(folder / f"{i:02d}.npz", **f)
    return folder


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_int8_graph_is_in_the_form_tensorrt_takes(model, tmp_path, method):
    prepared = prepare_model(model, tmp_path / "w")
    ranges = compute_ranges(prepared, feeds(4), method, tmp_path / "w")
    q = quantize_graph(prepared, tmp_path / "q.onnx", ranges, precision="int8", method=method)
    assert sorted(q.quantized) == ["conv1", "conv2", "gemm", "matmul"] and q.excluded == []
    m = onnx.load(str(q.path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    for n in qs + dqs:  # symmetric: every zero point is int8 0
        assert inits[n.input[2]].dtype == np.int8 and not inits[n.input[2]].any()
    producers = {o: n.op_type for n in m.graph.node for o in n.output}
    weight_dq = {n.output[0]: n for n in dqs if n.input[0] in inits}
    for node in (n for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")):
        assert producers[node.input[0]] == "DequantizeLinear"  # Q/DQ on inputs ...
        dq = weight_dq[node.input[1]]  # ... weights per output channel ...
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        out_channels = {"conv1": 8, "conv2": 16, "gemm": 12, "matmul": 10}[node.name]
        assert inits[dq.input[1]].shape == (out_channels,)
        assert inits[dq.input[0]].shape[axis] == out_channels
        if len(node.input) > 2:  # ... bias stays float
            assert inits[node.input[2]].dtype == np.float32
    dq_out = {n.output[0] for n in dqs}
    users = [n.op_type for n in m.graph.node if any(i in dq_out for i in n.input)]
    assert set(users) == {"Conv", "Gemm", "MatMul"}, "Q/DQ feed only the quantized ops (none on Relu, pooling)"
    assert "logits" not in {n.input[0] for n in qs}, "no Q/DQ on outputs"


def test_ort_cpu_form_computes_the_same_values(model, tmp_path):
    prepared = prepare_model(model, tmp_path / "w")
    q = quantize_graph(prepared, tmp_path / "q.onnx", compute_ranges(prepared, feeds(4), "minmax", tmp_path / "w"),
                       precision="int8", method="minmax")
    assert to_ort_cpu_form(q.path, tmp_path / "u8.onnx") == 4
    u8 = onnx.load(str(tmp_path / "u8.onnx"))
    zps = {i.name: numpy_helper.to_array(i) for i in u8.graph.initializer if i.name.endswith("128")}
    assert next(iter(zps.values())).dtype == np.uint8
    data = feeds(2, seed=7)
    a = run_outputs(ort_session(q.path, level="basic"), data)
    b = run_outputs(ort_session(tmp_path / "u8.onnx", level="basic"), data)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x["logits"], y["logits"], rtol=1e-5, atol=1e-5)


def test_fp8_uses_amax_scales(model, tmp_path):
    prepared = prepare_model(model, tmp_path / "w")
    ranges = compute_ranges(prepared, feeds(4), "minmax", tmp_path / "w")
    q = quantize_graph(prepared, tmp_path / "q8.onnx", ranges, precision="fp8", method="minmax")
    m = onnx.load(str(q.path))
    inits = {i.name: i for i in m.graph.initializer}
    q_x = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    assert inits[q_x.input[2]].data_type == TensorProto.FLOAT8E4M3FN
    amax = max(abs(ranges["x"][0]), abs(ranges["x"][1]))
    assert float(numpy_helper.to_array(inits[q_x.input[1]])) == pytest.approx(amax / 448, rel=1e-5)
    assert q.realised()["activations"].startswith("float8 E4M3FN")


def test_quantize_model_caches_ranges_by_model_data_and_method(model, tmp_path):
    data = _npz_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    opts = dict(data=data, budget="none", cache_dir=cache)

    def run(path=model, **kw):
        return quantize_model(path, tmp_path / "out.onnx", "int8", IO, CalibOptions(**(opts | kw)), work=tmp_path / "w")

    first = run(method="minmax")
    assert first.cache == {"minmax": "miss"} and (cache / "ranges-minmax.json").is_file()
    key = json.loads((cache / "ranges-minmax.json").read_text())["meta"]["key"]
    assert key["model_sha256"] == first.model_sha256 and key["data_sha256"] == first.split.sha256
    assert run(method="minmax").cache == {"minmax": "hit"}
    assert run(method="percentile").cache == {"percentile": "miss"}  # one file per method
    changed = make_model(tmp_path / "other.onnx", seed=5)
    assert run(changed, method="minmax").cache == {"minmax": "invalidated"}  # the model changed
    assert run(changed, method="minmax").cache == {"minmax": "hit"}
    (data / "00.npz").unlink()
    np.savez(data / "00.npz", **feeds(1, seed=99)[0])
    assert run(changed, method="minmax").cache == {"minmax": "invalidated"}  # the data changed
    assert (tmp_path / "out.onnx").is_file()


def test_method_all_compares_and_the_manifest_entry_lists_it(model, tmp_path):
    res = quantize_model(model, tmp_path / "out.onnx", "int8", IO,
                         CalibOptions(data=_npz_folder(tmp_path / "d"), method="all", budget="cosine>=0.9"),
                         work=tmp_path / "w")
    entry = res.manifest_entry()
    assert set(entry["comparison"]) == {"minmax", "entropy", "percentile"}
    assert entry["method"] in entry["comparison"] and entry["budget_met"] is True
    assert entry["samples"] == {"calibration": 9, "evaluation": 3}
    assert entry["accuracy"]["logits"]["cosine_min"] >= 0.9 and "top1" in entry["accuracy"]["logits"]


def test_budget_keeps_the_most_sensitive_layers_in_float(model, tmp_path):
    data = _npz_folder(tmp_path / "d")
    loose = quantize_model(model, tmp_path / "a.onnx", "int8", IO, CalibOptions(data=data, budget="none"),
                           work=tmp_path / "w1")
    tight = loose.accuracy["logits"]["cosine_min"] + (1 - loose.accuracy["logits"]["cosine_min"]) / 2
    res = quantize_model(model, tmp_path / "b.onnx", "int8", IO,
                         CalibOptions(data=data, budget=f"cosine>={tight:.6f}", max_excluded_fraction=1.0),
                         work=tmp_path / "w2")
    assert res.budget_met and res.graph.excluded and res.sensitivity
    assert set(res.graph.excluded) == {n for n, _ in res.sensitivity[:len(res.graph.excluded)]}
    assert set(res.graph.quantized) | set(res.graph.excluded) == {"conv1", "conv2", "gemm", "matmul"}
    assert res.accuracy["logits"]["cosine_min"] >= tight


def test_an_unreachable_budget_fails_and_writes_nothing(model, tmp_path):
    with pytest.raises(BuildError, match=r"could not .*Nothing was written"):
        quantize_model(model, tmp_path / "out.onnx", "int8", IO,
                       CalibOptions(data=_npz_folder(tmp_path / "d"), budget="cosine>=0.9999999", max_excluded_fraction=0.25),
                       work=tmp_path / "w")
    assert not (tmp_path / "out.onnx").exists()


def test_smoothing_keeps_fp32_numerics(model, tmp_path):
    from calibration.smooth import smooth_model

    prepared = prepare_model(model, tmp_path / "w")
    done = smooth_model(prepared, tmp_path / "s.onnx", feeds(2), ort_session)
    assert done == ["f", "g"]  # the Gemm's and the MatMul's activation inputs
    data = feeds(2, seed=3)
    a, b = run_outputs(ort_session(model), data), run_outputs(ort_session(tmp_path / "s.onnx"), data)
    assert accuracy(a, b)["logits"]["cosine_min"] > 0.999999


def test_bad_calibration_inputs(model, tmp_path):
    with pytest.raises(UsageError, match="calibration data"):
        quantize_model(model, tmp_path / "o.onnx", "int8", IO, CalibOptions(data=None), work=tmp_path / "w")
    with pytest.raises(UsageError, match="calibration method"):
        quantize_model(model, tmp_path / "o.onnx", "int8", IO, CalibOptions(data="random", method="kl"), work=tmp_path / "w")
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "a.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    np.savez(bad / "b.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(DataError, match="fit the model's inputs"):
        quantize_model(model, tmp_path / "o.onnx", "int8", IO, CalibOptions(data=bad), work=tmp_path / "w")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("text, message", [("cosine>=2", "in \\(0, 1\\]"), ("speed>=0.9", "METRIC"), ("cos", "METRIC")])
def test_budget_parsing(text, message):
    with pytest.raises(UsageError, match=message):
        parse_budget(text)


def test_budget_semantics():
    assert parse_budget("none") == [] and str(parse_budget("logits:top1>=0.98")[0]) == "logits:top1>=0.98"
    acc = {"logits": {"cosine_min": 0.995, "top1": 0.97}, "emb": {"cosine_min": 0.98}}
    assert check_budget(acc, parse_budget("top1>=0.98")) == ["logits top1 0.9700 < 0.98"]
    assert check_budget(acc, parse_budget("cosine≥0.99")) == ["emb cosine 0.9800 < 0.99"]
    assert check_budget(acc, parse_budget("logits:cosine>=0.99")) == []
    with pytest.raises(UsageError, match="'nope'"):
        check_budget(acc, parse_budget("nope:cosine>=0.9"))


def test_fp8_accuracy_is_labelled_as_cpu_emulation(model, tmp_path):
    res = quantize_model(model, tmp_path / "q8.onnx", "fp8", IO, CalibOptions(data="random:32", budget="cosine>=0.9"),
                         work=tmp_path / "w")
    entry = res.manifest_entry()
    assert res.graph.precision == "fp8" and entry["budget_met"]
    assert any("emulated" in n for n in entry["notes"]) and any("RANDOM DATA" in n for n in entry["notes"])


def test_the_budget_ranks_layers_end_to_end_and_locally_past_the_limit(model, tmp_path, monkeypatch):
    """Up to END_TO_END_LIMIT layers the ranking is each layer alone kept in float, scored by the mean cosine
    of the whole graph on the evaluation split (the local one-node error did not follow what a layer costs at
    the output); past it, the local order. Both rank every quantized layer."""
    import calibration.calibrate as calibrate

    data = _npz_folder(tmp_path / "d")
    loose = quantize_model(model, tmp_path / "a.onnx", "int8", IO, CalibOptions(data=data, budget="none"),
                           work=tmp_path / "w1")
    tight = loose.accuracy["logits"]["cosine_min"] + (1 - loose.accuracy["logits"]["cosine_min"]) / 2
    options = CalibOptions(data=data, budget=f"cosine>={tight:.6f}", max_excluded_fraction=1.0)
    e2e = quantize_model(model, tmp_path / "b.onnx", "int8", IO, options, work=tmp_path / "w2")
    scores = [s for _, s in e2e.sensitivity]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
    monkeypatch.setattr(calibrate, "END_TO_END_LIMIT", 0)
    local = quantize_model(model, tmp_path / "c.onnx", "int8", IO, options, work=tmp_path / "w3")
    assert {n for n, _ in local.sensitivity} == {n for n, _ in e2e.sensitivity}
    assert local.budget_met and e2e.budget_met
