"""The training flow end to end under Prefect's test harness, with a temporary MLflow store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import artifact_markdown
from mlflow.tracking import MlflowClient

from torchcycle.config import config_from_dict
from torchcycle.errors import ConfigError, DataError, StorageError
from torchcycle.flows.training import TrainingSummary, Unchanged, training_flow

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _cfg(source: str, kind: str = "mlp", **extra):
    raw = {
        "name": "flow-test",
        "experiment": "tests",
        "data": {"source": source, **extra.pop("data", {})},
        "model": {"kind": kind, **extra.pop("model", {})},
        "train": {"epochs": 5, "patience": 0, "lr": 0.01, **extra.pop("train", {})},
        **extra,
    }
    return config_from_dict(raw)


def test_training_flow_tracks_registers_and_loads_back(tracking_uri: str) -> None:
    cfg = _cfg("sklearn:iris")
    summary = training_flow(cfg, tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    run = client.get_run(summary.run_id)

    # the whole resolved config as params, test metrics, per-epoch history, Prefect lineage tags
    assert run.data.params["model.kind"] == "mlp" and run.data.params["train.epochs"] == "5"
    # ... and what the data made of its "auto" settings, and which columns it left out
    resolved = {"train.resolved_epochs", "train.resolved_batch_size", "model.resolved_bins", "model.resolved_members"}
    assert run.data.params.keys() == cfg.flat_params().keys() | resolved | {"data.left_out"}
    assert run.data.params["model.resolved_members"] == "5" and run.data.params["data.left_out"] == "-"
    assert summary.metrics["test_accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
    assert len(client.get_metric_history(summary.run_id, "train_loss")) == 5
    assert run.data.tags["prefect.flow_run_id"] == summary.flow_run_id
    assert run.info.status == "FINISHED"
    plots = {a.path for a in client.list_artifacts(summary.run_id, "plots")}
    assert plots == {"plots/loss_curve.png", "plots/confusion_matrix.png"}

    # registry version with lineage tags
    mv = client.get_model_version("flow-test", summary.model_version)
    assert mv.run_id == summary.run_id
    assert mv.tags["config_hash"] == cfg.config_hash()
    assert mv.tags["prefect_flow_run_id"] == summary.flow_run_id
    assert len(mv.tags["data_digest"]) == 64

    # loaded back by models:/NAME/VERSION: raw rows in, same predictions as the logged example
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(summary.model_uri)
    from sklearn.datasets import load_iris

    rows = load_iris(as_frame=True).frame.drop(columns="target")
    out = model.predict(rows)
    assert len(out) == 150 and (out["prediction"] == load_iris().target).mean() > 0.8
    again = mlflow.pyfunc.load_model(f"models:/flow-test/{summary.model_version}").predict(rows)
    pd.testing.assert_frame_equal(out, again)
    assert model.metadata.signature.inputs.input_names() == list(rows.columns)

    # nothing in the logged model is a pickle
    local = Path(mlflow.artifacts.download_artifacts(summary.model_uri))
    assert not [p for p in local.rglob("*") if p.suffix in {".pkl", ".pickle"}]
    assert (local / "artifacts" / "bundle" / "weights.safetensors").exists()

    # MLflow's own lineage: the three splits as the run's data sets, with digests of their content and role
    datasets = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(datasets) == {"flow-test-train", "flow-test-validation", "flow-test-test"}
    contexts = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in datasets.items()}
    assert contexts == {"flow-test-train": "train", "flow-test-validation": "validation", "flow-test-test": "test"}
    digests = {d.dataset.digest for d in datasets.values()}
    assert len(digests) == 3 and all(len(d) == 16 for d in digests)
    assert all("sklearn:iris" in d.dataset.source for d in datasets.values())
    # the logged model carries its test metrics, and the run page's description is the summary
    logged = client.get_logged_model(run.outputs.model_outputs[0].model_id)
    linked = {m.key: m.value for m in logged.metrics}
    assert linked["test_accuracy"] == pytest.approx(summary.metrics["test_accuracy"])
    assert f"version {summary.model_version}" in run.data.tags["mlflow.note.content"]
    # the MLmodel file names its run: MLflow's tools walk from a registered version to the run that made it
    info = mlflow.models.get_model_info(f"models:/flow-test/{summary.model_version}")
    assert info.run_id == summary.run_id

    # the Prefect flow run carries a markdown summary with the metrics and the MLflow run id
    md = artifact_markdown(summary.flow_run_id)
    assert summary.run_id in md and "test_accuracy" in md

    # a second run adds version 2 of the same model
    assert training_flow(cfg, tracking_uri=tracking_uri).model_version == "2"


def test_flow_on_a_csv_with_categoricals(tracking_uri: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 120
    frame = pd.DataFrame({"size": rng.normal(size=n), "colour": rng.choice(["red", "blue"], size=n)})
    frame["label"] = np.where((frame["size"] > 0) ^ (frame["colour"] == "red"), "yes", "no")
    path = tmp_path / "train.csv"
    frame.to_csv(path, index=False)
    cfg = _cfg(f"file:{path}", data={"target": "label"}, model={"hidden": [16]}, train={"epochs": 60})
    summary = training_flow(cfg, tracking_uri=tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    out = mlflow.pyfunc.load_model(summary.model_uri).predict(frame.drop(columns="label"))
    assert set(out.columns) == {"prediction", "proba_no", "proba_yes"}
    assert (out["prediction"] == frame["label"]).mean() > 0.9


def test_flow_trains_a_cnn_on_mnist_idx_files(tracking_uri: str, mnist_root: Path) -> None:
    cfg = _cfg(
        "torchvision:MNIST",
        "cnn",
        data={"root": str(mnist_root)},
        model={"channels": [16, 32], "hidden": 64},
        train={"epochs": 15, "batch_size": 32, "lr": 0.003, "patience": 0},
    )
    summary = training_flow(cfg, tracking_uri=tracking_uri)
    # 300 noisy, shifted 28x28 digits: far above chance (0.1), though far from what 60,000 images give
    assert summary.metrics["test_accuracy"] >= 0.5
    assert MlflowClient(tracking_uri).get_model_version("flow-test", summary.model_version).status == "READY"


def test_bad_data_writes_no_run_and_registers_nothing(tracking_uri: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    pd.DataFrame({"a": [1.0, 2.0], "y": [0, 1]}).to_csv(path, index=False)
    cfg = _cfg(f"file:{path}", data={"target": "missing"})
    with pytest.raises(DataError, match="target column 'missing' not found"):
        training_flow(cfg, tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("tests")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []
    assert client.search_registered_models() == []


def test_failure_after_the_run_started_marks_it_failed(tracking_uri: str, tmp_path: Path, monkeypatch) -> None:
    # The checkpoint directory is a file: training cannot save its first epoch, after the run started.
    (tmp_path / "ckpt").write_text("not a directory")
    monkeypatch.setenv("TORCHCYCLE_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    cfg = _cfg("synthetic:line", "linear", train={"epochs": 2})
    with pytest.raises(StorageError, match=r"ckpt is a file, not a directory"):
        training_flow(cfg, tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert client.search_registered_models() == []


def test_a_gate_metric_the_inferred_task_lacks_is_refused_before_any_run(tracking_uri: str, tmp_path: Path) -> None:
    # file: source, task auto: the task (regression) is known only after ingest, still before the MLflow run
    pd.DataFrame({"x": np.arange(40.0), "y": np.arange(40.0) * 0.5}).to_csv(tmp_path / "t.csv", index=False)
    cfg = _cfg(f"file:{tmp_path / 't.csv'}", "mlp", data={"target": "y"}, gate={"metric": "test_accuracy"})
    with pytest.raises(ConfigError, match=r"gate\.metric"):
        training_flow(cfg, tracking_uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("tests")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []
    assert client.search_registered_models() == []


def test_skip_unchanged_registers_nothing_until_the_data_changes(tracking_uri: str, tmp_path: Path) -> None:
    folder = tmp_path / "training"
    folder.mkdir()
    frame = pd.DataFrame({"x": np.arange(40.0), "y": 2 * np.arange(40.0) + 1})
    frame.iloc[:20].to_parquet(folder / "day1.parquet")
    cfg = _cfg(f"file:{folder}/*.parquet", "linear", data={"target": "y"}, train={"epochs": 2})
    first = training_flow(cfg, tracking_uri=tracking_uri, skip_unchanged=True)
    assert isinstance(first, TrainingSummary) and first.model_version == "1"
    again = training_flow(cfg, tracking_uri=tracking_uri, skip_unchanged=True)
    assert again == Unchanged("flow-test", "1", "data, config and code are those of version 1")
    frame.iloc[20:].to_parquet(folder / "day2.parquet")  # new data lands in the glob
    grown = training_flow(cfg, tracking_uri=tracking_uri, skip_unchanged=True)
    assert isinstance(grown, TrainingSummary) and grown.model_version == "2"
    client = MlflowClient(tracking_uri)
    assert len(client.search_model_versions("name='flow-test'")) == 2
    # version 2 was trained on both files: its data digest differs from version 1's
    assert (
        client.get_model_version("flow-test", "2").tags["data_digest"]
        != client.get_model_version("flow-test", "1").tags["data_digest"]
    )
