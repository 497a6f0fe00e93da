"""Tune: Optuna trials of the experiment config, each trained on the train split and judged on the validation split.

The flow (flows/tuning.py) asks the study for a trial and tells it the outcome; a trial task trains the trial's
config with a per-epoch callback that reports to Optuna and raises `optuna.TrialPruned` when the pruner says
so. The study lives in Optuna's RDB storage, so a killed study resumes: its running trials stop sending
heartbeats and are failed as stale, and a new run asks for as many trials as are still missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from torchcycle.cache import stage_key, store_cached
from torchcycle.config import ExperimentConfig, ParamSpace, TuneSection
from torchcycle.errors import ConfigError
from torchcycle.retry import io_task_options
from torchcycle.store import resolve_tracking_uri
from torchcycle.tasks.evaluate import validation_metrics
from torchcycle.tasks.features import Prepared, build_features
from torchcycle.tasks.ingest import RawData
from torchcycle.tasks.preprocess import preprocess

STORAGE_ENV = "TORCHCYCLE_OPTUNA_STORAGE"
HEARTBEAT_S = 3  # the flow marks its running trials alive this often ...
GRACE_S = 12  # ... and a running trial silent for longer belongs to a process that is gone
Direction = Literal["maximize", "minimize"]
# gate metric -> (what a trial is judged by on the validation split, which way is better)
OBJECTIVES: dict[str, tuple[str, Direction]] = {
    "test_accuracy": ("val_accuracy", "maximize"),
    "test_f1_macro": ("val_f1_macro", "maximize"),
    "test_r2": ("val_r2", "maximize"),
    "test_mse": ("val_mse", "minimize"),
    "test_mae": ("val_mae", "minimize"),
}
FINISHED = ("COMPLETE", "PRUNED")


def default_storage(tracking_uri: str | None = None) -> str:
    """$TORCHCYCLE_OPTUNA_STORAGE, else a SQLite file beside the embedded MLflow store (mlflow/optuna.db)."""
    explicit = os.environ.get(STORAGE_ENV)
    if explicit:
        return explicit
    uri = tracking_uri or resolve_tracking_uri()
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else Path("mlflow")
    return f"sqlite:///{folder.resolve() / 'optuna.db'}"


def check_tunable(cfg: ExperimentConfig) -> None:
    """What a study needs of its config beyond a valid config (ConfigError): something to search, and validation
    rows of their own to judge trials on."""
    if not cfg.tune.space:
        raise ConfigError(f"the config {cfg.name} has no tune.space: nothing to search (README: Tuning)")
    if cfg.data.val_size == 0:
        raise ConfigError(
            "data.val_size is 0: trials would be judged on their own training rows; give the study a validation "
            "split (e.g. --set data.val_size=0.1)"
        )


def check_storage(url: str, cfg: ExperimentConfig, study: str | None) -> None:
    """The study storage as the CLI edge checks it, before Prefect starts: a database that opens (ConfigError, or
    StorageDown when a server does not answer) and, when `study` exists there, is a search of this config and
    space. A SQLite file that does not exist yet is not created here."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    from torchcycle.errors import ServiceDown

    shown = safe_url(url)
    try:
        parsed = make_url(url)
        parsed.get_dialect()  # the driver is installed
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as err:
        raise ConfigError(f"--storage {shown}: not a database URL this install can use ({err})") from None
    if parsed.get_backend_name() == "sqlite":
        where = parsed.database or ""
        if where in ("", ":memory:"):
            raise ConfigError(f"--storage {shown}: an in-memory study cannot be resumed; give sqlite:///PATH")
        path = Path(where)
        if path.is_dir():
            raise ConfigError(f"--storage {shown}: {path} is a directory, not a database file")
        if not path.exists():
            if not path.parent.is_dir() and path.parent.exists():
                raise ConfigError(f"--storage {shown}: {path.parent} is not a directory")
            return
        with path.open("rb") as f:
            if path.stat().st_size and f.read(16) != b"SQLite format 3\x00":
                raise ConfigError(f"--storage {shown}: {path} is not a SQLite database")
    try:
        create_engine(url, connect_args={"connect_timeout": 10} if "postgresql" in url else {}).connect().close()
    except OperationalError as err:
        reason = str(err.orig).strip()
        if parsed.get_backend_name() == "sqlite" or "does not exist" in reason:  # ours to fix, not to wait for
            hint = (
                " (compose: docker compose exec postgres createdb -U torchcycle optuna)" if "database" in reason else ""
            )
            raise ConfigError(f"--storage {shown}: cannot open it ({reason[:200]}){hint}") from None
        raise ServiceDown(f"the study storage {shown} does not answer ({reason[:200]})") from None
    if study is not None:
        _check_resume(url, cfg, study)


