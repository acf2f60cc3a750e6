"""A model with two planted FP16 hazards, for the mixed-precision tests: an intermediate above the FP16
maximum (65504) and a large offset whose subtraction loses the signal when stored in FP16."""

import torch
from torch import nn


class Planted(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 16)
        self.out = nn.Linear(16, 8)
    def forward(self, x):
        h = self.lin(x)
        e = (h * 300.0).pow(2).sum(-1, keepdim=True)     # energy ~1e6: above the fp16 max
        y = h / torch.sqrt(e)
        z = h + 2000.0                                   # large offset, then mean subtraction
        c = z - z.mean(-1, keepdim=True)
        return self.out(y * 100.0 + c)


def make():
    return Planted().eval(), {"x": torch.randn(4, 16)}
