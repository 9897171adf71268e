"""Activation modules that transformers' ``ACT2FN`` does not provide."""

from __future__ import annotations

import torch
from torch import nn


class LearnableLeakyReLU(nn.Module):
    """LeakyReLU with a learnable negative slope: ``x if x >= 0 else a * x``.

    NerVE §3.2 (normalisation-free GPT-2 with learnable LeakyReLU): one scalar slope per FFN, initialised
    to 0.01 as in the paper's released code (its "per_layer" mode).
    """

    def __init__(self, init_slope: float = 0.01):
        super().__init__()
        self.negative_slope = nn.Parameter(torch.tensor(float(init_slope)))  # [] learnable scalar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, x, x * self.negative_slope.to(x.dtype))

    def extra_repr(self) -> str:
        return "learnable negative_slope"
