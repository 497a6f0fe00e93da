"""Feature engineering: fit the feature pipeline on the train split, transform every split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from torchcycle.config import DriftConfig, FeaturesConfig
from torchcycle.models.augment import Augment
from torchcycle.runtime.bundle import FeaturePipeline
from torchcycle.runtime.contract import infer_contract
from torchcycle.runtime.drift import ReferenceProfile
from torchcycle.tasks.preprocess import Splits


@dataclass(frozen=True)
class Prepared:
    """Model-ready arrays for each split plus the fitted pipeline that made them."""

    pipeline: FeaturePipeline
    # (N, F) float32; for images: sources uint8 pixels (N, C*H*W), a quarter of the memory, which the training
    # loop normalises batch by batch on its device (model_inputs does the same here)
    x_train: np.ndarray
    y_train: np.ndarray  # (N,) int64 class index or float32 target
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_frame: pd.DataFrame  # raw test rows (features + target), for examples and sample files
    target: str = ""  # the target column of test_frame
    augment: Augment | None = None  # images: what the training loop changes in each batch (None: nothing)

    def model_inputs(self, x: np.ndarray) -> np.ndarray:
        """One of the x arrays as the model takes it: float32 (N, F) (image pixels normalised)."""
        if x.dtype != np.uint8 or self.pipeline.image_shape is None:
            return x
        return self.pipeline.normalise(x.reshape(len(x), *self.pipeline.image_shape))

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_outputs(self) -> int:
        return len(self.pipeline.classes or []) if self.pipeline.task == "classification" else 1


def _sorted_labels(values: pd.Series) -> list[Any]:
    uniq = pd.unique(values.dropna())
    try:
        return sorted(uniq.tolist())
    except TypeError:  # mixed types: order by their text
        return sorted(uniq.tolist(), key=str)


def build_features(splits: Splits, cfg: FeaturesConfig, drift: DriftConfig | None = None) -> Prepared:
    """Fit the pipeline on the train split and transform every split. The pipeline carries the drift reference
    of the train split's raw features (its predictions are added when the bundle is written)."""
    drift = drift or DriftConfig()
    if splits.train_images is not None:
        return _image_features(splits, cfg, drift)
    classes = None
    if splits.task == "classification":
        classes = _sorted_labels(
            pd.concat([splits.train[splits.target], splits.val[splits.target], splits.test[splits.target]])
        )
    columns = [c for c in splits.train.columns if c != splits.target and c not in splits.left_out]
    pipe = FeaturePipeline.fit(
        splits.train,
        splits.target,
        splits.task,
        classes,
        splits.image_shape,
        cfg.scale,
        kinds={c: k for c, k in splits.kinds.items() if c in columns},
        columns=columns,
        max_categories=cfg.max_categories,
    )
    # The contract describes the whole table (nulls may first appear in a held-out split, or in rows with no
    # label, which are scored too); only the fitted statistics above come from the train split alone.
    parts = [splits.train, splits.val, splits.test] + ([splits.unlabeled] if splits.unlabeled is not None else [])
    pipe.contract = infer_contract(pd.concat([p[columns] for p in parts]))
    # dates are not profiled: data scored later holds later dates by nature, which is no drift
    profiled = [c for c in columns if pipe.kinds.get(c) != "datetime"]
    pipe.reference = ReferenceProfile.from_frame(
        splits.train[profiled],
        drift.bins,
        warn=drift.warn,
        threshold=drift.threshold,
        min_rows=drift.min_rows,
    )

    def xy(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        return pipe.transform(frame), pipe.encode_target(frame[splits.target])

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = xy(splits.train), xy(splits.val), xy(splits.test)
    return Prepared(pipe, x_tr, y_tr, x_va, y_va, x_te, y_te, splits.test, splits.target)


def _image_features(splits: Splits, cfg: FeaturesConfig, drift: DriftConfig) -> Prepared:
    """Images: per-channel mean/std fitted on the train split; every split's pixels as uint8 (N, C*H*W).
    No pandera contract (the input is encoded image bytes, checked by decoding them). The drift reference profiles
    no input column, only the predictions (added when the bundle is written): scoring watches the class mix."""
    assert splits.train_images is not None and splits.val_images is not None and splits.test_images is not None
    classes = _sorted_labels(
        pd.concat([splits.train[splits.target], splits.val[splits.target], splits.test[splits.target]])
    )
    column = next(c for c in splits.train.columns if c != splits.target)
    pipe = FeaturePipeline.fit_images(splits.train_images, column, classes)
    pipe.reference = ReferenceProfile.from_frame(
        pd.DataFrame(index=splits.train.index),  # the train split's rows, no column of its own
        drift.bins,
        warn=drift.warn,
        threshold=drift.threshold,
        min_rows=drift.min_rows,
    )
    a = cfg.augment
    augment = Augment(a.flip, a.crop_scale, a.jitter) if a.active() else None

    def xy(frame: pd.DataFrame, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return images.reshape(len(images), -1), pipe.encode_target(frame[splits.target])

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (
        xy(splits.train, splits.train_images),
        xy(splits.val, splits.val_images),
        xy(splits.test, splits.test_images),
    )
    return Prepared(pipe, x_tr, y_tr, x_va, y_va, x_te, y_te, splits.test, splits.target, augment)


@task(name="features", cache_policy=NO_CACHE)
def features_task(splits: Splits, cfg: FeaturesConfig, drift: DriftConfig | None = None) -> Prepared:
    return build_features(splits, cfg, drift)
