"""Score (batch-predict): stream CSV/Parquet through a registered model into Parquet, written atomically.

Plain functions (per-batch scoring, output naming and checks, the Scorer) touch only the files they are
given; the @task wrappers at the bottom do registry I/O and carry the retries. Reading and writing tables
is torchcycle.tables; model references are torchcycle.registry."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from torchcycle.atomic import check_writable_target, remove_stale_temps, storage_error, temp_path
from torchcycle.errors import DataError, StorageError
from torchcycle.registry import ModelRef, ResolvedModel, resolve_model
from torchcycle.runtime.drift import DriftCounts, ReferenceProfile
from torchcycle.runtime.types import LINEAGE_COLUMNS
from torchcycle.tables import (
    DEFAULT_BATCH_ROWS,
    IMAGE_BATCH_ROWS,
    SUFFIXES,
    NoInputs,
    atomic_parquet,
    check_schema,
    expected_columns,
    file_digest,
    find_inputs,
    open_batches,
    pack_rows,
    row_group_sizes,
    write_frame,
)


# ---- scoring ------------------------------------------------------------------------------------
def _constant(value: str, n: int) -> pa.Array:
    # Dictionary-encoded: one string stored once per batch, and near-free in Parquet.
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([value]))


def score_batch(
    batch: pa.RecordBatch,
    predict: Callable[[Any], Any],
    expected: dict[str, str],
    passthrough: list[str],
    model: ResolvedModel,
    offset: int = 0,
    observe: Callable[[pd.DataFrame, pd.DataFrame], None] | None = None,
    base: Path | None = None,
    prepare: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
) -> pa.RecordBatch:
    """One input batch -> passthrough columns, prediction (+ proba_*), lineage columns. Same rows, same order.

    `offset`: the batch's first data row in its file, so validation errors name file rows. `prepare`: the model's
    reading of its input cells (torchcycle.runtime.cells), once per batch; `predict` then takes what it returns.
    `observe`: called with (model inputs, model outputs) of every scored batch (drift counting); it must not
    change them. `base`: the folder relative image paths are read from (the table's, or the folder of images)."""
    from torchcycle.runtime.images import ImageError

    features = pa.Table.from_batches([batch.select(list(expected))])
    paths: list[str | None] | None = None
    for i, (col, kind) in enumerate(expected.items()):
        typ = features.column(col).type
        if kind == "number" and (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ)):
            features = features.set_column(i, col, features.column(col).cast(pa.float64()))  # stored numbers
        elif kind == "binary" and not pa.types.is_binary(features.column(col).type):  # paths to the images
            paths = features.column(col).to_pylist()
            features = features.set_column(i, col, pa.array(read_image_files(paths, base, offset), pa.binary()))
    frame = features.to_pandas()
    frame.index = pd.RangeIndex(offset, offset + len(frame))
    try:
        if prepare is not None:
            frame = prepare(frame)
        result = predict(frame)
    except ImageError as err:
        if paths is None or not err.bad:
            raise
        shown = "; ".join(f"{paths[i]} (row {offset + i}): {why}" for i, why in err.bad[:5])
        more = f" (+{len(err.bad) - 5} more)" if len(err.bad) > 5 else ""
        raise DataError(f"{len(err.bad)} image(s) cannot be read: {shown}{more}") from None
    if len(result) != batch.num_rows:
        raise RuntimeError(f"model returned {len(result)} rows for {batch.num_rows}")
    if observe is not None:
        observe(frame, result)
    out = pa.Table.from_pandas(result, preserve_index=False)
    arrays = [batch.column(c) for c in passthrough] + [c.combine_chunks() for c in out.columns]
    arrays += [_constant(v, batch.num_rows) for v in (model.name, model.version, model.run_id)]
    names = [*passthrough, *out.column_names, *LINEAGE_COLUMNS]
    if len(set(names)) < len(names):  # a file Parquet readers refuse: never write it
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"input column(s) {', '.join(twice)} would be overwritten by the output: rename them first")
    return pa.RecordBatch.from_arrays(arrays, names=names)


