"""Validate: the loaded data can be trained on; otherwise a DataError naming the problem."""

from __future__ import annotations

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.contract import value_problems
from tasks.types import DataError, DataProfile, RawData


def validate(raw: RawData) -> DataProfile:
    """Every problem found, reported at once in one DataError (lazy validation)."""
    frame = raw.frame
    if raw.target not in frame.columns:
        raise DataError(f"target column '{raw.target}' is missing")
    if len(frame) == 0:
        raise DataError(f"data from {raw.source} has no rows")
    features = raw.feature_columns
    if not features:
        raise DataError(f"data from {raw.source} has no feature columns besides the target '{raw.target}'")
    problems = value_problems(frame, features)
    y = frame[raw.target]
    class_counts = None
    if y.isna().all():
        problems.append(f"target column '{raw.target}' has no values")
    elif raw.task == "classification":
        counts = y.dropna().astype(str).value_counts()
        if len(counts) < 2:
            problems.append(
                f"target column '{raw.target}' needs at least 2 classes for classification, found {len(counts)}"
            )
        class_counts = {str(k): int(v) for k, v in counts.items()}
    elif not pd.api.types.is_numeric_dtype(y):
        problems.append(f"target column '{raw.target}' must be numeric for regression, found dtype {y.dtype}")
    if problems:
        raise DataError(f"data from {raw.source}: {len(problems)} problem(s): " + "; ".join(problems))
    return DataProfile(n_rows=len(frame), n_features=len(features), task=raw.task, class_counts=class_counts)


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(raw: RawData) -> DataProfile:
    return validate(raw)
