"""The batch-scoring flow: resolve the model version, load it through MLflow, score files, record the run."""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from torchcycle.errors import ServiceDown
from torchcycle.registry import ModelRef, ResolvedModel
from torchcycle.runtime.drift import DriftCounts, drift_report
from torchcycle.tables import DEFAULT_BATCH_ROWS, find_inputs
from torchcycle.tasks.drift import record_drift_task
from torchcycle.tasks.score import (
    DEFAULT_UNIT_ROWS,
    LoadedModel,
    ScoreResult,
    check_output,
    commit_outputs_task,
    load_model_task,
    log_scoring_task,
    pending_units,
    remove_stale_parts,
    resolve_model_task,
    score_task,
    score_unit_task,
    staging_dir,
    summary_markdown,
)
from torchcycle.tracking import flow_run_id, resolve_tracking_uri, tracked_run, use_tracking_uri

SCORING_EXPERIMENT = "scoring"
WORKER_WAIT_S = 60  # a scheduler with no worker by then: the run stops (exit 3) instead of waiting for ever
DASK_CONNECT_TIMEOUT_S = 15  # a scheduler that does not answer by then is down (exit 3)


def dask_runner(workers: int = 0, address: str | None = None, torch_threads: int | None = None) -> Any:
    """The Dask task runner for `workers` local worker processes or the scheduler at `address`; None: none
    (everything in this process). One thread per worker: torch already uses the cores it is given, which is one
    (Dask's default OMP_NUM_THREADS=1) unless `torch_threads` says otherwise."""
    if not workers and not address:
        return None
    import logging

    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address, client_kwargs={"timeout": DASK_CONNECT_TIMEOUT_S})
    return DaskTaskRunner(
        cluster_class=local_cluster,
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
            # Workers log a failed heartbeat as an ERROR with a traceback when the cluster closes; the units'
            # own errors come back through their futures.
            "silence_logs": logging.CRITICAL,
            **({"env": {"OMP_NUM_THREADS": str(torch_threads)}} if torch_threads else {}),
        },
    )


@contextlib.contextmanager
def workers_started_early() -> Iterator[_EarlyClient]:
    """The flow's Dask task runner makes its client, and its local cluster, on the first submit. Made now on a
    thread, the workers start and import torch & co. (torchcycle/dask_preload.py) while this process prepares
    the data. `wait()` for it before the first submit: two makers would start two clusters. Should the body
    raise first, the thread is joined, so the cluster it makes lands in the runner's exit stack and is closed."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    runner = ctx.task_runner if ctx is not None else None
    task_runners = sys.modules.get("prefect_dask")  # not imported: no Dask task runner can be in use
    early = _EarlyClient(runner if task_runners and isinstance(runner, task_runners.DaskTaskRunner) else None)
    early.start()
    try:
        yield early
    except BaseException:
        if not early.gave_up:
            early.join(early.limit())
        raise


class _EarlyClient(threading.Thread):
    def __init__(self, runner: Any) -> None:
        super().__init__(name="torchcycle-dask-start", daemon=True)
        self.runner, self.error, self.gave_up = runner, None, False  # runner None: no Dask, nothing to make

    def limit(self) -> float | None:
        """Seconds to wait for the client: bounded for a scheduler's address (see `wait`), not for a local cluster."""
        return 2 * DASK_CONNECT_TIMEOUT_S if getattr(self.runner, "address", None) else None

    def run(self) -> None:
        if self.runner is None:
            return
        try:
            _ = self.runner.client  # the property makes it
        except BaseException as err:  # raised by wait(), in the flow's thread
            self.error = err

    def wait(self) -> None:
        """Until the client is made; raises what making it raised (a scheduler that does not answer: its timeout,
        once, not again at the first submit). A scheduler's address that takes the connection and never speaks
        Dask keeps distributed's Client waiting whatever its timeout: ServiceDown after twice the connect timeout."""
        self.join(self.limit())
        if self.is_alive():
            self.gave_up = True
            raise ServiceDown(f"the Dask scheduler at {self.runner.address} does not answer within {self.limit()} s")
        if self.error is not None:
            raise self.error


def worker_settings() -> dict[str, Any]:
    """torchcycle/dask_workers.yaml: the Dask settings its workers train and score fastest with (why: there)."""
    from importlib.resources import files

    import yaml

    return yaml.safe_load((files("torchcycle") / "dask_workers.yaml").read_text())


def local_cluster(**kwargs: Any) -> Any:
    """A distributed.LocalCluster whose workers run with `worker_settings()` on top of the user's Dask config
    (the nanny reads its environment, and each worker its config, when it is made)."""
    import dask
    from distributed import LocalCluster

    ours = worker_settings()
    merged = dask.config.merge(dask.config.config, ours)
    theirs = list(dask.config.get("distributed.worker.preload", None) or [])  # kept: merge replaces lists
    mine = ours["distributed"]["worker"]["preload"]
    merged["distributed"]["worker"]["preload"] = theirs + [m for m in mine if m not in theirs]
    with dask.config.set(merged):
        return LocalCluster(**kwargs)


