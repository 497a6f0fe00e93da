"""The `torchcycle` command line. Config errors and bad data end in one message and exit code 2."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from typer._click.exceptions import ClickException  # typer vendors click: its parser raises this one
from typer.core import TyperGroup

from torchcycle.store import resolve_tracking_uri


class _OneLineUsageErrors(TyperGroup):
    """A bad option or argument is one `error:` line (exit 2) like every other refusal, not a usage box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except ClickException as err:
            where = f" (see {err.ctx.command_path} --help)" if getattr(err, "ctx", None) is not None else ""
            typer.secho(f"error: {err.format_message()}{where}", fg="red", err=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train, track, register and score torch models.",
)
DEFAULT_CONFIG = Path("configs/digits_cnn.yaml")
EXIT_BAD_INPUT = 2
EXIT_SERVICE_DOWN = 3  # a server we depend on is down: worth retrying later, unlike bad input
EXIT_BUG = 1  # none of the above: a bug of ours; TORCHCYCLE_DEBUG=1 (or --debug) shows the traceback
DEBUG_ENV = "TORCHCYCLE_DEBUG"
# how prefect.server.api.server.SubprocessASGIServer.start says its temporary API did not come up in time
TEMPORARY_API_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


_options_given = {"debug": False}  # this invocation's global options (set afresh by every invocation)


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback behind an error line.")] = False,
) -> None:
    _options_given["debug"] = debug


def _debug() -> bool:
    return _options_given["debug"] or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def _setup_env() -> None:
    # Offline machines: Prefect's telemetry would only log errors.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per model load is noise
    # Local mode starts a temporary Prefect server; on a busy 2-core machine 20 s is not always enough.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # MLflow's client retries each request 7 times with backoff up to 2 minutes (4 minutes before a "server
    # down" is known); 3 short ones here, and the I/O tasks' own retries (TORCHCYCLE_IO_RETRY_DELAYS) on top.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", fg="red", err=True)
    return typer.Exit(code)


class _NoTracebackOnTheConsole:
    """Logging filter: a failed task or flow is logged on the console as one line, not a traceback. The CLI
    prints the error itself; a stack trace of Prefect internals would only bury it."""

    def filter(self, record) -> bool:
        # a bug's traceback too: the CLI's error line names it and --debug prints it (the Prefect UI keeps it)
        if record.exc_info and not _debug():
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_console_tracebacks() -> None:
    import logging

    from prefect.logging.configuration import setup_logging

    setup_logging()  # idempotent; makes Prefect's handlers exist so the filter can be attached
    handlers = {h for name in ("prefect", "") for h in logging.getLogger(name).handlers}
    for handler in handlers:
        handler.addFilter(_NoTracebackOnTheConsole())


def _loaded(module: str, *names: str) -> tuple[type[BaseException], ...]:
    """The exception classes `module.name` when `module` is imported, else (): an error of a class whose module
    was never imported cannot have been raised, so classifying one imports nothing (torch, httpx and mlflow
    take seconds to import, and a registry command's error line should not wait for them)."""
    found = sys.modules.get(module)
    return tuple(getattr(found, name) for name in names) if found is not None else ()


def _bad_input_errors() -> tuple[type[Exception], ...]:
    from torchcycle.errors import ConfigError, DataError

    # OutOfMemory too: its message names the batch size to try, a stack trace would add nothing; and a
    # diverged training (FloatingPointError: "lower train.lr")
    return (ConfigError, DataError, FloatingPointError, *_loaded("torchcycle.models.training", "OutOfMemory"))


