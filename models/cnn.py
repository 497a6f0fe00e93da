"""Small CNN: [conv 3x3 (padding 1) -> ReLU -> max-pool 2] * n -> flatten -> FC -> ReLU -> FC."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torchcycle.models.checks import derived_problems, is_int, raise_problems


@dataclass(frozen=True)
class CNNConfig:
    in_features: int = 0  # C*H*W, derived from the data; inputs may arrive flattened
    image_shape: tuple[int, int, int] = (1, 8, 8)  # (C, H, W), derived from the data
    num_classes: int = 0  # derived from the data
    channels: tuple[int, ...] = (32, 64)
    hidden: int = 128  # width of the fully connected layer
    dropout: float = 0.0  # before the last layer, in [0, 1)

    def __post_init__(self) -> None:
        # Checked on construction, so a bad config fails here with the field's name, not deep inside torch.
        problems = derived_problems(self, "in_features", "num_classes")
        if len(self.image_shape) != 3 or not all(is_int(n, least=1) for n in self.image_shape):
            problems.append(f"image_shape: must be (C, H, W) of integers >= 1, got {tuple(self.image_shape)}")
        if not all(is_int(c, least=1) for c in self.channels):
            problems.append(f"channels: must be integers >= 1, got {list(self.channels)}")
        if not is_int(self.hidden, least=1):
            problems.append(f"hidden: must be an integer >= 1, got {self.hidden!r}")
        if not 0.0 <= self.dropout < 1.0:  # nan fails this too
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        raise_problems(problems)


class CNN(nn.Module):
    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, h, w = cfg.image_shape
        blocks: list[nn.Module] = []
        for out_c in cfg.channels:
            blocks += [nn.Conv2d(c, out_c, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out_c, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"image {cfg.image_shape} is too small for {len(cfg.channels)} pooling stages")
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C*H*W) flattened pixels or (B, C, H, W) -> logits (B, num_classes)
        x = x.reshape(x.shape[0], *self.cfg.image_shape)
        return self.head(self.features(x))
