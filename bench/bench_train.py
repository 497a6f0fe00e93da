"""Training throughput: the classic seed loop vs torchcycle's train stage, same data, same device, one run.

    python bench/bench_train.py [--device cuda|cpu] [--batch-sizes 512,4096] [--train 60000] [--test 10000]

Data: MNIST-format IDX files (60,000 train / 10,000 test) written from scikit-learn digits upscaled to
28x28 with random shifts and noise, read back through torchvision's MNIST loader by both sides.

(A) the seed loop, as the seeds wrote it: torchvision.datasets.MNIST -> ToTensor/Normalize ->
    DataLoader(batch_size=64, shuffle=True) -> 784-512-256-10 MLP -> Adam(1e-3), one epoch, fp32.
(B) torchcycle's train stage (the plain `torchcycle.tasks.train.train` the flow's task calls), MLP 784-512-256-10 and
    CNN, data resident on the device, one-cycle LR, bf16 autocast on CUDA, channels_last for the CNN,
    at batch 512 (3 epochs, lr 3e-3) and at batch 4096 (8 epochs, lr 1e-2: the large-batch recipe).

Prints samples/s of each (train samples per second over the whole fit: upload, first-epoch warm-up and
per-epoch validation included for B), the B/A ratio and each model's test accuracy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_data(root: Path, n_train: int, n_test: int) -> None:
    from torchcycle.idx import digits_as_mnist, write_mnist

    write_mnist(root, digits_as_mnist(n_train, seed=0), digits_as_mnist(n_test, seed=1))


def seed_loop(root: Path, device, epochs: int = 1) -> tuple[float, float]:
    """(samples/s, test accuracy) of the classic loop."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train = datasets.MNIST(root, train=True, transform=tf, download=False)
    test = datasets.MNIST(root, train=False, transform=tf, download=False)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(train, batch_size=64, shuffle=True)
    _sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    _sync(device)
    seconds = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=1000):
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    return epochs * len(train) / seconds, correct / len(test)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# batch size -> (peak one-cycle LR, epochs). Larger batches take fewer, larger steps: a higher LR and more epochs.
RECIPES = {512: (3e-3, 3), 1024: (5e-3, 4), 2048: (6e-3, 6), 4096: (1e-2, 8)}


def torchcycle_train(root: Path, device, kind: str, batch_size: int) -> tuple[float, float, float, str]:
    """(samples/s, steady samples/s, test accuracy, precision) of the train stage on the same IDX files.

    Steady: the median epoch after the first, i.e. without the one-off CUDA/cuDNN warm-up and upload."""
    import statistics

    import torch

    from torchcycle.config import DataConfig, FeaturesConfig, ModelSpec, TrainSection
    from torchcycle.models.inference import predict
    from torchcycle.models.training import resolve_precision
    from torchcycle.tasks.features import build_features
    from torchcycle.tasks.ingest import ingest
    from torchcycle.tasks.preprocess import preprocess
    from torchcycle.tasks.train import train

    data = DataConfig(source="torchvision:MNIST", root=str(root), val_size=0.05)
    prepared = build_features(preprocess(ingest(data), data, seed=0), FeaturesConfig())
    spec = (
        ModelSpec(kind="mlp", hidden=[512, 256])
        if kind == "mlp"
        else ModelSpec(kind="cnn", channels=[32, 64], hidden=128)
    )
    lr, epochs = RECIPES[batch_size]
    cfg = TrainSection(epochs=epochs, batch_size=batch_size, lr=lr, schedule="onecycle", patience=0, device=str(device))
    stamps: list[float] = []  # after each epoch's validation, which ends in a host sync
    start = time.perf_counter()
    trained = train(
        prepared,
        spec,
        cfg,
        seed=0,
        device=device,
        progress=False,
        callback=lambda *_: stamps.append(time.perf_counter()),
    )
    epoch_s = [b - a for a, b in zip([start, *stamps], stamps, strict=False)]
    steady = len(prepared.x_train) / statistics.median(epoch_s[1:] or epoch_s)
    n = len(prepared.x_train) * len(trained.fit.history)
    model = trained.build().to(device)
    out = predict(model, torch.tensor(prepared.x_test), device)
    acc = (out.argmax(1).numpy() == prepared.y_test).mean()
    precision = "bf16" if resolve_precision(cfg.precision, device) else "fp32"
    return n / trained.fit.seconds, steady, float(acc), precision


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", default="512,4096", help=f"torchcycle batch sizes, of {sorted(RECIPES)}")
    ap.add_argument("--train", type=int, default=60_000)
    ap.add_argument("--test", type=int, default=10_000)
    ap.add_argument("--models", default="mlp,cnn")
    args = ap.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_data(root, args.train, args.test)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
        print(f"device {device} ({name}), torch {torch.__version__}, {args.train:,} train / {args.test:,} test")
        a_rate, a_acc = seed_loop(root, device)
        rows = [("(A) seed loop MLP, DataLoader bs 64, fp32, 1 epoch", a_rate, None, a_acc, "")]
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            for kind in args.models.split(","):
                rate, steady, acc, precision = torchcycle_train(root, device, kind, bs)
                label = f"(B) torchcycle {kind.upper()}, resident bs {bs}, {precision}, {RECIPES[bs][1]} epochs"
                rows.append((label, rate, steady, acc, f"{rate / a_rate:.1f}x"))

    print()
    print(f"{'run':<64}{'samples/s':>12}{'steady/s':>12}{'test acc':>10}{'B/A':>8}")
    for label, rate, steady, acc, ratio in rows:
        steady_s = f"{steady:>12,.0f}" if steady is not None else f"{'':>12}"
        print(f"{label:<64}{rate:>12,.0f}{steady_s}{acc:>10.4f}{ratio:>8}")


if __name__ == "__main__":
    main()
