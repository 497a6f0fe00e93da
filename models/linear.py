"""Linear regression: y = x @ W.T + b."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torchcycle.models.checks import derived_problems, raise_problems


@dataclass(frozen=True)
class LinearConfig:
    in_features: int = 0  # derived from the data
    out_features: int = 1
    bias: bool = True

    def __post_init__(self) -> None:
        # Checked on construction, so a bad config fails here with the field's name, not deep inside torch.
        problems = derived_problems(self, "in_features", "out_features")
        raise_problems(problems)


class LinearRegression(nn.Module):
    def __init__(self, cfg: LinearConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.linear = nn.Linear(cfg.in_features, cfg.out_features, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_features) -> (B, out_features)
        return self.linear(x)
