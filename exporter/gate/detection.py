"""Detection-aware parity (numpy only): compare what a detector reports, not its tensors' elements.

After NMS, element-wise comparison means nothing: a score that moves by 1e-4 reorders two boxes,
and a box near the IoU or score threshold survives in one engine and not in the other, so slot k
of one output holds another object than slot k of the other. Instead, per image, detections of
the same class are matched greedily by IoU (reference detections in descending score order, each
to the unmatched candidate of highest IoU ≥ `match_iou`); then:

- matched: matched pairs / max(reference count, engine count), over all images of the case;
- mean_iou / min_iou of the matched pairs; score_delta (max) and score_delta_mean;
- missing / extra: unmatched reference / engine detections that count against `matched`;
- borderline: unmatched detections that do not count, because their score is within the case's
  numerical noise of the score threshold, or of the lowest score kept on an image that hit the
  max-detections limit (which of two near-equal boxes survives is then a tie, not an error).

At FP16/BF16 the mean-IoU floor is never above what the precision itself can represent: the
reference's matched boxes are rounded to that format (`resolution_iou`, their IoU with the
unrounded boxes) and the engine may lose up to RESOLUTION_FACTOR times that IoU. Small boxes far from
the origin lose the most: a 22-pixel box at x ≈ 400 moves by up to 0.125 px when stored in FP16
(spacing 0.25 px there), IoU ≈ 0.99. Found on the YOLOX-S-sized detector with random weights (boxes
of about 22 px everywhere): its FP16 engine lost 0.0118 of mean IoU where rounding the reference
boxes to FP16 loses 0.0122, every matched pair the same anchor: no tie, no wrong box, only storage
resolution. A real regression error (a wrong box, a shifted grid) costs far more than that.

The outputs follow the static-shape form of NMS in the graph: num_detections [B] (int), boxes
[B, K, 4] (x1, y1, x2, y2), scores [B, K], classes [B, K] (int), rows beyond num_detections padding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from exporter.gate.parity import TaskCheck

FINAL_OUTPUTS = ("num_detections", "boxes", "scores", "classes")
CHECK_NAME = "detections"


@dataclass(frozen=True)
class DetectionTolerance:
    """matched and mean_iou are minima, score_delta a maximum (None: not gated)."""

    matched: float | None = 0.99
    mean_iou: float | None = 0.999
    score_delta: float | None = 1e-3
    match_iou: float = 0.5  # IoU at which two detections of the same class are the same object


# How much more IoU than rounding the reference boxes to the precision's format costs an engine may lose:
# storing boxes once costs 1×; the head's FP16 activations before the (FP32) decode add about as much again.
RESOLUTION_FACTOR = 2.0
STORAGE_FORMATS = ("fp16", "bf16")


# FP32 engines differ from torch by kernel order only; reduced precision moves scores by about its
# own resolution (FP16 ~1e-3 relative, BF16 ~8e-3) and boxes by a fraction of a pixel.
DETECTION_TOLERANCES: dict[str, DetectionTolerance] = {
    "fp32": DetectionTolerance(0.99, 0.999, 1e-3),
    "fp16": DetectionTolerance(0.95, 0.99, 0.02),
    "bf16": DetectionTolerance(0.9, 0.98, 0.05),
    "int8": DetectionTolerance(0.85, 0.9, 0.1),
    "fp8": DetectionTolerance(0.85, 0.9, 0.1),
}


def is_detection_io(output_names: list[str] | tuple[str, ...]) -> bool:
    """True when the outputs are the final detections of NMS in the graph (by name)."""
    return all(n in output_names for n in FINAL_OUTPUTS)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of x1y1x2y2 boxes (corners in any order, like ONNX NMS)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    a_lo, a_hi = np.minimum(a[:, :2], a[:, 2:]), np.maximum(a[:, :2], a[:, 2:])
    b_lo, b_hi = np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])
    lo = np.maximum(a_lo[:, None], b_lo[None])
    hi = np.minimum(a_hi[:, None], b_hi[None])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    area_a = np.prod(a_hi - a_lo, axis=-1)
    area_b = np.prod(b_hi - b_lo, axis=-1)
    union = area_a[:, None] + area_b[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_image(ref_boxes: np.ndarray, ref_scores: np.ndarray, ref_classes: np.ndarray, got_boxes: np.ndarray,
                got_scores: np.ndarray, got_classes: np.ndarray, match_iou: float = 0.5) -> list[tuple[int, int, float]]:
    """Greedy same-class IoU matching: (reference index, engine index, IoU) per matched pair."""
    iou = box_iou(ref_boxes, got_boxes)
    iou = np.where(np.asarray(ref_classes)[:, None] == np.asarray(got_classes)[None], iou, -1.0)
    pairs, taken = [], np.zeros(len(got_boxes), bool)
    for i in np.argsort(-np.asarray(ref_scores, np.float64), kind="stable"):
        if not len(got_boxes):
            break
        row = np.where(taken, -1.0, iou[i])
        j = int(row.argmax())
        if row[j] >= match_iou:
            taken[j] = True
            pairs.append((int(i), j, float(row[j])))
    return pairs


def _image(out: Mapping[str, np.ndarray], b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = int(np.asarray(out["num_detections"]).reshape(-1)[b])
    return (np.asarray(out["boxes"])[b, :n], np.asarray(out["scores"], np.float64)[b, :n],
            np.asarray(out["classes"])[b, :n])


def rounded(boxes: np.ndarray, storage: str) -> np.ndarray:
    """`boxes` stored in `storage` (fp16, bf16) and read back as float64."""
    if storage == "fp16":
        return np.asarray(boxes, np.float32).astype(np.float16).astype(np.float64)
    import ml_dtypes

    return np.asarray(boxes, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def resolution_iou(boxes: np.ndarray, storage: str | None) -> float:
    """Mean IoU of `boxes` [N, 4] with themselves stored in `storage` (1.0 for FP32 or no boxes)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if storage not in STORAGE_FORMATS or not len(boxes):
        return 1.0
    stored = rounded(boxes, storage)
    return float(np.mean([box_iou(boxes[k:k + 1], stored[k:k + 1])[0, 0] for k in range(len(boxes))]))


