"""Multi-layer perceptron for tabular features or flattened images.

Two things make it hold its own against gradient-boosted trees on real tables (bench/bench_tables.py):
- each input column is also encoded piecewise-linearly over quantile bins of the train split (`bins`; Gorishniy
  et al., "On Embeddings for Numerical Features in Tabular Deep Learning", 2022): thresholds such as
  "expenditure > 0" become one unit's step instead of a sharp turn the network must learn;
- on small tables, several independently initialised MLPs train side by side on the same batches and their
  predictions are averaged (`members`): a deep ensemble, whose variance is what a few hundred rows cannot pin.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from torchcycle.models.checks import derived_problems, is_int, raise_problems

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
AUTO_BINS = 16  # bins per input column of a table (images: none, pixels are no thresholds)
AUTO_MEMBERS = (5, 5_000)  # 5 members for train splits of up to 5,000 rows, 1 above
MAX_BINS, MAX_MEMBERS = 256, 32
QUANTILE_ROWS = 100_000  # bin edges from at most this many train rows (evenly spaced)


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 0  # derived from the data
    out_features: int = 0  # classes, or 1 for regression; derived from the data
    hidden: tuple[int, ...] = (256, 256)
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    dropout: float = 0.2  # fraction of activations zeroed while training, in [0, 1)
    # each input also as `bins` piecewise-linear parts over its train-split quantiles; 0: the inputs as they are;
    # auto: 16 for tables, 0 for images
    bins: int | Literal["auto"] = "auto"
    # MLPs trained side by side, predictions averaged; auto: 5 for tables of up to 5,000 train rows, else 1
    members: int | Literal["auto"] = "auto"
    # the inputs that get bins: those with more than two values in the train split (not one-hot columns or flags);
    # derived from the data (`binned_inputs`)
    binned: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Checked on construction, so a bad config fails here with the field's name, not deep inside torch.
        problems = derived_problems(self, "in_features", "out_features")
        if not all(is_int(i, least=0) and i < max(self.in_features, 1) for i in self.binned):
            problems.append(f"binned: input indices must be integers in [0, in_features), got {list(self.binned)[:5]}")
        if not all(is_int(h, least=1) for h in self.hidden):
            problems.append(f"hidden: layer sizes must be integers >= 1, got {list(self.hidden)}")
        if self.activation not in _ACTIVATIONS:
            problems.append(f"activation: must be one of {', '.join(_ACTIVATIONS)}, got {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:  # nan fails this too
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.bins != "auto" and not (is_int(self.bins, least=0) and self.bins <= MAX_BINS):
            problems.append(f"bins: must be auto or an integer from 0 to {MAX_BINS}, got {self.bins!r}")
        if self.members != "auto" and not (is_int(self.members, least=1) and self.members <= MAX_MEMBERS):
            problems.append(f"members: must be auto or an integer from 1 to {MAX_MEMBERS}, got {self.members!r}")
        raise_problems(problems)

    def resolved(self, *, image_shape: tuple[int, int, int] | None, n_rows: int | None) -> MLPConfig:
        """Every "auto" made a number for the data: images or a table, and the train split's rows."""
        bins = self.bins if self.bins != "auto" else (0 if image_shape is not None else AUTO_BINS)
        members = self.members
        if members == "auto":
            small = n_rows is not None and n_rows <= AUTO_MEMBERS[1]
            members = AUTO_MEMBERS[0] if small and image_shape is None else 1
        return replace(self, bins=bins, members=members)


def _sample(x: torch.Tensor) -> torch.Tensor:
    """At most QUANTILE_ROWS rows of x, evenly spaced (no randomness), as float32 (N, F) on the CPU."""
    x = x.flatten(1).float().cpu()
    return x[:: max(1, math.ceil(len(x) / QUANTILE_ROWS))]