def _check_resume(url: str, cfg: ExperimentConfig, name: str) -> None:
    import optuna

    _quiet_optuna()
    if name not in optuna.get_all_study_names(storage=storage(url)):
        return
    attrs = optuna.load_study(study_name=name, storage=storage(url)).user_attrs
    if attrs.get("torchcycle.search", search_digest(cfg)) != search_digest(cfg):
        raise ConfigError(
            f"study '{name}' in {safe_url(url)} is a search of another config or space (config "
            f"{attrs.get('torchcycle.config', '?')}): resume it with the config it was started with, "
            "or give a new --study name"
        )


def objective(metric: str) -> tuple[str, Direction]:
    return OBJECTIVES[metric]


def epoch_value(metrics: dict[str, float], direction: Direction) -> float:
    """What the pruner compares trials by after each epoch, oriented like the objective: validation accuracy
    where the loop measures it, else the validation loss (negated when higher is better)."""
    if "val_accuracy" in metrics:
        return metrics["val_accuracy"]
    return -metrics["val_loss"] if direction == "maximize" else metrics["val_loss"]


def _scalar_choices(space: ParamSpace) -> bool:
    return all(isinstance(c, bool | int | float | str) or c is None for c in space.choice or [])


def to_optuna(space: ParamSpace, value: Any) -> Any:
    """A config value as the study records it: lists (layer sizes) as their JSON text."""
    return value if space.choice is None or _scalar_choices(space) else json.dumps(value)


def config_values(cfg: ExperimentConfig, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's params as the study stores them -> config values (lists were stored as JSON text)."""
    out = {}
    for key, value in params.items():
        space = cfg.tune.space.get(key)
        listy = space is not None and space.choice is not None and not _scalar_choices(space)
        out[key] = json.loads(value) if listy else value
    return out


def suggest(trial: Any, space: dict[str, ParamSpace]) -> dict[str, Any]:
    """One value per key from `trial` (an optuna.Trial); returns config values (lists as lists)."""
    params: dict[str, Any] = {}
    for key, s in space.items():
        if s.choice is not None:
            if _scalar_choices(s):
                params[key] = trial.suggest_categorical(key, s.choice)
            else:
                params[key] = json.loads(trial.suggest_categorical(key, [json.dumps(c) for c in s.choice]))
        elif s.int_ is not None:
            params[key] = trial.suggest_int(key, s.int_[0], s.int_[1], step=int(s.step or 1), log=s.log)
        elif s.uniform is not None:
            params[key] = trial.suggest_float(key, s.uniform[0], s.uniform[1], step=s.step)
        else:
            params[key] = trial.suggest_float(key, s.log_uniform[0], s.log_uniform[1], log=True)
    return params


def _current(cfg: ExperimentConfig, key: str) -> Any:
    node: Any = {**cfg.model_dump(mode="json"), "model": {"kind": cfg.model.kind, **cfg.model.params}}
    for part in key.split("."):
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


def _inside(space: ParamSpace, value: Any) -> bool:
    if space.choice is not None:
        return to_optuna(space, value) in [to_optuna(space, c) for c in space.choice]
    low, high = space.uniform or space.log_uniform or space.int_
    return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high


def baseline_params(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The config's own values as a trial's params (enqueued first, so the winner is never worse than the
    config as written); None when one of them lies outside the space."""
    out = {}
    for key, space in cfg.tune.space.items():
        value = _current(cfg, key)
        if not _inside(space, value):
            return None
        out[key] = to_optuna(space, value)
    return out


def search_digest(cfg: ExperimentConfig) -> str:
    """What a study is a search of: the base config and the space. A resume must match it."""
    blob = json.dumps([cfg.config_hash(), cfg.tune.model_dump(mode="json", by_alias=True)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- the study ------------------------------------------------------------------------------------------
def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the flow logs one line per trial itself
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # heartbeats are recorded by the flow (tasks/tune.py: heartbeats), not by Study.optimize
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def storage(url: str) -> Any:
    """Optuna's RDB storage at `url`, with heartbeats: a trial silent for GRACE_S is stale.

    A SQLite file is put in WAL mode with synchronous=NORMAL: every trial reports every epoch, and with SQLite's
    default journal each report is a commit with an fsync that the other trials' reports queue behind (two
    parallel trials took twice as long each). WAL needs a local disk, not a network file system: studies shared
    between machines belong in PostgreSQL."""
    import optuna

    _quiet_optuna()
    sqlite = url.startswith("sqlite:///")
    if sqlite:
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        _wal(path)
    st = optuna.storages.RDBStorage(
        url,
        heartbeat_interval=HEARTBEAT_S,
        grace_period=GRACE_S,
        # several trials write at once: wait for SQLite's lock rather than fail on it
        engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None,
    )
    if sqlite:
        from sqlalchemy import event

        event.listen(st.engine, "connect", lambda conn, _record: conn.execute("PRAGMA synchronous=NORMAL"))
        st.engine.dispose()  # the connections opened before the listener: reopened with it
    return st


def _wal(path: Path) -> None:
    """WAL is a property of the database file: set once, every later connection uses it."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(path, timeout=60)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


def make_sampler(tune: TuneSection, seed: int, parallel: int) -> Any:
    import optuna

    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: trials asked while others run are steered away from those running ones' points
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune.startup_trials, constant_liar=parallel > 1)


