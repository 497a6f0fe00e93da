"""k-nearest neighbours on torch: `cdist` for distances, `topk` for the neighbours.

"Training" stores the training set as buffers, so the state dict is the whole model and
saves to safetensors like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from torchcycle.models.checks import is_int, raise_problems


@dataclass(frozen=True)
class KNNConfig:
    in_features: int = 0  # derived from the data
    num_classes: int = 0  # classes; 1 means regression (mean of neighbours). Derived from the data
    k: int = 5
    weights: Literal["uniform", "distance"] = "uniform"
    query_chunk: int = 1024  # queries per cdist call: bounds memory at chunk * n_train floats

    def __post_init__(self) -> None:
        # Checked on construction, so a bad config fails here with the field's name, not deep inside torch.
        problems = [
            f"{name}: must be an integer >= {least}, got {value!r}"
            for name, value, least in (
                ("in_features", self.in_features, 0),
                ("num_classes", self.num_classes, 0),
                ("k", self.k, 1),
                ("query_chunk", self.query_chunk, 1),
            )
            if not is_int(value, least)
        ]
        if self.weights not in ("uniform", "distance"):
            problems.append(f"weights: must be uniform or distance, got {self.weights!r}")
        raise_problems(problems)


class KNN(nn.Module):
    trainable = False  # fitted by memorising, not by gradient descent

    def __init__(self, cfg: KNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("train_x", torch.empty(0, cfg.in_features))
        self.register_buffer("train_y", torch.empty(0))

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> KNN:
        # x: (N, in_features); y: (N,) class indices or targets
        if x.shape[0] < self.cfg.k:
            raise ValueError(f"k={self.cfg.k} needs at least k training rows, got {x.shape[0]}")
        self.train_x = x.detach().flatten(1).float().clone()
        self.train_y = y.detach().clone()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The stored training set has its own size: resize the empty buffers before copying in.
        for name in ("train_x", "train_y"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classification: log vote shares (B, num_classes), so softmax gives the shares back.
        Regression: the neighbours' (weighted) mean target, (B, 1)."""
        if self.train_x.shape[0] == 0:
            raise RuntimeError("KNN has no training data: call fit() first")
        x = x.flatten(1).float()
        return torch.cat([self._predict(chunk) for chunk in x.split(self.cfg.query_chunk)])

    def _predict(self, q: torch.Tensor) -> torch.Tensor:
        dist = torch.cdist(q, self.train_x)  # (b, N)
        d, idx = dist.topk(self.cfg.k, dim=1, largest=False)  # (b, k) each
        w = 1.0 / (d + 1e-08) if self.cfg.weights == "distance" else torch.ones_like(d)
        neighbours = self.train_y[idx]  # (b, k)
        if self.cfg.num_classes > 1:
            votes = torch.zeros(q.shape[0], self.cfg.num_classes, device=q.device)
            votes.scatter_add_(1, neighbours.long(), w)
            shares = votes / votes.sum(dim=1, keepdim=True)
            return torch.log(shares + 1e-9)
        return ((neighbours.float() * w).sum(1) / w.sum(1)).unsqueeze(1)
