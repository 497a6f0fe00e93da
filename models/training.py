"""The training loop: plain torch, device passed in, tracking injected as a callback."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

Task = Literal["classification", "regression"]
# Called after every epoch with (epoch starting at 1, {"train_loss": .., "val_loss": .., ...}).
EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.0  # SGD only
    weight_decay: float = 0.0
    patience: int = 5  # epochs without val-loss improvement before stopping and restoring the
    # best epoch's weights; 0 disables early stopping and keeps the final weights
    min_delta: float = 0.0  # smallest val-loss drop that counts as an improvement
    schedule: Literal["none", "cosine", "onecycle"] = "none"  # LR schedule, stepped per batch
    device: str = "auto"  # request: auto | cpu | cuda | cuda:N | mps; resolved at the edge


@dataclass(frozen=True)
class TensorData:
    """Model-ready arrays: x float32 (N, F), y int64 class indices or float32 targets (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


@dataclass(frozen=True)
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    best_epoch: int = 0
    best_val_loss: float = float("nan")
    stopped_early: bool = False
    seconds: float = 0.0


def resolve_device(request: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; anything else is taken as given."""
    if request != "auto":
        return torch.device(request)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def loss_fn(task: Task, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(out, y)
    return F.mse_loss(out.squeeze(-1), y)


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps)
    return None


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 4096) -> torch.Tensor:
    """Raw model outputs (logits, or (N, 1) for regression) on CPU, computed in batches."""
    model.eval()
    outs = [model(chunk.to(device)).float().cpu() for chunk in x.split(batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def _evaluate(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict[str, float]:
    model.eval()
    total, correct, n = 0.0, 0, 0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
        out = model(xb)
        total += loss_fn(task, out, yb).item() * len(yb)
        if task == "classification":
            correct += (out.argmax(1) == yb).sum().item()
        n += len(yb)
    metrics = {"val_loss": total / max(n, 1)}
    if task == "classification":
        metrics["val_accuracy"] = correct / max(n, 1)
    return metrics


def fit(
    model: nn.Module,
    data: TensorData,
    cfg: TrainConfig,
    *,
    task: Task,
    device: torch.device,
    seed: int = 0,
    callback: EpochCallback | None = None,
    progress: bool = True,
) -> FitResult:
    """Train `model` in place. With early stopping it ends on its best validation epoch's weights."""
    start = time.perf_counter()
    model.to(device)
    # The whole (small) data set lives on the device: batches are index slices, no host copies.
    x_tr, y_tr = data.x_train.to(device), data.y_train.to(device)
    x_va, y_va = data.x_val.to(device), data.y_val.to(device)

    if not getattr(model, "trainable", True):  # KNN: "training" is memorising the train split
        model.fit(x_tr, y_tr)
        metrics = _evaluate(model, task, x_va, y_va, cfg.batch_size)
        if callback:
            callback(1, metrics)
        return FitResult([metrics], 1, metrics["val_loss"], False, time.perf_counter() - start)

    opt = _make_optimizer(model, cfg)
    steps_per_epoch = max(1, -(-len(x_tr) // cfg.batch_size))  # ceil division
    sched = _make_schedule(opt, cfg, steps_per_epoch * cfg.epochs)
    gen = torch.Generator().manual_seed(seed)  # shuffling order depends on the seed only
    best_loss, best_epoch, best_state = float("inf"), 0, None
    history: list[dict[str, float]] = []
    stopped = False
    bar = tqdm(range(1, cfg.epochs + 1), desc="train", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen).to(device)
        running, seen = 0.0, 0
        for idx in perm.split(cfg.batch_size):
            loss = loss_fn(task, model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            running += loss.item() * len(idx)
            seen += len(idx)
        metrics = {"train_loss": running / max(seen, 1), **_evaluate(model, task, x_va, y_va, cfg.batch_size)}
        if not np.isfinite(metrics["train_loss"]):
            raise FloatingPointError(
                f"training diverged at epoch {epoch} (loss {metrics['train_loss']}): lower train.lr"
            )
        history.append(metrics)
        if callback:
            callback(epoch, metrics)
        bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()})
        if metrics["val_loss"] < best_loss - cfg.min_delta:
            best_loss, best_epoch = metrics["val_loss"], epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif cfg.patience and epoch - best_epoch >= cfg.patience:
            stopped = True
            break
    if cfg.patience and best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(history, best_epoch, best_loss, stopped, time.perf_counter() - start)
