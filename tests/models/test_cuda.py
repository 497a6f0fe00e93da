"""The CUDA path of the train stage: resident data, bf16 autocast, channels_last, torch.compile, the streaming
fallback with pinned memory, a real out-of-memory error, and the whole flow on a GPU.

Skipped where torch sees no CUDA device (CI and these development machines have none). On a GPU machine:
`pytest tests/models/test_cuda.py`. The README's "Training speed" section records the last run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_training_speed import _digits, _fit_digits

import torchcycle.models.training as training
from torchcycle.models.cnn import CNN, CNNConfig
from torchcycle.models.inference import predict
from torchcycle.models.mlp import MLP, MLPConfig
from torchcycle.models.training import OutOfMemory, TensorData, TrainConfig, fit

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False here)"
)
ROOT = Path(__file__).resolve().parents[2]


def test_resident_bf16_on_cuda_keeps_fp32_accuracy() -> None:
    data, _, _ = _digits()
    assert training.data_fits_on_device(data, torch.device("cuda"), 0.5)  # the resident path is the one taken
    fp32, _ = _fit_digits("cuda", precision="fp32")
    bf16, _ = _fit_digits("cuda")  # precision auto: bf16 on CUDA
    assert fp32 >= 0.93
    assert bf16 >= fp32 - 0.02, (bf16, fp32)


def test_streaming_path_on_cuda_trains_as_well(monkeypatch) -> None:
    """Data over the budget: a DataLoader with 2 workers, pinned memory and non_blocking copies."""
    resident, _ = _fit_digits("cuda")
    monkeypatch.setattr(training, "data_fits_on_device", lambda *a: False)
    streamed, result = _fit_digits("cuda", num_workers=2)
    assert len(result.history) == 8
    assert streamed >= resident - 0.02, (streamed, resident)


def test_cnn_channels_last_bf16_then_saved_in_the_default_layout() -> None:
    data, x_te, y_te = _digits()
    torch.manual_seed(0)
    model = CNN(CNNConfig(in_features=64, image_shape=(1, 8, 8), num_classes=10, channels=(32, 64), hidden=128))
    cfg = TrainConfig(epochs=10, batch_size=64, lr=3e-3, schedule="onecycle", patience=0)
    fit(model, data, cfg, task="classification", device=torch.device("cuda"), progress=False)
    acc = (predict(model, x_te, torch.device("cuda")).argmax(1) == y_te).float().mean().item()
    assert acc >= 0.95
    # channels_last was for the GPU's convolutions; the weights that get saved are plain contiguous tensors
    assert all(t.is_contiguous() for t in model.state_dict().values())
    on_cpu = CNN(model.cfg)
    on_cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    cpu_pred = predict(on_cpu, x_te, torch.device("cpu")).argmax(1)
    gpu_pred = predict(model, x_te, torch.device("cuda")).argmax(1)
    assert (cpu_pred == gpu_pred).float().mean().item() >= 0.99  # same model on either device


def test_compiled_model_on_cuda_matches_eager() -> None:
    _, eager = _fit_digits("cuda", epochs=2, precision="fp32")
    _, compiled = _fit_digits("cuda", epochs=2, precision="fp32", compile=True)
    assert compiled.history[-1]["train_loss"] == pytest.approx(eager.history[-1]["train_loss"], rel=1e-2)


def test_a_real_cuda_out_of_memory_names_the_batch_size_to_try() -> None:
    # (65,536 x 1,048,576) activations in bf16 = 128 GiB for one batch: more than any single GPU holds
    n = 65_536
    data = TensorData(
        torch.randn(n, 64), torch.randint(0, 10, (n,)), torch.randn(256, 64), torch.randint(0, 10, (256,))
    )
    model = MLP(MLPConfig(in_features=64, out_features=10, hidden=(1 << 20,)))
    cfg = TrainConfig(epochs=1, batch_size=n, patience=0)
    with pytest.raises(
        OutOfMemory, match=r"cuda ran out of memory at train\.batch_size=65536: try --set train\.batch_size=32768"
    ):
        fit(model, data, cfg, task="classification", device=torch.device("cuda"), progress=False)
    del model
    torch.cuda.empty_cache()
    acc, _ = _fit_digits("cuda", epochs=2)  # the process is still usable afterwards
    assert acc >= 0.8


@pytest.mark.usefixtures("prefect_harness")
def test_training_flow_on_cuda_end_to_end(tracking_uri: str) -> None:
    """digits CNN through the whole flow on the GPU; the registered model then scores on the CPU."""
    import mlflow
    import numpy as np

    from torchcycle.config import load_config
    from torchcycle.flows.training import training_flow

    cfg = load_config(ROOT / "configs" / "digits_cnn.yaml", ["train.epochs=10"])
    summary = training_flow(cfg, tracking_uri=tracking_uri)
    assert summary.device.startswith("cuda")
    assert summary.metrics["test_accuracy"] >= 0.95
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(summary.model_uri)  # loads on the CPU: weights were saved device-free
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True, as_frame=True)
    out = model.predict(x.head(200))
    assert (np.asarray(out["prediction"]) == y.head(200).to_numpy()).mean() >= 0.95
