"""Pure-torch models and the training loop. Imports nothing of Prefect or MLflow."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from torch import nn

from torchcycle.models.cnn import CNN, CNNConfig
from torchcycle.models.knn import KNN, KNNConfig
from torchcycle.models.linear import LinearConfig, LinearRegression
from torchcycle.models.mlp import MLP, MLPConfig
from torchcycle.models.softmax import SoftmaxConfig, SoftmaxRegression

# kind -> (config class, model class, tasks it supports)
MODELS: dict[str, tuple[type, type[nn.Module], frozenset[str]]] = {
    "linear": (LinearConfig, LinearRegression, frozenset({"regression"})),
    "softmax": (SoftmaxConfig, SoftmaxRegression, frozenset({"classification"})),
    "mlp": (MLPConfig, MLP, frozenset({"classification", "regression"})),
    "cnn": (CNNConfig, CNN, frozenset({"classification"})),
    "knn": (KNNConfig, KNN, frozenset({"classification", "regression"})),
}

# Fields filled from the data, never from a user's config.
DERIVED_FIELDS = frozenset({"in_features", "out_features", "num_classes", "image_shape", "binned"})


def user_fields(kind: str) -> dict[str, Any]:
    """The settable fields of a model kind's config, with their defaults."""
    cfg_cls = MODELS[kind][0]
    return {f.name: f.default for f in fields(cfg_cls) if f.name not in DERIVED_FIELDS}


def make_config(
    kind: str,
    params: dict[str, Any],
    *,
    in_features: int,
    n_outputs: int,
    image_shape: tuple[int, int, int] | None = None,
    n_rows: int | None = None,
    binned: tuple[int, ...] = (),
) -> Any:
    """Build a model config from user params plus the shape facts the data decides.

    n_outputs: number of classes for classifiers, 1 for regression. n_rows: the train split's rows; a config with
    settings of "auto" resolves them from these facts (its `resolved`). binned: the inputs worth bins (models/mlp.py).
    """
    cfg_cls = MODELS[kind][0]
    names = {f.name for f in fields(cfg_cls)}
    derived: dict[str, Any] = {"in_features": in_features}
    if "out_features" in names:
        derived["out_features"] = n_outputs
    if "binned" in names:
        derived["binned"] = tuple(binned)
    if "num_classes" in names:
        derived["num_classes"] = n_outputs
    if "image_shape" in names:
        if image_shape is None:
            raise ValueError(f"model '{kind}' needs image data (a source with an image shape)")
        derived["image_shape"] = tuple(image_shape)
    cfg = replace(cfg_cls(**params), **derived)
    if hasattr(cfg, "resolved"):
        cfg = cfg.resolved(image_shape=image_shape, n_rows=n_rows)
    return cfg


def build_model(kind: str, cfg: Any) -> nn.Module:
    return MODELS[kind][1](cfg)


__all__ = [
    "CNN",
    "DERIVED_FIELDS",
    "KNN",
    "MLP",
    "MODELS",
    "CNNConfig",
    "KNNConfig",
    "LinearConfig",
    "LinearRegression",
    "MLPConfig",
    "SoftmaxConfig",
    "SoftmaxRegression",
    "build_model",
    "make_config",
    "user_fields",
]
