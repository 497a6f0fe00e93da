"""Multi-layer perceptron for tabular features or flattened images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from torchcycle.models.checks import derived_problems, is_int, raise_problems

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 0  # derived from the data
    out_features: int = 0  # classes, or 1 for regression; derived from the data
    hidden: tuple[int, ...] = (128,)
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    dropout: float = 0.0  # fraction of activations zeroed while training, in [0, 1)

    def __post_init__(self) -> None:
        # Checked on construction, so a bad config fails here with the field's name, not deep inside torch.
        problems = derived_problems(self, "in_features", "out_features")
        if not all(is_int(h, least=1) for h in self.hidden):
            problems.append(f"hidden: layer sizes must be integers >= 1, got {list(self.hidden)}")
        if self.activation not in _ACTIVATIONS:
            problems.append(f"activation: must be one of {', '.join(_ACTIVATIONS)}, got {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:  # nan fails this too
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        raise_problems(problems)


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        width = cfg.in_features
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[cfg.activation]()]
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            width = h
        layers.append(nn.Linear(width, cfg.out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_features), or (B, C, H, W) images which are flattened -> (B, out_features)
        return self.net(x.flatten(1))
