"""Write MNIST-format IDX files, so torchvision's MNIST loader can be exercised offline."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

# torchvision.datasets.MNIST looks for these (unzipped) names under <root>/<Name>/raw.
_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """images: (N, H, W) uint8. Magic 2051, then N, H, W as big-endian int32."""
    n, h, w = images.shape
    path.write_bytes(struct.pack(">IIII", 2051, n, h, w) + np.ascontiguousarray(images, dtype=np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """labels: (N,) uint8. Magic 2049, then N."""
    path.write_bytes(struct.pack(">II", 2049, len(labels)) + np.asarray(labels, dtype=np.uint8).tobytes())


def write_mnist(
    root: str | Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], name: str = "MNIST"
) -> Path:
    """Lay out train/test (images, labels) as `root/name/raw/*-ubyte`; returns the raw folder."""
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for is_train, (images, labels) in ((True, train), (False, test)):
        img_file, lbl_file = _FILES[is_train]
        write_idx_images(raw / img_file, images)
        write_idx_labels(raw / lbl_file, labels)
    return raw


def digits_as_mnist(n: int, seed: int = 0, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size) uint8 images made from scikit-learn's 8x8 digits: upscaled, shifted, noisy."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(d.images), n)
    small = torch.from_numpy(d.images[pick].astype(np.float32) / 16.0).unsqueeze(1)  # (n, 1, 8, 8), [0, 1]
    inner = size - 8  # leave room for random shifts of up to +-4 px
    big = torch.nn.functional.interpolate(small, size=(inner, inner), mode="bilinear", align_corners=False)
    out = np.zeros((n, size, size), dtype=np.float32)
    shifts = rng.integers(0, size - inner + 1, size=(n, 2))
    for i, (dy, dx) in enumerate(shifts):
        out[i, dy : dy + inner, dx : dx + inner] = big[i, 0].numpy()
    out += rng.normal(0, 0.05, out.shape).astype(np.float32)
    images = (np.clip(out, 0, 1) * 255).astype(np.uint8)
    return images, d.target[pick].astype(np.uint8)
