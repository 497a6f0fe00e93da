"""The command line: bad input is one clear message and exit code 2; --json ends stdout with one object."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from torchcycle.cli import app

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("name: m\ndata: {source: 'sklearn:iris'}\nmodel: {kind: mlp, widht: 3}\n", "unknown key model.widht"),
        ("name: m\ndata: {source: 'sklearn:iris'}\nmodel: {kind: resnet}\n", "unknown model kind 'resnet'"),
        ("name: m\ndata: {source: 'kaggle:titanic'}\nmodel: {kind: mlp}\n", "unknown source scheme 'kaggle'"),
        ("name: m\ndata: {source: 'sklearn:iris'}\nmodel: {kind: mlp}\ntrain: {lr: fast}\n", "train.lr"),
        (
            "name: m\ndata: {source: 'file:/nonexistent.csv', target: y}\nmodel: {kind: mlp}\n",
            "input not found: /nonexistent.csv",
        ),
    ],
)
def test_bad_config_exits_2_with_a_message(tmp_path: Path, content: str, needle: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    result = CliRunner().invoke(app, ["train", "--config", str(cfg)], env=env)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output


def test_missing_config_file_and_bad_override_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "config file not found" in result.output
    result = runner.invoke(app, ["train", "--config", str(ROOT / "configs/xor_mlp.yaml"), "--set", "train.epochs=x"])
    assert result.exit_code == 2 and "train.epochs" in result.output


def test_train_json_end_to_end(tmp_path: Path) -> None:
    """The real console script in a fresh process, as a user runs it."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torchcycle", "train", "--config", str(ROOT / "configs/xor_mlp.yaml"), "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model_name"] == "xor-mlp" and result["model_version"] == "1"
    assert result["metrics"]["test_accuracy"] == 1.0
    assert len(result["run_id"]) == 32
    assert "xor-mlp v1" in proc.stdout  # the human summary comes first


def test_a_temporary_api_that_does_not_start_in_time_is_exit_3_in_one_line(tmp_path: Path) -> None:
    """Both cores busy, Prefect's temporary API slower than its limit: one error line, exit 3, no run recorded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1",  # its server takes seconds to import: always late
    )
    cli = Path(sys.executable).parent / "torchcycle"
    proc = subprocess.run([str(cli), "train", "--config", str(ROOT / "configs/xor_mlp.yaml")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "did not start within 1 s" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() or "xor-mlp" not in _registered(tmp_path / "mlflow.db")


def _registered(db: Path) -> str:
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as con:
        return " ".join(row[0] for row in con.execute("select name from registered_models"))


def test_sigterm_stops_the_temporary_prefect_server_too(tmp_path: Path) -> None:
    """`kill PID` of a command running on Prefect's temporary API: the command exits 143 and takes the server
    (a uvicorn child) with it, instead of leaving it running under init."""
    import signal
    import time

    import psutil

    config = tmp_path / "long.yaml"
    config.write_text(
        "name: sigterm-test\ndata: {source: 'sklearn:digits'}\nmodel: {kind: mlp, hidden: [32]}\n"
        "train: {epochs: 500, patience: 0}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        PREFECT_HOME=str(tmp_path / "prefect"),
        TORCHCYCLE_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
    )
    cli = Path(sys.executable).parent / "torchcycle"
    proc = subprocess.Popen([str(cli), "train", "--config", str(config), "--no-cache"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline, servers = time.monotonic() + 180, []
        while not servers:  # the temporary API: a uvicorn process below the command
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.5)
            kids = psutil.Process(proc.pid).children(recursive=True)
            servers = [k for k in kids if "uvicorn" in " ".join(k.cmdline())]
        time.sleep(3)  # the flow is under way
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 143
        _gone, alive = psutil.wait_procs(servers, timeout=30)
        assert not alive, f"temporary Prefect server left running: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()


HEARTBEATS = """
import json, time
from prefect import flow
from prefect.runtime import flow_run
from prefect.settings import temporary_settings
from torchcycle.local_server import starting_temporary_api

@flow
def quick() -> str:
    time.sleep(0.5)  # a heartbeat thread that is on sends its first beat before the run ends
    return flow_run.id

with starting_temporary_api() as ready:  # what a command without PREFECT_API_URL runs its flows on
    ready()
    default = quick()
    with temporary_settings(updates={"flows.heartbeat_frequency": 30}):  # as PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30
        chosen = quick()
print(json.dumps({"default": default, "chosen": chosen}))
"""


def _no_heartbeat_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_FLOWS", "PREFECT_RUNNER"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    return env


def test_flows_on_the_temporary_api_send_no_heartbeats_unless_asked(tmp_path: Path) -> None:
    """Nothing outlives a temporary API to watch heartbeats, and Prefect's heartbeat thread costs each flow run up
    to 1 s at its end (bench/bench_flow.py). A frequency the user sets is kept: that run sends one."""
    import sqlite3

    env = _no_heartbeat_env(tmp_path)
    done = subprocess.run([sys.executable, "-c", HEARTBEATS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    with contextlib.closing(sqlite3.connect(tmp_path / "prefect" / "prefect.db")) as db:
        beats = {r for (r,) in db.execute("SELECT resource_id FROM events WHERE event = 'prefect.flow-run.heartbeat'")}
        ended = {r for (r,) in db.execute("SELECT resource_id FROM events WHERE event = 'prefect.flow-run.Completed'")}
    assert {f"prefect.flow-run.{runs['default']}", f"prefect.flow-run.{runs['chosen']}"} <= ended  # events were kept
    assert beats == {f"prefect.flow-run.{runs['chosen']}"}


FREQUENCY = """
from prefect.settings import get_current_settings
from torchcycle.local_server import no_heartbeats, no_heartbeats_on_a_temporary_api
print(no_heartbeats(), end=" ")
with no_heartbeats_on_a_temporary_api():  # what `--dask` and DDP runs leave to Prefect's own temporary API
    print(get_current_settings().flows.heartbeat_frequency)
"""


@pytest.mark.parametrize(
    ("extra", "printed"),
    [
        ({}, "{'flows.heartbeat_frequency': None} None"),
        ({"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}, "{} 30"),  # the user's frequency is kept
        ({"PREFECT_RUNNER_HEARTBEAT_FREQUENCY": "45"}, "{} 45"),  # so is the setting's old name
        ({"PREFECT_API_URL": "http://127.0.0.1:9/api"}, "{'flows.heartbeat_frequency': None} 180"),  # a server's
    ],
    ids=["default", "user-frequency", "old-name", "running-server"],
)
def test_heartbeats_are_off_only_where_nothing_can_watch_them(tmp_path: Path, extra: dict, printed: str) -> None:
    env = {**_no_heartbeat_env(tmp_path), **extra}
    done = subprocess.run([sys.executable, "-c", FREQUENCY], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == printed