def compare_detections(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                       tol: DetectionTolerance, *, score_threshold: float | None = None,
                       max_detections: int | None = None, storage: str | None = None) -> TaskCheck:
    """The detection check of one case (all images of the batch). storage: the engine's reduced
    precision (fp16, bf16), whose resolution bounds the mean-IoU floor (see the module's docstring)."""
    check = TaskCheck(CHECK_NAME)
    missing_outputs = [n for n in FINAL_OUTPUTS if n not in candidate]
    if missing_outputs:
        check.failures.append(f"engine outputs lack {missing_outputs}")
        return check
    batch = int(np.asarray(reference["num_detections"]).reshape(-1).shape[0])
    k = max_detections or int(np.asarray(reference["boxes"]).shape[1])
    images = []
    for b in range(batch):
        r, g = _image(reference, b), _image(candidate, b)
        images.append((r, g, match_image(*r, *g, match_iou=tol.match_iou)))
    deltas = np.array([abs(r[1][i] - g[1][j]) for r, g, pairs in images for i, j, _ in pairs])
    ious = np.array([iou for _, _, pairs in images for _, _, iou in pairs])
    matched_boxes = [r[0][i] for r, _, pairs in images for i, _, _ in pairs]
    resolution = resolution_iou(np.asarray(matched_boxes).reshape(-1, 4), storage)
    # Numerical noise of this case: what matched scores moved by (at least the gated resolution).
    noise = max(3 * float(np.percentile(deltas, 90)) if deltas.size else 0.0, tol.score_delta or 0.0, 1e-6)
    n_ref = n_got = n_pairs = missing = extra = borderline = 0
    for r, g, pairs in images:
        n_ref, n_got, n_pairs = n_ref + len(r[1]), n_got + len(g[1]), n_pairs + len(pairs)
        for scores, taken, full in ((r[1], {i for i, _, _ in pairs}, len(r[1]) >= k),
                                    (g[1], {j for _, j, _ in pairs}, len(g[1]) >= k)):
            floor = float(scores.min()) if full and len(scores) else None
            for idx in set(range(len(scores))) - taken:
                s = float(scores[idx])
                near = (score_threshold is not None and s - score_threshold <= noise) or \
                       (floor is not None and s - floor <= noise)
                if near:
                    borderline += 1
                elif scores is r[1]:
                    missing += 1
                else:
                    extra += 1
    denom = max(n_ref, n_got)
    check.metrics = {
        "matched": 1.0 if denom == 0 else min(1.0, (n_pairs + borderline) / denom),
        "mean_iou": float(ious.mean()) if ious.size else 1.0,
        "min_iou": float(ious.min()) if ious.size else 1.0,
        "score_delta": float(deltas.max()) if deltas.size else 0.0,
        "score_delta_mean": float(deltas.mean()) if deltas.size else 0.0,
        "reference_count": float(n_ref), "engine_count": float(n_got),
        "missing": float(missing), "extra": float(extra), "borderline": float(borderline),
    }
    floor = tol.mean_iou
    if storage in STORAGE_FORMATS and floor is not None:
        check.metrics["resolution_iou"] = resolution
        floor = min(floor, 1.0 - RESOLUTION_FACTOR * (1.0 - resolution))
        check.metrics["mean_iou_floor"] = floor
    m = check.metrics
    if tol.matched is not None and m["matched"] < tol.matched:
        check.failures.append(f"matched {m['matched']:.4f} < {tol.matched} ({missing} reference detection(s) missing, "
                              f"{extra} extra, of {n_ref} / {n_got})")
    if floor is not None and m["mean_iou"] < floor:
        why = "" if floor == tol.mean_iou else \
            f" (the {storage} resolution floor: the reference boxes stored in {storage} keep IoU {resolution:.4f})"
        check.failures.append(f"mean IoU {m['mean_iou']:.4f} < {floor:.4f}{why}")
    if tol.score_delta is not None and m["score_delta"] > tol.score_delta:
        check.failures.append(f"score delta {m['score_delta']:.3g} > {tol.score_delta:g}")
    return check
