"""Images as model input: encoded bytes (JPEG, PNG, GIF, WebP) -> uint8 (C, H, W) -> normalised float32.

What training (tasks/ingest.py) and a logged model (the pyfunc, batch scoring) share, so an image is decoded,
resized and normalised alike in both. Decoding is torchvision.io.decode_image, after PIL has read the header
alone to refuse decompression bombs; resizing and cropping are torchvision.transforms.v2. Torch, torchvision and
PIL (a torchvision dependency) are all it imports: a logged model carries this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import torch

from torchcycle.runtime.types import DataError

# What decode_image reads (torchvision 0.29: JPEG, PNG, GIF, WebP); a folder's other files are not images.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")
MAX_IMAGE_BYTES = 64 << 20  # one encoded image; more is not a photo but a mistake (or a decompression bomb)
MAX_IMAGE_PIXELS = 100_000_000  # H * W (times frames) an image may decode to, read from its header


class ImageError(DataError):
    """Images that cannot be decoded: `bad` holds (row position, reason) for each, so callers can name them."""

    def __init__(self, message: str, bad: Sequence[tuple[int, str]] = ()) -> None:
        super().__init__(message)
        self.bad = list(bad)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def _reason(err: BaseException) -> str:
    # torchvision's messages start with the C++ source location: "decode_jpeg, /__w/.../decode_jpeg.cpp:171, ..."
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    parts = text.split(", ", 2)
    return parts[2] if len(parts) == 3 and ".cpp:" in parts[1] else text


@cache
def _resizer(h: int, w: int, size: tuple[int, int]):
    """v2 resize so the image covers `size` (aspect kept), then a centre crop to exactly `size`."""
    from torchvision.transforms import v2

    scale = max(size[0] / h, size[1] / w)
    covered = (max(size[0], round(h * scale)), max(size[1], round(w * scale)))
    return v2.Compose([v2.Resize(covered, antialias=True), v2.CenterCrop(size)])


def _check_dimensions(data: bytes | bytearray | memoryview) -> None:
    """Refuse, from the header alone, an image that would decode to more than MAX_IMAGE_PIXELS (over all frames of
    an animation): a few hundred KB of PNG can stand for gigabytes of pixels. Headers PIL cannot read are left to
    decode_image, which names what is wrong."""
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(data))) as im:  # reads the header, not the pixels
                w, h = im.size
                frames = int(getattr(im, "n_frames", 1) or 1)
    except Image.DecompressionBombError as err:
        raise ImageError(f"too many pixels to decode ({err})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return
    if w * h * frames > MAX_IMAGE_PIXELS:
        many = f" x {frames} frames" if frames > 1 else ""
        raise ImageError(f"{w}x{h} pixels{many}: more than the {MAX_IMAGE_PIXELS} an image may decode to")


def decode(data: bytes, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """Encoded bytes -> uint8 (channels, H, W) of `size`. Grayscale, palette and RGBA images are converted to
    `channels` (1: grey, 3: RGB); 16-bit images are scaled to 8 bits. ImageError with the reason otherwise."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import to_dtype

    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageError(f"not image bytes but {type(data).__name__}")
    if len(data) == 0:
        raise ImageError("empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{len(data)} bytes: more than the {MAX_IMAGE_BYTES} an image may have")
    _check_dimensions(data)
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except RuntimeError as err:
        raise ImageError(_reason(err)) from None
    if img.ndim == 4:  # an animated GIF: its first frame
        img = img[0]
    h, w = img.shape[-2:]
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = to_dtype(img, torch.uint8, scale=True)
    if (h, w) != tuple(size):
        img = _resizer(int(h), int(w), tuple(size))(img)
    return img.contiguous()


def decode_all(
    values: Sequence[object], channels: int, size: tuple[int, int]
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """(uint8 (N_good, C, H, W), [(position, reason)] of the values that are no image)."""
    good: list[torch.Tensor] = []
    bad: list[tuple[int, str]] = []
    for i, value in enumerate(values):
        try:
            good.append(decode(value, channels, size))  # type: ignore[arg-type]
        except ImageError as err:
            bad.append((i, str(err)))
    if not good:
        return np.empty((0, channels, *size), dtype=np.uint8), bad
    return torch.stack(good).numpy(), bad


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images, in [0, 1] units (what Normalize takes)."""
    c = images.shape[1]
    mean, sq = np.zeros(c), np.zeros(c)
    for start in range(0, len(images), 1024):  # float64 a chunk at a time, never the whole set
        chunk = images[start : start + 1024].astype(np.float64) / 255.0
        mean += chunk.sum(axis=(0, 2, 3))
        sq += (chunk**2).sum(axis=(0, 2, 3))
    n = max(images.shape[0] * images.shape[2] * images.shape[3], 1)
    mean /= n
    std = np.sqrt(np.maximum(sq / n - mean**2, 0.0))
    return [float(m) for m in mean], [float(s) if s > 1e-6 else 1.0 for s in std]


def normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (N, C, H, W) -> float32 (N, C*H*W): (x / 255 - mean[c]) / std[c]."""
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    out = (images.astype(np.float32) / 255.0 - m) / s
    return out.reshape(len(images), -1)
