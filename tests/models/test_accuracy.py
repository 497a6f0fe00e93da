"""The seed systems reach their targets with the shipped configs (CPU, real data sets that ship with sklearn)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from torchcycle.config import load_config
from torchcycle.runtime.bundle import Predictor, load_bundle
from torchcycle.tasks.evaluate import evaluate
from torchcycle.tasks.features import build_features
from torchcycle.tasks.ingest import ingest
from torchcycle.tasks.preprocess import preprocess
from torchcycle.tasks.register import write_bundle
from torchcycle.tasks.train import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _run(name: str, tmp_path: Path) -> tuple[dict[str, float], Predictor, float]:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    prepared = build_features(preprocess(ingest(cfg.data), cfg.data, cfg.seed), cfg.features)
    trained = train(prepared, cfg.model, cfg.train, seed=cfg.seed, device=torch.device("cpu"), progress=False)
    metrics = evaluate(trained, prepared).metrics
    # Everything below goes through the saved bundle: raw inputs in, raw-unit predictions out.
    predictor = load_bundle(write_bundle(trained, prepared, cfg.data.target or "y", tmp_path / name))
    return metrics, predictor, trained.fit.seconds


@pytest.mark.parametrize(
    ("name", "threshold"),
    [
        ("digits_cnn", 0.98),
        ("digits_mlp", 0.96),
        ("wine_mlp", 0.95),
        ("xor_mlp", 1.0),
        ("digits_knn", 0.97),
    ],
)
def test_classifiers_reach_their_accuracy(name: str, threshold: float, tmp_path: Path) -> None:
    metrics, _, seconds = _run(name, tmp_path)
    assert metrics["test_accuracy"] >= threshold, metrics
    if name == "digits_cnn":
        assert seconds < 60, f"digits_cnn trained for {seconds:.0f}s on CPU"


def _linear_params(predictor: Predictor, columns: list[str]) -> tuple[np.ndarray, float]:
    """Read w and b of the whole raw-input -> prediction map by probing it at 0 and the unit vectors."""
    probe = pd.DataFrame(np.vstack([np.zeros(len(columns)), np.eye(len(columns))]), columns=columns)
    out = predictor.predict(probe)["prediction"].to_numpy()
    return out[1:] - out[0], float(out[0])


def test_line_predicts_11_at_5(tmp_path: Path) -> None:
    _, predictor, _ = _run("line_linear", tmp_path)
    assert predictor.predict(pd.DataFrame({"x": [5.0]}))["prediction"][0] == pytest.approx(11.0, abs=0.1)


def test_regression_recovers_bias(tmp_path: Path) -> None:
    _, predictor, _ = _run("regression_linear", tmp_path)
    _, b = _linear_params(predictor, ["x"])
    assert b == pytest.approx(14.5, abs=2.0)


def test_linear2d_recovers_w_and_b(tmp_path: Path) -> None:
    _, predictor, _ = _run("linear2d_linear", tmp_path)
    w, b = _linear_params(predictor, ["x1", "x2"])
    assert w == pytest.approx([2.0, -3.4], abs=0.01)
    assert b == pytest.approx(4.2, abs=0.01)


def test_remaining_configs_train(tmp_path: Path) -> None:
    for name, key, floor in [
        ("classification_mlp", "test_accuracy", 0.7),
        ("digits_softmax", "test_accuracy", 0.93),
        ("diabetes_linear", "test_r2", 0.3),
    ]:
        metrics, _, _ = _run(name, tmp_path)
        assert metrics[key] >= floor, (name, metrics)