def _tracking_failure(err: BaseException) -> tuple[str, int] | None:
    """(message, exit code) when `err` is a server refusing (2) or unreachable/failing (3), else None."""
    from torchcycle.retry import server_refusal

    status_error = _loaded("httpx", "HTTPStatusError")
    uri = resolve_tracking_uri()
    remote = uri.startswith(("http://", "https://"))
    refusal = server_refusal(err)
    if refusal and isinstance(err, status_error):
        return f"the Prefect server refused the request ({refusal}); check PREFECT_API_AUTH_STRING", EXIT_BAD_INPUT
    if refusal and remote:
        hint = " (check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)" if refusal.startswith("401") else ""
        return f"the MLflow server at {uri} refused the request ({refusal}){hint}", EXIT_BAD_INPUT
    if isinstance(err, status_error) and err.response.status_code >= 500:
        return f"the Prefect server failed ({err.response.status_code}); try again later", EXIT_SERVICE_DOWN
    if isinstance(err, _loaded("httpx", "TransportError")):
        return f"the Prefect server is unreachable ({_first_line(err)}); try again later", EXIT_SERVICE_DOWN
    failing = (
        *_loaded("mlflow.exceptions", "MlflowException"),
        *_loaded("requests.exceptions", "RequestException"),
        ConnectionError,
    )
    if remote and isinstance(err, failing):
        return (
            f"the MLflow tracking server at {uri} is unreachable or failing, after retries ({_first_line(err)}). "
            "Run the same command again later; a training resumes from its last checkpoint.",
            EXIT_SERVICE_DOWN,
        )
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _classify(err: BaseException) -> tuple[str, int] | None:
    """(message, exit code) for every failure with a known cause; None for a bug of ours."""
    from torchcycle.retry import file_system_refusal, is_lock_timeout

    if isinstance(err, _bad_input_errors()):
        return str(err), EXIT_BAD_INPUT
    if file_system_refusal(err):
        assert isinstance(err, OSError)
        where = err.filename or "a file"
        return f"cannot use {where}: {err.strerror or type(err).__name__}", EXIT_BAD_INPUT
    dask_lost = (*_loaded("distributed", "KilledWorker"), *_loaded("distributed.comm.core", "CommClosedError"))
    if isinstance(err, (*_loaded("torchcycle.errors", "ServiceDown"), *dask_lost)):
        what = "a Dask worker or the scheduler was lost" if isinstance(err, dask_lost) else "a service is down"
        return f"{what} ({_first_line(err)}); try again later", EXIT_SERVICE_DOWN
    if is_lock_timeout(err):
        return (
            f"the tracking store {resolve_tracking_uri()} stayed locked by another process, after retries; "
            "try again when it has finished",
            EXIT_SERVICE_DOWN,
        )
    if isinstance(err, RuntimeError) and str(err).startswith(TEMPORARY_API_TIMEOUT):
        # Prefect's own words, whichever process started it (ours, or Prefect's in a flow we did not wrap)
        limit = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "20")
        return (
            f"Prefect's temporary API did not start within {limit} s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_"
            "SECONDS): the machine may be busy. Try again, raise that limit, or set PREFECT_API_URL to a running "
            "Prefect server",
            EXIT_SERVICE_DOWN,
        )
    return _tracking_failure(err)


def _clean_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Every failure of a command ends in one `error:` line and its exit code: 2 bad input (config, data,
    a server's refusal, a file system saying no), 3 a server down or busy after retries, 1 a bug."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as err:
            found = _classify(err)
            if _debug():
                import traceback

                traceback.print_exc()
            if found is None:
                found = (f"unexpected {type(err).__name__}: {_first_line(err)} (--debug shows where)", EXIT_BUG)
            raise _fail(*found) from None

    return wrapper


def _preflight(cfg) -> None:
    """Checks that need no flow run: fail in milliseconds, not after starting Prefect."""
    from torchcycle.tables import find_inputs

    scheme, _, path = cfg.data.source.partition(":")
    if scheme == "file":
        find_inputs(path)  # a file, a directory or a glob of CSV/Parquet; DataError when there is none
    if scheme == "images" and not Path(path).exists():
        from torchcycle.errors import DataError

        raise DataError(f"image source not found: {path}")


@app.command()
@_clean_errors
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="Experiment YAML.")] = DEFAULT_CONFIG,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set train.epochs=5")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last stdout line.")] = False,
    nproc: Annotated[int, typer.Option(min=1, help="Processes for torch DDP via torchrun (GPUs, else CPU).")] = 1,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Run every stage again; neither read nor write the stage cache.")
    ] = False,
) -> None:
    """Run the training flow for one experiment config. Stages done by an earlier run with the same config,
    data and code come from the stage cache (TORCHCYCLE_CACHE_DIR, default ./cache)."""
    _setup_env()
    from torchcycle.config import load_config

    cfg = load_config(config, set_ or [])
    _preflight(cfg)
    if nproc > 1:
        # torchrun starts N processes of torchcycle.ddp: NCCL on GPUs, gloo on CPU; rank 0 runs the flow.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        cmd += ["-m", "torchcycle.ddp", "--config", str(config)]
        for item in set_ or []:
            cmd += ["--set", item]
        cmd += ["--json"] if as_json else []
        cmd += ["--no-cache"] if no_cache else []
        raise typer.Exit(subprocess.call(cmd))
    with contextlib.ExitStack() as stack:
        run_training(cfg, as_json, cache=not no_cache, api_ready=_prefect_api(stack))


