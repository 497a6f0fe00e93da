"""The command line: bad input is one clear message and exit code 2; --json ends stdout with one object."""

from __future__ import annotations

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
