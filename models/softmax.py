"""Softmax regression: one linear layer producing class logits (softmax lives in the loss)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torchcycle.models.checks import derived_problems, raise_problems


@dataclass(frozen=True)
class SoftmaxConfig:
    in_features: int = 0  # derived from the data
    num_classes: int = 0  # derived from the data

    def __post_init__(self) -> None:
        # Checked on construction, so a bad config fails here with the field's name, not deep inside torch.
        problems = derived_problems(self, "in_features", "num_classes")
        raise_problems(problems)


class SoftmaxRegression(nn.Module):
    def __init__(self, cfg: SoftmaxConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.linear = nn.Linear(cfg.in_features, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_features) -> logits (B, num_classes)
        return self.linear(x)
