"""The tuning flow: an Optuna study of the config's `tune.space`, then the winner through the training flow.

ingest -> validate -> preprocess -> features once; then trials as Prefect task runs, `parallel` at a time
(in this process, or on Dask worker processes), until the study holds `trials` finished (complete or pruned)
trials; then the best trial's config is trained, evaluated on the test split, registered and gated by the
training flow, its model taken from the stage cache the trial filled.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed

from torchcycle.cache import cached, stage_keys
from torchcycle.config import ExperimentConfig, check_against_task, with_params
from torchcycle.errors import ConfigError
from torchcycle.flows.scoring import dask_runner, workers_started_early
from torchcycle.flows.training import TrainingSummary, Unchanged, training_flow
from torchcycle.tasks.features import Prepared, features_task
from torchcycle.tasks.gate import default_metric
from torchcycle.tasks.ingest import RawData, ingest_task
from torchcycle.tasks.preprocess import preprocess_task
from torchcycle.tasks.tune import (
    FINISHED,
    TrialPlan,
    TrialResult,
    baseline_params,
    best_trial,
    check_tunable,
    config_values,
    counts,
    default_storage,
    describe,
    fail_stale,
    heartbeats,
    log_study_task,
    objective,
    open_study,
    planned_epochs,
    safe_url,
    study_run_task,
    suggest,
    tidy_trial_runs_task,
    trial_task,
)
from torchcycle.tasks.validate import validate_task
from torchcycle.tracking import finish_run_task, flow_run_id, resolve_tracking_uri, use_tracking_uri


@dataclass(frozen=True)
class TuningSummary:
    study: str
    storage: str  # the study storage's URL, password hidden
    parent_run_id: str
    metric: str  # the objective: val_accuracy, val_r2, ...
    counts: dict[str, int]  # trial state -> trials in the study (COMPLETE, PRUNED, FAIL)
    ran: int  # trials this run finished
    best_number: int | None
    best_value: float | None
    best_params: dict[str, Any]
    winner: TrainingSummary | Unchanged | None  # None: no trial completed
    flow_run_id: str = ""  # this tuning flow run (its trials are its task runs)


def study_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def tune_study(config: ExperimentConfig, trials: int, parallel: int = 1, dask: str | None = None, **kw: Any) -> Any:
    """tuning_flow with `parallel` trials at once: on the Dask scheduler at `dask` (whose workers must reach the
    same study storage, tracking store and files), else one at a time in this process (`parallel` 1), else on a
    local Dask cluster of `parallel` worker processes sharing the machine's cores. Not threads: the training loop
    of a small model is bound by Python's dispatch and holds the GIL, and two trials in threads of one process
    took 0.9-1.0x the time of one after the other (measured on 2 cores); in two processes, 0.6x."""
    from prefect.task_runners import ThreadPoolTaskRunner

    parallel = max(1, min(parallel, trials))  # no more workers than trials
    if dask:
        runner = dask_runner(address=dask)
    elif parallel > 1:
        runner = dask_runner(workers=parallel, torch_threads=max(1, (os.cpu_count() or 1) // parallel))
    else:
        runner = ThreadPoolTaskRunner(max_workers=1)
    return tuning_flow.with_options(task_runner=runner)(config, trials, parallel=parallel, **kw)


@flow(name="tuning")
def tuning_flow(
    config: ExperimentConfig,
    trials: int,
    parallel: int = 1,
    study: str | None = None,
    timeout: float | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
) -> TuningSummary:
    """Run (or resume) study `study` until it holds `trials` finished trials, `parallel` at a time; `timeout`:
    no trial starts after that many seconds. Then train, register and gate the winner."""
    check_tunable(config)
    if trials < 1 or parallel < 1 or (timeout is not None and timeout <= 0):
        raise ConfigError(f"trials ({trials}) and parallel ({parallel}) must be >= 1, timeout ({timeout}) > 0")
    parallel = min(parallel, trials)
    # storage None: resolved here from $TORCHCYCLE_OPTUNA_STORAGE, so a database password is no flow parameter
    uri, url, name = resolve_tracking_uri(tracking_uri), storage or default_storage(tracking_uri), study
    use_tracking_uri(uri)
    with workers_started_early() as workers:
        raw = ingest_task(config.data)
        validate_task(raw)
        check_against_task(config, raw.task)
        metric, direction = objective(config.gate.metric or default_metric(raw.task))
        key = stage_keys(config.config_hash(), raw.digest, 1)
        prepared = cached(features_task, key("features"))(
            cached(preprocess_task, key("preprocess"))(raw, config.data, config.seed), config.features, config.drift
        )
        name = name or study_name(config)
        epochs = planned_epochs(config, len(prepared.x_train))
        the_study = open_study(config, name, url, direction, parallel, epochs)
        get_run_logger().info("study %s in %s (resume it with --study %s)", name, safe_url(url), name)
        parent = study_run_task(uri, config, the_study, url, f"tune-{name}")
        _take_over(the_study, config, uri, parent)
        plan = _Plan(config, name, url, uri, parent, metric, direction, raw.digest, epochs)
        try:
            workers.wait()
            ran = _run_trials(the_study, plan, trials, parallel, timeout, raw, prepared)
            log_study_task(uri, parent, the_study, metric)
            best = best_trial(the_study)
            winner = _train_winner(config, best, name, parent, uri) if best is not None else None
        except BaseException:
            with contextlib.suppress(Exception):  # the study's own error is the one to report
                finish_run_task(uri, parent, "FAILED")
            raise
    finish_run_task(uri, parent)
    summary = TuningSummary(
        name,
        safe_url(url),
        parent,
        metric,
        counts(the_study),
        ran,
        best.number if best else None,
        best.value if best else None,
        config_values(config, best.params) if best else {},
        winner,
        flow_run_id(),
    )
    create_markdown_artifact(markdown=summary_markdown(summary), key="tuning-summary", description=name)
    return summary


def _train_winner(
    config: ExperimentConfig, best: Any, study: str, parent: str, uri: str
) -> TrainingSummary | Unchanged:
    """The best trial's config through the training flow: test split, registry, gate. Nothing new is registered
    when the latest version was made from the same data, config and code (a resumed, finished study)."""
    winner_cfg = with_params(config, config_values(config, best.params))
    tags = {"torchcycle.study": study, "torchcycle.trial": str(best.number), "torchcycle.study_run_id": parent}
    return training_flow(winner_cfg, tracking_uri=uri, cache=True, skip_unchanged=True, extra_tags=tags)


def _take_over(study: Any, config: ExperimentConfig, uri: str, parent: str) -> None:
    """Before the first trial of this run: fail the trials a killed run left running (their runs KILLED), and
    in a new study enqueue the config's own values as trial 0."""
    log = get_run_logger()
    stale = fail_stale(study)
    tidy_trial_runs_task(uri, parent, {t.number: t.state.name for t in study.get_trials(deepcopy=False)})
    if stale:
        log.info("trials %s of an earlier run were left running: failed, their runs KILLED", stale)
    if not study.get_trials(deepcopy=False) and config.tune.baseline:
        base = baseline_params(config)
        if base is None:
            log.info("the config's own values lie outside tune.space: no baseline trial")
        else:
            study.enqueue_trial(base, user_attrs={"torchcycle.baseline": True})


