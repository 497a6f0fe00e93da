"""Dask worker preload, named in torchcycle/dask_workers.yaml: as a worker starts, a thread of its own imports
what trials and scoring units run on (torch, MLflow, Optuna, torchcycle's stages: some 5 s on 2 cores), while the
worker registers and waits for work; the first unit then finds them imported (an import still running makes it
wait for that import, not start another)."""

from __future__ import annotations

import contextlib
import importlib
import threading
from typing import Any

MODULES = (
    "torch",
    "mlflow.tracking",
    "optuna",
    "torchcycle.tasks.tune",
    "torchcycle.tasks.score",
    "torchcycle.flows.scoring",
    "prefect.task_engine",
)
_done = threading.Event()


def _import_all() -> None:
    for name in MODULES:
        with contextlib.suppress(Exception):  # a unit that needs it raises the import's error itself
            importlib.import_module(name)
    _done.set()


def dask_setup(worker: Any) -> None:
    threading.Thread(target=_import_all, name="torchcycle-preload", daemon=True).start()


def wait(timeout: float) -> bool:
    """Whether the preload's imports have finished, waiting up to `timeout` seconds (False: not in `timeout`, or
    this process is no worker that preloaded)."""
    return _done.wait(timeout)
