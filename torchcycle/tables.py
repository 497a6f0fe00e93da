"""CSV and Parquet tables on disk: finding input files, streaming them as Arrow record batches with errors that
name the column, and writing Parquet atomically."""

from __future__ import annotations

import glob
import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from torchcycle.atomic import atomic_target
from torchcycle.errors import DataError
from torchcycle.runtime.types import LINEAGE_COLUMNS, is_output_column

DEFAULT_BATCH_ROWS = 65_536  # rows per record batch: bounded memory whatever the file size


# ---- finding inputs -----------------------------------------------------------------------------
SUFFIXES = (".csv", ".parquet", ".pq")


class NoInputs(DataError):
    """The input path, directory or glob names no table file (yet)."""


def walk_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files, left out) under `folder` at any depth, in name order; left out: hidden files and links to nothing
    (hidden folders are not entered). Linked folders are followed (ImageFolder's rule), each real folder once,
    so a link loop ends."""
    import os

    files: list[Path] = []
    broken: list[Path] = []
    seen: set[str] = set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            p = Path(top) / name
            (files if p.is_file() and not name.startswith(".") else broken).append(p)
    return sorted(files), sorted(broken)


def image_files(folder: Path) -> list[Path]:
    """The images under `folder` (any depth, hidden entries left out), in name order."""
    from torchcycle.runtime.images import is_image_name

    return [f for f in walk_files(folder)[0] if is_image_name(f.name)]


def is_image_folder(path: Path) -> bool:
    """A directory with images in it and no CSV/Parquet file beside them: one input of images to score. Images
    beside a table in one folder are refused (DataError): scoring one kind would drop the other."""
    if not path.is_dir():
        return False
    from torchcycle.runtime.images import is_image_name

    top = [f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")]
    tables = [f for f in top if f.suffix.lower() in SUFFIXES]
    if tables:
        beside = [f for f in top if is_image_name(f.name)]
        if beside:
            raise DataError(
                f"{path} holds both tables ({tables[0].name}) and images ({beside[0].name}): "
                "put the images in a folder of their own, or name the table file as the input"
            )
        return False
    return bool(image_files(path))


def find_inputs(path: str | Path) -> list[Path]:
    """A file, a directory (its CSV/Parquet files; a directory of images alone is one input, for a model of images)
    or a glob; sorted so output order is stable."""
    text = str(path)
    p = Path(text)
    if is_image_folder(p):
        return [p]
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES]
    elif p.is_file():
        files = [p]
    elif glob.has_magic(text):
        files = [Path(f) for f in glob.glob(text) if Path(f).is_file()]
    else:
        raise NoInputs(f"input not found: {text}")
    if not p.is_file():  # in a directory or glob, hidden files are skipped (our own partial files); named: read
        files = [f for f in files if not f.name.startswith(".")]
    files = sorted(files)
    if not files:
        raise NoInputs(f"no .csv or .parquet files (or images, for a model of images) in {text}")
    bad = [f.name for f in files if f.suffix.lower() not in SUFFIXES]
    if bad:
        raise DataError(f"unsupported input file type: {', '.join(bad)} (use .csv or .parquet)")
    return files


# ---- reading: a table's schema and record batches --------------------------------------------------------------------
_KINDS = {
    "boolean": "bool",
    "integer": "number",
    "long": "number",
    "float": "number",
    "double": "number",
    "string": "string",
    "datetime": "datetime",
    "binary": "binary",  # encoded image bytes; a table may give them as paths instead (tasks/score.py reads them)
}
IMAGE_BATCH_ROWS = 256  # rows per batch of a model of images: each row is a whole encoded image


def expected_columns(signature_schema: Any) -> dict[str, str]:
    """Model input signature -> {column: kind}, kind in number | string | bool | datetime | binary | any (a column
    the signature leaves untyped: read as its file stores it, the model decides)."""
    if signature_schema is None or not signature_schema.has_input_names():
        raise DataError("the model has no named input schema: re-register it with torchcycle train")
    return {spec.name: _spec_kind(spec.type) for spec in signature_schema.inputs}


def _spec_kind(spec_type: Any) -> str:
    name = getattr(spec_type, "name", None)
    if name is None:  # mlflow.types.schema.AnyType (and objects, arrays): no type to hold the column to
        return "any"
    return _KINDS.get(name, "string")


def _kind_of(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return _kind_of(t.value_type)
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return "datetime"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_null(t):
        return "null"  # an all-empty CSV column: fits any kind
    return str(t)


def check_schema(schema: pa.Schema, expected: dict[str, str], source: str, outputs: tuple[str, ...] = ()) -> None:
    """Every problem at once: duplicate names, missing columns, incompatible types, names the output takes.

    `outputs`: the model's output columns (prediction, proba_*), when known."""
    names = schema.names
    problems = []
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"duplicate column name(s) {', '.join(dupes)}")
    missing = [c for c in expected if c not in names]
    if missing:
        problems.append(f"missing column(s) {_names(missing)}")
    wrong: dict[tuple[str, str], list[str]] = {}  # (expected kind, found type) -> columns
    for col, kind in expected.items():
        if col in names and col not in dupes:
            found = _kind_of(schema.field(col).type)
            if not _fits(kind, found):
                wrong.setdefault((kind, str(schema.field(col).type)), []).append(col)
    for (kind, found), cols in wrong.items():
        problems.append(f"column(s) {_names(cols)} must be {kind}, found {found}")
    taken = {*outputs, *LINEAGE_COLUMNS, "prediction"}
    clash = [c for c in dict.fromkeys(names) if c in taken or (not outputs and is_output_column(c))]
    if clash:
        problems.append(
            f"input column(s) {', '.join(clash)} would be overwritten by the output: rename or drop them first"
        )
    if problems:
        raise DataError(f"{source}: " + "; ".join(problems))