def score_files(model: str, input: str, output: str, workers: int = 0, dask: str | None = None, **kw: Any) -> Any:
    """scoring_flow in this process, or on Dask (`workers` local processes, or the scheduler at `dask`)."""
    runner = dask_runner(workers, dask)
    run = scoring_flow if runner is None else scoring_flow.with_options(task_runner=runner)
    return run(model, input, output, distributed=runner is not None, **kw)


@flow(name="scoring")
def scoring_flow(
    model: str,
    input: str,
    output: str,
    id_cols: list[str] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    tracking_uri: str | None = None,
    experiment: str = SCORING_EXPERIMENT,
    distributed: bool = False,
    unit_rows: int = DEFAULT_UNIT_ROWS,
) -> ScoreResult:
    """Score a file, directory or glob of CSV/Parquet with `model` (NAME, NAME@alias, NAME/version).

    `output` ending in .parquet is one file for all inputs; anything else is a directory with one
    file per input and model version, and inputs already scored by that version are skipped.
    `distributed`: work units (files, and row groups of big Parquet files) mapped over the flow's task
    runner (Dask: see score_files), each into a part; outputs committed when all their units succeeded."""
    uri = resolve_tracking_uri(tracking_uri)
    use_tracking_uri(uri)
    ref = ModelRef.parse(model)
    inputs = find_inputs(input)
    resolved = resolve_model_task(uri, ref)
    check_output(input, inputs, Path(output), resolved)  # before a byte is read or an MLflow run exists
    # Loaded here too when distributed: a model that cannot load fails before any worker is busy.
    loaded = load_model_task(uri, resolved)
    params = {
        "model_ref": str(ref),
        "model_uri": resolved.uri,
        "model_name": resolved.name,
        "model_version": resolved.version,
        "input": str(input),
        "output": str(output),
        "batch_rows": str(batch_rows),
    }
    tags = {"prefect.flow_run_id": flow_run_id(), "model_run_id": resolved.run_id, "torchcycle.kind": "scoring"}
    with tracked_run(uri, experiment, f"score-{resolved.name}-v{resolved.version}", params, tags) as run_id:
        if distributed:
            result = _score_units(uri, loaded, resolved, inputs, Path(output), tuple(id_cols or ()), batch_rows,
                                  unit_rows)  # fmt: skip
        else:
            result = score_task(loaded, resolved, inputs, Path(output), tuple(id_cols or ()), batch_rows)
        log_scoring_task(uri, run_id, result)
        if loaded.reference is not None and result.drift_counts is not None and result.rows:
            counts = DriftCounts.from_dict(result.drift_counts, loaded.reference)
            report = drift_report(loaded.reference, counts)
            record_drift_task(uri, run_id, resolved.name, resolved.version, report, loaded.reference, counts)
            result = replace(result, drift=report)
    result = replace(result, scoring_run_id=run_id)
    create_markdown_artifact(
        markdown=summary_markdown(result) + f"\nMLflow run `{run_id}`\n",
        key="scoring-summary",
        description=f"{resolved.name} v{resolved.version}: {result.rows} rows",
    )
    return result


def _score_units(
    uri: str,
    loaded: LoadedModel,
    model: ResolvedModel,
    inputs: list[Path],
    output: Path,
    id_cols: tuple[str, ...],
    batch_rows: int,
    unit_rows: int,
) -> ScoreResult:
    """Map score_unit_task over the work units (on the flow's task runner), then commit what is whole."""
    start = time.perf_counter()
    with workers_started_early() as workers:  # the client: made on a thread, so a silent scheduler is bounded
        units, skipped = pending_units(inputs, output, model, unit_rows, batch_rows)
        workers.wait()
    _wait_for_a_worker()
    staging = staging_dir(output)
    remove_stale_parts(output)
    try:
        futures = [
            score_unit_task.submit(uri, model, u, str(staging / f"{u.index:06d}.parquet"), id_cols, batch_rows)
            for u in units
        ]
        outcomes = [(u, _outcome(f)) for u, f in zip(units, futures, strict=True)]
        seconds = time.perf_counter() - start
        return commit_outputs_task(model, inputs, outcomes, skipped, output, seconds, loaded.reference)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _outcome(future: Any) -> Any:
    """A unit's result or its error. Every future is awaited, also after a lost worker (Dask raises its own
    errors, KilledWorker say, from result()), so no unit still writes into the parts when they are removed."""
    import asyncio

    try:
        return future.result(raise_on_failure=False)
    except (Exception, asyncio.CancelledError) as err:  # handed to commit_outputs, which raises it; Ctrl-C is not
        return err


def _wait_for_a_worker() -> None:
    """With a Dask task runner: at least one worker has joined, else ServiceDown (the units would wait for
    ever on a scheduler whose workers are all gone)."""
    from prefect.context import FlowRunContext

    from torchcycle.errors import ServiceDown

    ctx = FlowRunContext.get()
    client = getattr(ctx.task_runner, "client", None) if ctx is not None else None
    if client is None or not hasattr(client, "wait_for_workers"):
        return
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError:
        raise ServiceDown(
            f"no Dask worker joined the scheduler at {client.scheduler.address} within {WORKER_WAIT_S} s"
        ) from None
