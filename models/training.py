"""The training loop: plain torch, device passed in, tracking injected as a callback."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

# torchcycle.runtime.types.Task too: models/ imports nothing of torchcycle outside models/ (pure torch layer)
Task = Literal["classification", "regression"]
# Called after every epoch with (epoch starting at 1, {"train_loss": .., "val_loss": .., ...}).
EpochCallback = Callable[[int, dict[str, float]], None]
# Called after every epoch with the full training state (see `fit`), to persist it somewhere.
CheckpointFn = Callable[[dict], None]
Schedule = torch.optim.lr_scheduler.LRScheduler


Auto = Literal["auto"]


@dataclass(frozen=True)
class TrainConfig:
    # "auto" (the defaults) size training by the train split, so a table of 100 rows gets as many optimizer steps
    # as one of a million (`resolved`); a number is taken as given
    epochs: int | Auto = "auto"  # passes over the train split, at most (early stopping may end sooner)
    batch_size: int | Auto = "auto"  # rows per optimizer step (the global batch under DDP)
    lr: float = 1e-3
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = 0.0  # SGD only
    weight_decay: float = 0.0
    patience: int | Auto = "auto"  # epochs without val-loss improvement before stopping and restoring the
    # best epoch's weights; 0 disables early stopping and keeps the final weights
    min_delta: float = 0.0  # smallest val-loss drop that counts as an improvement
    schedule: Literal["none", "cosine", "onecycle"] = "none"  # LR schedule, stepped per batch
    device: str = "auto"  # request: auto | cpu | cuda | cuda:N | mps; resolved at the edge
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = False  # torch.compile the model (pays a one-off compile for faster steps)
    # Train/val tensors are uploaded once when they fit in this fraction of free GPU memory;
    # otherwise batches stream from host memory through a DataLoader.
    gpu_data_budget: float = 0.5
    num_workers: int = 2  # DataLoader workers when streaming
    # classification: "balanced" weighs each class's loss by n_rows / (n_classes * its rows), so a rare class
    # counts as much as a common one (sklearn's class_weight="balanced"); validation loss is weighed alike
    class_weight: Literal["none", "balanced"] = "none"


# What "auto" resolves to (`resolved`): measured on real tables, bench/bench_tables.py.
AUTO_BATCH_ROWS = (16, 256)  # the batch: about a 64th of the train split, a power of two within these bounds
AUTO_STEPS = 3000  # optimizer steps the auto epoch count aims for
AUTO_EPOCHS = (20, 500)  # the auto epoch count stays within these
AUTO_PATIENCE = (10, 0.1)  # at least 10 epochs, or a tenth of the epochs planned when that is more


def resolved(cfg: TrainConfig, n_rows: int, world: int = 1, resident: bool = True) -> TrainConfig:
    """`cfg` with every "auto" made a number for a train split of `n_rows` rows on `world` ranks."""
    import math

    batch = cfg.batch_size
    if batch == "auto":
        low, high = AUTO_BATCH_ROWS
        batch = int(min(high, max(low, 2 ** round(math.log2(max(n_rows, 1) / 64)))))
    epochs = cfg.epochs
    if epochs == "auto":
        steps = steps_per_epoch(n_rows, batch, world, resident)
        epochs = int(min(AUTO_EPOCHS[1], max(AUTO_EPOCHS[0], math.ceil(AUTO_STEPS / steps))))
    patience = cfg.patience
    if patience == "auto":
        patience = max(AUTO_PATIENCE[0], math.ceil(AUTO_PATIENCE[1] * epochs))
    return replace(cfg, batch_size=batch, epochs=epochs, patience=patience)


@dataclass(frozen=True)
class TensorData:
    """Model-ready arrays: x float32 (N, F), y int64 class indices or float32 targets (N,). With `prepare`, x is
    stored in another form (uint8 pixels: a quarter of float32's memory, so 4x the images stay resident on a GPU)
    and `prepare` turns each batch into model inputs on the batch's device, for training and validation alike."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None
    class_weights: torch.Tensor | None = None  # (C,) per-class loss weights (TrainConfig.class_weight)


@dataclass(frozen=True)
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    best_epoch: int = 0
    best_val_loss: float = float("nan")
    stopped_early: bool = False
    seconds: float = 0.0
    epochs: int = 0  # planned (train.epochs, resolved)
    batch_size: int = 0  # train.batch_size, resolved


def resolve_device(request: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; anything else is taken as given."""
    if request != "auto":
        return torch.device(request)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class OutOfMemory(RuntimeError):
    """The device ran out of memory; the message says which batch size to try."""


def resolve_precision(request: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if request == "bf16" or (request == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def distributed() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def data_fits_on_device(data: TensorData, device: torch.device, budget: float) -> bool:
    if device.type != "cuda":
        return True  # CPU/MPS: the tensors are in (unified) memory already
    nbytes = sum(t.numel() * t.element_size() for t in (data.x_train, data.y_train, data.x_val, data.y_val))
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= budget * free


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def loss_fn(task: Task, out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """out: (B, C) outputs, or (B, M, C) those of M ensemble members training side by side (models/mlp.py), whose
    losses are averaged: each member learns on its own."""
    if out.dim() == 3:
        members = out.shape[1]
        if task == "classification":
            return F.cross_entropy(out.flatten(0, 1), y.repeat_interleave(members), weight=weight)
        return F.mse_loss(out.squeeze(-1), y.unsqueeze(1).expand(-1, members))
    if task == "classification":
        return F.cross_entropy(out, y, weight=weight)
    return F.mse_loss(out.squeeze(-1), y)


def balanced_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(C,) n / (C * rows of each class) of class indices `y` (a class with no rows: weight 0, it never occurs)."""
    counts = torch.bincount(y.long().cpu(), minlength=n_classes).to(torch.float32)
    return torch.where(counts > 0, len(y) / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))


def _make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # Fused on CUDA: one kernel per step for all parameters. Small models are launch-bound there
    # (measured on an H100: ~2 ms of dispatch per step at any batch size; see bench/bench_train.py).
    fused = device.type == "cuda"
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused or None
        )
    if cfg.optimizer == "adamw":  # weight decay apart from the gradient's scaling (Loshchilov & Hutter)
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def _make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Schedule | None:
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps)
    return None


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    task: Task,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    device: torch.device,
    autocast: torch.dtype | None = None,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    weight: torch.Tensor | None = None,
) -> dict[str, float]:
    model.eval()
    total = torch.zeros((), device=device)  # accumulated on the device: one host sync per evaluation
    correct = torch.zeros((), device=device, dtype=torch.long)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        if prepare is not None:
            xb = prepare(xb)
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = model(xb).float()
        total += loss_fn(task, out, yb, weight) * len(yb)
        if task == "classification":
            correct += (out.argmax(1) == yb).sum()
    n = max(len(y), 1)
    metrics = {"val_loss": total.item() / n}
    if task == "classification":
        metrics["val_accuracy"] = correct.item() / n
    return metrics


