"""Typed objects the stages hand each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

Task = Literal["classification", "regression"]


class DataError(ValueError):
    """Bad input data: the message names the column/file and what is wrong."""


class StorageError(DataError):
    """A file could not be read or written (read-only, a directory, no space): names the path and the cause.
    Not transient: a retry meets the same file system."""


# Columns every scored output has: a training feature or scored input column of one of these names would be
# overwritten (`proba_<class>` too, for classifiers).
PREDICTION_COLUMN = "prediction"
LINEAGE_COLUMNS = ("model_name", "model_version", "model_run_id")
RESERVED_COLUMNS = (PREDICTION_COLUMN, *LINEAGE_COLUMNS)


def is_output_column(name: str) -> bool:
    return name in RESERVED_COLUMNS or name.startswith("proba_")


@dataclass(frozen=True)
class RawData:
    """A loaded data set: feature columns plus the target column in one frame."""

    frame: pd.DataFrame
    target: str
    task: Task
    source: str
    digest: str  # sha256 of the frame's content, for lineage tags
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) when columns are pixels
    test_mask: np.ndarray | None = None  # rows of a predefined test split (torchvision)

    @property
    def feature_columns(self) -> list[str]:
        return [c for c in self.frame.columns if c != self.target]


@dataclass(frozen=True)
class DataProfile:
    n_rows: int
    n_features: int
    task: Task
    class_counts: dict[str, int] | None


@dataclass(frozen=True)
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    target: str
    task: Task
    image_shape: tuple[int, int, int] | None = None
    dropped_rows: int = 0  # rows dropped for a missing target


def frame_digest(frame: pd.DataFrame) -> str:
    """Content hash of a frame (values, index and column names), stable across runs."""
    import hashlib

    h = hashlib.sha256()
    h.update("\x1f".join(map(str, frame.columns)).encode())
    h.update(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
    return h.hexdigest()
