"""FP16/BF16 mixed precision: AutoCast lowering, honest low-precision numerics on the CPU, and the
parity-driven FP32 fallback that repairs what a naive cast breaks."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import runtimes
from exporter.lower.emulate import emulation_model, run_outputs
from exporter.pipeline import BuildOptions, build
from runtimes.errors import BuildError, InvalidInput, ParityError, UsageError
from tests.conftest import MODELS

pytest.importorskip("modelopt.onnx.autocast")
PLANTED = f"py:{MODELS / 'planted.py'}:make"


def _fp32_nodes(manifest):
    return {n["node"]: n["reason"] for n in manifest.precision["realised"]["fp32_nodes"]}


def test_cpu_provider_hides_fp16_overflow_and_the_emulation_shows_it():
    """x*300 squared overflows FP16 (>65504); ORT's CPU provider computes it in FP32 anyway."""
    g = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
         helper.make_node("Mul", ["h", "k"], ["m"]), helper.make_node("Mul", ["m", "m"], ["sq"]),
         helper.make_node("Cast", ["sq"], ["y"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [helper.make_tensor("k", TensorProto.FLOAT16, [], np.array([300], np.float16).tobytes(), raw=True)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    x = {"x": np.array([0.1, 1.0, 2.0, -3.0], np.float32)}
    plain = run_outputs(model, x)["y"]
    emulated = run_outputs(emulation_model(model), x)["y"]
    assert np.all(np.isfinite(plain))  # the CPU provider's answer: no overflow
    assert np.isfinite(emulated[0]) and np.all(np.isinf(emulated[1:]))  # 300² and above: inf in FP16


@pytest.mark.parametrize("source", ["bert", "clip", "conv"])
def test_fp16_families_pass_the_fp16_gate_on_ort_cpu(source, tiny_bert_dir, tiny_clip_dir, tmp_path):
    spec = {"bert": f"hf:{tiny_bert_dir}", "clip": f"hf:{tiny_clip_dir}", "conv": f"py:{MODELS / 'convnet.py'}:make"}[source]
    res = build(spec, BuildOptions(precision="fp16", output=tmp_path / "b"))
    assert res.parity.status == "passed"
    bundle, manifest, labels = res.bundle, res.manifest, [c.label for c in res.parity.cases]
    if source == "clip":  # a zero-shot bundle: each tower was lowered and gated in its own folder
        assert set(manifest.precision["parts"]) == {"image", "text"}
        bundle = res.bundle / "image"
        manifest = runtimes.Manifest.read(bundle)
        labels = [c["label"] for c in json.loads((bundle / "parity.json").read_text())["cases"]]
    assert any(lab.startswith("fp16-emulated") for lab in labels) and any(not lab.startswith("fp16-") for lab in labels)
    realised = manifest.precision["realised"]
    assert realised["nodes_by_dtype"]["float16"] > realised["nodes_by_dtype"].get("float32", 0)
    assert all(n["reason"] for n in realised["fp32_nodes"])
    assert [s.dtype for s in manifest.io.inputs] == [s.dtype for s in manifest.io.inputs if s.dtype != "float16"]
    lowered_types = {i.data_type for i in onnx.load(str(bundle / "model.onnx")).graph.initializer}
    assert TensorProto.FLOAT16 in lowered_types


def test_naive_fp16_fails_and_the_fallback_repairs_it_naming_the_nodes(tmp_path):
    # No range rules and no fallback: every node in FP16, the planted overflow breaks parity.
    with pytest.raises(ParityError, match="fp16-emulated"):
        build(PLANTED, BuildOptions(precision="fp16", range_rules=False, fallback_budget=0, output=tmp_path / "naive"))
    report = json.loads((tmp_path / "naive.rejected" / "parity.json").read_text())
    worst = max(o["rel_l2"] for c in report["cases"] for o in c["outputs"] if c["label"].startswith("fp16-emulated"))
    assert worst > 0.05
    # The same naive start, with the parity-driven fallback.
    res = build(PLANTED, BuildOptions(precision="fp16", range_rules=False, output=tmp_path / "fixed"))
    assert res.parity.status == "passed"
    kept = _fp32_nodes(res.manifest)
    ops = {n["op"] for n in res.manifest.precision["realised"]["fp32_nodes"]}
    assert {"Pow", "ReduceSum", "Sqrt"} <= ops  # the overflow: (300h)² summed, then its square root
    assert {"Add", "ReduceMean", "Sub"} <= ops  # the cancellation: h + 2000 minus its mean
    assert all(r.startswith("parity fallback round") for r in kept.values())
    assert any("exceeds the FP16 maximum" in r for r in kept.values())
    assert len(res.manifest.precision["fallback"]) >= 2
    assert res.manifest.precision["realised"]["nodes_by_dtype"]["float16"] >= 4  # the rest stays FP16


def test_autocast_range_rules_on_real_data_keep_the_planted_nodes(tmp_path):
    res = build(PLANTED, BuildOptions(precision="fp16", output=tmp_path / "b"))
    assert res.parity.status == "passed" and "fallback" not in res.manifest.precision
    kept = _fp32_nodes(res.manifest)
    assert any("out of range" in r for r in kept.values())
    assert {n["op"] for n in res.manifest.precision["realised"]["fp32_nodes"]} >= {"Pow", "ReduceSum", "Sub"}


def test_user_forced_fp32_nodes_and_ops(tiny_bert_dir, tmp_path):
    res = build(f"hf:{tiny_bert_dir}", BuildOptions(precision="fp16", fp32_ops=["LayerNormalization"],
                                                     output=tmp_path / "b"))
    kept = [n for n in res.manifest.precision["realised"]["fp32_nodes"] if n["op"] == "LayerNormalization"]
    assert kept and all(n["reason"] == "user: --fp32-ops" for n in kept)


def test_native_fp16_io(tmp_path):
    res = build(f"py:{MODELS / 'convnet.py'}:make", BuildOptions(precision="fp16", native_io=True, output=tmp_path / "b"))
    assert res.parity.status == "passed"
    assert res.manifest.io.inputs[0].dtype == "float16" and res.manifest.io.outputs[0].dtype == "float16"
    with runtimes.load(res.bundle) as r:
        out = r.infer({"images": np.ones((2, 3, 32, 32), np.float16)})["output"]
        assert out.dtype == np.float16
        with pytest.raises(InvalidInput, match="float32, expected float16"):
            r.infer({"images": np.ones((2, 3, 32, 32), np.float32)})


def test_bf16_lowering_structure_and_honest_not_checked_status(tiny_bert_dir, tmp_path):
    """BF16 cannot run on ORT's CPU provider: built for CUDA here, its gate is 'not-checked'."""
    res = build(f"hf:{tiny_bert_dir}", BuildOptions(precision="bf16", device="cuda", output=tmp_path / "b"))
    model = onnx.load(str(res.bundle / "model.onnx"))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 22
    assert TensorProto.BFLOAT16 in {i.data_type for i in model.graph.initializer}
    assert any(n.op_type == "Cast" for n in model.graph.node)
    assert [i.type.tensor_type.elem_type for i in model.graph.output] == [TensorProto.FLOAT] * 2  # keep_io_types
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert res.parity.status == "not-checked" and not res.parity.passed
        assert res.manifest.parity["status"] == "not-checked"
        assert all(c.label.startswith("bf16-emulated") and c.passed for c in res.parity.cases)


def test_bf16_refused_where_it_cannot_run(tiny_bert_dir, tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="no BF16 kernels"):
        build(f"hf:{tiny_bert_dir}", BuildOptions(precision="bf16", output=tmp_path / "cpu"))
    import runtimes.device as device

    monkeypatch.setattr(device, "gpu_info", lambda: {"name": "Tesla T4", "compute_capability": [7, 5]})
    with pytest.raises(UsageError, match=r">= 8.0 \(Ampere\).*Tesla T4.*7\.5"):
        build(f"hf:{tiny_bert_dir}", BuildOptions(precision="bf16", device="cuda", output=tmp_path / "t4"))
    assert not (tmp_path / "t4").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_fp16_bf16_engines_pass_on_the_cuda_provider(precision, tiny_bert_dir, tiny_clip_dir, tmp_path):
    for name, spec in {"bert": f"hf:{tiny_bert_dir}", "clip": f"hf:{tiny_clip_dir}"}.items():
        res = build(spec, BuildOptions(precision=precision, device="cuda", output=tmp_path / name))
        assert res.parity.status == "passed", res.parity.failures()
        assert not any("emulated" in c.label for c in res.parity.cases)  # the GPU computes the real thing



def _lower_until_it_builds(src, mixed, feeds, tmp_path, rounds, refused):
    """Lower `src` to BF16 and build a CPU engine, asking refused(exc, lowered) after each refusal; the last
    lowering. The CPU provider has almost no BF16 kernels: it refuses the way the CUDA provider does."""
    from exporter.lower.precision import lower_precision
    from runtimes.ort.build import OrtBuildOptions, build_ort_engine

    for k in range(rounds):
        lowered = lower_precision(src, "bf16", tmp_path / f"w{k}", mixed=mixed, calibration=feeds)
        (tmp_path / f"e{k}").mkdir()
        try:
            build_ort_engine(lowered.path, tmp_path / f"e{k}", OrtBuildOptions(device="cpu"))
            return lowered
        except Exception as exc:
            assert refused(exc, lowered), exc
    pytest.fail(f"still refused after {rounds} rounds")


def test_an_op_without_a_low_precision_kernel_stays_fp32(tmp_path):
    """ORT's CPU provider has no BF16 kernel for Relu, Resize or Conv, and refuses the lowered graph; the
    build keeps each refused op type in FP32 (one lowering round each) instead of failing, and says so.
    The same path kept the CUDA provider's Resize in FP32 for a detector on the H200."""
    from exporter.lower.mixed import MixedOptions, keep_unrunnable_op

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["r"], name="up", mode="nearest"),
             helper.make_node("Relu", ["r"], ["y"], name="act")]
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], [scales]),
                                opset_imports=[helper.make_opsetid("", 22)]), str(src))
    mixed, history, said = MixedOptions(precision="bf16", range_rules=False), [], []
    feeds = [{"x": np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)}]
    lowered = _lower_until_it_builds(src, mixed, feeds, tmp_path, 4,
                                     lambda exc, _low: keep_unrunnable_op(exc, mixed, history, said.append))
    assert set(mixed.fp32_ops) == {"Resize", "Relu"} and len(history) == 2
    reasons = {n["op"]: n["reason"] for n in lowered.realised["fp32_nodes"]}
    assert all("no bf16 kernel" in reasons[op] for op in ("Resize", "Relu"))
    assert any("keeping Resize in FP32" in m for m in said)
    assert not keep_unrunnable_op(ValueError("something else"), mixed, history, said.append)
    again = BuildError("... Provider type for Relu node with name 'act' is not set.")
    assert keep_unrunnable_op(again, mixed, history, said.append)  # refused in FP32 too: cast its inputs next
    assert mixed.cast_inputs_ops == ["Relu"] and history[-1]["cast_inputs_ops"] == ["Relu"]
    with pytest.raises(BuildError, match=r"refused Relu node 'act' even with Relu kept in FP32 \(op types kept in FP32 so far: Resize, Relu\)"):
        keep_unrunnable_op(again, mixed, history, said.append)


