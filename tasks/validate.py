"""Validate: the loaded data can be trained on; otherwise a DataError naming the problem."""

from __future__ import annotations

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from torchcycle.errors import DataError
from torchcycle.runtime.contract import value_problems
from torchcycle.runtime.types import is_output_column
from torchcycle.tasks.ingest import RawData


def unsupported_features(frame: pd.DataFrame, features: list[str]) -> dict[str, str]:
    """Feature columns the pipeline cannot encode, by name: dates and times (convert them to numbers first:
    epoch seconds, day of week...), and values that are neither numbers, booleans nor text (lists, bytes)."""
    problems: dict[str, str] = {}
    for col in features:
        s = frame[col]
        if pd.api.types.is_datetime64_any_dtype(s) or isinstance(s.dtype, pd.PeriodDtype):
            problems[col] = (
                f"column '{col}' holds dates/times ({s.dtype}): convert it to numbers (e.g. epoch seconds) or drop it"
            )
        elif pd.api.types.is_timedelta64_dtype(s):
            problems[col] = f"column '{col}' holds durations ({s.dtype}): convert it to seconds or drop it"
        elif pd.api.types.is_complex_dtype(s):
            problems[col] = f"column '{col}' holds complex numbers: not a supported feature type"
        elif s.dtype == object:
            odd = next((v for v in s.dropna() if not isinstance(v, str | bool | int | float)), None)
            if odd is not None:
                problems[col] = (
                    f"column '{col}' holds {type(odd).__name__} values (e.g. {str(odd)[:40]!r}): "
                    "features must be numbers, booleans or text"
                )
    return problems


def reserved_features(features: list[str]) -> list[str]:
    """Names the scored output writes itself: a model trained on them could never score a file."""
    taken = [c for c in features if is_output_column(str(c))]
    if not taken:
        return []
    return [
        f"feature column(s) {', '.join(map(repr, taken))} clash with the output's own columns "
        "(prediction, proba_<class>, model_name, model_version, model_run_id): rename them"
    ]


def validate(raw: RawData) -> None:
    """Every problem found, reported at once in one DataError (lazy validation)."""
    frame = raw.frame
    if raw.target not in frame.columns:
        raise DataError(f"target column '{raw.target}' is missing")
    if len(frame) == 0:
        raise DataError(f"data from {raw.source} has no rows")
    features = raw.feature_columns
    if raw.images is not None:  # every image was decoded at ingest: only the labels are left to check
        _check_labels(raw, reserved_features(features))
        return
    if not features:
        raise DataError(f"data from {raw.source} has no feature columns besides the target '{raw.target}'")
    unsupported = unsupported_features(frame, features)
    problems = [*reserved_features(features), *unsupported.values()]
    problems += value_problems(frame, [c for c in features if c not in unsupported])
    _check_labels(raw, problems)


def _check_labels(raw: RawData, problems: list[str]) -> None:
    """The target's problems added to `problems`; one DataError with all of them, if any."""
    y = raw.frame[raw.target]
    if y.isna().all():
        problems.append(f"target column '{raw.target}' has no values")
    elif raw.task == "classification":
        counts = y.dropna().astype(str).value_counts()
        if len(counts) < 2:
            problems.append(
                f"target column '{raw.target}' needs at least 2 classes for classification, found {len(counts)}"
            )
    elif not pd.api.types.is_numeric_dtype(y):
        problems.append(f"target column '{raw.target}' must be numeric for regression, found dtype {y.dtype}")
    if problems:
        raise DataError(f"data from {raw.source}: {len(problems)} problem(s): " + "; ".join(problems))


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(raw: RawData) -> None:
    validate(raw)