def _fits(kind: str, found: str) -> bool:
    """A stored column of kind `found` can hold a model input of `kind`. Text can hold any kind (a CSV column, or
    Parquet text): its cells are read by torchcycle.runtime.cells, as at training. Numbers can hold text (codes a
    writer stored as numbers: each scores as the training category of its value, as the pyfunc does). Otherwise
    nothing crosses kinds silently: a bool where a number was trained is refused, not read as 0/1; image bytes may
    come as their paths."""
    return found in (kind, "null", "string") or kind == "any" or (kind in ("bool", "string") and found == "number")


def _names(cols: list[str], show: int = 6) -> str:
    more = f" (+{len(cols) - show} more)" if len(cols) > show else ""
    return ", ".join(f"'{c}'" for c in cols[:show]) + more


def csv_convert_options(columns: list[str]) -> pacsv.ConvertOptions:
    """Every column as text, missing where pandas.read_csv says so (torchcycle.runtime.cells.NULL_TOKENS): training
    and scoring read a CSV cell alike; runtime.cells turns the text into numbers, booleans or dates."""
    from torchcycle.runtime.cells import NULL_TOKENS

    return pacsv.ConvertOptions(
        column_types={c: pa.string() for c in columns},
        null_values=sorted(NULL_TOKENS),
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
    )


_CSV_CELL = re.compile(r"In CSV column #(\d+): (.*)", re.S)


def _csv_error(err: Exception, path: Path, names: list[str], expected: dict[str, str]) -> Exception:
    """pyarrow's 'In CSV column #3: CSV conversion error ...' -> a DataError naming the column."""
    m = _CSV_CELL.match(str(err).strip())
    if m is None or int(m.group(1)) >= len(names):
        return DataError(f"cannot read {path}: {_short(err)}")
    column, what = names[int(m.group(1))], _short(Exception(m.group(2)))
    kind = f" must be {expected[column]}" if column in expected else ""
    return DataError(f"{path}: column '{column}'{kind}: {what}")


def _csv_names(path: Path) -> list[str]:
    import csv

    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: a byte-order mark is no part of a name
            return next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def read_csv_text(path: Path) -> pd.DataFrame:
    """A whole CSV file as text columns (missing cells None), read as scoring reads it (`csv_convert_options`);
    training decides each column's kind from this (torchcycle.runtime.cells.canonical_table)."""
    names = _csv_names(path)
    try:
        table = pacsv.read_csv(path, convert_options=csv_convert_options(names))
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, UnicodeDecodeError) as err:
        if "Empty CSV file" in str(err):
            raise DataError(f"input file is empty: {path}") from None
        raise _csv_error(err, path, names, {}) from None
    return table.to_pandas(types_mapper={pa.string(): pd.StringDtype()}.get)


@contextmanager
def open_batches(
    path: Path, expected: dict[str, str], batch_rows: int, row_groups: Sequence[int] | None = None
) -> Iterator[tuple[pa.Schema, Iterator[pa.RecordBatch], int | None]]:
    """(schema, record batches, row count if known) for a CSV or Parquet file; read errors become DataError.

    `row_groups`: only these row groups of a Parquet file (a work unit of distributed scoring); None: all.
    Row groups are read in packs (`_group_batches`), so a file scored whole and the same file scored as units
    of packs go through the model in the same batches (the same floating-point results, bit for bit).

    CSV columns are read as the text they hold (the model's through torchcycle.runtime.cells, as at training; the
    others passed through as they are: a guessed type would turn the ID 00042 into 42, round a 20-digit ID through
    float64, or fail on text after 100,000 empty rows)."""
    pf: pq.ParquetFile | None = None
    if path.is_dir():  # a folder of images: a table of their paths, relative to it, in the image column
        yield _image_folder_batches(path, expected, batch_rows)
        return
    try:
        if path.suffix.lower() == ".csv":
            reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=1 << 22),  # ~4 MiB of text per batch
                convert_options=csv_convert_options([*_csv_names(path), *expected]),
            )
            schema, batches, total = reader.schema, iter(reader), None
        else:
            # pre_buffer=False: with it on, pyarrow keeps every row group it read (memory grows with the file).
            pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
            groups = list(range(pf.metadata.num_row_groups)) if row_groups is None else list(row_groups)
            schema, batches = pf.schema_arrow, _group_batches(pf, groups, batch_rows)
            total = sum(pf.metadata.row_group(g).num_rows for g in groups)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, UnicodeDecodeError) as err:
        names = _csv_names(path) if path.suffix.lower() == ".csv" else []
        raise _csv_error(err, path, names, expected) from None
    try:
        yield schema, _wrap_errors(batches, path, schema.names, expected), total
    finally:
        if pf is not None:
            pf.close()


