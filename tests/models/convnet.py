"""Small torch modules for py: sources in the tests (each factory returns model, example inputs)."""

import torch
from torch import nn


class SmallConvNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(32, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(1))


def make():
    torch.manual_seed(0)
    model = SmallConvNet().eval()
    # BatchNorm statistics that are not the identity, so folding them is actually exercised.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model, {"images": torch.randn(2, 3, 32, 32)}


class TwoHeads(nn.Module):
    """Two inputs with independent batch dims and a dict of outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        return {"x_proj": self.a(x), "y_proj": self.b(y), "similarity": self.a(x) @ self.b(y).T}


def make_two_heads():
    torch.manual_seed(1)
    return TwoHeads().eval(), {"x": torch.randn(3, 8), "y": torch.randn(5, 6)}, {"x": {0: "x_batch"}, "y": {0: "y_batch"}}


class Eigen(nn.Module):
    """Uses an operator that has no ONNX translation (symmetric eigenvalues)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.block = _EigBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.proj(x))


class _EigBlock(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvalsh(x @ x.transpose(-1, -2))


def make_unsupported():
    return Eigen().eval(), {"x": torch.randn(2, 4, 4)}


class Noisy(nn.Module):
    """Adds fresh random noise on every call: no engine can reproduce its reference outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + torch.rand_like(x)


def make_noisy():
    return Noisy().eval(), {"x": torch.randn(2, 8)}


def make_not_a_model():
    return "model", {"x": torch.randn(2, 8)}
