"""MLflow tracking helpers. Everything takes an explicit tracking URI / run id: no global state
is touched on import, and MlflowClient with a run id is safe from Prefect's worker threads."""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from torchcycle.store import artifact_root_for, prepare_store, resolve_tracking_uri

__all__ = ["resolve_tracking_uri"]  # re-exported: flows resolve the URI where they set it


def use_tracking_uri(tracking_uri: str) -> None:
    """Set the process's MLflow tracking URI, at the edge (a flow's first line) and nowhere else. Tasks pass
    the URI and run id explicitly; only MLflow's own model logging reads this global."""
    import mlflow

    prepare_store(tracking_uri)
    if tracking_uri.startswith("sqlite:///"):
        _create_sqlite_store(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)


def _create_sqlite_store(tracking_uri: str) -> None:
    """Create (or check) the SQLite store's tables, one process at a time. Two commands on a fresh store at once
    would both run MLflow's migrations, each with temporary tables, and the loser would find a half-made schema
    for good ("table _alembic_tmp_tags already exists"); a lock beside the database lets one in at a time."""
    import fcntl
    from pathlib import Path

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db = Path(tracking_uri.removeprefix("sqlite:///"))
    with open(db.parent / f".{db.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, by a crash too
        SqlAlchemyStore(tracking_uri, artifact_root_for(tracking_uri))


def require_tracking_uri(tracking_uri: str) -> None:
    """For MLflow calls that read only the process-wide URI: refuse to run when the edge did not set it to
    `tracking_uri`, rather than write somewhere else."""
    import mlflow

    if mlflow.get_tracking_uri() != tracking_uri:
        raise RuntimeError(
            f"MLflow's tracking URI is {mlflow.get_tracking_uri()}, not {tracking_uri}: "
            "set it at the edge with torchcycle.tracking.use_tracking_uri"
        )


def download_registered(tracking_uri: str, name: str, version: str, dst: str, path: str = "") -> str:
    """Files of registered version `version` of `name` (all of it, or `path` inside it) fetched through
    `tracking_uri`; returns the local path. MLflow's own models:/ resolver would ask the process-wide
    registry URI instead of the one passed in, so the version's artifact location is looked up here."""
    import mlflow

    location = MlflowClient(tracking_uri).get_model_version_download_uri(name, version)
    uri = f"{location.rstrip('/')}/{path}" if path else location
    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst, tracking_uri=tracking_uri)


def load_registered(tracking_uri: str, name: str, version: str):
    """`models:/NAME/VERSION` as a pyfunc, fetched through `tracking_uri` (no global state), into a directory
    of its own that stays for the process's lifetime, as MLflow's own loader does."""
    import mlflow

    local = download_registered(tracking_uri, name, version, tempfile.mkdtemp(prefix="torchcycle-model-"))
    return mlflow.pyfunc.load_model(local)


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root_for(tracking_uri))


@dataclass
class MlflowEpochLogger:
    """Training-loop callback: per-epoch metrics to one run, as a batch per epoch."""

    client: MlflowClient
    run_id: str

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])


def missing_epochs(history: list[dict[str, float]], logged_steps: set[int]) -> list[tuple[int, dict[str, float]]]:
    """(epoch, metrics) of the epochs a run has not logged yet; epochs count from 1."""
    return [(i, m) for i, m in enumerate(history, start=1) if i not in logged_steps]


def log_figures(client: MlflowClient, run_id: str, figures: dict[str, bytes], artifact_path: str = "plots") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, png in figures.items():
            (Path(tmp) / name).write_bytes(png)
        client.log_artifacts(run_id, tmp, artifact_path)


# ---- Prefect task wrappers: every one of these talks to the tracking server, so they retry. ----
from prefect import runtime, task  # noqa: E402

from torchcycle.retry import io_task_options  # noqa: E402

_IO_RETRIES = io_task_options()


def flow_run_id() -> str:
    """The Prefect flow run this code runs in, '' outside one."""
    return str(runtime.flow_run.id) if runtime.flow_run.id else ""


@task(name="start-mlflow-run", **_IO_RETRIES)
def start_run_task(
    tracking_uri: str, experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str]
) -> str:
    client = MlflowClient(tracking_uri)
    exp_id = ensure_experiment(client, experiment, tracking_uri)
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


