"""Tuning: Optuna studies through the tuning flow. Pruning on the epoch callback, one nested MLflow run per trial,
the winner trained, registered and gated; a SIGKILLed study resumed to exactly N trials; parallel trials as
Prefect task runs that overlap in time."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import optuna
import pytest
import yaml
from conftest import CONFIGS, cli_env
from mlflow.tracking import MlflowClient

from torchcycle.config import config_from_dict, load_config
from torchcycle.flows.tuning import tune_study
from torchcycle.tasks.tune import baseline_params, config_values, epoch_value

BIN = Path(sys.executable).parent


def _children(client: MlflowClient, parent_run_id: str) -> list:
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000
    )


def _small(**tune) -> dict:
    """A quick search: digits, a small MLP, a few epochs."""
    return {
        "name": "tune-small",
        "experiment": "tests",
        "data": {"source": "sklearn:digits"},
        "model": {"kind": "mlp", "hidden": [32]},
        "train": {"epochs": 6, "batch_size": 64, "lr": 0.01, "patience": 0},
        "tune": {
            "space": {"train.lr": {"log_uniform": [1e-3, 3e-2]}, "model.hidden": {"choice": [[16], [32], [64, 32]]}},
            "startup_trials": 2,
            "warmup_epochs": 1,
            **tune,
        },
    }


def test_space_values_round_trip_and_the_baseline_is_the_configs_own() -> None:
    cfg = config_from_dict(_small())
    base = baseline_params(cfg)
    assert base == {"train.lr": 0.01, "model.hidden": "[32]"}  # lists are stored by the study as JSON text
    assert config_values(cfg, base) == {"train.lr": 0.01, "model.hidden": [32]}
    outside = config_from_dict({**_small(), "train": {"epochs": 6, "lr": 0.5}})
    assert baseline_params(outside) is None  # lr 0.5 lies outside [1e-3, 3e-2]: no baseline trial
    # what the pruner compares, oriented like the objective
    assert epoch_value({"val_loss": 0.5, "val_accuracy": 0.9}, "maximize") == 0.9
    assert epoch_value({"val_loss": 0.5}, "maximize") == -0.5
    assert epoch_value({"val_loss": 0.5}, "minimize") == 0.5


@pytest.mark.usefixtures("prefect_harness")
def test_digits_mlp_study_of_12_trials_prunes_nests_and_registers_the_winner(tmp_path: Path, tracking_uri) -> None:
    """The issue's example as a user runs it: configs/digits_mlp.yaml as shipped, 12 trials."""
    cfg = load_config(CONFIGS / "digits_mlp.yaml")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = tune_study(cfg, 12, tracking_uri=tracking_uri, storage=url, study="digits")
    study = optuna.load_study(study_name="digits", storage=url)
    states = Counter(t.state.name for t in study.trials)
    assert states["COMPLETE"] + states["PRUNED"] == 12 and not states.get("FAIL"), states
    assert states["PRUNED"] >= 1, states
    baseline = study.trials[0]
    assert baseline.user_attrs["torchcycle.baseline"] and baseline.params == baseline_params(cfg)
    assert baseline.state.name == "COMPLETE"
    assert study.best_value >= baseline.value  # the winner is at least the config as written, on validation
    assert s.best_number == study.best_trial.number and s.best_value == study.best_value

    client = MlflowClient(tracking_uri)
    kids = _children(client, s.parent_run_id)
    assert sorted(int(k.data.tags["torchcycle.trial"]) for k in kids) == list(range(12))
    by_number = {int(k.data.tags["torchcycle.trial"]): k for k in kids}
    for t in study.trials:
        run = by_number[t.number]
        assert run.info.status == "FINISHED" and run.data.tags["torchcycle.trial_state"] == t.state.name
        assert not any(m.startswith("test_") for m in run.data.metrics)  # the test split is not looked at
        epochs = len(client.get_metric_history(run.info.run_id, "val_loss"))
        if t.state.name == "PRUNED":
            assert epochs < cfg.train.epochs and epochs == max(t.intermediate_values)
        else:
            assert epochs == cfg.train.epochs and run.data.metrics["final_val_accuracy"] == pytest.approx(t.value)
    plots = {a.path for a in client.list_artifacts(s.parent_run_id, "plots")}
    assert plots == {f"plots/{n}.png" for n in ("optimization_history", "parallel_coordinate", "param_importances")}
    parent = client.get_run(s.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["space.train.lr"].startswith("log_uniform")
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(study.best_value)

    (version,) = client.search_model_versions("name = 'digits-mlp'")  # one new version, gated
    assert version.tags["torchcycle.study"] == "digits" and version.tags["torchcycle.trial"] == str(s.best_number)
    assert (
        version.tags["gate_reason"] and str(client.get_model_version_by_alias("digits-mlp", "champion").version) == "1"
    )
    trained = client.get_run(version.run_id)
    for key, value in config_values(cfg, study.best_params).items():  # trained with the winner's values
        assert json.loads(trained.data.params[key]) == (list(value) if isinstance(value, list) else value)
    assert "test_accuracy" in trained.data.metrics  # the test split judged the winner, once
    from prefect.settings import PREFECT_API_URL

    body = {"flow_runs": {"id": {"any_": [s.winner.flow_run_id]}}, "limit": 50}
    found = httpx.post(f"{PREFECT_API_URL.value()}/task_runs/filter", json=body, timeout=30).json()
    (train,) = [r for r in found if r["name"].startswith("train-")]
    assert train["state"]["name"] == "Cached"  # the winner's weights are its trial's: not trained twice


@pytest.mark.usefixtures("prefect_harness")
def test_the_tune_deployments_flow_runs_parallel_trials_as_overlapping_task_runs_in_worker_processes(
    tmp_path: Path, monkeypatch
) -> None:
    """What a run of the `tune` deployment does, with parallel=2: a local Dask cluster of two processes."""
    from prefect.settings import PREFECT_API_URL

    from torchcycle.flows.deployments import tune

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the local workers report to this server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TORCHCYCLE_OPTUNA_STORAGE", f"sqlite:///{tmp_path / 'optuna.db'}")
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(_small(pruner="none", sampler="random")))
    out = tune(config_path=str(tmp_path / "tune.yaml"), trials=4, parallel=2)
    assert out["trials"] == {"COMPLETE": 4} and out["registered"] and out["model_version"] == "1"
    body = {"task_runs": {"name": {"like_": "trial-"}}, "flow_runs": {"id": {"any_": [out["flow_run_id"]]}}}
    found = httpx.post(f"{PREFECT_API_URL.value()}/task_runs/filter", json={**body, "limit": 50}, timeout=30).json()
    runs = [r for r in found if r["name"].startswith("trial-")]  # like_ matches tidy-trial-runs too
    assert sorted(r["name"] for r in runs) == [f"trial-{i}" for i in range(4)]
    assert all(r["state"]["type"] == "COMPLETED" for r in runs)
    spans = sorted((r["start_time"], r["end_time"]) for r in runs)
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans)), spans  # two ran at once
    kids = _children(MlflowClient(uri), out["run_id"])
    pids = {k.data.tags["torchcycle.trial_process"].rsplit(":", 1)[1] for k in kids}
    assert len(kids) == 4 and pids and str(os.getpid()) not in pids  # trained in the worker processes


