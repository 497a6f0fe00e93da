"""features: the pipeline is fitted on the train split only."""

from __future__ import annotations

import numpy as np
import pytest
from stage_data import _raw, _table

from torchcycle.config import DataConfig, FeaturesConfig
from torchcycle.errors import DataError
from torchcycle.tasks.features import build_features
from torchcycle.tasks.ingest import ingest
from torchcycle.tasks.preprocess import preprocess


# ---- features -----------------------------------------------------------------------------------
def test_features_fit_on_train_only_and_one_hot() -> None:
    s = preprocess(_raw(_table()), DataConfig(source="file:x", target="y"), seed=0)
    p = build_features(s, FeaturesConfig())
    # numeric scaled with train statistics: train column mean ~0, std ~1; cat one-hot adds 3 columns
    assert p.x_train.shape[1] == 1 + 3 and p.x_train.dtype == np.float32
    assert abs(p.x_train[:, 0].mean()) < 1e-5
    assert p.pipeline.classes == ["a", "b", "c"] and p.y_train.dtype == np.int64
    unseen = s.test.drop(columns="y").head(2).assign(cat="purple")
    x = p.pipeline.transform(unseen)  # a value never seen in training sets no category column (no rare ones)
    assert (x[:, 1:] == 0).all() and np.isfinite(x).all()
    with pytest.raises(DataError, match="missing input column"):
        p.pipeline.transform(s.test.drop(columns=["num"]))


def test_features_impute_missing_numeric_values() -> None:
    frame = _table()
    frame.loc[::5, "num"] = np.nan
    s = preprocess(_raw(frame), DataConfig(source="file:x", target="y"), seed=0)
    p = build_features(s, FeaturesConfig())
    assert np.isfinite(p.x_train).all() and np.isfinite(p.x_test).all()


def test_image_features_are_normalised() -> None:
    raw = ingest(DataConfig(source="sklearn:digits"))
    s = preprocess(raw, DataConfig(source="sklearn:digits"), seed=0)
    p = build_features(s, FeaturesConfig())
    assert p.pipeline.image_shape == (1, 8, 8)
    assert abs(float(p.x_train.mean())) < 1e-4 and abs(float(p.x_train.std()) - 1) < 1e-3


def test_regression_targets_round_trip() -> None:
    raw = ingest(DataConfig(source="sklearn:diabetes"))
    s = preprocess(raw, DataConfig(source="sklearn:diabetes"), seed=0)
    p = build_features(s, FeaturesConfig())
    assert abs(float(p.y_train.mean())) < 1e-5  # learned in standardised units
    assert np.allclose(p.pipeline.decode_target(p.y_test), s.test["target"], atol=1e-3)