def _image_folder_batches(
    folder: Path, expected: dict[str, str], batch_rows: int
) -> tuple[pa.Schema, Iterator[pa.RecordBatch], int]:
    images = [c for c, k in expected.items() if k == "binary"]
    if len(images) != 1 or len(expected) != 1:
        raise DataError(
            f"{folder} is a folder of images: the model does not take images (its inputs: {_names(list(expected))})"
        )
    names = [str(f.relative_to(folder)) for f in image_files(folder)]
    schema = pa.schema([(images[0], pa.string())])
    batches = (
        pa.RecordBatch.from_arrays([pa.array(names[i : i + batch_rows], pa.string())], schema=schema)
        for i in range(0, len(names), batch_rows)
    )
    return schema, batches, len(names)


def pack_rows(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Positions of consecutive `sizes` packed greedily into runs of at most `limit` rows (a larger one is a
    run of its own; empty ones join their neighbours, so no run is empty but for an all-empty input)."""
    runs: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for i, n in enumerate(sizes):
        if current and rows > 0 and n > 0 and rows + n > limit:
            runs.append(current)
            current, rows = [], 0
        current.append(i)
        rows += n
    if current:
        runs.append(current)
    return runs


def _group_batches(pf: pq.ParquetFile, groups: list[int], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Row groups read in packs of up to `batch_rows` rows: small groups make full batches, and a read never
    crosses a pack. Packing is greedy from the first group, so a unit that starts at a pack boundary
    (tasks.score.plan_units) reads the same packs, and the same batches, as the whole file does."""
    sizes = [pf.metadata.row_group(g).num_rows for g in groups]
    for pack in pack_rows(sizes, batch_rows):
        yield from pf.iter_batches(batch_size=batch_rows, row_groups=[groups[i] for i in pack])


def row_group_sizes(path: Path) -> list[int]:
    """Rows in each row group of a Parquet file (read from its footer only)."""
    try:
        meta = pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"cannot read {path}: {_short(err)}") from None
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def _wrap_errors(
    batches: Iterator[pa.RecordBatch], path: Path, names: list[str], expected: dict[str, str]
) -> Iterator[pa.RecordBatch]:
    try:
        yield from batches
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, UnicodeDecodeError) as err:
        raise _csv_error(err, path, names, expected) from None


def _short(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def file_digest(path: Path) -> str:
    """SHA-256 of a file; of a folder of images, over each image's name and contents."""
    if path.is_dir():
        h = hashlib.sha256()
        for f in image_files(path):
            with open(f, "rb") as fh:
                h.update(str(f.relative_to(path)).encode() + b"\0" + hashlib.file_digest(fh, "sha256").digest())
        return h.hexdigest()
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# ---- writing ----------------------------------------------------------------------------------
@contextmanager
def atomic_parquet(path: Path) -> Iterator[Callable[[pa.RecordBatch], None]]:
    """Yield a batch writer; the file appears at `path` only when every batch is written.

    Batches go to a hidden temp file of this writer's own beside the target (torchcycle.atomic): a crash leaves
    nothing at `path`, and of two writers racing for one path the last to finish wins with a whole file."""
    with atomic_target(path) as tmp, _parquet_writer(tmp, path) as write:
        yield write


@contextmanager
def _parquet_writer(tmp: Path, path: Path) -> Iterator[Callable[[pa.RecordBatch], None]]:
    writer: pq.ParquetWriter | None = None

    def write(batch: pa.RecordBatch) -> None:
        nonlocal writer
        if writer is None:
            # Dictionary-encode only the constant lineage columns: trying it on float columns costs time.
            lineage = [c for c in LINEAGE_COLUMNS if c in batch.schema.names]
            writer = pq.ParquetWriter(tmp, batch.schema, use_dictionary=lineage)
        elif batch.schema != writer.schema:
            raise DataError(f"inputs written to {path.name} differ in columns: {batch.schema.names}")
        writer.write_batch(batch)

    try:
        yield write
        if writer is None:
            raise DataError("no rows to write")
    finally:
        if writer is not None:
            writer.close()


def write_frame(frame: Any, path: Path) -> Path:
    """Write a DataFrame as Parquet atomically (a sample file for scoring, say)."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    with atomic_parquet(path) as write:
        for batch in table.to_batches(max_chunksize=DEFAULT_BATCH_ROWS):
            write(batch)
    return path


def frame_digest(frame: pd.DataFrame) -> str:
    """Content hash of a frame (values, index and column names), stable across runs."""
    h = hashlib.sha256()
    h.update("\x1f".join(map(str, frame.columns)).encode())
    h.update(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
    return h.hexdigest()
