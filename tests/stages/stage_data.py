"""Tiny data and a small trained model the stage tests share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from torchcycle.config import config_from_dict
from torchcycle.tasks.features import build_features
from torchcycle.tasks.ingest import RawData, frame_digest, ingest
from torchcycle.tasks.preprocess import preprocess
from torchcycle.tasks.train import train


def _raw(frame: pd.DataFrame, target: str = "y", task: str = "classification") -> RawData:
    return RawData(frame, target, task, "test", frame_digest(frame))


def _table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 60
    return pd.DataFrame(
        {
            "num": rng.normal(size=n),
            "cat": rng.choice(["red", "green", "blue"], size=n),
            "y": np.tile(["a", "b", "c"], n // 3),
        }
    )


def _train_small(tmp_path: Path, source: str = "sklearn:iris", kind: str = "mlp"):
    cfg = config_from_dict(
        {
            "name": "t",
            "data": {"source": source},
            "model": {"kind": kind},
            "train": {"epochs": 30, "patience": 0, "lr": 0.01},
        }
    )
    p = build_features(preprocess(ingest(cfg.data), cfg.data, 0), cfg.features)
    trained = train(p, cfg.model, cfg.train, seed=0, device=torch.device("cpu"), progress=False)
    return cfg, p, trained