def read_image_files(paths: list[str | None], base: Path | None, offset: int = 0) -> list[bytes | None]:
    """The bytes of each image file named (relative to `base`); None stays None (the model refuses it by row).
    One DataError naming every file that cannot be read."""
    out: list[bytes | None] = []
    missing: list[str] = []
    for i, name in enumerate(paths):
        if name is None or not name.strip():
            out.append(None)
            continue
        p = Path(name)
        p = p if p.is_absolute() or base is None else base / p
        try:
            out.append(p.read_bytes())
        except OSError as err:
            missing.append(f"{name} (row {offset + i}): {err.strerror or err}")
            out.append(None)
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DataError(f"{len(missing)} image file(s) cannot be read: " + "; ".join(missing[:5]) + more)
    return out


@dataclass(frozen=True)
class FileResult:
    input: str
    output: str
    rows: int
    digest: str
    skipped: bool = False  # output for this model version already existed


@dataclass(frozen=True)
class ScoreResult:
    model: ResolvedModel
    files: tuple[FileResult, ...]
    seconds: float
    output: str
    scoring_run_id: str = ""  # the MLflow run that recorded this scoring
    drift_counts: dict[str, Any] | None = None  # DriftCounts.to_dict() of the scored rows (None: no reference)
    drift: Any = None  # the DriftReport judged from them (set by the flow)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files if not f.skipped)

    @property
    def input_digest(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.digest.encode())
        return h.hexdigest()


def output_is_directory(output: Path) -> bool:
    return output.suffix.lower() not in (".parquet", ".pq")


def output_name(input_path: Path, model: ResolvedModel) -> str:
    """Per-input output name in directory mode: the whole input name (a.csv and a.parquet stay apart) and the
    model version (idempotent re-runs)."""
    return f"{input_path.name}.{model.name}-v{model.version}.parquet"


def output_targets(inputs: list[Path], output: Path, model: ResolvedModel) -> list[tuple[Path, Path]]:
    """(input, output file) pairs; two inputs that would share an output file are refused by name."""
    if not output_is_directory(output):
        return [(p, output) for p in inputs]
    pairs = [(p, output / output_name(p, model)) for p in inputs]
    seen: dict[Path, Path] = {}
    for src, target in pairs:
        if target in seen:
            raise DataError(
                f"inputs {seen[target]} and {src} would both be written to {target}: "
                "score them into separate output directories"
            )
        seen[target] = src
    return pairs


def check_output(input_spec: str, inputs: list[Path], output: Path, model: ResolvedModel | None = None) -> None:
    """Refuse, before anything is read, an output that is an input or would become one on the next run,
    and an output path that can never be written."""
    import fnmatch

    out = output.absolute()
    real = {p.resolve(): p for p in inputs}
    directory = output_is_directory(output)
    if output.resolve() in real:
        raise DataError(f"--output {output} is the input file {real[output.resolve()]}: scoring would replace it")
    if directory and output.exists() and not output.is_dir():
        raise DataError(f"--output {output} is a file: a directory output needs a directory (or a .parquet name)")
    if not directory and output.is_dir():
        raise DataError(f"--output {output} is a directory: give a .parquet file name, or a directory without it")
    check_writable_target(output / "x.parquet" if directory else output)
    spec = Path(input_spec)
    # What this run writes, as the next run's input lookup would see it.
    written = [out / output_name(p, model) for p in inputs] if directory and model else [out]
    if spec.is_dir():
        folder = spec.resolve()
        inside = [w for w in written if w.parent.resolve() == folder and w.suffix.lower() in SUFFIXES]
        if inside or (directory and out.resolve() == folder):
            raise DataError(
                f"--output {output} lies inside the input directory {input_spec}: "
                "the next run would score its own output; write elsewhere"
            )
    elif not spec.is_file():  # a glob
        pattern = str(Path(input_spec).absolute())
        caught = [w for w in written if fnmatch.fnmatch(str(w), pattern)]
        if caught:
            raise DataError(
                f"--output {output} matches the input pattern {input_spec}: the next run would score its own output"
            )