@_clean_errors  # also rank 0's entry under DDP, outside Typer
def run_training(cfg, as_json: bool = False, cache: bool = True, api_ready: Callable[[], object] | None = None) -> None:
    """The training flow plus its printed summary (also rank 0's job under DDP). `api_ready`: waits for the
    Prefect API started in the background (see `_prefect_api`)."""
    from torchcycle.flows.training import training_flow

    _quiet_console_tracebacks()
    if api_ready is not None:
        api_ready()
    summary = training_flow(cfg, cache=cache)
    _print_training(summary)
    if as_json:
        print(
            json.dumps(
                {
                    "run_id": summary.run_id,
                    "model_name": summary.model_name,
                    "model_version": summary.model_version,
                    "metrics": summary.metrics,
                    "device": summary.device,
                }
            )
        )


@app.command()
@_clean_errors
def tune(
    config: Annotated[Path, typer.Option("--config", "-c", help="Experiment YAML with a tune: section.")],
    trials: Annotated[int, typer.Option(min=1, max=100_000, help="Finished trials the study should hold.")],
    parallel: Annotated[
        int, typer.Option(min=1, max=256, help="Trials at once: local worker processes (or on the --dask cluster).")
    ] = 1,
    study: Annotated[
        str | None, typer.Option(help="Study name: resumes that study (default: a new one, NAME-DATE-TIME).")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=1, help="Start no trial after this many seconds (running ones finish).")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(help="Optuna storage URL (default: $TORCHCYCLE_OPTUNA_STORAGE, else mlflow/optuna.db)."),
    ] = None,
    dask: Annotated[
        str | None,
        typer.Option(help=f"Run the trials on the Dask scheduler at tcp://HOST:PORT (default: ${DASK_ENV})."),
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set train.epochs=5")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last stdout line.")] = False,
) -> None:
    """Search the config's tune.space with Optuna (pruned per epoch, one nested MLflow run per trial), then
    train, register and gate the best trial's config. A killed study resumes with --study NAME."""
    _setup_env()
    from torchcycle.config import load_config
    from torchcycle.errors import ConfigError
    from torchcycle.tasks.tune import STORAGE_ENV, check_storage, check_tunable

    cfg = load_config(config, set_ or [])
    check_tunable(cfg)
    if study is not None and not _STUDY_NAME.fullmatch(study):
        raise ConfigError(f"--study '{study}' is not a study name: letters, digits, . _ - (at most 200)")
    _preflight(cfg)
    url = _optuna_storage(storage)
    check_storage(url, cfg, study)
    os.environ[STORAGE_ENV] = url  # the flow reads it there: a password in the URL is no flow-run parameter
    dask = dask if dask is not None else (os.environ.get(DASK_ENV) or None)
    stack = contextlib.ExitStack()
    if dask:
        dask = _dask_address(dask)
        host = dask.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
        if url.startswith("sqlite") and host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError(
                f"the study storage {url} is a file on this machine, which the Dask workers at {dask} cannot share: "
                "give --storage postgresql+psycopg://... (or TORCHCYCLE_OPTUNA_STORAGE)"
            )
        _check_dask_answers(dask)
        _quiet_dask_logs()
    with stack:
        # a remote cluster's workers report to their own API; local ones (parallel > 1) to this one
        api_ready = _prefect_api(stack, start=not dask)
        from torchcycle.flows.tuning import tune_study

        _quiet_console_tracebacks()
        if parallel > 1 and not dask:
            _quiet_dask_logs()
        api_ready()
        summary = tune_study(cfg, trials, parallel, dask, study=study, timeout=timeout)
    _print_tuning(summary)
    if as_json:
        winner = summary.winner
        print(
            json.dumps(
                {
                    "study": summary.study,
                    "run_id": summary.parent_run_id,
                    "trials": summary.counts,
                    "ran": summary.ran,
                    "metric": summary.metric,
                    "best_trial": summary.best_number,
                    "best_value": summary.best_value,
                    "best_params": summary.best_params,
                    "model_name": getattr(winner, "model_name", None),
                    "model_version": getattr(winner, "model_version", None),
                    "registered": hasattr(winner, "run_id"),
                }
            )
        )


_STUDY_NAME = __import__("re").compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


def _optuna_storage(explicit: str | None) -> str:
    """The study storage URL: checked here, so a typo is one error line before Prefect starts."""
    from torchcycle.errors import ConfigError
    from torchcycle.tasks.tune import default_storage

    url = explicit if explicit is not None else default_storage()
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigError(
            f"--storage '{url}' is not a database URL (sqlite:///PATH or postgresql+psycopg://...)"
        ) from None
    return url


