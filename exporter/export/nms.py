"""NMS inside the exported graph: a torch custom op that eager torch computes and torch.onnx turns
into ONNX NonMaxSuppression (which ONNX Runtime runs and TensorRT's ONNX parser maps to its NMS
layer), plus the static-shape post-processing around it.

Why a custom op: torchvision.ops.nms exports, but torchvision is not installed everywhere enginekit
builds (no CPU wheel of it on the CI machine), and its batched_nms is a per-class offset trick, not
ONNX's batched, per-class operator. `enginekit::nms` has ONNX's semantics exactly (center_point_box
0: corners in any diagonal order; a box is kept when its score is above `score_threshold`; a box is
suppressed by a kept one of the same class when their IoU is above `iou_threshold`; ties in score
keep the lower box index first), so the torch reference and the engine select the same boxes.
Its ONNX translation is handed to torch.onnx.export through `custom_translation_table`
(exporter/export/graph.py asks `onnx_translations()` for it): no import side effects on other exports.

Post-processing (`select_detections`): from NMS's [N, 3] (batch, class, box) selections to the
fixed-size form engines serve: num_detections [B], boxes [B, K, 4], scores [B, K], classes [B, K],
ordered by score, padded with zeros (class -1) beyond num_detections.
"""

from __future__ import annotations

from typing import Any

import torch

# Padding of the score matrix: selected scores are in (score_threshold, 1], padding sorts last.
_PAD = -1.0


@torch.library.custom_op("enginekit::nms", mutates_args=())
def nms(boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou_threshold: float,
        score_threshold: float) -> torch.Tensor:
    """ONNX NonMaxSuppression: boxes [B, A, 4] (x1, y1, x2, y2), scores [B, C, A] → selected
    indices [N, 3] as (batch, class, box), per batch and class in descending score order."""
    boxes, scores = boxes.float(), scores.float()
    lo = torch.minimum(boxes[..., :2], boxes[..., 2:])
    hi = torch.maximum(boxes[..., :2], boxes[..., 2:])
    area = (hi - lo).prod(-1)
    selected = []
    for b in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            s = scores[b, c]
            cand = torch.nonzero(s > score_threshold).flatten()
            order = cand[torch.argsort(-s[cand], stable=True)]
            if max_per_class <= 0 or order.numel() == 0:
                continue
            lb, hb, ab = lo[b, order], hi[b, order], area[b, order]
            inter = (torch.minimum(hb[:, None], hb[None]) - torch.maximum(lb[:, None], lb[None])).clamp(min=0).prod(-1)
            union = ab[:, None] + ab[None] - inter
            # ONNX Runtime suppresses only when both areas and the intersection are positive.
            valid = (inter > 0) & (ab[:, None] > 0) & (ab[None] > 0)
            over = valid & (inter / torch.where(union > 0, union, torch.ones_like(union)) > iou_threshold)
            suppressed = torch.zeros(order.numel(), dtype=torch.bool)
            kept = []
            over_cpu = over.cpu()
            for i in range(order.numel()):
                if suppressed[i]:
                    continue
                kept.append(i)
                if len(kept) == max_per_class:
                    break
                suppressed |= over_cpu[i]
            for i in kept:
                selected.append((b, c, int(order[i])))
    out = torch.tensor(selected, dtype=torch.int64).reshape(-1, 3)
    return out.to(boxes.device)


@nms.register_fake
def _nms_fake(boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou_threshold: float,
              score_threshold: float) -> torch.Tensor:
    n = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((n, 3), dtype=torch.int64)


def _nms_onnx(boxes: Any, scores: Any, max_per_class: int, iou_threshold: float, score_threshold: float) -> Any:
    from onnxscript import opset18 as op

    # Constants, not graph inputs: TensorRT's parser needs the three limits as initializers.
    return op.NonMaxSuppression(boxes, scores, op.Constant(value_ints=[max_per_class]),
                                op.Constant(value_floats=[iou_threshold]),
                                op.Constant(value_floats=[score_threshold]), center_point_box=0)