@dataclass
class Scorer:
    """Scores input files with one loaded model. `predict` maps a pandas frame to a result frame."""

    predict: Callable[[Any], Any]
    expected: dict[str, str]
    model: ResolvedModel
    id_cols: tuple[str, ...] = ()
    batch_rows: int = DEFAULT_BATCH_ROWS
    progress: bool = True
    outputs: tuple[str, ...] = ()  # the model's output columns, when known: checked against input names
    observe: Callable[[pd.DataFrame, pd.DataFrame], None] | None = None  # sees every scored batch (drift)
    prepare: Callable[[pd.DataFrame], pd.DataFrame] | None = None  # the model's reading of its cells, per batch

    def __post_init__(self) -> None:
        self.id_cols = tuple(dict.fromkeys(self.id_cols))  # `--id-col a --id-col a` is one column
        if "binary" in self.expected.values():  # a row is a whole image: batches of a bounded size in bytes
            self.batch_rows = min(self.batch_rows, IMAGE_BATCH_ROWS)

    def score(self, inputs: list[Path], output: Path) -> ScoreResult:
        start = time.perf_counter()
        files: list[FileResult] = []
        if output_is_directory(output):
            refused: list[str] = []
            for path, target in output_targets(inputs, output, self.model):
                if target.exists():
                    files.append(FileResult(str(path), str(target), 0, file_digest(path), skipped=True))
                    continue
                try:
                    files += self._write(target, [path])
                except StorageError:  # the output side: every other file would meet it too
                    raise
                except DataError as err:  # one bad file does not hold up the others (nor every later run)
                    refused.append(str(err))
            if refused:
                scored = sum(not f.skipped for f in files)
                raise DataError(
                    f"{len(refused)} of {len(inputs)} file(s) refused ({scored} scored, their outputs are "
                    f"written): " + "; ".join(refused)
                )
        else:
            files = self._write(output, inputs)
        return ScoreResult(self.model, tuple(files), time.perf_counter() - start, str(output))

    def _write(self, target: Path, inputs: list[Path]) -> list[FileResult]:
        """Score `inputs` into one atomic `target`."""
        with atomic_parquet(target) as write:
            return [self._score_file(path, target, write) for path in inputs]

    def _score_file(self, path: Path, target: Path, write: Callable[[pa.RecordBatch], None]) -> FileResult:
        from concurrent.futures import ThreadPoolExecutor

        # Hash the input on a second thread while scoring (hashlib releases the GIL on large reads).
        with ThreadPoolExecutor(1) as pool:
            digest = pool.submit(file_digest, path)
            rows = self._score_rows(path, write)
            return FileResult(str(path), str(target), rows, digest.result())

    def score_unit(self, unit: WorkUnit, part: Path) -> UnitResult:
        """Score one work unit into its own part file, written atomically (a retry rewrites the same part)."""
        from concurrent.futures import ThreadPoolExecutor

        path = Path(unit.input)
        with ThreadPoolExecutor(1) as pool, atomic_parquet(part) as write:
            # the file's first unit hashes it, on a second thread while it scores (as _score_file does)
            digest = pool.submit(file_digest, path) if unit.first_row == 0 else None
            rows = self._score_rows(path, write, unit.row_groups, unit.first_row)
        return UnitResult(unit, str(part), rows, digest.result() if digest is not None else "")

    def _score_rows(
        self,
        path: Path,
        write: Callable[[pa.RecordBatch], None],
        row_groups: tuple[int, ...] | None = None,
        first_row: int = 0,
    ) -> int:
        """With `progress`: a bar on a terminal; elsewhere (worker logs, CI) one plain line per scored file,
        so logs get no carriage-return redraws. `row_groups`/`first_row`: a work unit of a Parquet file."""
        from tqdm.auto import tqdm

        start, rows = time.perf_counter(), 0
        isatty = getattr(sys.stderr, "isatty", None)
        bar_on = self.progress and bool(isatty and isatty())
        with open_batches(path, self.expected, self.batch_rows, row_groups) as (schema, batches, total):
            check_schema(schema, self.expected, str(path), self.outputs)
            missing_ids = [c for c in self.id_cols if c not in schema.names]
            if missing_ids:
                raise DataError(f"{path}: id column(s) not found: {', '.join(missing_ids)}")
            # ids first, image paths next, then every column the model does not use (extras are passed through)
            paths = [
                c
                for c, k in self.expected.items()
                if k == "binary" and not pa.types.is_binary(schema.field(c).type) and c not in self.id_cols
            ]
            passthrough = [
                *self.id_cols,
                *paths,
                *(c for c in schema.names if c not in self.expected and c not in self.id_cols),
            ]
            base = path if path.is_dir() else path.parent
            with tqdm(total=total, unit="row", desc=path.name, disable=not bar_on, leave=False) as bar:
                for batch in batches:
                    if batch.num_rows:
                        try:
                            scored = score_batch(
                                batch,
                                self.predict,
                                self.expected,
                                passthrough,
                                self.model,
                                first_row + rows,
                                self.observe,
                                base,
                                self.prepare,
                            )
                            write(scored)
                        except DataError as err:  # the model's contract refused values: say which file
                            raise DataError(f"{path}: {str(err).removeprefix('input: ')}") from None
                    rows += batch.num_rows
                    bar.update(batch.num_rows)
        if rows == 0 and row_groups is None:
            raise DataError(f"{path} has no data rows")
        if self.progress and not bar_on:
            seconds = time.perf_counter() - start
            span = "" if row_groups is None else f" (rows {first_row}-{first_row + rows - 1})"
            print(f"scored {path.name}{span}: {rows} rows in {seconds:.2f} s", file=sys.stderr, flush=True)
        return rows


