"""Crash safety: per-epoch checkpoints and resume (also after SIGKILL), and scoring killed mid-file."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cli_env
from mlflow.tracking import MlflowClient

from torchcycle.checkpoint import load_checkpoint, save_checkpoint
from torchcycle.config import load_config
from torchcycle.errors import DataError
from torchcycle.flows.training import training_flow
from torchcycle.models.mlp import MLP, MLPConfig
from torchcycle.models.training import TensorData, TrainConfig, fit

ROOT = Path(__file__).resolve().parents[2]


def _data() -> TensorData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 10, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return TensorData(x[:300], y[:300], x[300:], y[300:])


def _run(epochs: int = 6, **kw):
    torch.manual_seed(0)
    model = MLP(MLPConfig(in_features=10, out_features=2, hidden=(16,), dropout=0.2))
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.01, schedule="onecycle", patience=0)
    result = fit(model, _data(), cfg, task="classification", device=torch.device("cpu"), progress=False, **kw)
    return model, result


def test_resume_from_any_epoch_ends_exactly_like_an_uninterrupted_run(tmp_path: Path) -> None:
    full, full_result = _run()
    _run(checkpoint=lambda st: save_checkpoint(tmp_path / f"epoch{st['epoch']}.pt", st))
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [f"epoch{i}.pt" for i in range(1, 7)]
    assert not list(tmp_path.glob(".*partial"))
    resumed, result = _run(resume=load_checkpoint(tmp_path / "epoch3.pt"))  # as if killed after epoch 3
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert [h["train_loss"] for h in result.history] == [h["train_loss"] for h in full_result.history]


def test_checkpoints_refuse_pickled_code(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "ckpt.pt"
    path.write_bytes(pickle.dumps({"epoch": Payload()}))
    with pytest.raises(DataError, match="cannot resume from checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="delete it to start over"):
        load_checkpoint(tmp_path / "torn.pt")


def _env(tmp_path: Path, name: str) -> dict[str, str]:
    return cli_env(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / name / 'mlflow.db'}",
        TORCHCYCLE_CHECKPOINT_DIR=str(tmp_path / name / "ckpt"),
        TORCHCYCLE_CACHE_DIR=str(tmp_path / name / "cache"),  # not the reference run's trained model
    )


@pytest.mark.usefixtures("prefect_harness")
def test_training_killed_with_sigkill_resumes_to_the_same_metrics(tmp_path: Path, monkeypatch) -> None:
    config = ROOT / "configs" / "digits_mlp.yaml"
    overrides = ["train.epochs=25"]
    # the reference: one uninterrupted seeded run, in process
    monkeypatch.setenv("TORCHCYCLE_CHECKPOINT_DIR", str(tmp_path / "ref-ckpt"))
    reference = training_flow(load_config(config, overrides), tracking_uri=f"sqlite:///{tmp_path / 'ref.db'}")

    env = _env(tmp_path, "killed")
    ckpt_dir = Path(env["TORCHCYCLE_CHECKPOINT_DIR"])
    cmd = [sys.executable, "-m", "torchcycle", "train", "--config", str(config), "--set", overrides[0], "--json"]
    log = tmp_path / "killed.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    epoch = 0
    while epoch < 5:  # let a few epochs land on disk, then kill without warning
        assert proc.poll() is None, f"training ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        files = list(ckpt_dir.glob("*.pt"))
        if files:
            epoch = load_checkpoint(files[0])["epoch"]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = load_checkpoint(next(ckpt_dir.glob("*.pt")))["epoch"]
    assert 5 <= killed_at < 25

    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"after epoch {killed_at}" in done.stdout + done.stderr  # it resumed, not restarted
    resumed = json.loads(done.stdout.strip().splitlines()[-1])
    for name, value in reference.metrics.items():
        assert resumed["metrics"][name] == pytest.approx(value, abs=1e-6), name
    assert not list(ckpt_dir.glob("*.pt"))  # registered: the checkpoint is gone


@pytest.mark.usefixtures("prefect_harness")
def test_scoring_killed_mid_file_leaves_no_output_and_reruns_cleanly(tmp_path: Path) -> None:
    # a model to score with: trained in process into the store the subprocess will use
    env = _env(tmp_path, "score")
    train = tmp_path / "train.csv"
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(2_000, 8)), columns=[f"f{i}" for i in range(8)])
    frame.assign(y=(frame["f0"] > 0).astype(int)).to_csv(train, index=False)
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        f"name: kill-score\ndata: {{source: 'file:{train}', target: y}}\nmodel: {{kind: mlp, hidden: [8]}}\n"
        "train: {epochs: 2}\n"
    )
    training_flow(load_config(cfg), tracking_uri=env["MLFLOW_TRACKING_URI"])

    big = tmp_path / "big.parquet"
    n = 1_000_000
    pd.DataFrame(rng.normal(size=(n, 8)), columns=[f"f{i}" for i in range(8)]).to_parquet(big, row_group_size=20_000)
    out = tmp_path / "scored.parquet"

    def partial_size() -> int:  # the killed writer's own hidden temp file
        return max((p.stat().st_size for p in tmp_path.glob(".scored.parquet.*.partial")), default=0)

    cmd = [sys.executable, "-m", "torchcycle", "predict", "-m", "kill-score", "-i", str(big), "-o", str(out)]
    cmd += ["--batch-rows", "10000"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while partial_size() <= 200_000:  # mid-file: batches are being written
        assert proc.poll() is None, "scoring ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()

    done = subprocess.run([*cmd, "--json"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["rows"] == n
    # the re-run removed the killed writer's temp file (its process is gone) and left none of its own
    assert len(pd.read_parquet(out, columns=["prediction"])) == n and partial_size() == 0


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_that_failed_at_register_restarts_at_register(tmp_path: Path, monkeypatch) -> None:
    """The re-run takes preprocess, features, train and evaluate from Prefect's cache: none executes."""

    import torchcycle.flows.training as training_module
    import torchcycle.tasks.evaluate
    import torchcycle.tasks.features
    import torchcycle.tasks.preprocess
    import torchcycle.tasks.train

    calls: dict[str, int] = {}
    for module, name in [
        (torchcycle.tasks.preprocess, "preprocess"),
        (torchcycle.tasks.features, "build_features"),
        (torchcycle.tasks.train, "train"),
        (torchcycle.tasks.evaluate, "evaluate"),
    ]:
        real = getattr(module, name)
        monkeypatch.setattr(
            module,
            name,
            lambda *a, _real=real, _n=name, **k: calls.update({_n: calls.get(_n, 0) + 1}) or _real(*a, **k),
        )
    monkeypatch.setenv("TORCHCYCLE_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(ROOT / "configs" / "wine_mlp.yaml", ["train.epochs=12", "train.patience=0"])
    real_register = training_module.register_task

    def registry_down(*args, **kwargs):
        raise ConnectionError("registry unreachable")

    monkeypatch.setattr(training_module, "register_task", registry_down)
    with pytest.raises(ConnectionError):
        training_flow(cfg, tracking_uri=uri)
    assert calls == {"preprocess": 1, "build_features": 1, "train": 1, "evaluate": 1}
    client = MlflowClient(uri)
    assert [r.info.status for r in client.search_runs([client.get_experiment_by_name("wine").experiment_id])] == [
        "FAILED"
    ]

    monkeypatch.setattr(training_module, "register_task", real_register)
    summary = training_flow(cfg, tracking_uri=uri)
    assert calls == {"preprocess": 1, "build_features": 1, "train": 1, "evaluate": 1}  # nothing ran again
    assert summary.model_version == "1" and summary.epochs == 12 and summary.metrics["test_accuracy"] > 0.8
    # the new run still shows the whole loss curve: the cached model's history is logged into it
    assert [m.step for m in client.get_metric_history(summary.run_id, "train_loss")] == list(range(1, 13))
    assert not list((tmp_path / "ckpt").glob("*.pt"))

    # another config is another key: the stages run again (preprocess's inputs did not change, but the
    # key covers the whole config, so it is conservative)
    changed = load_config(ROOT / "configs" / "wine_mlp.yaml", ["train.epochs=6", "train.patience=0"])
    assert training_flow(changed, tracking_uri=uri).epochs == 6
    assert calls["train"] == 2 and calls["evaluate"] == 2
    # cache=False (`torchcycle train --no-cache`) runs everything again
    training_flow(cfg, tracking_uri=uri, cache=False)
    assert calls == {"preprocess": 3, "build_features": 3, "train": 3, "evaluate": 3}


@pytest.mark.usefixtures("prefect_harness")
def test_tracking_server_down_retries_then_fails_clearly(tmp_path: Path) -> None:
    """An unreachable MLflow server: the tracking task retries (Prefect), then one error line, exit code 3."""
    env = cli_env(
        MLFLOW_TRACKING_URI="http://127.0.0.1:9",  # nothing listens on the discard port
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="2",
        TORCHCYCLE_IO_RETRY_DELAYS="0.2,0.2",
        TORCHCYCLE_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
    )
    cmd = [sys.executable, "-m", "torchcycle", "train", "--config", str(ROOT / "configs" / "wine_mlp.yaml")]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 3, output[-3000:]
    assert "Retry 2/2" in output  # both retries happened before giving up
    last = [line for line in output.splitlines() if line.startswith("error:")]
    assert last and "MLflow tracking server at http://127.0.0.1:9 is unreachable" in last[-1]
