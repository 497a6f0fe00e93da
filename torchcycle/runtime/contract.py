"""Data contracts as pandera schemas: what the training data looked like, saved with the model.

Per input column (canonical, torchcycle.runtime.cells): its kind, whether nulls were seen (else they are
refused), and as metadata, not enforced, the range of values seen (a new extreme is not an error) and the
categories of a text column (a value never seen in training is scored as the column's "other" category, and
counted as <unseen> by drift monitoring). Validation is lazy: every failing column and check is reported at
once, with row examples, in one DataError.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from torchcycle.runtime.types import DataError

MAX_CATEGORIES = 200  # a text column with more distinct values is free text: no category check
_registered = False


def _register_checks() -> None:
    """Register the `finite` check with pandera once, so schemas holding it serialise to JSON."""
    global _registered
    if _registered:
        return
    from pandera.extensions import register_check_method

    @register_check_method(statistics=[], check_type="vectorized")
    def finite(series: pd.Series) -> pd.Series:
        values = pd.to_numeric(series, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        ok = ~np.isinf(values)
        if not pd.api.types.is_numeric_dtype(series):  # object or str columns (pandas 3 reads text as str)
            # text where a number was trained ('red', even '1.5') is not a number
            ok &= ~np.fromiter((isinstance(v, str | bytes) for v in series), dtype=bool, count=len(series))
        return pd.Series(ok, index=series.index)

    _registered = True


def _is_number(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)


def infer_contract(frame: pd.DataFrame, name: str = "model input") -> Any:
    """A pandera DataFrameSchema describing `frame` (the training split's feature columns)."""
    _register_checks()
    import pandera.pandas as pa

    columns = {}
    for col in frame.columns:
        s = frame[col]
        meta: dict[str, Any] = {"dtype": str(s.dtype)}
        checks = []
        if _is_number(s):
            meta.update(kind="number", min=_num(s.min()), max=_num(s.max()))
            checks.append(pa.Check.finite())
        elif pd.api.types.is_bool_dtype(s):
            meta["kind"] = "bool"
        elif pd.api.types.is_datetime64_any_dtype(s):
            present = s.dropna()
            meta.update(kind="datetime", min=_iso(present.min()), max=_iso(present.max()))
        else:
            meta["kind"] = "string"
            cats = sorted(map(str, s.dropna().unique()))
            if len(cats) <= MAX_CATEGORIES:
                meta["categories"] = cats
        columns[str(col)] = pa.Column(
            dtype=None, nullable=bool(s.isna().any()), checks=checks, required=True, metadata=meta
        )
    return pa.DataFrameSchema(columns, strict=False, name=name)  # extra columns are allowed


def _iso(v: Any) -> str | None:
    return None if pd.isna(v) else pd.Timestamp(v).isoformat()


def _num(v: Any) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def to_json(schema: Any) -> str:
    """pandera's own JSON (the checks), plus the per-column profile it does not serialise
    (training dtype, kind, value range seen), so the file says what the training data looked like."""
    import json

    profile = {name: col.metadata for name, col in schema.columns.items()}
    return json.dumps({"pandera": json.loads(schema.to_json()), "profile": profile}, indent=1)


def from_json(text: str) -> Any:
    import json

    _register_checks()
    import pandera.pandas as pa

    doc = json.loads(text)
    schema = pa.DataFrameSchema.from_json(json.dumps(doc["pandera"]))
    for name, meta in doc.get("profile", {}).items():
        if name in schema.columns:
            schema.columns[name].metadata = meta
    return schema


def _clearly_valid(frame: pd.DataFrame, schema: Any) -> bool:
    """A vectorised pass over all numeric columns at once; True only when pandera would find nothing.

    Scoring calls this per batch: most batches are clean, and one (N, F) isnan/isinf beats F pandera
    column validations. Anything else (a category set, a missing column, a failure) goes to pandera,
    which then produces the detailed report."""
    nullable = _numeric_nullable(frame, schema)
    if nullable is None:
        return False
    try:
        values = frame[list(nullable)].to_numpy(dtype="float64", na_value=np.nan)
    except (TypeError, ValueError):
        return False
    return _finite_where_required(values, list(nullable.values()))


def clearly_valid_values(frame: pd.DataFrame, schema: Any, values: np.ndarray, columns: list[str]) -> bool:
    """`_clearly_valid` on `values`, the float (N, F) array already made of `frame[columns]` (F = `columns`):
    the same verdict without converting the frame a second time."""
    nullable = _numeric_nullable(frame, schema)
    if nullable is None or set(nullable) != set(columns) or values.shape[1:] != (len(columns),):
        return False
    return _finite_where_required(values, [nullable[c] for c in columns])


def _numeric_nullable(frame: pd.DataFrame, schema: Any) -> dict[str, bool] | None:
    """Column -> nullable, when every column of `schema` is a number column of `frame` with only the finite
    check; None otherwise (pandera decides)."""
    nullable: dict[str, bool] = {}
    for name, col in schema.columns.items():
        if name not in frame.columns or (col.metadata or {}).get("kind") != "number" or len(col.checks) != 1:
            return None
        if not pd.api.types.is_numeric_dtype(frame[name]):  # text such as '1.5' would convert below
            return None
        nullable[name] = bool(col.nullable)
    return nullable or None


def _finite_where_required(values: np.ndarray, nullable: list[bool]) -> bool:
    """No inf anywhere, no NaN in a column that is not nullable; (N, F) `values`, F = len(nullable)."""
    finite = np.isfinite(values)
    if finite.all():  # one pass over the batch, the common case
        return True
    if np.isinf(values).any():
        return False
    holes = ~finite.all(axis=0)  # (F,) columns with a NaN
    return not (holes & ~np.asarray(nullable, dtype=bool)).any()


def check_frame(frame: pd.DataFrame, schema: Any, source: str = "input") -> None:
    """Validate lazily; all problems in one DataError naming column, expectation, findings and rows."""
    import pandera.errors as pe

    if _clearly_valid(frame, schema):
        return
    try:
        schema.validate(frame, lazy=True)
    except pe.SchemaErrors as err:
        raise DataError(f"{source}: {describe_failures(err.failure_cases)}") from None


def value_problems(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    """Training-data value checks through pandera, lazily: +-inf in any numeric column (a column with no value at
    all is left out as constant, tasks/validate.py). One text per failing (column, check), with row examples."""
    _register_checks()
    import pandera.errors as pe
    import pandera.pandas as pa

    checks = {}
    for col in columns:
        rules = [pa.Check.finite()] if _is_number(frame[col]) else []
        checks[col] = pa.Column(dtype=None, nullable=True, checks=rules)
    try:
        pa.DataFrameSchema(checks, strict=False).validate(frame, lazy=True)
    except pe.SchemaErrors as err:
        return describe_failures(err.failure_cases).split(": ", 1)[1].split("; ")
    return []


def describe_failures(cases: pd.DataFrame, examples: int = 3) -> str:
    """pandera's failure-case table -> one line per (column, check): how many rows, which, what was found."""
    parts = []
    for (column, check), group in cases.groupby(["column", "check"], sort=False, dropna=False):
        rows = [int(i) for i in group["index"].dropna().tolist()[:examples]]
        found = [_show(v) for v in group["failure_case"].tolist()[:examples]]
        if not rows:  # a whole-column check (no failing rows to show)
            parts.append(f"column '{column}' fails {_expectation(str(check))}")
            continue
        where = f" in {len(group)} row(s), e.g. row {', '.join(map(str, rows))}"
        parts.append(f"column '{column}' fails {_expectation(str(check))}{where}: found {', '.join(found)}")
    return f"{len(parts)} problem(s): " + "; ".join(parts)


def _expectation(check: str) -> str:
    if check == "not_nullable":
        return "not-null (no missing values in training)"
    if check == "finite":
        return "finite (no +-inf)"
    if check.startswith("isin("):
        return "its training categories" + (f" {check[5:-1]}" if len(check) < 120 else "")
    if check == "column_in_dataframe":
        return "presence (missing column)"
    return check


def _show(v: Any) -> str:
    if isinstance(v, float) and np.isnan(v):
        return "NaN"
    return repr(v) if isinstance(v, str) else str(v)