# ---- distributed scoring: work units, parts, commit ----------------------------------------------
DEFAULT_UNIT_ROWS = 1_048_576  # a Parquet file with more rows is split into units of about this many


@dataclass(frozen=True)
class WorkUnit:
    """A piece of one input scored on its own: the whole file, or consecutive row groups of a Parquet file."""

    input: str
    target: str  # the output file this unit's part is committed into
    index: int  # position in the run's unit list: input order, then file order
    row_groups: tuple[int, ...] | None = None  # None: the whole file
    first_row: int = 0  # the unit's first row in its file (errors name file rows; 0 also hashes the file)


@dataclass(frozen=True)
class UnitResult:
    unit: WorkUnit
    part: str  # the part file written
    rows: int
    digest: str  # the input file's SHA-256 (computed by its first unit; "" for the others)
    counts: Any = None  # the unit's drift counts (JSON-able), merged by the flow


def row_group_spans(sizes: list[int], unit_rows: int, batch_rows: int) -> list[tuple[tuple[int, ...], int]]:
    """Row groups -> units of whole read packs (torchcycle.tables.pack_rows at `batch_rows`, as scoring reads
    them) of at most `unit_rows` rows (a larger pack is a unit of its own): [(groups, first row)]."""
    packs = pack_rows(sizes, batch_rows)
    spans: list[tuple[tuple[int, ...], int]] = []
    first = 0
    for run in pack_rows([sum(sizes[i] for i in pack) for pack in packs], unit_rows):
        groups = tuple(g for k in run for g in packs[k])
        spans.append((groups, first))
        first += sum(sizes[g] for g in groups)
    return spans


def plan_units(pairs: list[tuple[Path, Path]], unit_rows: int, batch_rows: int = DEFAULT_BATCH_ROWS) -> list[WorkUnit]:
    """(input, output file) pairs -> work units in input order. A Parquet file of more than `unit_rows`
    rows is split by row groups; a CSV file (no cheap split points) or a file whose footer cannot be read
    (its unit then fails with the reader's error, naming the file) is one unit."""
    units: list[WorkUnit] = []
    for src, target in pairs:
        sizes: list[int] = []
        if src.suffix.lower() != ".csv":
            try:
                sizes = row_group_sizes(src)
            except DataError:
                sizes = []
        # absolute: workers elsewhere (a Dask cluster) do not share this process's working directory
        src, target = src.absolute(), target.absolute()
        spans = row_group_spans(sizes, unit_rows, batch_rows) if sum(sizes) > unit_rows else []
        if len(spans) < 2:
            units.append(WorkUnit(str(src), str(target), len(units)))
            continue
        for groups, first in spans:
            units.append(WorkUnit(str(src), str(target), len(units), groups, first))
    return units


def pending_units(
    inputs: list[Path], output: Path, model: ResolvedModel, unit_rows: int, batch_rows: int = DEFAULT_BATCH_ROWS
) -> tuple[list[WorkUnit], list[FileResult]]:
    """The work units still to score, and the inputs skipped because this version already scored them
    (directory output: their file exists)."""
    pairs = output_targets(inputs, output, model)
    done = output_is_directory(output)
    skipped = [
        FileResult(str(a.absolute()), str(b.absolute()), 0, file_digest(a), skipped=True)
        for a, b in pairs
        if done and b.exists()
    ]
    todo = [(a, b) for a, b in pairs if not (done and b.exists())]
    return plan_units(todo, unit_rows, batch_rows), skipped


