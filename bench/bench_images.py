"""Images: what configs/images_cnn.yaml reaches, and the train stage against a plain ImageFolder + DataLoader loop.

    python bench/bench_images.py [--per-class 150] [--seeds 0 1 2] [--epochs 25] [--device auto] [--repeats 2]

1. Writes the generated shapes folder (torchcycle.image_demo: 3 classes x PER_CLASS PNG/JPEG images of 28-48
   pixels a side) in a temporary folder.
2. Accuracy: ingest -> preprocess -> features -> train -> evaluate of configs/images_cnn.yaml (source pointed
   at that folder, --epochs) for each seed; prints test accuracy per seed and the range.
3. Throughput, side by side, alternated, best of --repeats, same model, optimizer, batch size, epochs and
   augmentation kinds (flip, random-resized crop, brightness/contrast jitter), on --device:
   (a) plain: torchvision.datasets.ImageFolder (PIL decode every epoch) with v2 transforms, a DataLoader with
       2 workers (pinned memory on CUDA), the usual training loop;
   (b) torchcycle: ingest (decode once) + preprocess + features + the train stage (data resident, augmentation
       on the device), the stage functions the flow runs.
   Prints training images per second of each and the ratio b/a (higher is better for torchcycle).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(folder: Path, seed: int, epochs: int, device: str):
    from torchcycle.config import load_config

    return load_config(
        ROOT / "configs" / "images_cnn.yaml",
        [f"data.source=images:{folder}", f"seed={seed}", f"train.epochs={epochs}", f"train.device={device}"],
    )


def ours(folder: Path, seed: int, epochs: int, device: str) -> tuple[float, float, int]:
    """(test accuracy, seconds of ingest..train, training images seen)."""
    import torch

    from torchcycle.models.training import resolve_device
    from torchcycle.tasks.evaluate import evaluate
    from torchcycle.tasks.features import build_features
    from torchcycle.tasks.ingest import ingest
    from torchcycle.tasks.preprocess import preprocess
    from torchcycle.tasks.train import train

    cfg = _config(folder, seed, epochs, device)
    start = time.perf_counter()
    prepared = build_features(preprocess(ingest(cfg.data), cfg.data, cfg.seed), cfg.features)
    dev = resolve_device(device)
    trained = train(prepared, cfg.model, cfg.train, seed=seed, device=dev, progress=False)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return evaluate(trained, prepared).metrics["test_accuracy"], seconds, len(prepared.x_train) * epochs


def plain(folder: Path, seed: int, epochs: int, device: str) -> tuple[float, int]:
    """(seconds, training images seen) of the textbook loop over the same folder (all of it: no split)."""
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    from torchcycle.models import build_model, make_config
    from torchcycle.models.training import resolve_device

    cfg = _config(folder, seed, epochs, device)
    dev = resolve_device(device)
    size = cfg.data.size
    a = cfg.features.augment
    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.RGB(),
            v2.RandomResizedCrop(size, scale=(a.crop_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=a.jitter, contrast=a.jitter),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.25] * 3),  # fixed statistics: the same arithmetic, no fitting pass
        ]
    )
    torch.manual_seed(seed)
    start = time.perf_counter()
    data = datasets.ImageFolder(str(folder), transform=transform)
    loader = DataLoader(
        data, batch_size=cfg.train.batch_size, shuffle=True, num_workers=2, pin_memory=dev.type == "cuda"
    )
    mcfg = make_config("cnn", cfg.model.params, in_features=3 * size[0] * size[1], n_outputs=3,
                       image_shape=(3, *size))  # fmt: skip
    model = build_model("cnn", mcfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    for _ in range(epochs):
        model.train()
        for xb, yb in loader:
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, len(data) * epochs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    import torch

    from torchcycle.image_demo import write_shapes

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "train"
        write_shapes(folder, args.per_class, seed=0)
        print(f"folder: 3 classes x {args.per_class} images; torch {torch.__version__}, device {args.device}")
        if not args.skip_accuracy:
            accs = []
            for seed in args.seeds:
                acc, seconds, _ = ours(folder, seed, args.epochs, args.device)
                accs.append(acc)
                print(f"  seed {seed}: test_accuracy {acc:.4f} ({seconds:.1f} s ingest..train)")
            print(f"test accuracy over seeds {args.seeds}: {min(accs):.4f}-{max(accs):.4f}")
        if not args.repeats:
            return
        best_a = best_b = 0.0
        for r in range(args.repeats):
            sa, na = plain(folder, 0, args.epochs, args.device)
            _, sb, nb = ours(folder, 0, args.epochs, args.device)
            best_a, best_b = max(best_a, na / sa), max(best_b, nb / sb)
            print(f"  round {r + 1}: (a) plain {na / sa:,.0f} img/s   (b) torchcycle {nb / sb:,.0f} img/s")
        print(f"(a) plain ImageFolder + DataLoader: {best_a:,.0f} training images/s (best of {args.repeats})")
        print(f"(b) torchcycle ingest..train stage: {best_b:,.0f} training images/s (best of {args.repeats})")
        print(f"ratio b/a: {best_b / best_a:.2f}")


if __name__ == "__main__":
    main()