def planned_epochs(cfg: ExperimentConfig, train_rows: int | None) -> int:
    """The base config's epochs for a train split of `train_rows` rows (train.epochs: auto depends on them; None:
    the most auto can plan)."""
    from torchcycle.models.training import AUTO_EPOCHS, resolved

    if train_rows is None:
        return cfg.train.epochs if isinstance(cfg.train.epochs, int) else AUTO_EPOCHS[1]
    return int(resolved(cfg.train.to_train_config(), train_rows).epochs)


def make_pruner(tune: TuneSection, epochs: int) -> Any:
    import optuna

    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=tune.warmup_epochs)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, tune.warmup_epochs), max_resource=epochs)
    return optuna.pruners.NopPruner()


def open_study(
    cfg: ExperimentConfig, name: str, url: str, direction: Direction, parallel: int, epochs: int | None = None
) -> Any:
    """Create the study, or load it to resume; a study of another search is refused (ConfigError). The sampler
    is seeded with the config's seed plus the trials the study holds, so a resumed study does not draw the
    values its first run drew again."""
    import optuna

    st = storage(url)
    study = optuna.create_study(study_name=name, storage=st, direction=direction, load_if_exists=True)
    held = len(study.get_trials(deepcopy=False))
    study = optuna.load_study(
        study_name=name,
        storage=st,
        sampler=make_sampler(cfg.tune, (cfg.seed + held) % 2**32, parallel),
        pruner=make_pruner(cfg.tune, epochs if epochs is not None else planned_epochs(cfg, None)),
    )
    digest = search_digest(cfg)
    attrs = study.user_attrs
    if attrs.get("torchcycle.search", digest) != digest or study.direction.name.lower() != direction:
        raise ConfigError(
            f"study '{name}' in {safe_url(url)} is a search of another config or space (config "
            f"{attrs.get('torchcycle.config', '?')}): resume it with the config it was started with, "
            "or give a new --study name"
        )
    if "torchcycle.search" not in attrs:
        study.set_user_attr("torchcycle.search", digest)
        study.set_user_attr("torchcycle.config", cfg.name)
    return study