def _staging_anchor(output: Path) -> Path:
    return output / "parts" if output_is_directory(output) else output


def remove_stale_parts(output: Path) -> None:
    """Directories of parts left by killed runs into `output` on this host."""
    remove_stale_temps(_staging_anchor(output))


def staging_dir(output: Path) -> Path:
    """Where the parts of one run wait for their commit: a hidden directory of this writer's own beside the
    output file (or inside the output directory), on the same file system, so a part moves in by rename.
    Named like torchcycle.atomic's temps, so a killed run's leftovers are removed by the next run."""
    return temp_path(_staging_anchor(output.absolute()))


def commit_parts(target: Path, parts: list[Path]) -> None:
    """Make `target` out of its parts, in order, atomically: one part is renamed into place; several are
    streamed into one file (Parquet cannot be concatenated without rewriting)."""
    import pyarrow.parquet as pq

    if len(parts) == 1:
        check_writable_target(target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(parts[0], target)
        except OSError as err:
            raise storage_error(err, target) from None
        return
    with atomic_parquet(target) as write:
        for part in parts:
            with pq.ParquetFile(part, pre_buffer=False) as pf:
                for batch in pf.iter_batches(batch_size=DEFAULT_BATCH_ROWS):
                    write(batch)


def commit_outputs(
    model: ResolvedModel,
    inputs: list[Path],
    outcomes: list[tuple[WorkUnit, UnitResult | BaseException]],
    skipped: list[FileResult],
    output: Path,
    seconds: float,
    reference: ReferenceProfile | None = None,
) -> ScoreResult:
    """Commit every output whose units all succeeded; the rest are refused as Scorer.score refuses them.

    One .parquet output: all or nothing. A directory: each input's file is committed on its own, and one
    refused file does not hold up the others. Anything but bad data (a storage error, a lost worker after
    its retries) stops the run with nothing more committed."""
    by_target: dict[str, list[tuple[WorkUnit, UnitResult | BaseException]]] = {}
    for unit, outcome in sorted(outcomes, key=lambda o: o[0].index):
        by_target.setdefault(unit.target, []).append((unit, outcome))
    for _, outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, DataError):
            raise outcome
    files: list[FileResult] = list(skipped)
    refused: list[str] = []
    counts = DriftCounts.empty(reference) if reference is not None else None
    for target, group in by_target.items():
        errors = list(dict.fromkeys(str(o) for _, o in group if isinstance(o, BaseException)))
        if errors:
            refused += errors
            continue
        results = [o for _, o in group if isinstance(o, UnitResult)]
        commit_parts(Path(target), [Path(r.part) for r in results])
        for r in results:  # drift of what was committed, as the rows are (units' counts add up exactly)
            if counts is not None and r.counts is not None:
                counts = counts.merge(DriftCounts.from_dict(r.counts, reference))
        for name in dict.fromkeys(r.unit.input for r in results):  # per input, in input order
            mine = [r for r in results if r.unit.input == name]
            files.append(FileResult(name, target, sum(r.rows for r in mine), next(r.digest for r in mine if r.digest)))
    if refused and not output_is_directory(output):
        raise DataError("; ".join(refused))
    if refused:
        scored = sum(not f.skipped for f in files)
        raise DataError(
            f"{len(refused)} of {len(inputs)} file(s) refused ({scored} scored, their outputs "
            "are written): " + "; ".join(refused)
        )
    order = {str(Path(p).absolute()): i for i, p in enumerate(inputs)}
    files.sort(key=lambda f: order.get(str(Path(f.input).absolute()), len(order)))
    drift = counts.to_dict() if counts is not None else None
    return ScoreResult(model, tuple(files), seconds, str(output), drift_counts=drift)


def summary_markdown(result: ScoreResult) -> str:
    lines = "\n".join(
        f"| {Path(f.input).name} | {f.output} | {'skipped (exists)' if f.skipped else f.rows} |" for f in result.files
    )
    rate = result.rows / result.seconds if result.seconds > 0 else 0.0
    drift = result.drift
    if drift is not None and drift.judged:
        lines += (
            f"\n\nDrift: **{drift.status}** (max PSI {drift.max_psi:.3f}"
            + (f", drifted: {', '.join(list(drift.drifted)[:10])}" if drift.drifted else "")
            + ")"
        )
    return (
        f"# Scored with {result.model.name} v{result.model.version}\n\n"
        f"{result.rows} rows in {result.seconds:.2f} s ({rate:,.0f} rows/s) · run `{result.model.run_id}` · "
        f"input digest `{result.input_digest[:16]}`\n\n| input | output | rows |\n|---|---|---|\n{lines}\n"
    )


