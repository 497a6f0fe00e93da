"""Linear regression: y = x @ W.T + b."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LinearConfig:
    in_features: int = 0  # derived from the data
    out_features: int = 1
    bias: bool = True


class LinearRegression(nn.Module):
    def __init__(self, cfg: LinearConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.linear = nn.Linear(cfg.in_features, cfg.out_features, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_features) -> (B, out_features)
        return self.linear(x)
