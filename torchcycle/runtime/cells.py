"""One meaning of a cell, wherever a table comes from: training ingest, batch scoring (CLI, Dask units, schedules),
the pyfunc (rows from `pandas.read_csv`, JSON from `mlflow models serve`) all go through these functions.

A column has one of four kinds, decided once from the training data (`infer_kind`) and saved with the model:
  number    numbers (text that parses as one, after trimming spaces); canonical: float64 (int64 when whole
            and complete, for a target)
  bool      True/TRUE/true/False/FALSE/false (pandas' own tokens), or real booleans; canonical for a feature:
            float64 1.0 / 0.0
  datetime  ISO 8601 dates or date-times (2024-03-01, 2024-03-01 14:30:00, ...T14:30Z), or real timestamps;
            canonical: datetime64[ns], naive UTC
  string    anything else; canonical: object of str
Missing, in every kind: an empty cell, None/NaN, or one of pandas' own missing-value tokens (`NULL_TOKENS`:
NA, N/A, NULL, None, NaN, ...), so a file means the same to torchcycle as to `pandas.read_csv`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import numpy as np
import pandas as pd

from torchcycle.runtime.types import DataError

Kind = Literal["number", "bool", "datetime", "string"]
KINDS: tuple[Kind, ...] = ("number", "bool", "datetime", "string")

# pandas.read_csv's default missing-value tokens (pandas._libs.parsers.STR_NA_VALUES; a test keeps them equal).
NULL_TOKENS = frozenset(
    {
        "",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)
TRUE_TOKENS = frozenset({"True", "TRUE", "true"})  # pandas.read_csv's booleans
FALSE_TOKENS = frozenset({"False", "FALSE", "false"})
# ISO 8601 dates and date-times: what is read as a date without guessing day/month order (03/04/2024 stays text)
_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?)?(Z|[+-]\d{2}:?\d{2})?$")
EXAMPLES = 3  # values named in an error


def _texts(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(trimmed text of each cell as an object array, missing mask): None/NaN and the null tokens are missing."""
    if isinstance(values.dtype, pd.StringDtype):  # text as pandas 3 and the readers give it: in pyarrow, vectorised
        return _arrow_texts(values)
    raw = values.to_numpy(dtype=object, na_value=None)
    missing = pd.isna(raw)
    if raw.dtype == object and all(isinstance(v, str) for v in raw[~missing]):
        return _arrow_texts(pd.Series(raw, dtype="string"))
    text = np.empty(len(raw), dtype=object)
    for i, v in enumerate(raw):
        if not missing[i]:
            t = v.strip() if isinstance(v, str) else _text_of(v)
            if t in NULL_TOKENS:
                missing[i] = True
            else:
                text[i] = t
    return text, missing


def _arrow_texts(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = pa.array(values.to_numpy(dtype=object, na_value=None), pa.string())
    trimmed = pc.utf8_trim_whitespace(arr)
    missing = pc.or_kleene(pc.is_null(trimmed), pc.is_in(trimmed, pa.array(sorted(NULL_TOKENS))))
    mask = missing.to_numpy(zero_copy_only=False).astype(bool)
    text = trimmed.to_numpy(zero_copy_only=False).astype(object)
    text[mask] = None
    return text, mask


def text_of_number(v: float) -> str:
    """The text a number cell in a text column is read as (7.0 -> '7', 1.5 -> '1.5')."""
    return _text_of(v)


def _text_of(v: Any) -> str:
    """A non-text cell as text: whole floats without '.0' (pandas reads 3 from '3' but 3.0 once a NaN is near)."""
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, float | np.floating) and np.isfinite(v) and float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace").strip()
    return str(v).strip()


