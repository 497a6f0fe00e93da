"""Promotion gate: the new version (challenger) must beat the current `champion` on this run's test split.

`should_promote` is the pure decision; `decide_and_record` does the registry I/O (aliases, tags) around
it, once per version and flow run: a retried gate finds its decision recorded on the version and returns
it; `gate_task` adds the lock, the log line and the artifact.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task

from torchcycle.config import CLASSIFICATION_METRICS, REGRESSION_METRICS
from torchcycle.errors import DataError
from torchcycle.registry import CHALLENGER, CHAMPION, alias_target, append_champion_history
from torchcycle.retry import io_task_options
from torchcycle.runtime.types import PREDICTION_COLUMN, Task
from torchcycle.tasks.evaluate import test_metrics
from torchcycle.tasks.score import loaded_model
from torchcycle.tracking import download_registered, load_registered

# Metrics where smaller is better; every other metric is maximised.
LOWER_IS_BETTER = frozenset({"test_mse", "test_mae"})


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    metric: str
    challenger: float
    champion: float | None  # None when there is no champion yet
    champion_version: str | None = None


def default_metric(task_: Task) -> str:
    return "test_accuracy" if task_ == "classification" else "test_r2"


def should_promote(
    metric: str, challenger: float, champion: float | None, margin: float = 0.0, champion_version: str | None = None
) -> Decision:
    """Promote when there is no champion, or the challenger beats it by at least `margin`.

    Ties and NaNs never promote over an existing champion: a model must earn the alias.
    """
    if champion is None:
        return Decision(True, "first version: no champion yet", metric, challenger, None, None)
    if math.isnan(challenger):
        return Decision(False, f"challenger {metric} is NaN", metric, challenger, champion, champion_version)
    gain = (champion - challenger) if metric in LOWER_IS_BETTER else (challenger - champion)
    promote = math.isnan(champion) or (gain > 0 and gain >= margin)
    rule = f">= margin {margin}" if promote else f"< required: > 0 and >= margin {margin}"
    reason = f"{metric} {challenger:.4f} vs champion v{champion_version} {champion:.4f}: gain {gain:+.4f} {rule}"
    return Decision(promote, reason, metric, challenger, champion, champion_version)


def metric_task(metric: str) -> Task:
    if metric in CLASSIFICATION_METRICS:
        return "classification"
    if metric in REGRESSION_METRICS:
        return "regression"
    raise ValueError(f"unsupported gate metric '{metric}'")


def output_classes(columns: Iterable[str]) -> list[str]:
    """The class labels, as text, that a pyfunc's output columns (or its signature's) name: `proba_<class>`."""
    return [c.removeprefix("proba_") for c in columns if c.startswith("proba_")]


def version_classes(tracking_uri: str, name: str, version: str) -> list[str] | None:
    """The class labels, as text, of registered version `version`, from the output signature it was logged
    with (only its MLmodel file is fetched); None when it has no output signature."""
    import tempfile

    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="torchcycle-mlmodel-") as tmp:
        path = download_registered(tracking_uri, name, version, tmp, "MLmodel")
        signature = Model.load(path).signature
    if signature is None or signature.outputs is None:
        return None
    return output_classes(signature.outputs.input_names())


def score_output(predictions: pd.DataFrame, truth: pd.Series, metric: str, classes: Sequence[str] | None) -> float:
    """`metric` of a pyfunc's output frame against raw target values, computed by evaluate()'s test_metrics
    over the label set `classes` (None: the classes the frame's `proba_<class>` columns name)."""
    task_ = metric_task(metric)
    if task_ == "classification" and classes is None:
        classes = output_classes(predictions.columns)
    pred = predictions[PREDICTION_COLUMN].to_numpy()
    return test_metrics(truth.to_numpy(), pred, task=task_, classes=classes)[metric]


def decision_markdown(name: str, version: str, d: Decision) -> str:
    verdict = "PROMOTED to champion" if d.promote else "REJECTED (alias challenger)"
    champ = "none" if d.champion is None else f"v{d.champion_version}: {d.champion:.4f}"
    return (
        f"# Gate: {name} v{version} {verdict}\n\n| | |\n|---|---|\n| metric | {d.metric} |\n"
        f"| challenger | {d.challenger:.4f} |\n| champion | {champ} |\n| reason | {d.reason} |\n"
    )


@task(name="gate", **io_task_options())
def gate_task(
    *,
    tracking_uri: str,
    name: str,
    version: str,
    metric: str,
    challenger_value: float,
    margin: float,
    test_frame: pd.DataFrame,
    target: str,
    flow_run_id: str,
) -> Decision:
    """Score the current champion on this run's test rows, decide, then tag the version and move aliases.
    A retry (after the decision was recorded) returns the recorded decision instead of deciding again."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    # Read champion -> decide -> move alias must not interleave with another gate of the same model,
    # or two challengers both beat the old champion and the last writer wins, not the better one.
    with gate_lock(name, tracking_uri):
        decision = decide_and_record(
            client, tracking_uri, name, version, metric, challenger_value, margin, test_frame, target, flow_run_id
        )
    get_run_logger().info("gate %s v%s: %s", name, version, decision.reason)
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        markdown=decision_markdown(name, version, decision), key="promotion-gate", description=f"{name} v{version}"
    )
    return decision


def gate_lock(name: str, tracking_uri: str):
    """Serialises the gates of one model (read champion -> decide -> move alias), across processes.

    An embedded store (`sqlite:///FILE`) is a file on this machine, so every gate into it runs here: a file lock
    beside it does it in microseconds. Any other store: a Prefect global concurrency limit of 1 per model,
    shared by every process and host that uses the Prefect server. (On Prefect's own SQLite database, half the
    acquisitions of a local run were answered 503 'database is locked' while the server recorded the task
    runs before it, and the client retried after about 2 s.)"""
    if tracking_uri.startswith("sqlite:///"):
        return _file_lock(Path(tracking_uri.removeprefix("sqlite:///")).parent / ".gate-locks", name)
    return _prefect_lock(name)


@contextlib.contextmanager
def _file_lock(folder: Path, name: str, timeout_s: float = 600.0):
    import fcntl
    import hashlib
    import time

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.lock"  # any model name is a file name
    deadline = time.monotonic() + timeout_s
    with open(path, "a") as fh:  # flock is per open file: threads of one process exclude each other too
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another gate of {name} held its lock for {timeout_s:.0f} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _prefect_lock(name: str):
    """A Prefect global concurrency limit of 1 per model: serialises gates across processes and hosts
    that share the Prefect server (created on first use)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    limit = f"torchcycle-gate-{name}"
    with get_client(sync_client=True) as client:
        try:  # look first: a duplicate create makes the server log an IntegrityError traceback
            client.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another gate created it meanwhile
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
    return concurrency(limit, occupy=1, timeout_seconds=600, strict=True)


def decide_and_record(
    client, tracking_uri, name, version, metric, challenger_value, margin, test_frame, target, flow_run_id
) -> Decision:
    """Decide and record, once per version and flow run. When the version already carries this flow
    run's decision (the task is retrying after it was recorded), that decision is returned as recorded:
    nothing is scored, decided or appended again, and only the aliases it had not moved yet are moved.
    Another flow run gating the same version decides afresh."""
    tags = client.get_model_version(name, version).tags or {}
    recorded = recorded_decision(tags)
    if recorded is not None and tags.get("gate_flow_run_id") == flow_run_id:
        finish_decision(client, name, version, recorded)
        return recorded
    decision = _decide(client, tracking_uri, name, version, metric, challenger_value, margin, test_frame, target)
    record_decision(client, name, version, decision, flow_run_id)
    return decision


def _decide(client, tracking_uri, name, version, metric, challenger_value, margin, test_frame, target) -> Decision:
    from mlflow.exceptions import MlflowException

    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champ = None
    champion_value = None
    incomparable = None
    champ_version = str(champ.version) if champ is not None else None  # MLflow returns ints here
    if champ is not None and champ_version != str(version):
        # called as batch scoring calls it (the predictor itself): through MLflow's pyfunc.predict the same
        # model's regression outputs differed by ~1e-5 (measured on diabetes), enough to break a tie
        model = loaded_model(load_registered(tracking_uri, name, champ_version))
        try:
            preds = model.predict(test_frame.drop(columns=[target]))
        except (MlflowException, DataError) as err:  # other columns, or values its contract refuses
            incomparable = f"champion v{champ_version} cannot score this run's test split: {str(err)[:300]}"
        else:
            # Scored over the challenger's class list, the label set its value was computed over (evaluate()),
            # not the champion's: a class the data gained or lost since the champion was trained then counts
            # alike for both, as does a class missing from this test split.
            classes = version_classes(tracking_uri, name, version) if metric_task(metric) == "classification" else None
            champion_value = score_output(preds, test_frame[target], metric, classes)
    if incomparable:  # no fair comparison: never promote blindly
        return Decision(False, incomparable, metric, challenger_value, None, champ_version)
    return should_promote(metric, challenger_value, champion_value, margin, champ_version)


_RECORDED = {"passed": True, "rejected": False}  # validation_status of a gate's decision


def decision_tags(d: Decision, flow_run_id: str = "") -> dict[str, str]:
    """The tags a decision is recorded in, in the order they are written: `gate_flow_run_id` last, so a
    version that carries a flow run's id carries the whole of that run's decision."""
    return {
        "validation_status": "passed" if d.promote else "rejected",
        "gate_metric": d.metric,
        "gate_challenger_value": f"{d.challenger:.6g}",
        "gate_champion_value": "" if d.champion is None else f"{d.champion:.6g}",
        "gate_champion_version": d.champion_version or "",
        "gate_reason": d.reason,
        "gate_flow_run_id": flow_run_id,
    }


def recorded_decision(tags: dict[str, str]) -> Decision | None:
    """The decision a gate recorded in a version's tags (values to 6 significant digits), else None.

    `validation_status` "manual" (promoted by hand) or absent means no gate decision is recorded."""
    promote = _RECORDED.get(tags.get("validation_status", ""))
    if promote is None or "gate_metric" not in tags:
        return None
    champion = tags.get("gate_champion_value", "")
    return Decision(
        promote,
        tags.get("gate_reason", ""),
        tags["gate_metric"],
        float(tags.get("gate_challenger_value", "nan")),
        float(champion) if champion else None,
        tags.get("gate_champion_version") or None,
    )


def record_decision(client, name: str, version: str, d: Decision, flow_run_id: str = "") -> None:
    """Tags first, alias last: a crash in between leaves the old champion in place, and the retry
    finds the decision recorded and moves the alias (`finish_decision`)."""
    for k, v in decision_tags(d, flow_run_id).items():
        client.set_model_version_tag(name, version, k, v)
    if d.promote:
        _crown(client, name, version, d.champion_version)
    else:
        client.set_registered_model_alias(name, CHALLENGER, version)


def finish_decision(client, name: str, version: str, d: Decision) -> None:
    """Move the aliases a recorded decision did not get to move, and none that another gate or a
    person has moved since: champion only while it is still the one the decision was made against,
    challenger only from an older version (or none)."""
    if d.promote:
        if alias_target(client, name, CHAMPION) == d.champion_version:  # None: there was no champion
            _crown(client, name, version, d.champion_version)
        return
    current = alias_target(client, name, CHALLENGER)
    if current is None or int(current) < int(version):
        client.set_registered_model_alias(name, CHALLENGER, version)


def _crown(client, name: str, version: str, previous: str | None) -> None:
    if previous:
        append_champion_history(client, name, previous)  # no second entry when a retry gets here again
    client.set_registered_model_alias(name, CHAMPION, version)