def safe_url(url: str) -> str:
    """A database URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    with contextlib.suppress(Exception):
        return make_url(url).render_as_string(hide_password=True)
    return "the study storage"


def counts(study: Any) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(t.state.name for t in study.get_trials(deepcopy=False)))


def fail_stale(study: Any, wait_s: float = GRACE_S + HEARTBEAT_S) -> list[int]:
    """Fail the running trials of a process that is gone (no heartbeat for GRACE_S); returns their numbers.
    Running trials with a fresh heartbeat are waited for up to `wait_s`: a study killed a moment ago still
    looks alive. Those still beating after that belong to a live `tune` of the same study and are left."""
    import optuna

    running_state = (optuna.trial.TrialState.RUNNING,)
    deadline, failed = time.monotonic() + wait_s, []
    while True:
        running = {t.number for t in study.get_trials(deepcopy=False, states=running_state)}
        if not running:
            return sorted(failed)
        optuna.storages.fail_stale_trials(study)
        now = {t.number: t.state for t in study.get_trials(deepcopy=False) if t.number in running}
        still = {n for n, state in now.items() if state == optuna.trial.TrialState.RUNNING}
        failed += [n for n, state in now.items() if state == optuna.trial.TrialState.FAIL]
        if not still or time.monotonic() > deadline:
            return sorted(failed)
        time.sleep(1.0)


@contextlib.contextmanager
def heartbeats(study: Any, trial_ids: set[int]) -> Iterator[None]:
    """Mark the trials in `trial_ids` (updated by the caller as trials start and end) alive every HEARTBEAT_S
    from a thread, while the flow waits for them."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            for trial_id in list(trial_ids):
                with contextlib.suppress(Exception):  # a finished trial: nothing to mark
                    study._storage.record_heartbeat(trial_id)

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ---- one trial ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialPlan:
    """What a trial task needs: which trial of which study, its config, where to track it."""

    study: str
    storage_url: str
    trial_id: int
    number: int
    params: dict[str, Any]  # dotted config key -> value (lists as lists)
    config: ExperimentConfig  # the base config with `params` set
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    metric: str  # val_accuracy, val_r2, ...
    direction: Direction
    data_digest: str
    epochs: int  # the base config's train.epochs, resolved for the data (Hyperband's budget)


@dataclass(frozen=True)
class TrialResult:
    number: int
    state: Literal["COMPLETE", "PRUNED"]
    value: float | None  # the objective (COMPLETE) or the last epoch's value reported (PRUNED)
    epochs: int
    run_id: str
    seconds: float
    metrics: dict[str, float]  # validation metrics of a complete trial
    process: str = ""  # host:pid that trained it (a Dask worker's, or this process's)