def test_an_op_onnx_runtime_expands_into_its_function_stays_fp32(tmp_path):
    """No BF16 Clip kernel: ONNX Runtime expands Clip-13 into its ONNX function (Less, Where) and then refuses a
    Less with no name, a node that is not in the graph. The build finds the op whose function holds it and
    keeps that in FP32 (the YOLOX-style detector's BF16 build on the H200 failed here, 2026-12-02)."""
    from exporter.lower.mixed import MixedOptions, function_ops_holding, keep_unrunnable_op

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    inits = [helper.make_tensor("lo", TensorProto.FLOAT, [], [0.0]), helper.make_tensor("hi", TensorProto.FLOAT, [], [1.0]),
             helper.make_tensor("w", TensorProto.FLOAT, [8, 8], np.eye(8, dtype=np.float32).ravel())]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Clip", ["h", "lo", "hi"], ["y"], name="clip")]
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 22)]), str(src))
    mixed, history, said = MixedOptions(precision="bf16", range_rules=False, fp32_ops=["MatMul"]), [], []
    feeds = [{"x": np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)}]

    def refused(exc, low):
        assert "node with name ''" in str(exc) and function_ops_holding(low.path, "Less") == ["Clip"]
        return keep_unrunnable_op(exc, mixed, history, said.append, graph=low.path)

    _lower_until_it_builds(src, mixed, feeds, tmp_path, 3, refused)
    assert "Clip" in mixed.fp32_ops and history[0]["kept_fp32_ops"] == ["Clip"]
    assert any("expanded Clip into a Less" in m for m in said)


