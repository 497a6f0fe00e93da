"""CNN: [conv 3x3 (padding 1) -> (batch norm) -> ReLU -> max-pool 2] * n -> head.

Each stage halves H and W. The head is flatten -> FC -> ReLU -> FC (the classic one, tied to the input size), or
with `global_pool` a global average pool -> FC -> ReLU -> FC, which takes any input size. With `residual` each
stage is a small residual block: conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv where the width changes), ReLU,
then the pool.
"""

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
    channels: tuple[int, ...] = (32, 64)  # output width of each stage; their number is the depth
    hidden: int = 128  # width of the fully connected layer
    dropout: float = 0.0  # before the last layer, in [0, 1)
    batch_norm: bool = False  # BatchNorm2d after every convolution
    global_pool: bool = False  # global average pooling before the head: the input size is free
    residual: bool = False  # stages as residual blocks (two convolutions, batch norm, a shortcut)

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
        for name in ("batch_norm", "global_pool", "residual"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}: must be true or false, got {getattr(self, name)!r}")
        raise_problems(problems)


class _Residual(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut, then ReLU (He et al.'s basic block, stride 1)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def _stage(c_in: int, c_out: int, cfg: CNNConfig) -> list[nn.Module]:
    if cfg.residual:
        return [_Residual(c_in, c_out), nn.MaxPool2d(2)]
    # a convolution followed by batch norm needs no bias of its own (BN's shift is one)
    conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=not cfg.batch_norm)
    return [conv, *([nn.BatchNorm2d(c_out)] if cfg.batch_norm else []), nn.ReLU(), nn.MaxPool2d(2)]


class CNN(nn.Module):
    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, h, w = cfg.image_shape
        blocks: list[nn.Module] = []
        for out_c in cfg.channels:
            blocks += _stage(c, out_c, cfg)
            c, h, w = out_c, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"image {cfg.image_shape} is too small for {len(cfg.channels)} pooling stages")
        self.features = nn.Sequential(*blocks)
        pool: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if cfg.global_pool else [nn.Flatten()]
        flat = c if cfg.global_pool else c * h * w
        self.head = nn.Sequential(
            *pool,
            nn.Linear(flat, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C*H*W) flattened pixels or (B, C, H, W) -> logits (B, num_classes)
        if x.ndim == 2:
            x = x.reshape(x.shape[0], *self.cfg.image_shape)
        return self.head(self.features(x))
