"""One function computes the test metrics of the challenger (evaluate) and of the champion (the gate)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import test_gate
from mlflow.tracking import MlflowClient
from sklearn import metrics as skm

from torchcycle.tasks.evaluate import evaluate, test_metrics
from torchcycle.tasks.gate import decide_and_record, score_output, version_classes

tiny = test_gate.tiny  # iris, softmax, 2 epochs: the registered model of the promotion tests


# ---- the shared function on tiny arrays -------------------------------------------------------------
def test_a_class_missing_from_the_split_counts_zero_in_the_macro_averages() -> None:
    m = test_metrics(["a", "a", "b", "b"], ["a", "a", "b", "a"], task="classification", classes=["a", "b", "c"])
    # a: precision 2/3, recall 1, F1 0.8; b: precision 1, recall 1/2, F1 2/3; c (absent, never predicted): 0
    assert m["test_accuracy"] == pytest.approx(0.75)
    assert m["test_precision_macro"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["test_recall_macro"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["test_f1_macro"] == pytest.approx((0.8 + 2 / 3 + 0) / 3)
    # the class list decides the average, not the labels that happen to be in the rows
    two = test_metrics(["a", "a", "b", "b"], ["a", "a", "b", "a"], task="classification", classes=["a", "b"])
    assert two["test_f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_balanced_accuracy_and_each_class_recall_weigh_a_rare_class_as_a_common_one() -> None:
    truth = ["common"] * 8 + ["rare"] * 2
    pred = ["common"] * 10  # right on 8 of 10 rows, never on the rare class
    m = test_metrics(truth, pred, task="classification", classes=["common", "rare", "a/b"])
    assert m["test_accuracy"] == pytest.approx(0.8) and m["test_balanced_accuracy"] == pytest.approx(0.5)
    assert m["test_recall_class_common"] == 1.0 and m["test_recall_class_rare"] == 0.0
    assert math.isnan(m["test_recall_class_a_b"])  # no row of it; '/' would split MLflow's charts
    from torchcycle.config import config_from_dict

    gated = {"name": "g", "data": {"source": "sklearn:iris"}, "model": {"kind": "mlp"}}
    assert config_from_dict({**gated, "gate": {"metric": "test_balanced_accuracy"}}).gate.metric


def test_labels_of_any_dtype_are_compared_as_their_text() -> None:
    as_text = test_metrics(["0", "1", "1", "2"], ["0", "1", "2", "2"], task="classification", classes=["0", "1", "2"])
    ints = test_metrics(
        np.array([0, 1, 1, 2]),  # raw target column
        pd.Series([0, 1, 2, 2], dtype="int64"),  # a pyfunc's `prediction` column
        task="classification",
        classes=[0, 1, 2, 3],  # 3: in the class list, not in the rows
    )
    assert ints["test_accuracy"] == as_text["test_accuracy"] == 0.75
    assert ints["test_f1_macro"] == pytest.approx(as_text["test_f1_macro"] * 3 / 4)
    mixed = test_metrics(np.array([0, 1, 1, 2]), ["0", "1", "2", "2"], task="classification", classes=["0", "1", "2"])
    assert mixed == as_text
    flags = test_metrics(
        pd.Series([True, False, False]),
        np.array(["True", "False", "True"]),
        task="classification",
        classes=[False, True],
    )
    assert flags["test_accuracy"] == pytest.approx(2 / 3) and flags["test_recall_macro"] == pytest.approx(0.75)


def test_regression_metrics() -> None:
    m = test_metrics([1.0, 2.0, 3.0], np.array([1, 2, 4], dtype=np.float32), task="regression", classes=None)
    assert m == pytest.approx({"test_mse": 1 / 3, "test_mae": 1 / 3, "test_r2": 0.5})
    assert all(type(v) is float for v in m.values())
    assert math.isnan(test_metrics([1.0], [2.0], task="regression", classes=None)["test_r2"])  # r2 needs 2 rows


def test_classification_needs_the_class_list() -> None:
    with pytest.raises(ValueError, match="class list"):
        test_metrics(["a"], ["a"], task="classification", classes=None)


def test_the_gate_scores_an_output_frame_with_the_shared_function() -> None:
    truth = pd.Series([0, 1, 1, 0], name="target")
    frame = pd.DataFrame({"prediction": [0, 1, 0, 0], "proba_0": 0.5, "proba_1": 0.3, "proba_2": 0.2})
    ours = test_metrics(truth, frame["prediction"], task="classification", classes=["0", "1"])
    assert score_output(frame, truth, "test_f1_macro", ["0", "1"]) == ours["test_f1_macro"]
    # without a class list: the classes the frame's proba_<class> columns name
    theirs = test_metrics(truth, frame["prediction"], task="classification", classes=[0, 1, 2])
    assert score_output(frame, truth, "test_f1_macro", None) == theirs["test_f1_macro"] != ours["test_f1_macro"]
    values = pd.Series([1.0, 2.0, 3.0])
    out = pd.DataFrame({"prediction": [1.0, 2.0, 4.0]})
    assert (
        score_output(out, values, "test_mae", None)
        == test_metrics(values, out["prediction"], task="regression", classes=None)["test_mae"]
    )
    with pytest.raises(ValueError, match="unsupported gate metric"):
        score_output(out, values, "test_precision_macro", None)


# ---- challenger and champion through evaluate() and the gate ---------------------------------------
@pytest.fixture()
def store(tracking_uri: str, monkeypatch) -> str:
    """`tracking_uri`, also as the process's MLflow tracking URI for this test: MLflow's model logging
    (register_model) reads only that global, which a flow sets at its edge."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", tracking_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    return tracking_uri


