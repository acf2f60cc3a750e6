"""A YOLOX-style detector (anchor-free, decoupled head; the layout DAMO-YOLO shares), usable as a
py: source: `enginekit build py:exporter.yolox:make_tiny` (tests, 64×64) or `py:exporter.yolox:make`
(YOLOX-S widths at 640×640, for the GPU bench).

Backbone: strided Conv-BN-SiLU stages with CSP blocks; neck: top-down FPN with a bottom-up path
(PAN) over strides 8, 16, 32; head per level: a 1×1 stem, then separate classification and
regression branches (box offsets + objectness). Decoding is YOLOX's: centre = (offset + grid) ×
stride, size = exp(log-size) × stride, score = sigmoid(objectness) × sigmoid(class).

Weights are random (seeded): no trained YOLOX weights can be fetched here. The class bias is set
so that a few percent of anchor/class pairs pass the score threshold on random inputs, which gives
NMS real work (overlapping boxes, several classes) in the parity tests instead of no detections.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from exporter.export.nms import Detector


class ConvBnAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class CSPBlock(nn.Module):
    """Cross-stage partial block: half the channels through bottlenecks, concatenated with the rest."""

    def __init__(self, cin: int, cout: int, depth: int = 1):
        super().__init__()
        mid = cout // 2
        self.a, self.b = ConvBnAct(cin, mid, 1), ConvBnAct(cin, mid, 1)
        self.blocks = nn.Sequential(*[nn.Sequential(ConvBnAct(mid, mid, 1), ConvBnAct(mid, mid, 3)) for _ in range(depth)])
        self.out = ConvBnAct(2 * mid, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        return self.out(torch.cat([a + self.blocks(a), self.b(x)], dim=1))


class YoloX(nn.Module):
    """Returns decoded (boxes [B, A, 4] xyxy in pixels, scores [B, A, C]); A = Σ (H/s × W/s), s = 8, 16, 32."""

    strides = (8, 16, 32)

    def __init__(self, num_classes: int = 80, width: int = 32, depth: int = 1, prior: float = 0.05):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width, 16 * width]
        self.stem = ConvBnAct(3, w[0], 3, 2)
        self.stages = nn.ModuleList(
            nn.Sequential(ConvBnAct(w[i], w[i + 1], 3, 2), CSPBlock(w[i + 1], w[i + 1], depth)) for i in range(4))
        c3, c4, c5 = w[2], w[3], w[4]
        self.lat5, self.lat4 = ConvBnAct(c5, c4, 1), ConvBnAct(c4, c3, 1)
        self.td4, self.td3 = CSPBlock(2 * c4, c4, depth), CSPBlock(2 * c3, c3, depth)
        self.down3, self.down4 = ConvBnAct(c3, c3, 3, 2), ConvBnAct(c4, c4, 3, 2)
        self.bu4, self.bu5 = CSPBlock(2 * c3, c4, depth), CSPBlock(2 * c4, c5, depth)
        hidden = w[2]
        # He init keeps activations at unit scale through the random network (PyTorch's default
        # shrinks them layer by layer until every anchor scores the same).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        self.heads = nn.ModuleList(self._head(c, hidden, num_classes, prior) for c in (c3, c4, c5))
        self.num_classes = num_classes

    @staticmethod
    def _head(cin: int, hidden: int, num_classes: int, prior: float) -> nn.ModuleDict:
        head = nn.ModuleDict({
            "stem": ConvBnAct(cin, hidden, 1),
            "cls": nn.Sequential(ConvBnAct(hidden, hidden), ConvBnAct(hidden, hidden)),
            "reg": nn.Sequential(ConvBnAct(hidden, hidden), ConvBnAct(hidden, hidden)),
            "cls_pred": nn.Conv2d(hidden, num_classes, 1),
            "reg_pred": nn.Conv2d(hidden, 4, 1),
            "obj_pred": nn.Conv2d(hidden, 1, 1),
        })
        for m in head.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        # YOLOX's prior-probability bias (here a higher prior than its 0.01: random weights, see above).
        bias = -torch.log(torch.tensor((1 - prior) / prior))
        for name in ("cls_pred", "obj_pred"):
            nn.init.normal_(head[name].weight, std=1.5 / hidden**0.5)
            nn.init.constant_(head[name].bias, float(bias) / 2)
        # Boxes about 2.7 strides wide with offsets of ±half a cell: neighbours overlap, NMS has work.
        nn.init.normal_(head["reg_pred"].weight, std=0.5 / hidden**0.5)
        with torch.no_grad():
            head["reg_pred"].bias.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]))
        return head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        c3, c4, c5 = feats[1:]
        p5 = self.lat5(c5)
        p4 = self.td4(torch.cat([nn.functional.interpolate(p5, size=c4.shape[-2:], mode="nearest"), c4], 1))
        p4l = self.lat4(p4)
        p3 = self.td3(torch.cat([nn.functional.interpolate(p4l, size=c3.shape[-2:], mode="nearest"), c3], 1))
        n4 = self.bu4(torch.cat([self.down3(p3), p4l], 1))
        n5 = self.bu5(torch.cat([self.down4(n4), p5], 1))
        boxes, scores = [], []
        for feat, head, stride in zip((p3, n4, n5), self.heads, self.strides):
            h = head["stem"](feat)
            cls, reg = head["cls_pred"](head["cls"](h)), head["reg"](h)
            box, obj = head["reg_pred"](reg), head["obj_pred"](reg)
            gh, gw = box.shape[-2:]
            ys, xs = torch.meshgrid(torch.arange(gh, device=x.device), torch.arange(gw, device=x.device), indexing="ij")
            grid = torch.stack([xs, ys], -1).reshape(1, gh * gw, 2).to(box.dtype)
            box = box.flatten(2).transpose(1, 2)
            centre = (box[..., :2] + grid + 0.5) * stride
            size = torch.exp(box[..., 2:].clamp(max=8.0)) * stride
            boxes.append(torch.cat([centre - size / 2, centre + size / 2], -1))
            scores.append((torch.sigmoid(obj) * torch.sigmoid(cls)).flatten(2).transpose(1, 2))
        return torch.cat(boxes, 1), torch.cat(scores, 1)


def _factory(model: YoloX, image: int, batch: int, seed: int, **detector: Any) -> tuple[Any, ...]:
    det = Detector(model.eval(), **detector).eval()
    example = torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(seed))
    return det, {"pixel_values": example}, {"pixel_values": {0: "batch"}}


def make_tiny() -> tuple[Any, ...]:
    """4 classes, 64×64 input, 84 anchors: the CPU tests' detector (score > 0.2, IoU > 0.4, up to 20
    per image: on random inputs about 10 detections per image, some suppressed, some at the limit)."""
    torch.manual_seed(0)
    return _factory(YoloX(num_classes=4, width=4, prior=0.3), 64, 2, 0, max_detections=20,
                    score_threshold=0.2, iou_threshold=0.4)


def make() -> tuple[Any, ...]:
    """YOLOX-S-like widths (32..512), 80 classes, 640×640 (8,400 anchors), 100 detections per image.
    With random weights no fixed threshold means anything, so the score threshold is set where about
    200 anchor/class pairs per image pass on seeded random inputs (NMS then keeps some 100)."""
    torch.manual_seed(0)
    model = YoloX(num_classes=80, width=32, prior=0.02).eval()
    with torch.no_grad():
        scores = model(torch.randn(2, 3, 640, 640, generator=torch.Generator().manual_seed(1)))[1]
    threshold = float(torch.quantile(scores.flatten(), 1 - 200 / scores[0].numel()))
    return _factory(model, 640, 2, 0, max_detections=100, score_threshold=round(threshold, 4), iou_threshold=0.65)
