"""Evaluate on the held-out test split: metrics plus the plots people want to look at."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from torchcycle.models.inference import predict as torch_predict
from torchcycle.models.training import FitResult
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


def evaluate(trained: TrainedModel, prepared: Prepared) -> EvalReport:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn import metrics as skm

    out = torch_predict(trained.build(), torch.from_numpy(prepared.x_test), torch.device("cpu"))
    figures = {"loss_curve.png": loss_curve_png(trained.fit)}
    y = prepared.y_test
    if prepared.pipeline.task == "classification":
        pred = out.argmax(1).numpy()
        labels = list(range(len(prepared.pipeline.classes or [])))
        p, r, f1, _ = skm.precision_recall_fscore_support(y, pred, labels=labels, average="macro", zero_division=0)
        m = {
            "test_accuracy": skm.accuracy_score(y, pred),
            "test_f1_macro": f1,
            "test_precision_macro": p,
            "test_recall_macro": r,
        }
        if len(labels) <= MAX_CONFUSION_CLASSES:
            fig, ax = plt.subplots(figsize=(6, 5))
            skm.ConfusionMatrixDisplay.from_predictions(
                y,
                pred,
                labels=labels,
                display_labels=[str(c) for c in prepared.pipeline.classes or []],
                ax=ax,
                colorbar=False,
            )
            ax.set_title("confusion matrix (test split)")
            figures["confusion_matrix.png"] = _png(fig)
    else:
        decode = prepared.pipeline.decode_target
        pred, y = decode(out[:, 0].numpy()), decode(y)
        m = {
            "test_mse": skm.mean_squared_error(y, pred),
            "test_mae": skm.mean_absolute_error(y, pred),
            "test_r2": skm.r2_score(y, pred) if len(y) > 1 else float("nan"),
        }
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(y, pred, s=12, alpha=0.7)
        lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", label="ideal")
        ax.set_xlabel("actual")
        ax.set_ylabel("predicted")
        ax.set_title("predicted vs actual (test split)")
        ax.legend()
        figures["predicted_vs_actual.png"] = _png(fig)
    return EvalReport({k: float(v) for k, v in m.items()}, figures)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(trained: TrainedModel, prepared: Prepared) -> EvalReport:
    return evaluate(trained, prepared)