def _print_tuning(s) -> None:
    from torchcycle.tasks.tune import describe

    n = ", ".join(f"{v} {k.lower()}" for k, v in sorted(s.counts.items()))
    typer.echo(f"study  {s.study}: {n}; {s.ran} trial(s) run now   (MLflow run {s.parent_run_id})")
    if s.best_number is None:
        typer.echo("best   no trial completed: nothing trained or registered")
        return
    typer.echo(f"best   trial {s.best_number}: {s.metric} {s.best_value:.4f}  {describe(s.best_params)}")
    w = s.winner
    if hasattr(w, "run_id"):
        _print_training(w)
    else:
        typer.echo(f"winner already registered as {w.model_name} v{w.model_version} ({w.reason})")


@app.command()
@_clean_errors
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="Experiment YAML.")] = DEFAULT_CONFIG,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set train.epochs=5")] = None,
    workdir: Annotated[Path, typer.Option(help="Where the sample and scored files go.")] = Path("outputs"),
) -> None:
    """The main job: train, gate, then batch-score held-out rows with the champion; one summary."""
    _setup_env()
    from torchcycle.config import load_config

    cfg = load_config(config, set_ or [])
    _preflight(cfg)
    with contextlib.ExitStack() as stack:
        api_ready = _prefect_api(stack)
        from torchcycle.flows.lifecycle import lifecycle_flow

        _quiet_console_tracebacks()
        api_ready()
        summary = lifecycle_flow(cfg, workdir=str(workdir))
    _print_training(summary.training, ui_hint=False)
    _print_scoring(summary.scoring)
    _print_ui_hint()


@app.command()
@_clean_errors
def predict(
    model: Annotated[str, typer.Option("--model", "-m", help="NAME (= NAME@champion), NAME@alias or NAME/version.")],
    input_: Annotated[str, typer.Option("--input", "-i", help="CSV/Parquet file, directory or glob.")],
    output: Annotated[str, typer.Option("--output", "-o", help="FILE.parquet, or a directory: one file per input.")],
    id_col: Annotated[list[str] | None, typer.Option("--id-col", help="Column to carry into the output first.")] = None,
    batch_rows: Annotated[int, typer.Option(min=1, help="Rows per streamed batch.")] = 65_536,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last stdout line.")] = False,
    workers: Annotated[
        int, typer.Option(min=0, max=1024, help="Score on a local Dask cluster of N worker processes (0: no Dask).")
    ] = 0,
    dask: Annotated[
        str | None,
        typer.Option(help=f"Score on the Dask scheduler at tcp://HOST:PORT (default: ${DASK_ENV})."),
    ] = None,
    unit_rows: Annotated[
        int, typer.Option(min=1, help="With Dask: Parquet files of more rows are split into units of row groups.")
    ] = 1_048_576,
) -> None:
    """Batch-score files with a registered model into Parquet (written atomically), here or on Dask."""
    _setup_env()
    if dask is None and not workers:  # an explicit --workers wins over the environment's scheduler
        dask = os.environ.get(DASK_ENV) or None
    if workers and dask:
        raise _fail(f"--workers starts a local Dask cluster; --dask (or ${DASK_ENV}) names one: give one of them")
    if dask is not None:
        dask = _dask_address(dask)
    from torchcycle.errors import DataError
    from torchcycle.registry import ModelRef
    from torchcycle.tables import find_inputs
    from torchcycle.tasks.score import check_output

    for option, value in (("--input", input_), ("--output", output)):
        if not value.strip():  # an unset shell variable: never "the current directory"
            raise DataError(f"{option} is empty: give a file, a directory or a glob")
    ModelRef.parse(model)  # fail in milliseconds, before Prefect starts
    check_output(input_, find_inputs(input_), Path(output))
    if dask:
        _check_dask_answers(dask)
    with contextlib.ExitStack() as stack:
        # a remote cluster's workers report to their own API; local ones (--workers) to this one
        api_ready = _prefect_api(stack, start=not dask)
        from torchcycle.flows.scoring import score_files

        _quiet_console_tracebacks()
        if workers or dask:
            _quiet_dask_logs()
        api_ready()
        try:
            result = score_files(
                model, input_, output, workers, dask, id_cols=id_col or [], batch_rows=batch_rows, unit_rows=unit_rows
            )
        except OSError as err:  # the scheduler named by --dask does not answer
            if dask and "Timed out trying to connect" in str(err):
                raise _fail(f"the Dask scheduler at {dask} does not answer ({_first_line(err)})", 3) from None
            raise
    _print_scoring(result)
    if as_json:
        print(
            json.dumps(
                {
                    "model_name": result.model.name,
                    "model_version": result.model.version,
                    "rows": result.rows,
                    "seconds": round(result.seconds, 3),
                    "output": result.output,
                    "files": [f.output for f in result.files],
                    "skipped": [f.input for f in result.files if f.skipped],
                    "run_id": result.scoring_run_id,
                    "drift": None
                    if result.drift is None
                    else {
                        "status": result.drift.status,
                        "max_psi": result.drift.max_psi,
                        "prediction_psi": result.drift.prediction_psi,
                        "drifted": result.drift.drifted,
                    },
                }
            )
        )


