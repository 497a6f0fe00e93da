"""Shared fixtures. Prefect runs against one session-scoped test harness; MLflow against a temp store."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The stage cache (torchcycle/cache.py) lives outside the checkout for the whole session; each test
# then gets its own (below), so no test takes another's trained model from the cache.
os.environ["TORCHCYCLE_CACHE_DIR"] = tempfile.mkdtemp(prefix="torchcycle-cache-")
warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _own_stage_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCHCYCLE_CACHE_DIR", str(tmp_path / "stage-cache"))


@pytest.fixture()
def tracking_uri(tmp_path: Path, monkeypatch) -> str:
    """A fresh embedded MLflow store per test, also MLflow's process-wide URI for the test, as a flow's edge
    sets it (tasks that call MLflow's model logging directly need that); restored afterwards."""
    from mlflow.tracking._tracking_service import utils

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setattr(utils, "_tracking_uri", uri)
    return uri


@pytest.fixture()
def mnist_root(tmp_path: Path) -> Path:
    """A tiny MNIST in IDX format written by the test (nothing is downloaded)."""
    from torchcycle.idx import digits_as_mnist, write_mnist

    root = tmp_path / "mnist"
    write_mnist(root, digits_as_mnist(300, seed=0), digits_as_mnist(100, seed=1))
    return root


def artifact_markdown(flow_run_id: str) -> str:
    """Markdown of a flow run's artifacts, read through the REST API."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 10, "offset": 0, "sort": "CREATED_DESC"}
    resp = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", json=body, timeout=30)
    resp.raise_for_status()
    return "\n".join(str(a["data"]) for a in resp.json())


def labelled_table(n: int = 300, seed: int = 0):
    """A small mixed table (number, integer, category) with a yes/no label the features decide."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n), rng.integers(0, 10, size=n)
    color = rng.choice(["red", "green", "blue"], size=n)
    label = np.where(x1 + 0.2 * x2 + (color == "red") > 1.2, "yes", "no")
    return pd.DataFrame({"x1": x1, "x2": x2, "color": color, "label": label})


def train_store(root: Path, config: str) -> dict:
    """Train `config` (YAML text; `{train}` stands for the training CSV's path) through the CLI into an
    embedded store under `root`: a registered champion (v1) to score with and compare the registry against."""
    import pytest
    from typer.testing import CliRunner

    from torchcycle.cli import app

    uri = f"sqlite:///{root / 'mlflow.db'}"
    train_csv = root / "train.csv"
    labelled_table().to_csv(train_csv, index=False)
    (root / "train.yaml").write_text(config.replace("{train}", str(train_csv)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        result = CliRunner().invoke(app, ["train", "--config", str(root / "train.yaml")])
    assert result.exit_code == 0, result.output
    return {"uri": uri, "root": root}


def prefect_logs_follow_stderr() -> None:
    """Point Prefect's console log handlers at whatever sys.stderr is when they write, so in-process CLI runs
    (CliRunner swaps the streams per invocation) get the logs, not '--- Logging error ---' on a closed stream."""
    import logging
    import sys

    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            console = getattr(handler, "console", None)
            if console is not None:
                console._file, console.stderr = None, True  # rich: None means sys.stderr at write time
                handler.stream = sys.__stderr__


def cli_output(result) -> str:
    """A CliRunner result's output without Prefect's '--- Logging error ---' blocks: its console handler keeps
    the stream of an earlier CliRunner invocation, closed by now; a test-runner artifact, not the CLI's output."""
    import re

    return re.sub(r"--- Logging error ---.*?\nArguments: [^\n]*\n", "", result.output, flags=re.S)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a `torchcycle` subprocess: talks to this session's Prefect test server (no
    temporary server to start per process) and gets `extra` (MLflow URI, checkpoint dir, ...)."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    if PREFECT_API_URL.value():
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    env.update(extra)
    return env


def scoring_table(n: int, seed: int = 0):
    """Two numeric features, one categorical; a high/low label that depends on all three."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=n)
    x2 = rng.integers(0, 10, size=n)
    color = rng.choice(["red", "green", "blue"], size=n)
    score = x1 + 0.3 * x2 + np.where(color == "red", 1.5, 0.0)
    label = np.where(score > 1.8, "high", "low")
    return pd.DataFrame({"x1": x1, "x2": x2, "color": color, "label": label})


def register_classifier(root: Path, name: str, epochs: int = 15) -> str:
    """Train and register a small MLP on `scoring_table(600)` through the training flow (champion v1) in an
    embedded store under `root`; its tracking URI. Needs the Prefect test harness."""
    from torchcycle.config import config_from_dict
    from torchcycle.flows.training import training_flow

    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    train_csv = root / "train.csv"
    scoring_table(600).to_csv(train_csv, index=False)
    cfg = config_from_dict(
        {
            "name": name,
            "experiment": "tests",
            "data": {"source": f"file:{train_csv}", "target": "label"},
            "model": {"kind": "mlp", "hidden": [16]},
            "train": {"epochs": epochs, "patience": 0, "lr": 0.01},
        }
    )
    summary = training_flow(cfg, tracking_uri=uri)
    assert summary.model_version == "1" and summary.decision.promote
    return uri


@contextlib.contextmanager
def mlflow_serving(uri: str, model: str, log_dir: Path, startup_s: float = 180):
    """`mlflow models serve -m MODEL` (MLflow's own server, --env-manager local) on a free loopback port, from the
    store at `uri`: yields its base URL once /ping answers; stopped afterwards. Its log goes to log_dir/serve.log."""
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    # mlflow execs `uvicorn` by name: the venv's bin directory must be on PATH even when not activated.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    log = open(log_dir / "serve.log", "wb")  # noqa: SIM115  (kept open for the server's lifetime)
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + startup_s
        while True:
            assert server.poll() is None, (log_dir / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"mlflow models serve did not come up in {startup_s:g} s"
            time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