def _parse_numbers(text: np.ndarray, missing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, cells that are no number) of trimmed text; pyarrow's parser, the one scoring reads with."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = np.full(len(text), np.nan)
    bad = np.zeros(len(text), dtype=bool)
    present = ~missing
    if not present.any():
        return out, bad
    strings = pa.array(text[present].tolist(), pa.string())
    try:
        out[present] = pc.cast(strings, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # some cell is no number: find which, one by one
        values = np.full(int(present.sum()), np.nan)
        fails = np.zeros(int(present.sum()), dtype=bool)
        for i, t in enumerate(strings.to_pylist()):
            try:
                values[i] = pc.cast(pa.array([t], pa.string()), pa.float64())[0].as_py()
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                fails[i] = True
        out[present], bad[present] = values, fails
    return out, bad


def _parse_dates(text: np.ndarray, missing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(datetime64[ns] naive UTC values, cells that are no ISO date) of trimmed text."""
    out = np.full(len(text), np.datetime64("NaT"), dtype="datetime64[ns]")
    bad = np.zeros(len(text), dtype=bool)
    idx = np.flatnonzero(~missing)
    iso = np.fromiter((bool(_ISO.match(text[i])) for i in idx), dtype=bool, count=len(idx))
    bad[idx[~iso]] = True
    good = idx[iso]
    if len(good):
        parsed = pd.to_datetime(pd.Series(text[good]), format="ISO8601", utc=True, errors="coerce")
        values = parsed.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")
        out[good] = values
        bad[good[np.isnat(values)]] = True  # 2024-02-30 matches the pattern and is no date
    return out, bad


def infer_kind(values: pd.Series) -> Kind:
    """The kind of a training column, from every value in it. Typed columns keep their type's kind; text decides by
    what all its present cells parse as (numbers, then booleans, then ISO dates); a column with no value at all is
    a number column (it is left out of the features as constant)."""
    dtype = values.dtype
    if pd.api.types.is_timedelta64_dtype(dtype) or isinstance(dtype, pd.PeriodDtype):
        raise DataError(
            f"column '{values.name}' holds {'durations' if pd.api.types.is_timedelta64_dtype(dtype) else 'periods'} "
            f"({dtype}): convert them to numbers (seconds, say) or leave the column out (data.ignore)"
        )
    if pd.api.types.is_complex_dtype(dtype):
        raise DataError(f"column '{values.name}' holds complex numbers: not a supported feature type")
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_numeric_dtype(dtype):
        return "number"
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return "datetime"
    text, missing = _texts(values)
    if missing.all():
        return "number"
    present = text[~missing]
    if not _parse_numbers(text, missing)[1].any():
        return "number"
    if all(t in TRUE_TOKENS or t in FALSE_TOKENS for t in present):
        return "bool"
    if not _parse_dates(text, missing)[1].any():
        return "datetime"
    return "string"


def coerce(values: pd.Series, kind: Kind, name: str | None = None) -> pd.Series:
    """`values` (any dtype a reader or a caller gives) as the canonical column of `kind`, same index; a DataError
    naming the column, how many rows and which values when some cell is not of that kind."""
    name = str(values.name if name is None else name)
    dtype = values.dtype
    if kind == "number":
        if isinstance(dtype, np.dtype) and dtype.kind in "fiu":
            return values if dtype == np.float64 else values.astype(np.float64)
        if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype):  # nullable Int64, ...
            return pd.Series(values.to_numpy(dtype=np.float64, na_value=np.nan), index=values.index, name=values.name)
        if pd.api.types.is_bool_dtype(dtype) or _holds_bools(values):
            # a bool where a number was trained is refused, not read as 0/1
            raise DataError(f"column '{name}' must be number, found booleans")
        text, missing = _texts(values)
        out, bad = _parse_numbers(text, missing)
        _refuse(name, "number", values, bad)
        return pd.Series(out, index=values.index, name=values.name)
    if kind == "bool":
        if pd.api.types.is_bool_dtype(dtype) and isinstance(dtype, np.dtype):
            return pd.Series(values.to_numpy(dtype=np.float64), index=values.index, name=values.name)
        text, missing = _texts(values)
        out = np.full(len(text), np.nan)
        bad = np.zeros(len(text), dtype=bool)
        for i in np.flatnonzero(~missing):
            t = text[i]
            if t in TRUE_TOKENS or t == "1":
                out[i] = 1.0
            elif t in FALSE_TOKENS or t == "0":
                out[i] = 0.0
            else:
                bad[i] = True
        _refuse(name, "bool (True or False)", values, bad)
        return pd.Series(out, index=values.index, name=values.name)
    if kind == "datetime":
        if pd.api.types.is_datetime64_any_dtype(dtype):
            v = values.dt.tz_convert("UTC").dt.tz_localize(None) if getattr(dtype, "tz", None) else values
            return pd.Series(v.to_numpy(dtype="datetime64[ns]"), index=values.index, name=values.name)
        text, missing = _texts(values)
        out, bad = _parse_dates(text, missing)
        _refuse(name, "a date (ISO 8601: 2024-03-01 or 2024-03-01 14:30:00)", values, bad)
        return pd.Series(out, index=values.index, name=values.name)
    text, missing = _texts(values)
    out = text.copy()
    out[missing] = np.nan
    return pd.Series(out, index=values.index, name=values.name, dtype=object)


def _holds_bools(values: pd.Series) -> bool:
    present = values.dropna()
    return len(present) > 0 and values.dtype == object and all(isinstance(v, bool | np.bool_) for v in present)


def _refuse(name: str, what: str, values: pd.Series, bad: np.ndarray) -> None:
    if not bad.any():
        return
    rows = values.index[bad]
    found = [repr(v) if isinstance(v, str) else str(v) for v in values[bad].head(EXAMPLES)]
    raise DataError(
        f"column '{name}' must be {what}: {int(bad.sum())} row(s) are not, "
        f"e.g. row {', '.join(map(str, rows[:EXAMPLES]))}: found {', '.join(found)}"
    )


def coerce_frame(frame: pd.DataFrame, kinds: dict[str, Kind]) -> pd.DataFrame:
    """The columns of `kinds` (in that order), each canonical; every column's problems in one DataError. `frame`
    is read, never changed."""
    columns: dict[str, pd.Series] = {}
    problems = []
    for col, kind in kinds.items():
        try:
            columns[col] = coerce(frame[col], kind, col)
        except DataError as err:
            problems.append(str(err))
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(f"{len(problems)} problem(s): " + "; ".join(problems))
    return pd.DataFrame(columns, index=frame.index, copy=False)


def read_kinds(frame: pd.DataFrame) -> dict[str, Kind]:
    """The kind of every column of a freshly read table."""
    return {str(c): infer_kind(frame[c]) for c in frame.columns}


def canonical_table(frame: pd.DataFrame, keep_whole: tuple[str, ...] = ()) -> tuple[pd.DataFrame, dict[str, Kind]]:
    """A freshly read table (text, or typed from Parquet) as canonical columns of their inferred kinds, and the
    kinds. Columns in `keep_whole` (the target) keep whole numbers as int64 and booleans as bool when complete, so
    class labels read as pandas reads them (1, not 1.0)."""
    kinds = read_kinds(frame)
    columns = {}
    for col, kind in kinds.items():
        if col in keep_whole:
            columns[col] = _label_column(frame[col], kind)
        else:
            columns[col] = coerce(frame[col], kind, col)
    return pd.DataFrame(columns, index=frame.index, copy=False), kinds


def _label_column(values: pd.Series, kind: Kind) -> pd.Series:
    """A target column: numbers (int64 where pandas.read_csv makes them int64: integers, none missing), bools as
    True/False, text as text."""
    if kind == "bool":
        out = coerce(values, "bool")
        return pd.Series(
            [None if np.isnan(v) else bool(v) for v in out], index=values.index, name=values.name, dtype=object
        ).infer_objects()
    if kind == "number":
        out = coerce(values, "number")
        if out.notna().all() and _integers(values):
            return out.astype(np.int64)
        return out
    return coerce(values, kind)


def _integers(values: pd.Series) -> bool:
    """Every cell an integer: an integer dtype, or text of integers (1, -3; not 1.0), as pandas reads ints."""
    if pd.api.types.is_integer_dtype(values.dtype):
        return True
    if pd.api.types.is_float_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype):
        return False
    import pyarrow as pa
    import pyarrow.compute as pc

    text, missing = _texts(values)
    try:
        pc.cast(pa.array(text[~missing].tolist(), pa.string()), pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True


def as_labels(values: pd.Series) -> pd.Series:
    """A label column as read (text, or typed), as the labels a model learns: see `canonical_table`."""
    return _label_column(values, infer_kind(values))


def kind_of_dtype(values: pd.Series) -> Kind:
    """The kind of a column that is canonical already (or typed, from a package's data set): its dtype says it."""
    return kind_of_dtype_name(str(values.dtype))


def kind_of_dtype_name(dtype: str) -> Kind:
    if dtype.startswith(("float", "int", "uint", "Float", "Int", "UInt")):
        return "number"
    if dtype in ("bool", "boolean"):
        return "bool"
    if dtype.startswith("datetime64"):
        return "datetime"
    return "string"