class _Report:
    """Epoch callback of a trial: its value to Optuna every epoch, raising optuna.TrialPruned when the pruner
    stops the trial; the epoch's metrics to the trial's MLflow run, sent at most once a second (`flush` sends
    the rest): a commit per epoch per trial is what parallel trials queue behind on an embedded store."""

    def __init__(self, trial: Any, client: Any, run_id: str, direction: Direction) -> None:
        self.trial, self.client, self.run_id, self.direction = trial, client, run_id, direction
        self.last: float | None = None
        self.epochs = 0
        self.pending: list[Any] = []
        self.sent = time.monotonic()

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        import optuna
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, epoch) for k, v in metrics.items()]
        if time.monotonic() - self.sent >= 1.0:
            self.flush()
        self.epochs = epoch
        self.last = epoch_value(metrics, self.direction)
        self.trial.report(self.last, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    def flush(self) -> None:
        for i in range(0, len(self.pending), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=self.pending[i : i + 1000])
        self.pending, self.sent = [], time.monotonic()


def trial_prepared(plan: TrialPlan, raw: RawData, base: ExperimentConfig, prepared: Prepared) -> Prepared:
    """The base config's prepared splits, unless the trial changes how they are made (data, features, seed)."""
    cfg = plan.config
    same = (cfg.data, cfg.features, cfg.drift, cfg.seed) == (base.data, base.features, base.drift, base.seed)
    return prepared if same else build_features(preprocess(raw, cfg.data, cfg.seed), cfg.features, cfg.drift)


def run_trial(plan: TrialPlan, prepared: Prepared) -> TrialResult:
    """Train the trial's config; its MLflow run is a child of the study's run. A complete trial's model is
    stored in the stage cache under the key the training flow uses for that config and data, so training
    the winner takes it from there."""
    import optuna
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from torchcycle.models.training import resolve_device
    from torchcycle.tasks.train import train

    cfg, client = plan.config, MlflowClient(plan.tracking_uri)
    tags = {
        "mlflow.parentRunId": plan.parent_run_id,
        "torchcycle.study": plan.study,
        "torchcycle.trial": str(plan.number),
        "torchcycle.config_hash": cfg.config_hash(),
        "torchcycle.trial_process": _process(),
    }
    run_id = client.create_run(plan.experiment_id, run_name=f"trial-{plan.number}", tags=tags).info.run_id
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in cfg.flat_params().items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    pruner = make_pruner(cfg.tune, plan.epochs)  # the base config's epochs: one pruner for the whole study
    study = optuna.load_study(study_name=plan.study, storage=storage(plan.storage_url), pruner=pruner)
    report = _Report(optuna.trial.Trial(study, plan.trial_id), client, run_id, plan.direction)
    start = time.perf_counter()
    try:
        trained = train(
            prepared,
            cfg.model,
            cfg.train,
            seed=cfg.seed,
            device=resolve_device(cfg.train.device),
            callback=report,
            progress=False,
        )
    except optuna.TrialPruned:
        report.flush()
        client.set_tag(run_id, "torchcycle.trial_state", "PRUNED")
        client.set_terminated(run_id, "FINISHED")
        seconds = time.perf_counter() - start
        return TrialResult(plan.number, "PRUNED", report.last, report.epochs, run_id, seconds, {}, _process())
    except BaseException:
        with contextlib.suppress(Exception):  # the curve so far; the trial's own error is the one raised
            report.flush()
        client.set_tag(run_id, "torchcycle.trial_state", "FAIL")
        client.set_terminated(run_id, "FAILED")
        raise
    report.flush()
    metrics = validation_metrics(trained, prepared)
    store_cached(stage_key("train", cfg.config_hash(), plan.data_digest), trained)
    now = int(time.time() * 1000)
    # final_*: the weights the trial ends with (the best epoch's, with patience); val_* are the per-epoch curves
    client.log_batch(run_id, metrics=[Metric(f"final_{k}", v, now, 0) for k, v in metrics.items()])
    client.set_tag(run_id, "torchcycle.trial_state", "COMPLETE" if math.isfinite(metrics[plan.metric]) else "FAIL")
    client.set_terminated(run_id, "FINISHED")
    seconds = time.perf_counter() - start
    value = metrics[plan.metric]
    return TrialResult(plan.number, "COMPLETE", value, len(trained.fit.history), run_id, seconds, metrics, _process())


def _process() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


@task(name="trial", task_run_name="trial-{plan.number}", cache_policy=NO_CACHE)
def trial_task(plan: TrialPlan, raw: RawData, base: ExperimentConfig, prepared: Prepared) -> TrialResult:
    """One trial as a Prefect task run. No retries: a trial that fails is told to the study as failed."""
    result = run_trial(plan, trial_prepared(plan, raw, base, prepared))
    shown = "n/a" if result.value is None else f"{result.value:.4f}"
    get_run_logger().info(
        "trial %d %s after %d epoch(s): %s %s (%.1f s) %s",
        plan.number,
        result.state.lower(),
        result.epochs,
        plan.metric,
        shown,
        result.seconds,
        describe(plan.params),
    )
    return result


def describe(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in params.items())


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, list) else str(value)