# ---- Prefect task wrappers ----------------------------------------------------------------------
from prefect import get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from torchcycle.retry import io_task_options  # noqa: E402
from torchcycle.tracking import load_registered  # noqa: E402


@task(name="resolve-model", **io_task_options())
def resolve_model_task(tracking_uri: str, ref: ModelRef) -> ResolvedModel:
    from mlflow.tracking import MlflowClient

    return resolve_model(MlflowClient(tracking_uri), ref)


@dataclass(frozen=True)
class ScoringPlan:
    """Whether a scheduled scoring run has work; `idle` says why not (None: there is work)."""

    idle: str | None
    model: ResolvedModel | None = None


def plan_scoring(client: Any, ref: ModelRef, input: str, output: Path) -> ScoringPlan:
    """Nothing to do when no input file exists yet, no version answers `ref` yet, or every input already
    has its output from that version (directory output). Other problems raise as usual."""
    try:
        inputs = find_inputs(input)
    except NoInputs as err:
        return ScoringPlan(str(err))
    try:
        model = resolve_model(client, ref)
    except DataError as err:
        return ScoringPlan(f"{err} (train one first)")
    if output_is_directory(output) and all(t.exists() for _, t in output_targets(inputs, output, model)):
        return ScoringPlan(f"all {len(inputs)} file(s) in {input} already scored by {model.name} v{model.version}")
    return ScoringPlan(None, model)


@task(name="plan-scoring", **io_task_options())
def plan_scoring_task(tracking_uri: str, ref: ModelRef, input: str, output: str) -> ScoringPlan:
    from mlflow.tracking import MlflowClient

    return plan_scoring(MlflowClient(tracking_uri), ref, input, Path(output))


@dataclass(frozen=True)
class LoadedModel:
    predict: Callable[[Any], Any]
    expected: dict[str, str]
    outputs: tuple[str, ...] = ()  # prediction (+ proba_<class>) when the model says so
    reference: ReferenceProfile | None = None  # the training data's drift reference (None: an older model)
    prepare: Callable[[pd.DataFrame], pd.DataFrame] | None = None  # reads input cells once per batch (ours)
    predict_prepared: Callable[[Any], Any] | None = None  # `predict` of what `prepare` returned

    def drift_counts(self) -> DriftCounts | None:
        return DriftCounts.empty(self.reference) if self.reference is not None else None

    def scorer(self, model: ResolvedModel, id_cols: tuple[str, ...], batch_rows: int) -> tuple[Scorer, Any]:
        """A Scorer of this model that counts drift as it scores, and the counts it fills (or None)."""
        counts = self.drift_counts()
        observe = counts.update if counts is not None else None
        scorer = Scorer(
            self.predict_prepared if self.predict_prepared is not None else self.predict,
            self.expected,
            model,
            id_cols,
            batch_rows,
            outputs=self.outputs,
            observe=observe,
            prepare=self.prepare if self.predict_prepared is not None else None,
        )
        return scorer, counts


@task(name="load-model", **io_task_options())
def load_model_task(tracking_uri: str, model: ResolvedModel) -> LoadedModel:
    """Load the registered version as MLflow's pyfunc, fetched through `tracking_uri`."""
    return loaded_model(load_registered(tracking_uri, model.name, model.version))


def loaded_model(pyfunc: Any) -> LoadedModel:
    """How to call a loaded pyfunc on raw rows: the predictor itself when it is one of this runtime's."""
    expected = expected_columns(pyfunc.metadata.get_input_schema())
    inner = pyfunc.unwrap_python_model()
    # A model of this runtime: call its predictor directly; the columns were checked and cast above, so
    # MLflow's per-batch schema enforcement would only repeat that work. Anything else (a version logged
    # before the torchcycle namespace, whose errors are another module's DataError): through pyfunc.predict.
    predictor = getattr(inner, "predictor", None)
    if predictor is None or not type(predictor).__module__.startswith("torchcycle.runtime."):
        return LoadedModel(_refusals_as_data_errors(pyfunc.predict), expected)
    pipeline = predictor.pipeline
    reference = getattr(pipeline, "reference", None)
    # the model's own reading of each column (the signature leaves them untyped, see tasks/register.py)
    kinds = pipeline.input_kinds() if hasattr(pipeline, "input_kinds") else expected
    return LoadedModel(
        predictor.predict,
        kinds,
        tuple(predictor.output_columns),
        reference,
        prepare=pipeline.canonical,
        predict_prepared=predictor.predict_canonical,
    )


