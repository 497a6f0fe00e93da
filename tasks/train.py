"""Train: build the configured model and fit it. No retries: a failed fit is a bug, not a blip."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from torchcycle.checkpoint import load_checkpoint, save_checkpoint
from torchcycle.config import ModelSpec, TrainSection
from torchcycle.models import build_model, make_config
from torchcycle.models.augment import augmenter, normaliser
from torchcycle.models.mlp import binned_inputs
from torchcycle.models.training import (
    EpochCallback,
    FitResult,
    TensorData,
    balanced_weights,
    distributed,
    fit,
    resolve_device,
    seed_everything,
)
from torchcycle.tasks.features import Prepared


@dataclass(frozen=True)
class TrainedModel:
    kind: str
    config: Any  # the model's frozen config dataclass
    state_dict: dict[str, torch.Tensor]  # CPU tensors
    fit: FitResult
    device: str

    def resolved_params(self) -> dict[str, str]:
        """What the config's "auto" settings became for this data: run params beside the config's own."""
        out = {"train.resolved_epochs": str(self.fit.epochs), "train.resolved_batch_size": str(self.fit.batch_size)}
        for key in ("bins", "members"):
            if hasattr(self.config, key):
                out[f"model.resolved_{key}"] = str(getattr(self.config, key))
        return out

    def build(self) -> torch.nn.Module:
        model = build_model(self.kind, self.config)
        model.load_state_dict(self.state_dict)
        return model.eval()


def train(
    prepared: Prepared,
    spec: ModelSpec,
    cfg: TrainSection,
    *,
    seed: int,
    device: torch.device,
    callback: EpochCallback | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
) -> TrainedModel:
    """Build and fit the model. With `checkpoint`, the state is saved there after every epoch and a
    run finding a state there resumes from it."""
    seed_everything(seed)  # before building: weight init is part of the run
    pipe = prepared.pipeline
    tabular = spec.kind == "mlp" and pipe.image_shape is None and pipe.image_column is None
    binned = binned_inputs(torch.from_numpy(prepared.x_train)) if tabular else ()
    model_cfg = make_config(
        spec.kind,
        spec.params,
        in_features=prepared.n_features,
        n_outputs=prepared.n_outputs,
        image_shape=prepared.pipeline.image_shape,
        n_rows=len(prepared.x_train),
        binned=binned,
    )
    model = build_model(spec.kind, model_cfg)
    if getattr(model_cfg, "bins", 0):  # input encodings fitted on the train split's inputs (models/mlp.py)
        model.fit_encoding(torch.from_numpy(prepared.model_inputs(prepared.x_train)))
    y_dtype = torch.long if prepared.pipeline.task == "classification" else torch.float32
    augment = prepare = None
    if pipe.image_column is not None and pipe.image_shape is not None:  # uint8 pixels, normalised per batch
        mean, std = pipe.channel_mean or [0.0], pipe.channel_std or [1.0]
        prepare = normaliser(pipe.image_shape, mean, std)
        if prepared.augment is not None:
            augment = augmenter(prepared.augment, pipe.image_shape, mean, std)
    y_train = torch.tensor(prepared.y_train, dtype=y_dtype)
    weights = None
    if cfg.class_weight == "balanced" and pipe.task == "classification":
        weights = balanced_weights(y_train, prepared.n_outputs)
    data = TensorData(
        torch.tensor(prepared.x_train),
        y_train,
        torch.tensor(prepared.x_val),
        torch.tensor(prepared.y_val, dtype=y_dtype),
        prepare=prepare,
        class_weights=weights,
    )
    result = fit(
        model,
        data,
        cfg.to_train_config(),
        task=prepared.pipeline.task,
        device=device,
        seed=seed,
        callback=callback,
        progress=progress,
        checkpoint=(lambda st: save_checkpoint(checkpoint, st)) if checkpoint is not None else None,
        resume=load_checkpoint(checkpoint) if checkpoint is not None else None,
        augment=augment,
    )
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return TrainedModel(spec.kind, model_cfg, state, result, str(device))


@task(name="train", cache_policy=NO_CACHE)
def train_task(
    prepared: Prepared,
    spec: ModelSpec,
    cfg: TrainSection,
    seed: int,
    callback: EpochCallback | None = None,
    checkpoint: Path | None = None,
) -> TrainedModel:
    device = resolve_device(cfg.device)
    logger = get_run_logger()
    logger.info(
        "training %s on %s (%d rows, %d features)", spec.kind, device, len(prepared.x_train), prepared.n_features
    )
    if distributed()[1] > 1:
        checkpoint = None  # resuming one rank of a DDP job would desynchronise it: DDP runs start over
    saved = load_checkpoint(checkpoint) if checkpoint is not None else None
    if saved is not None:
        logger.info("resuming from checkpoint %s after epoch %d", checkpoint, saved["epoch"])
    trained = train(prepared, spec, cfg, seed=seed, device=device, callback=callback, checkpoint=checkpoint)
    fit = trained.fit
    logger.info(
        "best epoch %d of %d (planned %d, batch %d rows), %.1fs",
        fit.best_epoch,
        len(fit.history),
        fit.epochs,
        fit.batch_size,
        fit.seconds,
    )
    return trained
