"""The fast paths of the training loop on CPU: bf16 autocast, torch.compile, the streaming fallback,
the out-of-memory message, and torch DDP with 2 gloo processes through `torchcycle train --nproc 2`.
The same checks on a GPU are in tests/models/test_cuda.py (skipped without CUDA); bench/bench_train.py
measures speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_env
from mlflow.tracking import MlflowClient

import torchcycle.models.training as training
from torchcycle.config import load_config
from torchcycle.flows.training import training_flow
from torchcycle.models.inference import predict
from torchcycle.models.mlp import MLP, MLPConfig
from torchcycle.models.training import OutOfMemory, TensorData, TrainConfig, fit, resolve_precision

ROOT = Path(__file__).resolve().parents[2]


def _digits() -> tuple[TensorData, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, va, te = perm[:1200], perm[1200:1400], perm[1400:]
    return TensorData(x[tr], y[tr], x[va], y[va]), x[te], y[te]


def _fit_digits(device: str = "cpu", **train_kw) -> tuple[float, training.FitResult]:
    """(test accuracy, fit result) of a 64-128-10 MLP on scikit-learn digits."""
    data, x_te, y_te = _digits()
    torch.manual_seed(0)
    model = MLP(MLPConfig(in_features=64, out_features=10, hidden=(128,), dropout=0.0))
    cfg = TrainConfig(**{"epochs": 8, "batch_size": 64, "lr": 3e-3, "patience": 0, **train_kw})
    result = fit(model, data, cfg, task="classification", device=torch.device(device), progress=False)
    logits = predict(model, x_te, torch.device(device))
    return (logits.argmax(1) == y_te).float().mean().item(), result


def test_precision_defaults_bf16_on_cuda_only() -> None:
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    assert resolve_precision("fp32", torch.device("cuda")) is None


def test_bf16_autocast_keeps_accuracy() -> None:
    fp32, _ = _fit_digits(precision="fp32")
    bf16, _ = _fit_digits(precision="bf16")
    assert fp32 >= 0.93
    assert bf16 >= fp32 - 0.02, (bf16, fp32)


def test_streaming_dataloader_path_trains_as_well(monkeypatch) -> None:
    """When the data does not fit the device budget, batches stream through a DataLoader."""
    resident, _ = _fit_digits()
    monkeypatch.setattr(training, "data_fits_on_device", lambda *a: False)
    streamed, result = _fit_digits(num_workers=0)
    assert len(result.history) == 8
    assert streamed >= resident - 0.02, (streamed, resident)


def test_compiled_model_matches_eager() -> None:
    _, eager = _fit_digits(epochs=2)
    _, compiled = _fit_digits(epochs=2, compile=True)
    assert compiled.history[-1]["train_loss"] == pytest.approx(eager.history[-1]["train_loss"], rel=1e-3)


def test_out_of_memory_names_the_batch_size_to_try(monkeypatch) -> None:
    def boom(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(MLP, "forward", boom)
    with pytest.raises(OutOfMemory, match=r"train\.batch_size=64: try --set train\.batch_size=32"):
        _fit_digits()


@pytest.mark.usefixtures("prefect_harness")
def test_ddp_two_gloo_processes_match_a_single_process(tmp_path: Path) -> None:
    overrides = ["train.epochs=15"]
    config = ROOT / "configs" / "digits_mlp.yaml"
    single_uri = f"sqlite:///{tmp_path / 'single.db'}"
    single = training_flow(load_config(config, overrides), tracking_uri=single_uri)

    ddp_uri = f"sqlite:///{tmp_path / 'ddp.db'}"
    env = cli_env(MLFLOW_TRACKING_URI=ddp_uri, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torchcycle", "train", "--config", str(config), "--set", overrides[0]]
    cmd += ["--nproc", "2", "--json"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ddp = json.loads(done.stdout.strip().splitlines()[-1])

    # the same quality as one process (global batch size kept, gradients averaged over the 2 ranks)
    assert ddp["metrics"]["test_accuracy"] >= 0.95
    assert abs(ddp["metrics"]["test_accuracy"] - single.metrics["test_accuracy"]) <= 0.02
    # only rank 0 tracked and registered: one run, one version
    client = MlflowClient(ddp_uri)
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["torchcycle.world_size"] == "2"
    assert [mv.version for mv in client.search_model_versions("name='digits-mlp'")] == [1]
