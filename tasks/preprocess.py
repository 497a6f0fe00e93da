"""Preprocess: drop unlabeled rows and split train/val/test (seeded, stratified for classes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sklearn.model_selection import train_test_split

from torchcycle.config import DataConfig
from torchcycle.errors import DataError
from torchcycle.runtime.types import Task
from torchcycle.tasks.ingest import RawData


@dataclass(frozen=True)
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    target: str
    task: Task
    image_shape: tuple[int, int, int] | None = None
    dropped_rows: int = 0  # rows dropped for a missing target
    # images: sources: each split's decoded images, uint8 (N, C, H, W), row for row with its frame
    train_images: np.ndarray | None = None
    val_images: np.ndarray | None = None
    test_images: np.ndarray | None = None

    def named(self) -> dict[str, pd.DataFrame]:
        """The three splits by the names MLflow's data set lineage shows."""
        return {"train": self.train, "validation": self.val, "test": self.test}


def _split(
    frame: pd.DataFrame, size: float, stratify: pd.Series | None, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    if size == 0:  # toy data: the held-out part is the training rows themselves
        return frame, frame
    try:
        a, b = train_test_split(frame, test_size=size, random_state=seed, stratify=stratify)
    except ValueError as err:  # e.g. a class with a single row cannot be stratified
        if stratify is None:
            raise DataError(f"cannot split {len(frame)} rows: {err}") from None
        a, b = train_test_split(frame, test_size=size, random_state=seed)
    return a, b


def preprocess(raw: RawData, cfg: DataConfig, seed: int) -> Splits:
    """Never mutates raw.frame: every step works on copies."""
    labeled = raw.frame[raw.frame[raw.target].notna()]
    dropped = len(raw.frame) - len(labeled)
    if len(labeled) == 0:
        raise DataError(f"no rows with a value in target column '{raw.target}'")
    strat = (lambda f: f[raw.target].astype(str)) if raw.task == "classification" else (lambda f: None)
    if raw.test_mask is not None:  # predefined split (torchvision): respect it
        mask = np.asarray(raw.test_mask)[raw.frame[raw.target].notna().to_numpy()]
        rest, test = labeled[~mask], labeled[mask]
    else:
        rest, test = _split(labeled, cfg.test_size, strat(labeled), seed)
    val_frac = cfg.val_size / (1 - cfg.test_size) if cfg.val_size else 0.0
    train, val = _split(rest, val_frac, strat(rest), seed)
    # the frames keep raw.frame's row positions as their index until reset below: the images follow them
    pick = (lambda f: raw.images[f.index.to_numpy()]) if raw.images is not None else (lambda f: None)
    return Splits(
        train_images=pick(train),
        val_images=pick(val),
        test_images=pick(test),
        train=train.reset_index(drop=True),
        val=val.reset_index(drop=True),
        test=test.reset_index(drop=True),
        target=raw.target,
        task=raw.task,
        image_shape=raw.image_shape,
        dropped_rows=dropped,
    )


@task(name="preprocess", cache_policy=NO_CACHE)
def preprocess_task(raw: RawData, cfg: DataConfig, seed: int) -> Splits:
    splits = preprocess(raw, cfg, seed)
    if splits.dropped_rows:  # said, not silent: a column of missing labels is worth knowing about
        get_run_logger().warning(
            "dropped %d of %d rows with no value in target column '%s'", splits.dropped_rows, len(raw.frame), raw.target
        )
    return splits
