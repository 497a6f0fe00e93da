"""Preprocess: drop unlabeled rows, decide the feature columns, split train/val/test (seeded, stratified for
classes)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sklearn.model_selection import train_test_split

from torchcycle.config import DataConfig
from torchcycle.errors import DataError
from torchcycle.runtime.cells import Kind
from torchcycle.runtime.types import Task
from torchcycle.tasks.ingest import RawData
from torchcycle.tasks.validate import left_out_columns


@dataclass(frozen=True)
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    target: str
    task: Task
    image_shape: tuple[int, int, int] | None = None
    dropped_rows: int = 0  # rows dropped for a missing target
    unlabeled: pd.DataFrame | None = None  # those rows' features: part of the table the contract describes
    kinds: dict[str, Kind] = field(default_factory=dict)  # each column's kind (torchcycle.runtime.cells)
    left_out: dict[str, str] = field(default_factory=dict)  # columns no feature, and why (tasks/validate.py)
    test_rows: np.ndarray | None = None  # the test split's rows: positions in the table as read (file row order)
    # images: sources: each split's decoded images, uint8 (N, C, H, W), row for row with its frame
    train_images: np.ndarray | None = None
    val_images: np.ndarray | None = None
    test_images: np.ndarray | None = None

    def named(self) -> dict[str, pd.DataFrame]:
        """The three splits by the names MLflow's data set lineage shows."""
        return {"train": self.train, "validation": self.val, "test": self.test}

    def facts(self) -> tuple[dict[str, str], dict[str, float], dict[str, dict]]:
        """What preprocessing decided, for the run: params, metrics and `columns.json` (each column's kind, and
        the columns left out of the features with why)."""
        left_out = "; ".join(f"{c} ({why})" for c, why in self.left_out.items())
        features = [c for c in self.train.columns if c != self.target and c not in self.left_out]
        document = {
            "target": self.target,
            "features": {c: self.kinds.get(c, "") for c in features},
            "left_out": self.left_out,
            "rows_unlabeled": self.dropped_rows,
        }
        return (
            {"data.left_out": left_out or "-"},
            {"rows_unlabeled": float(self.dropped_rows)},
            {"columns.json": document},
        )


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
    has_label = raw.frame[raw.target].notna()
    labeled = raw.frame[has_label]
    dropped = len(raw.frame) - len(labeled)
    if len(labeled) == 0:
        raise DataError(f"no rows with a value in target column '{raw.target}'")
    y = labeled[raw.target]
    if raw.task == "classification" and y.dtype.kind == "f" and bool((y == y.round()).all()):
        # whole-number labels read as floats only because some were missing: the classes are 0, 1, not 0.0, 1.0
        labeled = labeled.assign(**{raw.target: y.astype(np.int64)})
    left_out = {c: "left out by data.ignore" for c in raw.left_out}
    if raw.image_shape is None:
        left_out.update(left_out_columns(raw.frame, raw.feature_columns, raw.kinds))
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
        unlabeled=raw.frame[~has_label].drop(columns=[raw.target]).reset_index(drop=True),
        test_rows=test.index.to_numpy(copy=True),
        kinds=dict(raw.kinds),
        left_out=left_out,
    )


@task(name="preprocess", cache_policy=NO_CACHE)
def preprocess_task(raw: RawData, cfg: DataConfig, seed: int) -> Splits:
    splits = preprocess(raw, cfg, seed)
    logger = get_run_logger()
    if splits.dropped_rows:  # said, not silent: a column of missing labels is worth knowing about
        logger.warning(
            "dropped %d of %d rows with no value in target column '%s'", splits.dropped_rows, len(raw.frame), raw.target
        )
    if splits.left_out:
        logger.info("left out of the features: %s", "; ".join(f"'{c}' ({why})" for c, why in splits.left_out.items()))
    return splits