def binned_inputs(x: torch.Tensor) -> tuple[int, ...]:
    """The inputs of x (N, F) worth bins: more than two distinct values (one-hot columns and flags are not)."""
    x = _sample(x)
    return tuple(i for i in range(x.shape[1]) if torch.unique(x[:, i]).numel() > 2)


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        if cfg.bins == "auto" or cfg.members == "auto":
            cfg = cfg.resolved(image_shape=None, n_rows=None)
        self.cfg = cfg
        bins, members = int(cfg.bins), int(cfg.members)
        binned = list(cfg.binned) if bins else []
        width = cfg.in_features + len(binned) * bins
        if binned:
            # bin j of binned input i covers [low[i, j], low[i, j] + span[i, j]); an unused bin has span inf (0)
            self.register_buffer("index", torch.tensor(binned, dtype=torch.long))
            self.register_buffer("low", torch.zeros(len(binned), bins))
            self.register_buffer("span", torch.full((len(binned), bins), math.inf))
        if members == 1:  # a plain Sequential: the state dict of models made before members existed
            layers: list[nn.Module] = []
            for h in cfg.hidden:
                layers += [nn.Linear(width, h), _ACTIVATIONS[cfg.activation]()]
                if cfg.dropout > 0:
                    layers.append(nn.Dropout(cfg.dropout))
                width = h
            layers.append(nn.Linear(width, cfg.out_features))
            self.net = nn.Sequential(*layers)
            return
        sizes = [width, *cfg.hidden, cfg.out_features]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for n_in, n_out in itertools.pairwise(sizes):
            bound = 1 / math.sqrt(n_in)  # nn.Linear's default initialisation, drawn for every member
            self.weights.append(nn.Parameter(torch.empty(members, n_in, n_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(members, 1, n_out).uniform_(-bound, bound)))
        self.act = _ACTIVATIONS[cfg.activation]()
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @torch.no_grad()
    def fit_encoding(self, x: torch.Tensor) -> MLP:
        """Bin edges from the train split's inputs x (N, in_features): `bins` quantile bins per binned column (a
        column of few values gets as many bins as it has values)."""
        if not hasattr(self, "index"):
            return self
        x = _sample(x)[:, self.index.cpu()]
        q = torch.linspace(0, 1, int(self.cfg.bins) + 1)
        low = torch.zeros_like(self.low, device="cpu")
        span = torch.full_like(self.span, math.inf, device="cpu")
        for i in range(x.shape[1]):
            edges = torch.unique(torch.quantile(x[:, i], q))  # sorted, duplicates (repeated values) once
            n = len(edges) - 1
            low[i, :n] = edges[:-1]
            span[i, :n] = edges[1:] - edges[:-1]
        self.low.copy_(low)
        self.span.copy_(span)
        return self

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, F) -> (B, F + binned * bins): the inputs, then each binned one's bins (0 below a bin, 1 above,
        # linear inside)
        if not hasattr(self, "index"):
            return x
        parts = ((x[:, self.index].unsqueeze(-1) - self.low) / self.span).clamp(0, 1)  # (B, binned, bins)
        return torch.cat([x, parts.flatten(1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_features), or (B, C, H, W) images which are flattened -> (B, out_features). With members, in
        # training: (B, members, out_features), each member's own output, so each learns on its own (loss_fn);
        # otherwise their average: of class probabilities, returned as log-probabilities (logits of the same
        # softmax), or of values for regression (out_features 1).
        h = self._encode(x.flatten(1))
        if int(self.cfg.members) == 1:
            return self.net(h)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            # (B, F) or (members, B, F) @ (members, F, H) -> (members, B, H)
            h = torch.matmul(h, w) + b
            if i < last:
                h = self.drop(self.act(h))
        out = h.transpose(0, 1)  # (B, members, out_features)
        if self.training:
            return out
        if self.cfg.out_features == 1:
            return out.mean(dim=1)
        return torch.logsumexp(torch.log_softmax(out.float(), dim=-1), dim=1) - math.log(out.shape[1])
