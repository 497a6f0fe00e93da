"""train and evaluate: metrics and plots of a small trained model."""

from __future__ import annotations

from pathlib import Path

from stage_data import _train_small

from torchcycle.tasks.evaluate import evaluate


def test_evaluate_classification_metrics_and_plots(tmp_path: Path) -> None:
    _, p, trained = _train_small(tmp_path)
    report = evaluate(trained, p)
    per_class = {f"test_recall_class_{c}" for c in p.pipeline.classes}
    assert set(report.metrics) == {
        "test_accuracy",
        "test_balanced_accuracy",
        "test_f1_macro",
        "test_precision_macro",
        "test_recall_macro",
        *per_class,
    }
    assert 0.8 <= report.metrics["test_accuracy"] <= 1.0
    assert set(report.figures) == {"loss_curve.png", "confusion_matrix.png"}
    assert all(png.startswith(b"\x89PNG") for png in report.figures.values())


def test_evaluate_regression_metrics_and_plots(tmp_path: Path) -> None:
    _, p, trained = _train_small(tmp_path, "sklearn:diabetes", "linear")
    report = evaluate(trained, p)
    assert set(report.metrics) == {"test_mse", "test_mae", "test_r2"}
    assert report.metrics["test_r2"] > 0.3  # in target units, not standardised ones
    assert set(report.figures) == {"loss_curve.png", "predicted_vs_actual.png"}