@dataclass(frozen=True)
class _Plan:
    """What every trial of this run shares."""

    config: ExperimentConfig
    study: str
    storage_url: str
    tracking_uri: str
    parent_run_id: str
    metric: str
    direction: str
    data_digest: str
    epochs: int

    def for_trial(self, trial: Any, experiment_id: str) -> TrialPlan:
        params = suggest(trial, self.config.tune.space)
        return TrialPlan(
            self.study,
            self.storage_url,
            trial._trial_id,
            trial.number,
            params,
            with_params(self.config, params),
            self.tracking_uri,
            experiment_id,
            self.parent_run_id,
            self.metric,
            self.direction,
            self.data_digest,
            self.epochs,
        )


def _run_trials(
    study: Any, plan: _Plan, trials: int, parallel: int, timeout: float | None, raw: RawData, prepared: Prepared
) -> int:
    """Ask, run and tell trials until the study holds `trials` finished ones (trials another live run of the study
    is running count too); returns how many this run finished. A failed trial (diverged, out of memory, a NaN
    objective) is told as failed and another is asked, up to tune.max_failures in this run: then the last error
    is raised once the running trials are told. Interrupted, the running trials are told as failed."""
    from mlflow.tracking import MlflowClient

    exp_id = MlflowClient(plan.tracking_uri).get_run(plan.parent_run_id).info.experiment_id
    deadline = None if timeout is None else time.monotonic() + timeout
    running: dict[Any, Any] = {}  # future -> its optuna trial
    alive: set[int] = set()  # trial ids the heartbeat thread marks
    ran, failures, error = 0, 0, None
    with heartbeats(study, alive):
        try:
            while True:
                n = counts(study)
                room = error is None and (deadline is None or time.monotonic() < deadline)
                while (
                    room
                    and len(running) < parallel
                    and n.get("COMPLETE", 0) + n.get("PRUNED", 0) + n.get("RUNNING", 0) < trials
                ):
                    trial = _start(study, plan, exp_id, raw, prepared, running, alive)
                    n["RUNNING"] = n.get("RUNNING", 0) + 1
                if not running:
                    break
                future = next(as_completed(list(running)))  # the first to finish: its slot is free again
                trial = running.pop(future)
                alive.discard(trial._trial_id)
                failed = _finish(study, trial, future, plan.metric, trials)
                ran, failures = ran + (failed is None), failures + (failed is not None)
                if failed is not None and failures >= plan.config.tune.max_failures:
                    error = failed
        finally:  # Ctrl-C, SIGTERM, a lost scheduler: what finished is told as it ended, the rest as failed
            for future, trial in running.items():
                if future.state.is_final():
                    _finish(study, trial, future, plan.metric, trials)
                else:
                    study.tell(trial, state=_state("FAIL"), skip_if_finished=True)
    if error is not None:
        raise error
    return ran