# ---- the study's MLflow run -----------------------------------------------------------------------------
def study_figures(study: Any) -> dict[str, bytes]:
    """Optuna's optimisation history, parallel coordinates and parameter importances as PNGs (each left out
    where the study cannot draw it yet, e.g. importances need two complete trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    _quiet_optuna()
    out: dict[str, bytes] = {}
    with warnings.catch_warnings():  # matplotlib's notes on flat axes of a young study: nothing to act on
        warnings.simplefilter("ignore")
        return _draw(study, out, plt, vis)


def _draw(study: Any, out: dict[str, bytes], plt: Any, vis: Any) -> dict[str, bytes]:
    for name, plot in (
        ("optimization_history.png", vis.plot_optimization_history),
        ("parallel_coordinate.png", vis.plot_parallel_coordinate),
        ("param_importances.png", vis.plot_param_importances),
    ):
        try:
            ax = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        out[name] = buf.getvalue()
    return out


def space_params(cfg: ExperimentConfig, study: str, storage_url: str) -> dict[str, str]:
    """The study run's params: the search space and how it is searched."""
    t = cfg.tune
    params = {f"space.{k}": v.describe() for k, v in t.space.items()}
    params.update(
        {
            "tune.sampler": t.sampler,
            "tune.pruner": t.pruner,
            "tune.startup_trials": str(t.startup_trials),
            "tune.warmup_epochs": str(t.warmup_epochs),
            "study": study,
            "study_storage": safe_url(storage_url),
        }
    )
    return params


@task(name="open-study-run", **io_task_options())
def study_run_task(tracking_uri: str, cfg: ExperimentConfig, study: Any, storage_url: str, run_name: str) -> str:
    """The study's parent MLflow run: the one a resumed study started with (RUNNING again), else a new one."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from torchcycle.tracking import ensure_experiment

    client = MlflowClient(tracking_uri)
    known = study.user_attrs.get("torchcycle.parent_run_id")
    if known:
        with contextlib.suppress(MlflowException):
            if client.get_run(known).info.lifecycle_stage == "active":
                client.update_run(known, status="RUNNING")
                return known
    exp_id = ensure_experiment(client, cfg.experiment, tracking_uri)
    tags = {
        "torchcycle.study": study.study_name,
        "torchcycle.config_hash": cfg.config_hash(),
        "torchcycle.kind": "study",
    }
    run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, v) for k, v in space_params(cfg, study.study_name, storage_url).items()])
    study.set_user_attr("torchcycle.parent_run_id", run_id)
    return run_id


@task(name="tidy-trial-runs", **io_task_options())
def tidy_trial_runs_task(tracking_uri: str, parent_run_id: str, states: dict[int, str]) -> int:
    """Child runs a killed study left RUNNING: KILLED for trials that failed, FINISHED for trials the study
    recorded as finished before the kill reached their run; runs of trials still running are left. Returns how
    many were fixed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'",
        max_results=10_000,
    )
    fixed = 0
    for run in runs:
        state = states.get(int(run.data.tags.get("torchcycle.trial", -1)), "FAIL")
        if state == "RUNNING":  # a live `tune` of the same study is training it
            continue
        client.set_tag(run.info.run_id, "torchcycle.trial_state", state)
        client.set_terminated(run.info.run_id, "FINISHED" if state in FINISHED else "KILLED")
        fixed += 1
    return fixed


@task(name="log-study", **io_task_options())
def log_study_task(tracking_uri: str, run_id: str, study: Any, metric: str) -> None:
    """The study's plots, trial counts and best trial on its parent run (again on every resume)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from torchcycle.tracking import log_figures

    client = MlflowClient(tracking_uri)
    log_figures(client, run_id, study_figures(study))
    now = int(time.time() * 1000)
    n = counts(study)
    metrics = [Metric(f"trials_{k.lower()}", float(n.get(k, 0)), now, 0) for k in ("COMPLETE", "PRUNED", "FAIL")]
    best = best_trial(study)
    if best is not None:
        metrics.append(Metric(f"best_{metric}", float(best.value), now, 0))
        client.set_tag(run_id, "torchcycle.best_trial", str(best.number))
        with tempfile_dir() as tmp:
            path = Path(tmp) / "best_params.json"
            path.write_text(json.dumps({"trial": best.number, metric: best.value, "params": best.params}, indent=2))
            client.log_artifact(run_id, str(path))
    client.log_batch(run_id, metrics=metrics)


def best_trial(study: Any) -> Any:
    """The best complete trial, None before one completed."""
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return study.best_trial if done else None


@contextlib.contextmanager
def tempfile_dir() -> Iterator[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        yield tmp