DASK_ENV = "TORCHCYCLE_DASK_ADDRESS"


def _prefect_api(stack: contextlib.ExitStack, start: bool = True) -> Callable[[], object]:
    """Without PREFECT_API_URL: Prefect's temporary API, started now in the background, so its start-up overlaps
    the imports that follow, and named in the environment local Dask workers are spawned from (they report to
    the API this flow uses). Call the returned function before the first flow run. With PREFECT_API_URL (a
    running server): nothing to start. `start` False (a remote Dask cluster, whose workers report to their own
    API): left to Prefect, which starts its temporary API at the first flow run."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return lambda: None
    from torchcycle.local_server import no_heartbeats_on_a_temporary_api, starting_temporary_api

    if not start:
        stack.enter_context(no_heartbeats_on_a_temporary_api())
        return lambda: None
    return stack.enter_context(starting_temporary_api())


def _dask_address(text: str) -> str:
    """`tcp://HOST:PORT` (or HOST:PORT, which means tcp); anything else is one error line."""
    import re

    raw = text.strip()
    address = raw if "://" in raw else f"tcp://{raw}"
    m = re.fullmatch(r"(tcp|tls)://([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})", address)
    if not m or not 1 <= int(m.group(3)) <= 65535:
        raise _fail(f"--dask '{text}' is not a Dask scheduler address: use tcp://HOST:PORT (e.g. tcp://127.0.0.1:8786)")
    return address


def _check_dask_answers(address: str) -> None:
    """A scheduler that does not accept a connection: exit 3 in seconds, before Prefect or a flow run starts."""
    import socket

    host, port = address.split("://", 1)[1].rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as err:
        raise _fail(f"the Dask scheduler at {address} does not answer ({err.strerror or err})", 3) from None


def _quiet_dask_logs() -> None:
    """Dask's scheduler and workers log every connection at INFO; a scoring command shows its own progress."""
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # read when distributed is imported (workers too)
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.worker"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _print_scoring(result) -> None:
    rate = result.rows / result.seconds if result.seconds > 0 else 0.0
    skipped = sum(f.skipped for f in result.files)
    typer.echo(
        f"scored {result.rows} rows from {len(result.files) - skipped} file(s) with "
        f"{result.model.name} v{result.model.version} in {result.seconds:.2f} s ({rate:,.0f} rows/s)"
        + (f"; {skipped} already scored by this version, skipped" if skipped else "")
    )
    typer.echo(f"output {result.output}   (MLflow run {result.scoring_run_id})")
    report = result.drift
    if report is not None and report.judged:
        parts = [", ".join(f"{c} {v:.2f}" for c, v in report.worst(3))] if report.psi else []
        if report.prediction_psi is not None:  # a model of images has only this one
            parts.append(f"predictions {report.prediction_psi:.2f}")
        line = f"drift  {report.status}: PSI {'; '.join(parts)}"
        if not report.enough_rows:
            line += f" -- {report.rows} rows, fewer than drift.min_rows ({report.min_rows}): not judged"
        elif report.drifted:
            line += f" -- {len(report.drifted)} column(s) at or over {report.threshold:g}: " + ", ".join(
                list(report.drifted)[:10]
            )
        typer.echo(line)


def _print_ui_hint() -> None:
    typer.echo("ui     torchcycle ui   (then open http://127.0.0.1:5000)")