def _start(study: Any, plan: _Plan, exp_id: str, raw: RawData, prepared: Prepared, running: dict, alive: set) -> Any:
    """Ask for a trial and submit it; a trial that cannot even start is told as failed, not left RUNNING."""
    trial = study.ask()
    try:
        study._storage.record_heartbeat(trial._trial_id)  # a trial without one never goes stale
        alive.add(trial._trial_id)
        running[trial_task.submit(plan.for_trial(trial, exp_id), raw, plan.config, prepared)] = trial
    except BaseException:
        alive.discard(trial._trial_id)
        study.tell(trial, state=_state("FAIL"), skip_if_finished=True)
        raise
    return trial


def _finish(study: Any, trial: Any, future: Any, metric: str, trials: int) -> BaseException | None:
    """Tell the study how a trial ended; the trial's error when it failed (None when it finished)."""
    import math

    try:
        result: TrialResult = future.result()
    except Exception as err:
        study.tell(trial, state=_state("FAIL"), skip_if_finished=True)
        get_run_logger().warning("trial %d failed: %s", trial.number, str(err).splitlines()[0][:300])
        return err
    if result.state == "COMPLETE" and not math.isfinite(result.value):
        study.tell(trial, state=_state("FAIL"), skip_if_finished=True)  # Optuna would fail it, and only warn
        err = FloatingPointError(f"trial {trial.number}: the objective {metric} is {result.value}")
        get_run_logger().warning("%s", err)
        return err
    if result.state == "PRUNED":
        study.tell(trial, state=_state("PRUNED"), skip_if_finished=True)
    else:
        study.tell(trial, result.value, skip_if_finished=True)
    _progress(study, result, metric, trials)
    return None


def _progress(study: Any, result: TrialResult, metric: str, trials: int) -> None:
    """One line per finished trial: `trial 6 pruned: val_accuracy 0.9278; best so far trial 4 (0.9667) [7/12]`."""
    best, now = best_trial(study), sum(counts(study).get(s, 0) for s in FINISHED)
    get_run_logger().info(
        "trial %d %s: %s %s; best so far trial %s (%s) [%d/%d finished]",
        result.number,
        result.state.lower(),
        metric,
        _fmt(result.value),
        best.number if best else "-",
        _fmt(best.value if best else None),
        now,
        trials,
    )


def _state(name: str) -> Any:
    from optuna.trial import TrialState

    return TrialState[name]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def summary_markdown(s: TuningSummary) -> str:
    n = ", ".join(f"{v} {k.lower()}" for k, v in sorted(s.counts.items()))
    best = (
        f"Best trial {s.best_number}: {s.metric} {s.best_value:.4f} with {describe(s.best_params)}"
        if s.best_number is not None
        else "No trial completed."
    )
    if isinstance(s.winner, TrainingSummary):
        verdict = "promoted to champion" if s.winner.decision and s.winner.decision.promote else "kept as challenger"
        won = f"Winner registered as {s.winner.model_name} v{s.winner.model_version}, {verdict}."
    elif isinstance(s.winner, Unchanged):
        won = f"Winner already registered: {s.winner.model_name} v{s.winner.model_version} ({s.winner.reason})."
    else:
        won = "Nothing registered."
    return f"# Study {s.study}\n\nTrials: {n}. MLflow run `{s.parent_run_id}`.\n\n{best}\n\n{won}\n"
