"""Evaluate on the held-out test split: metrics plus the plots people want to look at."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from prefect import task
from prefect.cache_policies import NO_CACHE

from torchcycle.models.inference import predict as torch_predict
from torchcycle.models.training import FitResult
from torchcycle.runtime.types import Task
from torchcycle.tasks.features import Prepared
from torchcycle.tasks.train import TrainedModel

# A confusion matrix with more classes is unreadable, and its (C, C) counts and figure grow with C**2
# (10,000 classes: 6 GB). Above this the plot is left out; the metrics are computed either way.
MAX_CONFUSION_CLASSES = 50


@dataclass(frozen=True)
class EvalReport:
    metrics: dict[str, float]
    figures: dict[str, bytes] = field(default_factory=dict, repr=False)  # file name -> PNG bytes


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def loss_curve_png(fit: FitResult) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # headless; never opens a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = range(1, len(fit.history) + 1)
    for key in ("train_loss", "val_loss"):
        values = [h.get(key, np.nan) for h in fit.history]
        ax.plot(epochs, values, marker="o" if len(values) < 30 else None, label=key)
    if fit.best_epoch:
        ax.axvline(fit.best_epoch, color="grey", linestyle="--", label=f"best epoch {fit.best_epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("loss curve")
    ax.legend()
    return _png(fig)


MAX_CLASS_METRICS = 50  # per-class metrics for at most this many classes (as the confusion matrix)


def metric_key(label: str) -> str:
    """A class label as part of an MLflow metric name: characters MLflow refuses, and '/' (which the UI reads as a
    chart section), become '_'."""
    import re

    return re.sub(r"[^A-Za-z0-9_\-. ]", "_", label)[:200] or "_"


def label_text(values: ArrayLike) -> np.ndarray:
    """Class labels as the text they are matched by: `str(label)`, as FeaturePipeline.encode_target maps
    raw target values to class indices. 3, np.int64(3) and "3" are one label; True and "True" too."""
    return np.asarray(values, dtype=object).astype(str)


def test_metrics(
    y_true: ArrayLike, y_pred: ArrayLike, *, task: Task, classes: Sequence[Any] | None
) -> dict[str, float]:
    """The test metrics of predictions against true values: what evaluate() logs for a new version and what
    the promotion gate scores the champion with, so the two are computed alike.

    Classification: labels (not class indices) compared as text (`label_text`); precision, recall and F1
    are macro averages over `classes`, the model's full class list, with zero_division=0: a class missing
    from the test split (and never predicted) counts 0 for every model scored on it. Labels outside
    `classes` count for accuracy only. Balanced accuracy is the mean recall over the classes present in the
    rows (a rare class weighs as much as a common one); each class's own recall is `test_recall_class_<class>`
    (NaN when the rows hold none of it), for at most MAX_CLASS_METRICS classes. Regression: mse, mae and r2
    (NaN for fewer than two rows), in target units; `classes` is ignored."""
    from sklearn import metrics as skm

    if task == "classification":
        if classes is None:
            raise ValueError("classification metrics need the model's class list")
        y, pred, labels = label_text(y_true), label_text(y_pred), label_text(classes)
        p, r, f1, _ = skm.precision_recall_fscore_support(y, pred, labels=labels, average="macro", zero_division=0)
        recalls = {c: float((pred[y == c] == c).mean()) if (y == c).any() else float("nan") for c in labels}
        present = [v for v in recalls.values() if not np.isnan(v)]
        m = {
            "test_accuracy": float((y == pred).mean()) if len(y) else float("nan"),
            "test_balanced_accuracy": float(np.mean(present)) if present else float("nan"),
            "test_f1_macro": f1,
            "test_precision_macro": p,
            "test_recall_macro": r,
        }
        if len(labels) <= MAX_CLASS_METRICS:
            m.update({f"test_recall_class_{metric_key(c)}": v for c, v in recalls.items()})
    else:
        y = np.asarray(y_true, dtype=np.float64)
        pred = np.asarray(y_pred, dtype=np.float64)
        m = {
            "test_mse": skm.mean_squared_error(y, pred),
            "test_mae": skm.mean_absolute_error(y, pred),
            "test_r2": skm.r2_score(y, pred) if len(y) > 1 else float("nan"),
        }
    return {k: float(v) for k, v in m.items()}


test_metrics.__test__ = False  # a metric function, not a test, when a test module imports it


def evaluate(trained: TrainedModel, prepared: Prepared) -> EvalReport:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn import metrics as skm

    out = torch_predict(trained.build(), torch.from_numpy(prepared.model_inputs(prepared.x_test)), torch.device("cpu"))
    figures = {"loss_curve.png": loss_curve_png(trained.fit)}
    y = prepared.y_test
    task = prepared.pipeline.task
    if task == "classification":
        classes = list(prepared.pipeline.classes or [])
        pred = out.argmax(1).numpy()
        # class indices -> their labels: scored in the label space the gate scores the champion's output in
        names = np.asarray(classes, dtype=object)
        m = test_metrics(names[y], names[pred], task=task, classes=classes)
        if len(classes) <= MAX_CONFUSION_CLASSES:
            labels = list(range(len(classes)))
            fig, ax = plt.subplots(figsize=(6, 5))
            skm.ConfusionMatrixDisplay.from_predictions(
                y,
                pred,
                labels=labels,
                display_labels=[str(c) for c in classes],
                ax=ax,
                colorbar=False,
            )
            ax.set_title("confusion matrix (test split)")
            figures["confusion_matrix.png"] = _png(fig)
        if prepared.pipeline.image_column is not None:
            figures["misclassified.png"] = misclassified_png(prepared, pred)
    else:
        # the raw float64 targets, as the gate scores the champion against: decoding the float32 training
        # targets would be off by ~1e-9 in r2, enough to break a tie between identical models
        pred = prepared.pipeline.decode_target(out[:, 0].numpy())
        y = prepared.test_frame[prepared.target].to_numpy(dtype=np.float64)
        m = test_metrics(y, pred, task=task, classes=None)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(y, pred, s=12, alpha=0.7)
        lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", label="ideal")
        ax.set_xlabel("actual")
        ax.set_ylabel("predicted")
        ax.set_title("predicted vs actual (test split)")
        ax.legend()
        figures["predicted_vs_actual.png"] = _png(fig)
    return EvalReport(m, figures)


MAX_MISCLASSIFIED = 36  # images in the grid of misclassified test images (6 x 6)


def misclassified_png(prepared: Prepared, pred: np.ndarray) -> bytes:
    """A grid of the test images the model got wrong (up to MAX_MISCLASSIFIED), each titled true -> predicted;
    'none misclassified' on an empty grid when it got every one right."""
    import matplotlib.pyplot as plt

    pipe = prepared.pipeline
    assert pipe.image_shape is not None
    c, h, w = pipe.image_shape
    wrong = np.flatnonzero(pred != prepared.y_test)[:MAX_MISCLASSIFIED]
    cols = max(1, min(6, len(wrong)))
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.0 * rows), squeeze=False)
    names = [str(k) for k in pipe.classes or []]
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong, strict=False):
        img = prepared.x_test[i].reshape(c, h, w) / 255.0  # uint8 pixels -> [0, 1]
        ax.imshow(img[0] if c == 1 else img.transpose(1, 2, 0), cmap="gray" if c == 1 else None, vmin=0, vmax=1)
        ax.set_title(f"{names[prepared.y_test[i]]} -> {names[pred[i]]}", fontsize=8)
    total = int((pred != prepared.y_test).sum())
    fig.suptitle(
        f"misclassified test images: {total} of {len(pred)}" + (f" (first {len(wrong)})" if total > len(wrong) else "")
        if total
        else f"none of {len(pred)} test images misclassified"
    )
    return _png(fig)


def validation_metrics(trained: TrainedModel, prepared: Prepared) -> dict[str, float]:
    """The test metrics computed on the validation split, named val_*: what a tuning trial is judged by, so the
    test split stays unseen until the winner is evaluated."""
    out = torch_predict(trained.build(), torch.from_numpy(prepared.model_inputs(prepared.x_val)), torch.device("cpu"))
    task = prepared.pipeline.task
    if task == "classification":
        classes = list(prepared.pipeline.classes or [])
        names = np.asarray(classes, dtype=object)
        m = test_metrics(names[prepared.y_val], names[out.argmax(1).numpy()], task=task, classes=classes)
    else:  # target units: both sides decoded alike
        pipe = prepared.pipeline
        m = test_metrics(
            pipe.decode_target(prepared.y_val), pipe.decode_target(out[:, 0].numpy()), task=task, classes=None
        )
    return {"val_" + k.removeprefix("test_"): v for k, v in m.items()}


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(trained: TrainedModel, prepared: Prepared) -> EvalReport:
    return evaluate(trained, prepared)