def _print_training(summary, ui_hint: bool = True) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    table = Table(title=f"{summary.model_name} v{summary.model_version}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in sorted(summary.metrics.items()):
        table.add_row(k, f"{v:.4f}")
    console.print(table)
    d = summary.decision
    if d is not None:
        verdict = "promoted to champion" if d.promote else "rejected: alias challenger, champion unchanged"
        console.print(f"gate   {verdict} ({d.reason})", soft_wrap=True, highlight=False)
    for line in (
        f"model  {summary.model_uri}  ({summary.epochs} epochs on {summary.device})",
        f"run    {summary.run_id}  in {summary.tracking_uri}",
    ):
        console.print(line, soft_wrap=True, highlight=False)
    if ui_hint:
        _print_ui_hint()


@app.command()
@_clean_errors
def ui(
    port: Annotated[int, typer.Option(help="Port for the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
) -> None:
    """Open the MLflow UI on the embedded store (or print where the server is)."""
    from torchcycle.store import artifact_root_for, prepare_store

    uri = resolve_tracking_uri()
    if not uri.startswith("sqlite:///"):
        typer.echo(f"Tracking server in use: {uri} (open it in a browser)")
        return
    prepare_store(uri)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        artifact_root_for(uri) or "",
        "--host",
        host,
        "--port",
        str(port),
    ]
    typer.echo(f"MLflow UI on http://{host}:{port} (store {uri}); Ctrl-C to stop")
    os.execv(sys.executable, cmd)


def _client():
    with _no_gc_while_starting():
        from mlflow.tracking import MlflowClient

        return MlflowClient(resolve_tracking_uri())


@contextlib.contextmanager
def _no_gc_while_starting() -> Iterator[None]:
    """Import MLflow and open its store with the cyclic garbage collector paused, then exempt what that made
    from later collections (gc.freeze). Those are some 250,000 objects (modules, classes, SQLAlchemy
    mappings) that live as long as the process: every full collection while they are being made walks all
    of them again, and so does the one at exit, for nothing: over a second of `torchcycle models` on a
    2-core machine, more than half of what `import mlflow` takes (bench/bench_cli.py). Only in a process
    that has not imported MLflow yet (a command as a user runs it); the collector runs as usual afterwards."""
    if "mlflow" in sys.modules or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


@app.command("models")
@_clean_errors
def models_cmd(
    name: Annotated[str | None, typer.Argument(help="Registered model; all models when left out.")] = None,
) -> None:
    """A table of registered models, or of one model's versions with aliases and gate status."""
    _setup_env()
    _models_table(_client(), name)


def _models_table(client, name: str | None) -> None:
    from torchcycle import registry

    if name is None:
        names = registry.list_models(client)
        typer.echo("\n".join(names) if names else "no registered models yet: run `torchcycle train`")
        return
    rows = registry.list_versions(client, name)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=name)
    for col in ("version", "aliases", "status", "metric", "value", "created", "run id"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.version, ", ".join(r.aliases), r.status, r.metric, r.value, r.created, r.run_id)
    console = Console()
    if not console.is_terminal:  # piped or captured: no terminal width to fit, so don't truncate
        console = Console(width=200)
    console.print(table)


@app.command("promote")
@_clean_errors
def promote_cmd(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to promote.")],
    alias: Annotated[str, typer.Option(help="Alias to move.")] = "champion",
) -> None:
    """Point an alias (default champion) at a version by hand; recorded in the version's tags."""
    _setup_env()
    from torchcycle import registry

    previous = registry.promote(_client(), name, version, alias)
    typer.echo(f"{name}@{alias}: v{previous or '-'} -> v{registry.check_version(version)}")


@app.command("rollback")
@_clean_errors
def rollback_cmd(name: Annotated[str, typer.Argument(help="Registered model name.")]) -> None:
    """Move champion back to the previous champion."""
    _setup_env()
    from torchcycle import registry

    old, new = registry.rollback(_client(), name)
    typer.echo(f"{name}@champion: v{old or '-'} -> v{new}")


_DeployConfig = Annotated[str, typer.Option("--config", help="Config to retrain (and its deployment: section).")]
_ScoreModel = Annotated[str, typer.Option("--model", help="Model the scheduled scoring uses.")]
_ScoreIn = Annotated[str, typer.Option("--score-input", help="Directory/glob scored on the schedule.")]
_ScoreOut = Annotated[str, typer.Option("--score-output", help="Directory for scored files.")]
# torchcycle.config.SCHEDULE_HELP's words; not imported: torchcycle.config imports torch, help must be quick
_Schedule = "a cron line ('0 2 * * *'), an interval (90, 30s, 15m, 6h, 1d) or 'off'"
_RetrainSchedule = Annotated[str | None, typer.Option("--retrain-schedule", help=f"When to retrain: {_Schedule}.")]
_TuneSchedule = Annotated[
    str | None, typer.Option("--tune-schedule", help=f"When to start a study (default off: on demand): {_Schedule}.")
]
_ScoreSchedule = Annotated[str | None, typer.Option("--score-schedule", help=f"When to score: {_Schedule}.")]
_Timezone = Annotated[str | None, typer.Option("--timezone", help="Time zone of cron lines (default UTC).")]
_ScoreDask = Annotated[
    str | None,
    typer.Option(
        "--dask", help="Scheduled scoring on the Dask scheduler at tcp://HOST:PORT (default: $TORCHCYCLE_DASK_ADDRESS)."
    ),
]
_DriftCooldown = Annotated[
    str | None,
    typer.Option(
        "--drift-cooldown",
        help="Retrain when scoring reports drift, at most once per this window: 90, 30s, 15m, 6h, 1d "
        "(default 1d, or as on the server); 'off': no retrain on drift.",
    ),
]


def _deployment_specs(
    config: str,
    source: Path,
    model: str,
    score_input: str,
    score_output: str,
    schedules,
    tz,
    drift_cooldown=None,
    dask: str | None = None,
):
    """The deployments (retrain, score, tune) with their schedules: options > the config's deployment:
    section > unset; and
    the drift automation's (model name, cool-down): the config's name (None where the config cannot be read
    here), the cool-down option > the config's deployment.drift_cooldown > unset (None).
    Bad options or config: one error line, exit 2."""
    from torchcycle.config import check_timezone, load_config, parse_schedule
    from torchcycle.flows.deployments import default_specs, parse_cooldown

    local = Path(config) if Path(config).is_absolute() else source / config
    try:
        cfg = load_config(local) if local.is_file() else None
        section = cfg.deployment if cfg else None
        zone = check_timezone(tz) if tz is not None else (section.timezone if section else "UTC")
        chosen = {
            which: parse_schedule(text, zone) if text is not None else (section.schedule(which) if section else None)
            for which, text in schedules.items()
        }
        cooldown = parse_cooldown(drift_cooldown) if drift_cooldown is not None else None
        if cooldown is None and section is not None:
            cooldown = section.drift_cooldown
    except ValueError as err:  # ConfigError too
        raise _fail(str(err)) from None
    dask = dask if dask is not None else (os.environ.get(DASK_ENV) or None)
    specs = default_specs(config, model, score_input, score_output, chosen, _dask_address(dask) if dask else None)
    if cfg is not None and not cfg.tune.space:  # a study of it would stop at once: "no tune.space"
        specs = tuple(s for s in specs if s.name != "tune")
    return specs, (cfg.name if cfg else None, cooldown)


def _drift_automation(drift, retrain_id) -> list[str]:
    """Create, update or remove the retrain-on-drift automation of the retrained model; what was done."""
    from torchcycle.flows.deployments import sync_drift_automation

    model_name, cooldown = drift
    if model_name is None:  # --source names the worker's directory, and the config is not here to read
        return ["retrain-on-drift: no automation: the config is not readable here, so its model name is unknown"]
    return sync_drift_automation(model_name, retrain_id, cooldown)


def _with_server_schedules(specs):
    """Fill unset schedules from the server (or defaults); (specs, what changes, server schedules)."""
    from torchcycle.flows.deployments import read_existing, resolve_schedules

    existing = read_existing(tuple((s.flow_name, s.name) for s in specs))
    specs, changes = resolve_schedules(specs, existing)
    if all(s.name != "tune" for s in specs):  # left out by _deployment_specs
        changes.append("tune: left out: the config has no tune.space")
    return specs, changes, existing


@app.command()
@_clean_errors
def deploy(
    pool: Annotated[str, typer.Option(help="Process work pool (created when missing).")] = "torchcycle",
    source: Annotated[Path, typer.Option(help="Project directory as the worker sees it.")] = Path("."),
    config: _DeployConfig = "configs/digits_cnn.yaml",
    model: _ScoreModel = "digits-cnn",
    score_input: _ScoreIn = "data/incoming",
    score_output: _ScoreOut = "data/scored",
    retrain_schedule: _RetrainSchedule = None,
    score_schedule: _ScoreSchedule = None,
    tune_schedule: _TuneSchedule = None,
    timezone: _Timezone = None,
    drift_cooldown: _DriftCooldown = None,
    dask: _ScoreDask = None,
) -> None:
    """Register the `retrain`, `score` and `tune` deployments with the Prefect server, and say what changed.

    A schedule not given here or in the config's deployment: section stays as the server has it (edited
    in the UI, say); a new deployment gets the default (retrain 02:00 UTC nightly, score hourly, tune none:
    on demand).
    Also creates or updates the automation `retrain-on-drift-NAME` (NAME: the config's model): a drift
    event of NAME's scoring runs `retrain`, at most once per cool-down window (default 1 day)."""
    _setup_env()
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise _fail("PREFECT_API_URL is not set: point it at your Prefect server (e.g. http://127.0.0.1:4200/api)")
    schedules = {"retrain": retrain_schedule, "score": score_schedule, "tune": tune_schedule}
    specs, drift = _deployment_specs(
        config, source, model, score_input, score_output, schedules, timezone, drift_cooldown, dask
    )
    from prefect import deploy as prefect_deploy

    from torchcycle.flows.deployments import runner_deployments

    _ensure_process_pool(pool)
    specs, changes, existing = _with_server_schedules(specs)
    prefect_deploy(
        *runner_deployments(specs, source=str(source.resolve()), existing=existing),
        work_pool_name=pool,
        build=False,
        push=False,
        print_next_steps_message=False,
        ignore_warnings=True,  # its advice (serve instead) does not apply: the worker runs them
    )
    for line in changes:
        typer.echo(f"deployed {line}")
    for line in _drift_automation(drift, _deployment_id(next(s for s in specs if s.name == "retrain"))):
        typer.echo(f"deployed {line}")
    typer.echo(f"pool {pool}: start a worker with  prefect worker start --pool {pool} --type process")


def _deployment_id(spec):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(f"{spec.flow_name}/{spec.name}").id


def _ensure_process_pool(pool: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    # idempotent: the compose worker deploys on every start
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))


