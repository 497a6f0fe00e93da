"""A labelled image folder drawn with PIL, so the image pipeline can be tried (and tested) without a download.

    python -m torchcycle.image_demo data/shapes     # data/shapes/train/<class>/*.png|jpg and data/shapes/new/*

Three classes (circle, square, triangle): one shape of a random colour, size and place on a noisy background
of another colour, at a random size between 28 and 48 pixels a side, saved as PNG or JPEG at random.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

CLASSES = ("circle", "square", "triangle")


def draw_shape(kind: str, rng: np.random.Generator) -> Image.Image:
    from PIL import Image, ImageDraw

    w, h = (int(v) for v in rng.integers(28, 49, size=2))
    background = rng.integers(0, 256, size=3)
    noise = rng.normal(0, 18, size=(h, w, 3))
    img = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    colour = tuple(int(v) for v in (background + 128 + rng.integers(-40, 41, size=3)) % 256)
    side = int(rng.integers(int(min(w, h) * 0.45), int(min(w, h) * 0.85)))
    x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    box = (x0, y0, x0 + side, y0 + side)
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=colour)
    return img


def write_shapes(root: Path, per_class: int, seed: int = 0, labelled: bool = True) -> list[Path]:
    """`per_class` images of each class under root/<class>/ (labelled) or flat in root/ (named
    <class>-<n>.<ext>, for scoring). The written paths, in the order written."""
    rng = np.random.default_rng(seed)
    written = []
    for kind in CLASSES:
        folder = root / kind if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = draw_shape(kind, rng)
            ext = "png" if rng.random() < 0.5 else "jpg"
            path = folder / f"{kind}-{i:04d}.{ext}"
            img.save(path, quality=90) if ext == "jpg" else img.save(path)
            written.append(path)
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m torchcycle.image_demo FOLDER", file=sys.stderr)
        return 2
    root = Path(argv[0])
    write_shapes(root / "train", 150, seed=0)
    write_shapes(root / "new", 20, seed=1, labelled=False)
    print(f"wrote {root}/train (3 classes x 150 images) and {root}/new (60 unlabelled images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
