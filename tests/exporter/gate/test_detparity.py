"""Detection-aware and zero-shot parity (numpy only): matching, borderline detections, overrides."""

import numpy as np
import pytest

from exporter.gate.detection import (
    DetectionTolerance,
    box_iou,
    compare_detections,
    match_image,
    resolution_iou,
)
from exporter.gate.task import ZeroShotTolerance, compare_zero_shot, gate_policy, split_tolerances
from runtimes.errors import UsageError

TOL = DetectionTolerance(matched=0.99, mean_iou=0.99, score_delta=0.01)


def _dets(rows, k=5):
    """rows: per image, a list of (x1, y1, x2, y2, score, class) → the padded NMS output form."""
    out = {"num_detections": np.array([len(r) for r in rows]), "boxes": np.zeros((len(rows), k, 4), np.float32),
           "scores": np.zeros((len(rows), k), np.float32), "classes": np.full((len(rows), k), -1)}
    for b, r in enumerate(rows):
        for i, (*box, s, c) in enumerate(r):
            out["boxes"][b, i], out["scores"][b, i], out["classes"][b, i] = box, s, c
    return out


def test_iou_and_greedy_matching():
    assert box_iou([[0, 0, 2, 2]], [[1, 1, 3, 3], [2, 2, 0, 0]]).tolist() == [[1 / 7, 1.0]]  # corners in any order
    pairs = match_image(np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([0.9, 0.8]), np.array([1, 1]),
                        np.array([[21, 20, 31, 30], [0, 0, 10, 10]]), np.array([0.8, 0.9]), np.array([1, 1]))
    assert [(i, j) for i, j, _ in pairs] == [(0, 1), (1, 0)]
    assert match_image(np.array([[0, 0, 10, 10]]), np.array([0.9]), np.array([1]),
                       np.array([[0, 0, 10, 10]]), np.array([0.9]), np.array([2])) == []  # other class: no match


def test_reordered_slots_match_and_a_lost_box_fails():
    ref = _dets([[(0, 0, 10, 10, 0.9, 0), (20, 20, 30, 30, 0.85, 1)]])
    swapped = _dets([[(20, 20, 30, 30, 0.851, 1), (0.1, 0, 10, 10, 0.899, 0)]])
    check = compare_detections(ref, swapped, TOL)
    assert check.passed and check.metrics["matched"] == 1.0 and check.metrics["mean_iou"] > 0.99
    lost = compare_detections(ref, _dets([[(0, 0, 10, 10, 0.9, 0)]]), TOL)
    assert not lost.passed and lost.metrics["missing"] == 1 and "matched 0.5000" in lost.failures[0]


def test_a_box_at_the_score_threshold_is_borderline_not_missing():
    ref = _dets([[(0, 0, 10, 10, 0.9, 0), (40, 40, 50, 50, 0.2505, 2)]])
    got = _dets([[(0, 0, 10, 10, 0.9001, 0)]])
    assert not compare_detections(ref, got, TOL).passed
    check = compare_detections(ref, got, TOL, score_threshold=0.25)
    assert check.passed and check.metrics["borderline"] == 1 and check.metrics["missing"] == 0


def test_score_and_box_drift_are_gated():
    ref = _dets([[(0, 0, 10, 10, 0.9, 0)]])
    check = compare_detections(ref, _dets([[(1, 1, 11, 11, 0.8, 0)]]), TOL)
    assert not check.passed and any("mean IoU" in f for f in check.failures) and any("score delta" in f for f in check.failures)


def test_the_fp16_iou_floor_is_the_resolution_of_fp16_boxes():
    # A 22-pixel box near x = 400, where FP16's spacing is 0.25 px: the YOLOX-S-sized detector's FP16 engine moved
    # such boxes by about 0.1-0.27 px (IoU 0.97-0.99), exactly what storing the reference boxes in FP16 costs.
    ref = _dets([[(400.1, 410.1, 422.1, 432.1, 0.9, 0), (350.05, 300.05, 372.05, 322.05, 0.8, 1)]])
    near = _dets([[(400.2, 410.0, 422.0, 432.2, 0.9, 0), (350.0, 300.15, 372.15, 322.0, 0.8, 1)]])
    fp32 = compare_detections(ref, near, TOL)
    assert not fp32.passed and "mean IoU" in fp32.failures[0] and "resolution_iou" not in fp32.metrics
    fp16 = compare_detections(ref, near, TOL, storage="fp16")
    assert fp16.passed, fp16.failures
    assert fp16.metrics["resolution_iou"] < 0.995 and fp16.metrics["mean_iou_floor"] < 0.99
    shifted = _dets([[(401.1, 410.1, 423.1, 432.1, 0.9, 0), (351.05, 301.05, 373.05, 323.05, 0.8, 1)]])  # 1 px
    wrong = compare_detections(ref, shifted, TOL, storage="fp16")
    assert not wrong.passed and "fp16 resolution floor" in wrong.failures[0]
    # BF16 stores 8 significant bits: 2-pixel spacing there, a floor far below FP16's; FP32 costs nothing
    box = np.array([[401.3, 411.3, 423.3, 433.3]])
    assert resolution_iou(box, "bf16") < resolution_iou(box, "fp16") < 1.0 == resolution_iou(box, "fp32")


def test_zero_shot_ranking_is_tie_aware():
    ref = np.array([[10.0, 5.0, 1.0], [2.0, 2.0005, 9.0]])
    near = ref + np.array([[0.01, -0.01, 0.0], [0.001, -0.001, 0.0]])  # the near-tie flips: still agrees
    check = compare_zero_shot({"logits_per_image": ref}, {"logits_per_image": near}, ZeroShotTolerance())
    assert check.passed and check.metrics["order"] == 1.0 and check.metrics["top1"] == 1.0
    flipped = ref[:, ::-1].copy()
    bad = compare_zero_shot({"logits_per_image": ref}, {"logits_per_image": flipped}, ZeroShotTolerance())
    assert not bad.passed and bad.metrics["top1_raw"] == 0.0


def test_task_tolerance_overrides():
    plain, task = split_tolerances(["rel_l2=1e-3", "detections:matched=0.9,mean_iou=0.8"])
    assert plain == ["rel_l2=1e-3"] and task == {"detections": {"matched": 0.9, "mean_iou": 0.8}}
    with pytest.raises(UsageError, match="METRIC in"):
        split_tolerances(["detections:cosine=0.9"])
    names = ["num_detections", "boxes", "scores", "classes", "raw_boxes"]
    _, det = gate_policy("fp16", ["detections:matched=0.9"], {"task": "custom"}, names)  # onnx: by output names
    assert det is not None and det.ungated == {"num_detections", "boxes", "scores", "classes"}
    with pytest.raises(UsageError, match="only for a bundle of that task"):
        gate_policy("fp32", ["zero-shot:order=0.9"], {"task": "custom"}, ["logits"])