@app.command()
@_clean_errors
def serve(
    config: _DeployConfig = "configs/digits_cnn.yaml",
    model: _ScoreModel = "digits-cnn",
    score_input: _ScoreIn = "data/incoming",
    score_output: _ScoreOut = "data/scored",
    retrain_schedule: _RetrainSchedule = None,
    score_schedule: _ScoreSchedule = None,
    tune_schedule: _TuneSchedule = None,
    timezone: _Timezone = None,
    drift_cooldown: _DriftCooldown = None,
    dask: _ScoreDask = None,
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="Port of the local Prefect server (when PREFECT_API_URL is unset).")
    ] = 4200,
) -> None:
    """Run the deployments on their schedules in this process (one machine, no worker). Ctrl-C stops.

    With PREFECT_API_URL set, that server schedules them; without, a local Prefect server is started
    for this command's lifetime (its UI on --port) and stopped when it ends."""
    _setup_env()
    from prefect.settings import PREFECT_API_URL

    schedules = {"retrain": retrain_schedule, "score": score_schedule, "tune": tune_schedule}
    specs, drift = _deployment_specs(
        config, Path("."), model, score_input, score_output, schedules, timezone, drift_cooldown, dask
    )
    with contextlib.ExitStack() as stack:
        if not PREFECT_API_URL.value():
            from torchcycle.local_server import PortTaken, local_prefect_server

            try:
                url = stack.enter_context(local_prefect_server(port))
            except PortTaken as err:
                raise _fail(str(err)) from None
            except RuntimeError as err:
                raise _fail(str(err), EXIT_SERVICE_DOWN) from None
            typer.echo(f"prefect server {url} (started for this command; UI on http://127.0.0.1:{port})")
        _serve(specs, drift)