def test_a_comparison_fed_by_low_precision_tensors_reads_them_through_a_cast():
    """A comparison is never lowered itself (bool output), so keeping it in FP32 does not help when its
    inputs are BF16 and the provider has no BF16 kernel for it (ORT 1.31's CUDA provider and a Less in a
    YOLOX-style detector, 2026-11-21). The CPU provider has no BF16 Less either: the same refusal here."""
    import onnxruntime as ort

    from exporter.lower.mixed import cast_inputs_to_fp32

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.BOOL, [4])
    half = helper.make_tensor("half", TensorProto.BFLOAT16, [1], [0.5])
    nodes = [helper.make_node("Cast", ["x"], ["x_bf16"], to=TensorProto.BFLOAT16, name="lowered"),
             helper.make_node("Less", ["x_bf16", "half"], ["y"], name="cmp")]
    graph = helper.make_graph(nodes, "g", [x], [y], [half])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    with pytest.raises(Exception, match="Less"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fixed = cast_inputs_to_fp32(model, ["Less"])
    onnx.checker.check_model(fixed)
    assert [n.op_type for n in fixed.graph.node] == ["Cast", "Cast", "Cast", "Less"]
    values = np.array([0.25, 0.5, 0.75, -1.0], np.float32)
    got = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": values})[0]
    assert got.tolist() == [True, False, False, True]


def test_nodes_that_compute_from_integers_only_stay_fp32():
    """Lengths and positions (integers turned into floats and back) are exact in FP32 and cheap; in FP16
    they round. A node fed by a float graph input or a weight is not among them."""
    import onnx
    from onnx import TensorProto, helper

    from exporter.lower.mixed import integer_derived_nodes

    nodes = [
        helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT, name="cast_in"),
        helper.make_node("ReduceSum", ["m"], ["len"], keepdims=0, name="length"),
        helper.make_node("Div", ["len", "hop"], ["frames"], name="frames"),
        helper.make_node("Floor", ["frames"], ["whole"], name="floor"),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
        helper.make_node("Mul", ["h", "hop"], ["y"], name="scale"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("mask", TensorProto.INT64, [2, 8]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("whole", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor("hop", TensorProto.FLOAT, [], [320.0]),
         helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.1] * 16)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert integer_derived_nodes(onnx.shape_inference.infer_shapes(model)) == ["length", "frames", "floor"]