def _per_rank_batch(batch_size: int, world: int) -> int:
    return max(1, batch_size // world)  # the global batch stays cfg.batch_size


def steps_per_epoch(n_rows: int, batch_size: int, world: int, resident: bool) -> int:
    """Optimizer steps each rank takes per epoch: the batches `_train_batches` yields. Resident data is
    trimmed to a multiple of `world` (n // world rows a rank); DistributedSampler pads every rank to
    ceil(n / world) rows instead. The LR schedule is sized from this, so it must never count short."""
    if world > 1:
        n_rows = n_rows // world if resident else -(-n_rows // world)
    return max(1, -(-n_rows // _per_rank_batch(batch_size, world)))  # ceil division


def _train_batches(
    data: TensorData, cfg: TrainConfig, device: torch.device, resident: bool, gen: torch.Generator, epoch: int
):
    """(x, y) batches on `device` for one epoch; under DDP, this rank's share of every global batch.

    Resident: index slices of tensors already on the device (no DataLoader, no host copies).
    Streaming: a DataLoader with workers and pinned memory, copies overlapped with compute."""
    rank, world = distributed()
    per_rank = _per_rank_batch(cfg.batch_size, world)
    if resident:
        perm = torch.randperm(len(data.x_train), generator=gen)  # same order on every rank (same seed)
        if world > 1:  # equal shares, so every rank takes the same number of steps
            perm = perm[: len(perm) - len(perm) % world][rank::world]
        for idx in perm.to(device).split(per_rank):
            yield data.x_train[idx], data.y_train[idx]
        return
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset

    dataset = TensorDataset(data.x_train, data.y_train)
    if world > 1:  # pads every rank to ceil(N / world) rows, repeating a few: every rank takes the same steps
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=int(gen.initial_seed()))
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=gen)
    loader = DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    for xb, yb in loader:
        yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)


# ---- the phases of `fit` -------------------------------------------------------------------------
@dataclass
class _RunState:
    """What `fit` carries from epoch to epoch besides the model, optimizer and schedule."""

    epoch: int = 0  # the last finished epoch
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_loss: float = float("inf")
    best_model: dict[str, torch.Tensor] | None = None
    stopped: bool = False


