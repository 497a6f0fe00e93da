"""Score (batch-predict): stream CSV/Parquet through a registered model into Parquet, written atomically.

Plain functions (per-batch scoring, output naming and checks, the Scorer) touch only the files they are
given; the @task wrappers at the bottom do registry I/O and carry the retries. Reading and writing tables
is torchcycle.tables; model references are torchcycle.registry."""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from torchcycle.atomic import check_writable_target
from torchcycle.errors import DataError, StorageError
from torchcycle.registry import ModelRef, ResolvedModel, resolve_model
from torchcycle.runtime.types import LINEAGE_COLUMNS
from torchcycle.tables import (
    DEFAULT_BATCH_ROWS,
    SUFFIXES,
    NoInputs,
    atomic_parquet,
    check_schema,
    expected_columns,
    file_digest,
    find_inputs,
    open_batches,
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
) -> pa.RecordBatch:
    """One input batch -> passthrough columns, prediction (+ proba_*), lineage columns. Same rows, same order.

    `offset`: the batch's first data row in its file, so validation errors name file rows."""
    features = pa.Table.from_batches([batch.select(list(expected))])
    for i, (col, kind) in enumerate(expected.items()):
        if kind == "number":  # ints and floats alike: the feature pipeline works in floats
            features = features.set_column(i, col, features.column(col).cast(pa.float64()))
    frame = features.to_pandas()
    frame.index = pd.RangeIndex(offset, offset + len(frame))
    result = predict(frame)
    if len(result) != batch.num_rows:
        raise RuntimeError(f"model returned {len(result)} rows for {batch.num_rows}")
    out = pa.Table.from_pandas(result, preserve_index=False)
    arrays = [batch.column(c) for c in passthrough] + [c.combine_chunks() for c in out.columns]
    arrays += [_constant(v, batch.num_rows) for v in (model.name, model.version, model.run_id)]
    names = [*passthrough, *out.column_names, *LINEAGE_COLUMNS]
    if len(set(names)) < len(names):  # a file Parquet readers refuse: never write it
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"input column(s) {', '.join(twice)} would be overwritten by the output: rename them first")
    return pa.RecordBatch.from_arrays(arrays, names=names)


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

    def __post_init__(self) -> None:
        self.id_cols = tuple(dict.fromkeys(self.id_cols))  # `--id-col a --id-col a` is one column

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

    def _score_rows(self, path: Path, write: Callable[[pa.RecordBatch], None]) -> int:
        """With `progress`: a bar on a terminal; elsewhere (worker logs, CI) one plain line per scored file,
        so logs get no carriage-return redraws."""
        from tqdm.auto import tqdm

        start, rows = time.perf_counter(), 0
        isatty = getattr(sys.stderr, "isatty", None)
        bar_on = self.progress and bool(isatty and isatty())
        with open_batches(path, self.expected, self.batch_rows) as (schema, batches, total):
            check_schema(schema, self.expected, str(path), self.outputs)
            missing_ids = [c for c in self.id_cols if c not in schema.names]
            if missing_ids:
                raise DataError(f"{path}: id column(s) not found: {', '.join(missing_ids)}")
            # ids first, then every column the model does not use (extras are passed through)
            passthrough = [
                *self.id_cols,
                *(c for c in schema.names if c not in self.expected and c not in self.id_cols),
            ]
            with tqdm(total=total, unit="row", desc=path.name, disable=not bar_on, leave=False) as bar:
                for batch in batches:
                    if batch.num_rows:
                        try:
                            write(score_batch(batch, self.predict, self.expected, passthrough, self.model, rows))
                        except DataError as err:  # the model's contract refused values: say which file
                            raise DataError(f"{path}: {str(err).removeprefix('input: ')}") from None
                    rows += batch.num_rows
                    bar.update(batch.num_rows)
        if rows == 0:
            raise DataError(f"{path} has no data rows")
        if self.progress and not bar_on:
            seconds = time.perf_counter() - start
            print(f"scored {path.name}: {rows} rows in {seconds:.2f} s", file=sys.stderr, flush=True)
        return rows


def summary_markdown(result: ScoreResult) -> str:
    lines = "\n".join(
        f"| {Path(f.input).name} | {f.output} | {'skipped (exists)' if f.skipped else f.rows} |" for f in result.files
    )
    rate = result.rows / result.seconds if result.seconds > 0 else 0.0
    return (
        f"# Scored with {result.model.name} v{result.model.version}\n\n"
        f"{result.rows} rows in {result.seconds:.2f} s ({rate:,.0f} rows/s) · run `{result.model.run_id}` · "
        f"input digest `{result.input_digest[:16]}`\n\n| input | output | rows |\n|---|---|---|\n{lines}\n"
    )


# ---- Prefect task wrappers ----------------------------------------------------------------------
from prefect import get_run_logger, task  # noqa: E402

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
    return LoadedModel(predictor.predict, expected, tuple(predictor.output_columns))


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
    scorer = Scorer(loaded.predict, loaded.expected, model, id_cols, batch_rows, outputs=loaded.outputs)
    result = scorer.score(inputs, output)
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