def onnx_translations() -> dict[Any, Any]:
    """torch.onnx.export(custom_translation_table=...) entries for enginekit's custom ops."""
    return {torch.ops.enginekit.nms.default: _nms_onnx}


def select_detections(boxes: torch.Tensor, scores: torch.Tensor, *, max_detections: int, max_per_class: int,
                      iou_threshold: float, score_threshold: float) -> tuple[torch.Tensor, ...]:
    """boxes [B, A, 4], scores [B, A, C] → (num_detections [B], boxes [B, K, 4], scores [B, K],
    classes [B, K]) with K = max_detections: per-class NMS, then the K best per image."""
    batch = boxes.shape[0]
    k = max_detections
    sel = torch.ops.enginekit.nms(boxes, scores.transpose(1, 2), max_per_class, iou_threshold, score_threshold)
    b, c, i = sel[:, 0], sel[:, 1], sel[:, 2]
    s = scores[b, i, c]
    # One row per image: its selections' scores, everything else padding; K padding columns more
    # make top-K well defined however few boxes were selected (static K, dynamic N).
    rows = torch.arange(batch, device=boxes.device)[:, None]
    matrix = torch.where(b[None, :] == rows, s[None, :], torch.full_like(s[None, :], _PAD))
    matrix = torch.cat([matrix, torch.full((batch, k), _PAD, dtype=s.dtype, device=s.device)], dim=1)
    top, idx = matrix.topk(k, dim=1)
    valid = top > _PAD / 2
    picked_boxes = torch.cat([boxes[b, i], boxes.new_zeros((k, 4))], dim=0)[idx]
    picked_classes = torch.cat([c, c.new_full((k,), -1)], dim=0)[idx]
    return (valid.sum(dim=1), picked_boxes * valid[..., None].to(boxes.dtype), torch.where(valid, top, torch.zeros_like(top)),
            torch.where(valid, picked_classes, torch.full_like(picked_classes, -1)))


class Detector(torch.nn.Module):
    """A detection model with its post-processing in the graph.

    `model(pixel_values)` returns decoded predictions: boxes [B, A, 4] (x1, y1, x2, y2 in input
    pixels) and scores [B, A, C] in [0, 1]. outputs='nms' (default) returns num_detections, boxes,
    scores, classes (max_detections per image, padded) plus the pre-NMS predictions as raw_boxes
    and raw_scores (the build keeps those out of the engine's outputs and uses them for the gate's
    element-wise check); outputs='raw' returns only raw_boxes and raw_scores (NMS left to the caller).
    Defaults: 100 detections, score > 0.25, IoU > 0.65 suppresses, max_per_class = max_detections.
    """

    def __init__(self, model: torch.nn.Module, *, max_detections: int = 100, score_threshold: float = 0.25,
                 iou_threshold: float = 0.65, max_per_class: int | None = None, outputs: str = "nms"):
        super().__init__()
        self.model = model
        self.max_detections = int(max_detections)
        self.score_threshold = float(score_threshold)
        self.iou_threshold = float(iou_threshold)
        self.max_per_class = int(max_per_class or max_detections)
        self.outputs = outputs

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        boxes, scores = self.model(pixel_values)
        if self.outputs == "raw":
            return {"raw_boxes": boxes, "raw_scores": scores}
        n, b, s, c = select_detections(boxes, scores, max_detections=self.max_detections,
                                       max_per_class=self.max_per_class, iou_threshold=self.iou_threshold,
                                       score_threshold=self.score_threshold)
        return {"num_detections": n, "boxes": b, "scores": s, "classes": c, "raw_boxes": boxes, "raw_scores": scores}

    @property
    def enginekit_info(self) -> dict[str, Any]:
        """What the manifest records (source.task, source.detection): the gate reads it."""
        return {"task": "object-detection", "detection": {
            "outputs": self.outputs, "max_detections": self.max_detections, "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold, "max_per_class": self.max_per_class, "box_format": "xyxy",
            "raw_outputs": ["raw_boxes", "raw_scores"]}}