def _refusals_as_data_errors(predict: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """pyfunc.predict answers bad input with MlflowException(INVALID_PARAMETER_VALUE): a DataError here."""

    def checked(frame: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return predict(frame)
        except MlflowException as err:
            if err.error_code != "INVALID_PARAMETER_VALUE":
                raise
            raise DataError(err.message) from None

    return checked


@task(name="score-files", **io_task_options())
def score_task(
    loaded: LoadedModel,
    model: ResolvedModel,
    inputs: list[Path],
    output: Path,
    id_cols: tuple[str, ...] = (),
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> ScoreResult:
    scorer, counts = loaded.scorer(model, id_cols, batch_rows)
    result = scorer.score(inputs, output)
    if counts is not None:
        result = replace(result, drift_counts=counts.to_dict())
    get_run_logger().info("scored %d rows with %s v%s -> %s", result.rows, model.name, model.version, output)
    return result


@task(name="write-sample", **io_task_options())
def write_frame_task(frame: Any, path: Path) -> Path:
    return write_frame(frame, path)


@task(name="log-scoring", **io_task_options())
def log_scoring_task(tracking_uri: str, run_id: str, result: ScoreResult) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    skipped = sum(f.skipped for f in result.files)
    values = {
        "rows": result.rows,
        "seconds": result.seconds,
        "rows_per_second": result.rows / result.seconds if result.seconds > 0 else 0.0,
        "files_scored": len(result.files) - skipped,
        "files_skipped": skipped,
    }
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
    client.set_tag(run_id, "input_digest", result.input_digest)
    client.log_text(run_id, summary_markdown(result), "scoring_summary.md")


# A Dask worker keeps the models it loaded (one load per worker and model version, not one per unit).
_WORKER_MODELS: dict[tuple[str, str, str], LoadedModel] = {}
_WORKER_LOCK = threading.Lock()
_WORKER_KEEP = 4  # models kept per worker process


def worker_model(tracking_uri: str, model: ResolvedModel) -> LoadedModel:
    """The registered version, loaded once per process and kept (a worker scores many units with it)."""
    key = (tracking_uri, model.name, str(model.version))
    with _WORKER_LOCK:  # threads of one worker: one load
        if key not in _WORKER_MODELS:
            if len(_WORKER_MODELS) >= _WORKER_KEEP:
                _WORKER_MODELS.pop(next(iter(_WORKER_MODELS)))
            _WORKER_MODELS[key] = loaded_model(load_registered(tracking_uri, model.name, model.version))
        return _WORKER_MODELS[key]


@task(name="score-unit", **io_task_options())
def score_unit_task(
    tracking_uri: str,
    model: ResolvedModel,
    unit: WorkUnit,
    part: str,
    id_cols: tuple[str, ...] = (),
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> UnitResult:
    """One work unit on whichever (Dask) worker runs it. Safe to retry: it rewrites its own part atomically."""
    scorer, counts = worker_model(tracking_uri, model).scorer(model, id_cols, batch_rows)
    result = scorer.score_unit(unit, Path(part))
    return replace(result, counts=counts.to_dict()) if counts is not None else result


# No retries: a commit is local renames, and a retry after a part was moved would find it gone.
@task(name="commit-outputs", cache_policy=NO_CACHE)
def commit_outputs_task(
    model: ResolvedModel,
    inputs: list[Path],
    outcomes: list[tuple[WorkUnit, Any]],
    skipped: list[FileResult],
    output: Path,
    seconds: float,
    reference: ReferenceProfile | None = None,
) -> ScoreResult:
    result = commit_outputs(model, inputs, outcomes, skipped, output, seconds, reference)
    get_run_logger().info("scored %d rows with %s v%s -> %s", result.rows, model.name, model.version, output)
    return result