def _without_a_class(prepared, trained):
    """`prepared` with the rows of its last class left out of the test split, and the rows the model
    predicts it for: a class in the model's list that neither the truth nor the predictions hold."""
    import torch

    pred = trained.build()(torch.from_numpy(prepared.x_test)).argmax(1).numpy()
    missing = len(prepared.pipeline.classes) - 1
    keep = (prepared.y_test != missing) & (pred != missing)
    assert keep.sum() >= 2 and len(set(prepared.y_test[keep])) >= 2
    narrowed = dataclasses.replace(
        prepared, x_test=prepared.x_test[keep], y_test=prepared.y_test[keep], test_frame=prepared.test_frame[keep]
    )
    return narrowed, pred[keep]


def test_the_same_model_scores_the_same_as_challenger_and_as_champion(store: str, tiny, tmp_path) -> None:
    prepared, trained = tiny
    narrowed, pred = _without_a_class(prepared, trained)
    challenger = evaluate(trained, narrowed).metrics["test_f1_macro"]
    # what the gate computed for the champion before (labels inferred from the rows): not comparable
    names = np.asarray(prepared.pipeline.classes)
    inferred = skm.f1_score(names[narrowed.y_test].astype(str), names[pred].astype(str), average="macro")
    assert not math.isclose(challenger, inferred)

    client = MlflowClient(store)
    for _ in range(2):  # one model, registered twice: v1 the champion, v2 the challenger
        test_gate._register(store, tiny, tmp_path, "same")
    assert version_classes(store, "same", "2") == [str(c) for c in prepared.pipeline.classes]

    def gate(version: str):
        frame = narrowed.test_frame
        args = (version, "test_f1_macro", challenger, 0.0, frame, "target", f"flow-{version}")
        return decide_and_record(client, store, "same", *args)

    assert gate("1").promote  # first version
    d = gate("2")
    assert d.champion_version == "1" and d.champion == pytest.approx(d.challenger, rel=1e-12, abs=1e-12)
    assert not d.promote  # a tie keeps the champion
    tags = client.get_model_version("same", "2").tags
    assert tags["gate_champion_value"] == tags["gate_challenger_value"]


@pytest.mark.parametrize("metric", ["test_r2", "test_mse"])
def test_a_regression_model_compared_with_itself_ties(store: str, tmp_path, metric: str) -> None:
    """The challenger's value (evaluate) and the champion's (the gate, on the raw rows) are computed on the
    same float64 targets: an identical model neither gains nor loses, not even by float32 rounding."""
    import torch

    from torchcycle.config import config_from_dict
    from torchcycle.tasks.features import build_features
    from torchcycle.tasks.ingest import ingest
    from torchcycle.tasks.preprocess import preprocess
    from torchcycle.tasks.train import train

    cfg = config_from_dict(
        {"name": "reg", "data": {"source": "sklearn:diabetes"}, "model": {"kind": "linear"}, "train": {"epochs": 2}}
    )
    prepared = build_features(preprocess(ingest(cfg.data), cfg.data, cfg.seed), cfg.features)
    trained = train(prepared, cfg.model, cfg.train, seed=cfg.seed, device=torch.device("cpu"), progress=False)
    challenger = evaluate(trained, prepared).metrics[metric]
    client = MlflowClient(store)
    for _ in range(2):
        test_gate._register(store, (prepared, trained), tmp_path, "reg")
    for version in ("1", "2"):
        args = (version, metric, challenger, 0.0, prepared.test_frame, "target", f"flow-{version}")
        d = decide_and_record(client, store, "reg", *args)
    assert d.champion_version == "1" and d.champion == d.challenger, (d.champion, d.challenger)
    assert not d.promote and "gain +0.0000" in d.reason
