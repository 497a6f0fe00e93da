"""Validate: the loaded data can be trained on; otherwise a DataError naming the problem."""

from __future__ import annotations

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.types import DataError, DataProfile, RawData


def validate(raw: RawData) -> DataProfile:
    frame = raw.frame
    if raw.target not in frame.columns:
        raise DataError(f"target column '{raw.target}' is missing")
    if len(frame) == 0:
        raise DataError(f"data from {raw.source} has no rows")
    features = raw.feature_columns
    if not features:
        raise DataError(f"data from {raw.source} has no feature columns besides the target '{raw.target}'")
    y = frame[raw.target]
    if y.isna().all():
        raise DataError(f"target column '{raw.target}' has no values")
    for col in features:
        s = frame[col]
        if s.isna().all():
            raise DataError(f"feature column '{col}' is entirely empty")
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            values = s.to_numpy(dtype="float64", na_value=np.nan)
            if np.isinf(values).any():
                raise DataError(f"feature column '{col}' holds infinite values (row {int(np.isinf(values).argmax())})")
    class_counts = None
    if raw.task == "classification":
        counts = y.dropna().astype(str).value_counts()
        if len(counts) < 2:
            raise DataError(
                f"target column '{raw.target}' needs at least 2 classes for classification, found {len(counts)}"
            )
        class_counts = {str(k): int(v) for k, v in counts.items()}
    elif not pd.api.types.is_numeric_dtype(y):
        raise DataError(f"target column '{raw.target}' must be numeric for regression, found dtype {y.dtype}")
    return DataProfile(n_rows=len(frame), n_features=len(features), task=raw.task, class_counts=class_counts)


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(raw: RawData) -> DataProfile:
    return validate(raw)