@task(name="log-evaluation", **_IO_RETRIES)
def log_evaluation_task(tracking_uri: str, run_id: str, metrics: dict[str, float], figures: dict[str, bytes]) -> None:
    import time

    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    log_figures(client, run_id, figures)


@task(name="log-facts", **_IO_RETRIES)
def log_facts_task(
    tracking_uri: str,
    run_id: str,
    params: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
    documents: dict[str, dict] | None = None,
) -> None:
    """What a stage decided, as the run's params (new keys), metrics (step 0) and JSON artifacts (file name ->
    content). Logging the same again is a no-op: safe to retry."""
    import time

    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    items = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    for i in range(0, max(len(items), 1), 100):  # log_batch takes at most 100 params per call
        chunk = items[i : i + 100]
        found = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()] if i == 0 else []
        if chunk or found:
            client.log_batch(run_id, params=chunk, metrics=found)
    for name, content in (documents or {}).items():
        client.log_dict(run_id, content, name)


@task(name="log-history", **_IO_RETRIES)
def log_history_task(tracking_uri: str, run_id: str, history: list[dict[str, float]]) -> int:
    """Log the per-epoch metrics the run lacks: a model that came from the stage cache or resumed
    from a checkpoint trained (some) epochs in an earlier run. Returns how many epochs were logged."""
    import time

    from mlflow.entities import Metric

    if not history:
        return 0
    client = MlflowClient(tracking_uri)
    first_key = next(iter(history[0]))
    logged = {m.step for m in client.get_metric_history(run_id, first_key)}
    todo = missing_epochs(history, logged)
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, epoch) for epoch, m in todo for k, v in m.items()]
    for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics per call
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    return len(todo)


@task(name="finish-mlflow-run", **_IO_RETRIES)
def finish_run_task(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri).set_terminated(run_id, status)


@task(name="describe-mlflow-run", **_IO_RETRIES)
def describe_run_task(tracking_uri: str, run_id: str, markdown: str) -> None:
    """The run's description on its MLflow page (MLflow keeps it in the `mlflow.note.content` tag)."""
    MlflowClient(tracking_uri).set_tag(run_id, "mlflow.note.content", markdown)


@contextmanager
def tracked_run(
    tracking_uri: str, experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str]
) -> Iterator[str]:
    """One MLflow run around a flow's body: yields its id; FINISHED when the body returns, FAILED when it
    raises (the error goes on up)."""
    run_id = start_run_task(tracking_uri, experiment, run_name, params, tags)
    try:
        yield run_id
    except BaseException:
        with contextlib.suppress(Exception):  # the body's error is the one to report, not a failing store's
            finish_run_task(tracking_uri, run_id, "FAILED")
        raise
    finish_run_task(tracking_uri, run_id)


def dataset_input(frame, *, name: str, source: str, target: str, digest: str, context: str):
    """A split as MLflow's dataset lineage (name, source, digest, schema), tagged with its role."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's hint about integer columns: integer pixels are intended
        # files (a path or a glob) are a local source; sklearn:/synthetic:/torchvision: are made by code
        local = str(Path(source.removeprefix("file:")).absolute())  # readable from another machine's UI
        where = local if source.startswith("file:") else CodeDatasetSource({"source": source})
        dataset = from_pandas(frame, source=where, targets=target, name=name, digest=digest[:16])
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


@task(name="log-datasets", **_IO_RETRIES)
def log_datasets_task(
    tracking_uri: str, run_id: str, splits: dict[str, object], *, name: str, source: str, target: str
) -> None:
    """The train / validation / test splits as the run's input data sets, each with its content digest."""
    from torchcycle.tables import frame_digest

    with warnings.catch_warnings():  # the schema is inferred again when logged: the same integer-column hint
        warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column.*")
        inputs = [
            dataset_input(
                f, name=f"{name}-{split}", source=source, target=target, digest=frame_digest(f), context=split
            )
            for split, f in splits.items()
        ]
        MlflowClient(tracking_uri).log_inputs(run_id, datasets=inputs)
