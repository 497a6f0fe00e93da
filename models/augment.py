"""Image augmentation of training batches, on the batch's device, a fresh draw for every image.

torchvision.transforms.v2 draws one set of parameters per call, so a batch tensor would be flipped or cropped as
one image; here each image of a (B, C, H, W) batch gets its own flip, random-resized crop (one affine grid per
image, sampled with grid_sample) and brightness/contrast factors, in a few batched kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class Augment:
    flip: bool = False  # mirror left-right with probability 1/2
    crop_scale: float = 1.0  # random-resized crop: the kept area is a fraction in [crop_scale, 1]
    jitter: float = 0.0  # brightness and contrast factors drawn from [1 - jitter, 1 + jitter]


def normaliser(
    image_shape: tuple[int, int, int], mean: Sequence[float], std: Sequence[float]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 pixels (B, C*H*W) -> float32 (B, C*H*W): (x / 255 - mean[c]) / std[c], on the batch's device; the
    same float32 operations as torchcycle.runtime.images.normalise, so training sees what scoring computes."""
    c, h, w = image_shape

    def apply(x: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
        return ((x.reshape(x.shape[0], c, h, w).to(torch.float32) / 255.0 - m) / s).reshape(x.shape[0], -1)

    return apply


def augmenter(
    aug: Augment, image_shape: tuple[int, int, int], mean: Sequence[float], std: Sequence[float]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function of normalised (B, C*H*W) or (B, C, H, W) batches -> augmented ones of the same shape, device and
    dtype. `mean`/`std`: the per-channel normalisation ([0, 1] units) the batch is in, undone for the jitter."""
    c, h, w = image_shape

    def apply(batch: torch.Tensor) -> torch.Tensor:
        x = batch.reshape(batch.shape[0], c, h, w)
        b, dev = x.shape[0], x.device
        if aug.flip or aug.crop_scale < 1:
            sx = torch.ones(b, device=dev)
            sy = torch.ones(b, device=dev)
            tx = torch.zeros(b, device=dev)
            ty = torch.zeros(b, device=dev)
            if aug.crop_scale < 1:
                area = torch.empty(b, device=dev).uniform_(aug.crop_scale, 1.0)
                # aspect ratio log-uniform in [3/4, 4/3], as torchvision's RandomResizedCrop
                ratio = torch.exp(torch.empty(b, device=dev).uniform_(math.log(3 / 4), math.log(4 / 3)))
                sx = torch.sqrt(area * ratio).clamp(max=1.0)  # the crop's width, as a fraction of the image's
                sy = torch.sqrt(area / ratio).clamp(max=1.0)
                tx = (torch.rand(b, device=dev) * 2 - 1) * (1 - sx)  # its centre, kept inside the image
                ty = (torch.rand(b, device=dev) * 2 - 1) * (1 - sy)
            if aug.flip:
                sx = sx * torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0)
            theta = torch.zeros(b, 2, 3, device=dev)
            theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
            grid = F.affine_grid(theta.to(x.dtype), [b, c, h, w], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if aug.jitter > 0:
            m = torch.tensor(mean, device=dev, dtype=x.dtype).view(1, c, 1, 1)
            s = torch.tensor(std, device=dev, dtype=x.dtype).view(1, c, 1, 1)
            pixels = x * s + m  # back to [0, 1]
            lo, hi = 1 - aug.jitter, 1 + aug.jitter
            bright = torch.empty(b, 1, 1, 1, device=dev, dtype=x.dtype).uniform_(lo, hi)
            contrast = torch.empty(b, 1, 1, 1, device=dev, dtype=x.dtype).uniform_(lo, hi)
            pixels = pixels * bright
            grey = pixels.mean(dim=(1, 2, 3), keepdim=True)
            pixels = ((pixels - grey) * contrast + grey).clamp(0, 1)
            x = (pixels - m) / s
        return x.reshape(batch.shape)

    return apply
