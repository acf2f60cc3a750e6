"""Detectors with NMS in the graph: the custom op against ONNX Runtime's NonMaxSuppression, the
tiny YOLOX-style model built at FP32, FP16 and INT8, detection-aware gates, raw head outputs."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import runtimes
from exporter.export.detector import set_outputs
from exporter.export.nms import nms
from exporter.gate.recheck import check_bundle
from exporter.pipeline import BuildOptions, build
from exporter.source.loading import load_source
from exporter.source.shapes import parse_shapes
from exporter.source.spec import parse_source
from runtimes.samples import generate_feeds

TINY = "py:exporter.yolox:make_tiny"


def _ort_nms(boxes, scores, max_per_class, iou, score):
    import onnxruntime as ort

    g = helper.make_graph(
        [helper.make_node("NonMaxSuppression", ["b", "s", "m", "i", "t"], ["y"], center_point_box=0)], "nms",
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, None), helper.make_tensor_value_info("s", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.INT64, None)],
        [helper.make_tensor("m", TensorProto.INT64, [1], [max_per_class]), helper.make_tensor("i", TensorProto.FLOAT, [1], [iou]),
         helper.make_tensor("t", TensorProto.FLOAT, [1], [score])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString()).run(None, {"b": boxes, "s": scores})[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_op_selects_what_onnx_runtime_selects(seed):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 40, (2, 60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 20, (2, 60, 2))], -1).astype(np.float32)
    boxes[1, :5] = boxes[1, :5, [2, 3, 0, 1]].T  # corners given the other way round
    scores = rng.uniform(0, 1, (2, 3, 60)).astype(np.float32)
    scores[0, 0, 10:14] = 0.75  # exact ties: the lower index first
    got = nms(torch.from_numpy(boxes), torch.from_numpy(scores), 7, 0.45, 0.3).numpy()
    want = _ort_nms(boxes, scores, 7, 0.45, 0.3)
    assert got.tolist() == want.tolist() and len(want) > 10


def test_detector_bundle_ships_final_outputs_and_gates_raw_ones(detector_bundle):
    m = runtimes.Manifest.read(detector_bundle)
    assert m.source["task"] == "object-detection" and m.source["detection"]["score_threshold"] == 0.2
    assert [o.name for o in m.io.outputs] == ["num_detections", "boxes", "scores", "classes"]
    assert m.parity["status"] == "passed" and set(m.parity["worst"]) == {"raw_boxes", "raw_scores"}
    det = m.parity["checks"]["detections"]
    assert det["matched"] == 1.0 and det["reference_count"] > 10 and det["mean_iou"] > 0.9999
    ops = {n.op_type for n in onnx.load(str(detector_bundle / "model.onnx")).graph.node}
    assert "NonMaxSuppression" in ops
    ref = load_source(parse_source(TINY))
    with runtimes.load(detector_bundle) as r:
        feeds = generate_feeds(m.io, {"batch": 3}, seed=7)  # a batch size the gate did not use
        got, want = r.infer(feeds), ref.reference(feeds)
    assert got["boxes"].shape == (3, 20, 4) and got["num_detections"].tolist() == want["num_detections"].tolist()
    np.testing.assert_allclose(got["boxes"], want["boxes"], atol=1e-3)
    assert (got["classes"][0, got["num_detections"][0]:] == -1).all()  # padding beyond the count


def test_parity_command_rechecks_a_detector_with_matching(detector_bundle, tmp_path):
    report = check_bundle(detector_bundle, tolerances=["detections:matched=1.0"], html=tmp_path / "r.html",
                          trust_recorded=True)
    assert report.passed and all(c.checks and c.checks[0].name == "detections" for c in report.cases)
    assert {o.name for c in report.cases for o in c.outputs} == {"raw_boxes", "raw_scores"}  # re-exposed from model.onnx
    assert (tmp_path / "r.html").is_file()


@pytest.mark.slow
def test_fp16_detector_keeps_nms_in_fp32_and_passes_the_detection_gate(tmp_path):
    res = build(TINY, BuildOptions(precision="fp16", output=tmp_path / "det16", shapes=parse_shapes("batch=1:2:4")))
    assert res.parity.status == "passed"
    kept = {n["op"] for n in res.manifest.precision["realised"]["fp32_nodes"]}
    assert "TopK" in kept  # AutoCast itself leaves NonMaxSuppression (no FP16 kernel) in FP32
    labels = [c.label for c in res.parity.cases]
    assert any(lab.startswith("fp16-emulated") for lab in labels)
    assert all(c.checks[0].name == "detections" for c in res.parity.cases)
    assert all({"raw_boxes", "raw_scores"} == {o.name for o in c.outputs} for c in res.parity.cases)


@pytest.mark.slow
def test_int8_detector_from_calibration_with_a_task_tolerance(tmp_path):
    # Width-4 convolutions quantize coarsely: boxes move by a pixel or two out of ~20 (IoU ~0.85).
    res = build(TINY, BuildOptions(precision="int8", calib="random:12", output=tmp_path / "det8", shapes=parse_shapes("batch=1:2:4"),
                                   tolerances=["detections:mean_iou=0.75"]))
    assert res.parity.status == "passed"
    assert res.manifest.calibration["budget"] == ["raw_boxes:cosine>=0.99", "raw_scores:cosine>=0.99"]
    parity = json.loads((res.bundle / "parity.json").read_text())
    assert all(c["checks"][0]["passed"] for c in parity["cases"])


def test_raw_outputs_option_exports_the_head_without_nms():
    loaded = load_source(parse_source(TINY))
    set_outputs(loaded, "raw")
    assert loaded.module.output_names == ["raw_boxes", "raw_scores"]
    assert loaded.info["detection"]["outputs"] == "raw"
    out = loaded.reference(generate_feeds(loaded.io, "opt"))
    assert set(out) == {"raw_boxes", "raw_scores"} and out["raw_scores"].shape[1:] == (84, 4)


def test_raw_outputs_run_with_the_engines_cuda_options():
    # The gate reads raw_boxes/raw_scores from a second ORT session: on CUDA it must run the engine's kernels
    # (an FP32 engine has TF32 off; ORT's default session would let cuDNN use TF32 and fail the FP32 gate).
    from exporter.export.detector import raw_providers

    assert raw_providers("cpu", {"use_tf32": 0}) == ["CPUExecutionProvider"]
    engine = {"device_id": 0, "use_tf32": 0, "cudnn_conv_algo_search": "EXHAUSTIVE", "prefer_nhwc": 1}
    cuda, cpu = raw_providers("cuda", engine)
    assert cuda == ("CUDAExecutionProvider", {k: str(v) for k, v in engine.items()}) and cpu == "CPUExecutionProvider"
    assert raw_providers("cuda", None)[0] == ("CUDAExecutionProvider", {"use_tf32": "0"})  # a TensorRT plan's ONNX


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_gpu_detector_passes_its_default_gates(precision, tmp_path):
    """On the CUDA provider, with default tolerances: FP32 (raw outputs read with the engine's own kernels),
    FP16 (the IoU floor at FP16's resolution), BF16 (comparisons read BF16 tensors through casts)."""
    res = build(TINY, BuildOptions(precision=precision, device="cuda", output=tmp_path / precision,
                                   shapes=parse_shapes("batch=1:2:4")))
    assert res.parity.status == "passed", res.parity.failures()
    assert not any("emulated" in c.label for c in res.parity.cases)


@pytest.mark.gpu
def test_gpu_int8_records_its_speed_against_fp16(tmp_path):
    res = build(TINY, BuildOptions(precision="int8", calib="random:12", device="cuda", output=tmp_path / "det8",
                                   shapes=parse_shapes("batch=1:2:4"), tolerances=["detections:mean_iou=0.75"]))
    speed = res.manifest.calibration["speed"]
    assert speed["device"] == "cuda" and speed["int8_ms"] > 0 and speed["fp16_ms"] > 0
    slower = speed["int8_over_fp16"] > 1.0
    assert slower == any("slower" in n and "--target trt" in n for n in res.manifest.calibration["notes"])


def test_cuda_graphs_are_refused_for_a_graph_with_nms(tmp_path):
    """NonMaxSuppression's output size depends on the data: ORT copies it to the host mid-run, which a CUDA
    graph cannot capture (the detector's bench crashed in capture on the H200). The build records such ops
    and the runner refuses cuda_graph=True for them with one paragraph."""
    from runtimes.errors import UsageError
    from runtimes.manifest import Manifest
    from runtimes.ort.runner import _check_capturable

    res = build(TINY, BuildOptions(output=tmp_path / "det", shapes=parse_shapes("batch=1:1:2")))
    assert res.manifest.target.options["data_dependent_ops"] == ["NonMaxSuppression"]
    with pytest.raises(UsageError, match="found NonMaxSuppression in bundle 'det'.*--no-cuda-graph"):
        _check_capturable(Manifest.read(res.bundle))
    raw = build(TINY, BuildOptions(output=tmp_path / "raw", detector_outputs="raw", shapes=parse_shapes("batch=1:1:2")))
    assert "data_dependent_ops" not in raw.manifest.target.options
    _check_capturable(raw.manifest)
