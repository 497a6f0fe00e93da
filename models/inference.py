"""Inference for a built model: what a logged model runs, so it imports torch and nothing else."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 4096) -> torch.Tensor:
    """Raw model outputs (logits, or (N, 1) for regression) on CPU, computed in batches."""
    model.eval()
    outs = [model(chunk.to(device)).float().cpu() for chunk in x.split(batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)