def _fit_knn(
    model: nn.Module,
    data: TensorData,
    cfg: TrainConfig,
    task: Task,
    device: torch.device,
    callback: EpochCallback | None,
    start: float,
) -> FitResult:
    """KNN: "training" is memorising the train split; one evaluation is its only epoch."""
    x = data.x_train.to(device)
    model.fit(data.prepare(x) if data.prepare is not None else x, data.y_train.to(device))
    metrics = _evaluate(model, task, data.x_val, data.y_val, cfg.batch_size, device, prepare=data.prepare)
    if callback:
        callback(1, metrics)
    return FitResult([metrics], 1, metrics["val_loss"], False, time.perf_counter() - start, 1, cfg.batch_size)


def _wrap_model(model: nn.Module, cfg: TrainConfig, device: torch.device, world: int) -> nn.Module:
    """The module the steps call: `model` in channels_last for convolutions on CUDA, under DDP when
    distributed, compiled when asked. Its parameters stay `model`'s, so the optimizer takes those."""
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)  # NHWC: what tensor cores want for convolutions
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    return net


def _restore(
    resume: dict,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Schedule | None,
    gen: torch.Generator,
    device: torch.device,
) -> _RunState:
    """Load a `_checkpoint_state` back: weights, optimizer, schedule and every RNG the loop draws from."""
    model.load_state_dict(resume["model"])
    opt.load_state_dict(resume["optimizer"])
    if sched is not None and resume.get("scheduler") is not None:
        sched.load_state_dict(resume["scheduler"])
    gen.set_state(resume["shuffle_rng"])
    torch.set_rng_state(resume["torch_rng"])  # dropout masks continue the same sequence
    if device.type == "cuda" and resume.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(resume["cuda_rng"], device)
    return _RunState(
        epoch=resume["epoch"],
        history=list(resume["history"]),
        best_epoch=resume["best_epoch"],
        best_loss=resume["best_loss"],
        best_model=resume.get("best_model"),
        stopped=resume["stopped"],
    )