def _finished(url: str, name: str) -> tuple[int, bool]:
    """(finished trials, whether a running trial has reported an epoch) of study `name`, or (0, False)."""
    try:
        trials = optuna.load_study(study_name=name, storage=url).trials
    except KeyError:
        return 0, False
    done = sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    return done, any(t.state.name == "RUNNING" and t.intermediate_values for t in trials)


@pytest.mark.usefixtures("prefect_harness")
def test_a_sigkilled_study_resumes_to_exactly_n_trials_without_duplicate_runs(tmp_path: Path) -> None:
    config = _small()
    config["train"]["epochs"] = 60  # a trial lasts seconds: the kill lands inside one
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(config))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    env = cli_env(MLFLOW_TRACKING_URI=uri, TORCHCYCLE_OPTUNA_STORAGE=url)
    cmd = [str(BIN / "torchcycle"), "tune", "--config", "tune.yaml", "--trials", "5", "--study", "s", "--json"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    while True:
        done, mid_trial = _finished(url, "s")
        if done >= 1 and mid_trial:  # inside any trial after the first (on a busy machine a poll can miss one)
            break
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    study = optuna.load_study(study_name="s", storage=url)
    parent = study.user_attrs["torchcycle.parent_run_id"]
    assert Counter(t.state.name for t in study.trials)["RUNNING"] == 1  # killed inside a trial

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "of an earlier run were left running: failed" in again.stdout + again.stderr  # judged by its heartbeat
    out = json.loads(again.stdout.strip().splitlines()[-1])
    assert out["run_id"] == parent and out["registered"]  # the same study run, resumed
    study = optuna.load_study(study_name="s", storage=url)
    states = Counter(t.state.name for t in study.trials)
    assert states["COMPLETE"] + states["PRUNED"] == 5 and states["FAIL"] == 1 and not states.get("RUNNING"), states

    client = MlflowClient(uri)
    kids = _children(client, parent)
    numbers = [int(k.data.tags["torchcycle.trial"]) for k in kids]
    assert len(numbers) == len(set(numbers)) == len(study.trials)  # one run per trial, none twice
    by_number = {int(k.data.tags["torchcycle.trial"]): k for k in kids}
    for t in study.trials:
        run = by_number[t.number]
        assert run.data.tags["torchcycle.trial_state"] == t.state.name
        assert run.info.status == ("KILLED" if t.state.name == "FAIL" else "FINISHED")
    assert len(client.search_model_versions("name = 'tune-small'")) == 1
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["ran"] == 0 and not out["registered"] and out["model_version"] == "1"  # finished: nothing new
    assert len(client.search_model_versions("name = 'tune-small'")) == 1


def _undo_storage_env(monkeypatch) -> None:
    """The CLI sets TORCHCYCLE_OPTUNA_STORAGE for its flow; in this process it would outlive the command and
    become the next in-process command's storage. Recorded here, monkeypatch undoes it at teardown."""
    monkeypatch.setenv("TORCHCYCLE_OPTUNA_STORAGE", "")
    monkeypatch.delenv("TORCHCYCLE_OPTUNA_STORAGE")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--trials", "0"], "--trials"),
        (["--trials", "3", "--parallel", "0"], "--parallel"),
        (["--trials", "3", "--study", "a b"], "is not a study name"),
        (["--trials", "3", "--study", ""], "is not a study name"),
        (["--trials", "3", "--storage", "not a url"], "is not a database URL"),
        (["--trials", "3", "--timeout", "0"], "--timeout"),
        (["--trials", "3", "--dask", "tcp://nowhere"], "is not a Dask scheduler address"),
        (["--trials", "3", "--set", "tune.space={}"], "has no tune.space"),
        (["--trials", "3", "--set", "tune.space={train.lrr: {uniform: [0, 1]}}"], "tune.space.train.lrr"),
        (["--trials", "3", "--set", "tune.space={train.lr: {uniform: [0, 1]}}"], "train.lr: Input should be greater"),
        (["--trials", "3", "--set", "tune.space={name: {choice: [a, b]}}"], "cannot be tuned"),
        (["--trials", "3", "--set", "tune.pruner=asha"], "tune.pruner"),
        (["--trials", "3", "--set", "tune.space={train.epochs: {uniform: [1, 10]}}"], "use int: [1, 10]"),
        (["--trials", "3", "--set", "tune.space={seed: {int: [0, 3]}}"], "cannot be tuned"),
        (["--trials", "3", "--set", "tune.space={model: {choice: [{kind: cnn}]}}"], "cannot be tuned"),
        (["--trials", "3", "--set", "data.val_size=0"], "data.val_size is 0"),
        (["--trials", "3", "--storage", "sqlite:////tmp/x.db", "--dask", "tcp://10.9.9.9:8786"], "cannot share"),
        (["--trials", "3", "--storage", "sqlite:////tmp"], "is a directory"),
        (["--trials", "3", "--storage", "sqlite:////etc/hostname"], "is not a SQLite database"),
        (["--trials", "3", "--storage", "sqlite://"], "in-memory"),
        (["--trials", "3", "--storage", "foo://bar"], "not a database URL"),
        (["--trials", "3", "--set", "tune.space={model.hidden: {choice: [[32], [32.0]]}}"], "lists a value twice"),
    ],
)
def test_bad_tune_input_is_one_error_line_and_writes_nothing(tmp_path: Path, monkeypatch, args, fragment) -> None:
    from typer.testing import CliRunner

    from torchcycle.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TORCHCYCLE_DASK_ADDRESS", raising=False)
    _undo_storage_env(monkeypatch)
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(_small()))
    result = CliRunner().invoke(app, ["tune", "--config", "tune.yaml", *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in result.output, result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tune.yaml"]  # no store, no study, no cache
    assert not Path("/tmp/x.db").exists()


def test_a_study_storage_server_that_does_not_answer_is_exit_3(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from torchcycle.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(_small()))
    url = "postgresql+psycopg://u:secret@127.0.0.1:1/optuna"  # nothing listens on port 1
    result = CliRunner().invoke(app, ["tune", "--config", "tune.yaml", "--trials", "2", "--storage", url])
    assert result.exit_code == 3, result.output
    assert "does not answer" in result.output and "secret" not in result.output  # the password stays hidden
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tune.yaml"]


def test_a_dask_address_that_never_speaks_dask_is_exit_3(tmp_path: Path, monkeypatch) -> None:
    """The tuning flow connects to the scheduler while it prepares the data. An address that takes the connection
    and never speaks Dask (distributed's Client would wait for ever) is one error line, exit 3, in bounded time."""
    from typer.testing import CliRunner

    from torchcycle.cli import app
    from torchcycle.flows.scoring import DASK_CONNECT_TIMEOUT_S

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(_small()))
    _undo_storage_env(monkeypatch)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # it takes the connection (the CLI's own quick check passes) and never says a word of Dask's protocol
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        args = ["tune", "--config", "tune.yaml", "--trials", "2", "--dask", address, "--storage", storage]
        result = CliRunner().invoke(app, args)
        seconds = time.monotonic() - start
    assert result.exit_code == 3, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{address} does not answer" in errors[0], result.output
    assert "Traceback" not in result.output
    assert seconds < 2 * DASK_CONNECT_TIMEOUT_S + 60, seconds  # the wait, plus preparing the data


def test_a_study_resumed_with_another_search_is_refused(tmp_path: Path) -> None:
    from torchcycle.errors import ConfigError
    from torchcycle.tasks.tune import open_study

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    open_study(config_from_dict(_small()), "s", url, "maximize", 1)
    open_study(config_from_dict(_small()), "s", url, "maximize", 1)  # the same search: resumed
    other = _small()
    other["tune"]["space"]["train.lr"] = {"log_uniform": [1e-4, 1e-1]}
    with pytest.raises(ConfigError, match="is a search of another config or space"):
        open_study(config_from_dict(other), "s", url, "maximize", 1)


def test_the_tune_deployment_sits_beside_retrain_and_score_with_no_schedule() -> None:
    from torchcycle.flows.deployments import DEFAULT_SCHEDULES, default_specs

    specs = {s.name: s for s in default_specs("configs/digits_mlp.yaml")}
    assert set(specs) == {"retrain", "score", "tune"}
    assert specs["tune"].parameters["config_path"] == "configs/digits_mlp.yaml"
    assert DEFAULT_SCHEDULES["tune"].kind == "off"  # on demand unless deployment.tune / --tune-schedule says


@pytest.mark.usefixtures("prefect_harness")
def test_failed_trials_are_told_and_the_study_goes_on_until_max_failures(tmp_path: Path, tracking_uri) -> None:
    """SGD at lr 1e9 diverges (FloatingPointError): those trials are FAIL, others are asked; all failing stops the
    run after tune.max_failures with the trials' own error, the study run FAILED."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    mixed = _small(sampler="random", pruner="none", max_failures=20)
    mixed["train"]["optimizer"] = "sgd"
    mixed["tune"]["space"] = {"train.lr": {"choice": [0.01, 1e9]}}
    s = tune_study(config_from_dict(mixed), 3, tracking_uri=tracking_uri, storage=url, study="mixed")
    states = Counter(t.state.name for t in optuna.load_study(study_name="mixed", storage=url).trials)
    assert states["COMPLETE"] == 3 and states["FAIL"] >= 1 and s.winner is not None, states
    assert all(v == 0.01 for v in s.best_params.values())
    bad = _small(sampler="random", max_failures=2)
    bad["train"]["optimizer"] = "sgd"
    bad["tune"]["space"] = {"train.lr": {"choice": [1e9]}}
    with pytest.raises(FloatingPointError, match=r"lower train\.lr"):
        tune_study(config_from_dict(bad), 3, tracking_uri=tracking_uri, storage=url, study="bad")
    study = optuna.load_study(study_name="bad", storage=url)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    client = MlflowClient(tracking_uri)
    parent = client.get_run(study.user_attrs["torchcycle.parent_run_id"])
    assert parent.info.status == "FAILED"
    assert {k.data.tags["torchcycle.trial_state"] for k in _children(client, parent.info.run_id)} == {"FAIL"}


@pytest.mark.usefixtures("prefect_harness")
def test_timeout_starts_no_trial_after_it_and_trains_the_winner_so_far(tmp_path: Path, tracking_uri) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = tune_study(config_from_dict(_small()), 500, timeout=1, tracking_uri=tracking_uri, storage=url, study="t")
    assert 1 <= s.counts["COMPLETE"] + s.counts.get("PRUNED", 0) < 500 and s.ran == sum(s.counts.values())
    assert s.winner is not None and s.winner.model_version == "1"