def _serve(specs, drift) -> None:
    import signal

    from prefect import serve as prefect_serve

    from torchcycle.flows.deployments import runner_deployments

    def stop(signum, frame):  # SIGTERM (docker stop, kill): unwind like Ctrl-C, so the server is stopped
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    specs, changes, existing = _with_server_schedules(specs)
    for line in changes:
        typer.echo(f"serving {line}")
    deployments = runner_deployments(specs, existing=existing)
    # the automation runs the retrain deployment by id: register it now (serve registers it again, the same one)
    retrain = next(d for d, s in zip(deployments, specs, strict=True) if s.name == "retrain")
    for line in _drift_automation(drift, retrain.apply()):
        typer.echo(f"serving {line}")
    with contextlib.suppress(KeyboardInterrupt):
        prefect_serve(*deployments)


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # 143, as the default action reports it


_EXIT_CODE: list[int] = []  # the code main() exits with, once known


def _exit_without_teardown() -> None:
    """The last exit handler (registered first): every other one has run, and so has every `finally`, so skip
    the interpreter's teardown, which frees every module object one by one: 3-4 s on 2 cores once torch,
    MLflow and Prefect are loaded, after the command's work was done and printed."""
    if not _EXIT_CODE:  # an exception main() did not see: the normal way out
        return
    logging.shutdown()  # registered before this handler, so it would run after it: flush the log handlers now
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(_EXIT_CODE[0])


def main() -> None:
    import signal

    # SIGTERM (kill, docker stop, a scheduler's timeout) unwinds like Ctrl-C: Prefect's temporary API server, a
    # local Dask cluster and temp files are stopped and removed on the way out. By default the process would
    # vanish and leave the server running, re-parented to init, for good.
    signal.signal(signal.SIGTERM, _terminated)
    app()


def entry() -> None:
    """The `torchcycle` command (and `python -m torchcycle`): `main`, then out without the interpreter's teardown.
    Code that calls `main` itself keeps its process and its own exit code."""
    import atexit

    atexit.register(_exit_without_teardown)  # before torch, MLflow and Prefect register theirs: runs after them
    try:
        main()
    except SystemExit as done:  # how Typer ends every command
        code = done.code
        _EXIT_CODE.append(code if isinstance(code, int) else (0 if code is None else 1))
        raise


if __name__ == "__main__":
    entry()
