"""Per-epoch training checkpoints: written atomically, read without unpickling.

One file per (config, data) pair, so `torchcycle train` with the same config and data resumes where
an interrupted run stopped; the flow removes it once the model is registered and gated.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from torchcycle.atomic import atomic_target
from torchcycle.errors import DataError

ENV_DIR = "TORCHCYCLE_CHECKPOINT_DIR"
DEFAULT_DIR = "checkpoints"  # relative to the working directory, like mlflow/


def checkpoint_path(name: str, config_hash: str, data_digest: str, root: str | Path | None = None) -> Path:
    root = Path(root or os.environ.get(ENV_DIR) or DEFAULT_DIR)
    return root / f"{name}-{config_hash[:12]}-{data_digest[:12]}.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temp file beside `path`, fsync, then rename: a kill leaves the old file or the new one."""
    # A temp file of this writer's own: two trainings of one config never rename each other's file.
    with atomic_target(path) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)


def load_checkpoint(path: Path) -> dict | None:
    """The saved state, or None when there is none. weights_only=True: tensors and plain containers only,
    so a planted pickle payload is refused, never executed."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, or not a weights-only file
        raise DataError(
            f"cannot resume from checkpoint {path}: {type(err).__name__}; delete it to start over"
        ) from None


def remove_checkpoint(path: Path) -> None:
    path.unlink(missing_ok=True)