def _train_epoch(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Schedule | None,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    task: Task,
    device: torch.device,
    autocast: torch.dtype | None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    weight: torch.Tensor | None = None,
) -> float:
    """One pass over `batches`, a step (and a schedule step) per batch; the mean training loss. `transform`
    turns each batch into (augmented) model inputs on its device before the forward pass."""
    net.train()
    running = torch.zeros((), device=device)  # summed on the device: no per-step host sync
    seen = 0
    for xb, yb in batches:
        if transform is not None:
            xb = transform(xb)
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = net(xb)
        loss = loss_fn(task, out.float(), yb, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        running += loss.detach() * len(yb)
        seen += len(yb)
    return running.item() / max(seen, 1)


def _record_epoch(run: _RunState, epoch: int, metrics: dict[str, float], model: nn.Module, cfg: TrainConfig) -> None:
    """Early-stopping bookkeeping: record `epoch`, keep the best weights, stop after `patience` without gain."""
    run.epoch = epoch
    run.history.append(metrics)
    if metrics["val_loss"] < run.best_loss - cfg.min_delta:
        run.best_loss, run.best_epoch = metrics["val_loss"], epoch
        run.best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    elif cfg.patience and epoch - run.best_epoch >= cfg.patience:
        run.stopped = True


def _agree_to_stop(stopped: bool, device: torch.device, world: int) -> bool:
    """Under DDP rank 0 decides, so no rank waits in a collective the others left."""
    if world == 1:
        return stopped
    flag = torch.tensor([int(stopped)], device=device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def _checkpoint_state(
    run: _RunState,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Schedule | None,
    gen: torch.Generator,
    device: torch.device,
) -> dict:
    """Everything `_restore` needs to continue after `run.epoch` exactly as if never interrupted."""
    return {
        "epoch": run.epoch,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if sched is not None else None,
        "shuffle_rng": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "history": run.history,
        "best_epoch": run.best_epoch,
        "best_loss": run.best_loss,
        "best_model": run.best_model,
        "stopped": run.stopped,
    }


def _on_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _EpochProgress:
    """Epoch progress on stderr: a tqdm bar on a terminal; elsewhere (worker logs, CI, a pipe) one plain
    line per epoch, so logs get no carriage-return redraws. Silent when disabled."""

    def __init__(self, epochs: range, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        on_terminal = enabled and _on_terminal(sys.stderr)
        self.bar = tqdm(epochs, desc="train", unit="epoch", leave=False) if on_terminal else None
        self.epochs = self.bar if self.bar is not None else epochs

    def __iter__(self):
        return iter(self.epochs)

    def show(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()})
        elif self.enabled:
            values = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            print(f"epoch {epoch}/{self.total} {values}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _compose(*fns: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    chain = [f for f in fns if f is not None]
    if not chain:
        return None

    def apply(x: torch.Tensor) -> torch.Tensor:
        for f in chain:
            x = f(x)
        return x

    return apply


def _out_of_memory(device: torch.device, cfg: TrainConfig) -> OutOfMemory:
    return OutOfMemory(
        f"{device} ran out of memory at train.batch_size={cfg.batch_size}: "
        f"try --set train.batch_size={max(1, cfg.batch_size // 2)}"
    )


def _finish(model: nn.Module, cfg: TrainConfig, device: torch.device, run: _RunState, start: float) -> FitResult:
    if cfg.patience and run.best_model is not None:
        model.load_state_dict(run.best_model)  # early stopping ends on the best epoch's weights
    if device.type == "cuda":
        model.to(memory_format=torch.contiguous_format)  # saved weights in the default layout
    return FitResult(
        run.history, run.best_epoch, run.best_loss, run.stopped, time.perf_counter() - start, cfg.epochs, cfg.batch_size
    )


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
    checkpoint: CheckpointFn | None = None,
    resume: dict | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FitResult:
    """Train `model` in place. With early stopping it ends on its best validation epoch's weights.

    Under torch.distributed (torchrun), the model is wrapped in DDP and each rank trains on its share
    of every batch; all ranks end with the same weights.

    `checkpoint` receives the whole state after every epoch (model, optimizer, scheduler, RNG and
    shuffling state, history, best epoch); passing such a state back as `resume` continues from the
    next epoch and, on the same device, ends exactly where an uninterrupted run would.

    `progress`: a bar on a terminal, one line per epoch on a non-terminal stderr (rank 0 only).
    `augment`: applied to every training batch on the device (models.augment), never to validation."""
    start = time.perf_counter()
    rank, world = distributed()
    model.to(device)
    resident = data_fits_on_device(data, device, cfg.gpu_data_budget)
    if resident:
        moved = (t.to(device) for t in (data.x_train, data.y_train, data.x_val, data.y_val))
        data = TensorData(*moved, prepare=data.prepare, class_weights=data.class_weights)
    cfg = resolved(cfg, len(data.x_train), world, resident)
    weight = data.class_weights.to(device) if data.class_weights is not None and task == "classification" else None
    if not getattr(model, "trainable", True):
        return _fit_knn(model, data, cfg, task, device, callback, start)

    autocast = resolve_precision(cfg.precision, device)
    net = _wrap_model(model, cfg, device, world)
    opt = _make_optimizer(model, cfg, device)
    sched = _make_schedule(opt, cfg, steps_per_epoch(len(data.x_train), cfg.batch_size, world, resident) * cfg.epochs)
    gen = torch.Generator().manual_seed(seed)  # shuffling order depends on the seed only
    run = _RunState() if resume is None else _restore(resume, model, opt, sched, gen, device)
    epochs = range(run.epoch + 1, cfg.epochs + 1) if not run.stopped else range(0)
    bar = _EpochProgress(epochs, cfg.epochs, enabled=progress and rank == 0)
    per_batch = _compose(data.prepare, augment)  # stored form -> model inputs -> augmented (training only)
    try:
        for epoch in bar:
            batches = _train_batches(data, cfg, device, resident, gen, epoch)
            train_loss = _train_epoch(net, opt, sched, batches, task, device, autocast, per_batch, weight)
            val_bs = max(cfg.batch_size, 1024)
            val = _evaluate(model, task, data.x_val, data.y_val, val_bs, device, autocast, data.prepare, weight)
            metrics = {"train_loss": train_loss, **val}
            if not np.isfinite(train_loss):
                raise FloatingPointError(f"training diverged at epoch {epoch} (loss {train_loss}): lower train.lr")
            _record_epoch(run, epoch, metrics, model, cfg)
            if callback:
                callback(epoch, metrics)
            bar.show(epoch, metrics)
            run.stopped = _agree_to_stop(run.stopped, device, world)
            if checkpoint is not None and rank == 0:
                checkpoint(_checkpoint_state(run, model, opt, sched, gen, device))
            if run.stopped:
                break
    except torch.OutOfMemoryError:
        raise _out_of_memory(device, cfg) from None
    finally:
        bar.close()
    return _finish(model, cfg, device, run, start)
