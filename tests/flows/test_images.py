"""Users' own images, end to end: a folder of class folders trained through the CLI, registered and gated; a
folder of new images scored to Parquet; the same images answered by `mlflow models serve` as base64 bytes."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_output, mlflow_serving
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from torchcycle.cli import app
from torchcycle.image_demo import CLASSES, write_shapes

ROOT = Path(__file__).resolve().parents[2]
NAME = "images-test"
# configs/images_cnn.yaml on the generated 3 x 150 shapes (test split of 90 images) reaches 0.956-0.989 over
# seeds 0-5 on CPU (bench/bench_images.py); the test runs seed 0 and keeps room for another machine's arithmetic.
MIN_TEST_ACCURACY = 0.9


def _config(tmp: Path, source: str) -> Path:
    """configs/images_cnn.yaml as shipped, pointed at `source`."""
    text = (ROOT / "configs" / "images_cnn.yaml").read_text()
    text = text.replace("images:data/shapes/train", source).replace("name: images-cnn", f"name: {NAME}")
    path = tmp / "images.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefect_harness) -> dict:
    root = tmp_path_factory.mktemp("images")
    folder = root / "train"
    write_shapes(folder, 150, seed=0)  # what bench/bench_images.py measures
    new = root / "new"
    write_shapes(new, 8, seed=5, labelled=False)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        result = CliRunner().invoke(app, ["train", "--config", str(_config(root, f"images:{folder}")), "--json"])
    assert result.exit_code == 0, cli_output(result)
    summary = json.loads(result.output.strip().splitlines()[-1])
    return {"root": root, "uri": uri, "new": new, "summary": summary, "folder": folder}


def test_a_folder_of_images_trains_registers_and_gates(trained: dict) -> None:
    s = trained["summary"]
    assert s["metrics"]["test_accuracy"] >= MIN_TEST_ACCURACY, s["metrics"]
    client = MlflowClient(trained["uri"])
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == s["model_version"] == "1"
    plots = {a.path for a in client.list_artifacts(s["run_id"], "plots")}
    assert {"plots/confusion_matrix.png", "plots/misclassified.png", "plots/loss_curve.png"} <= plots
    # the bundle's normalisation is per channel, fitted on the train split, as JSON
    local = client.download_artifacts(s["run_id"], "plots/misclassified.png", str(trained["root"]))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = client.get_run(s["run_id"])
    assert run.data.params["data.source"] == f"images:{trained['folder']}"
    assert run.data.params["model.global_pool"] == "True"


def test_a_retrain_on_the_same_images_is_unchanged_and_new_images_are_not(trained: dict, tmp_path: Path) -> None:
    """The lineage digest is of the files' contents: the retrain deployment's skip_unchanged finds nothing new in
    an untouched folder (file times changed), and trains a new version once one image's content changed."""
    from torchcycle.config import load_config
    from torchcycle.flows.training import Unchanged, training_flow

    folder = tmp_path / "copy"
    shutil.copytree(trained["folder"], folder)
    cfg = load_config(_config(tmp_path, f"images:{folder}"), ["name=images-lineage", "train.epochs=2"])
    first = training_flow(cfg, tracking_uri=trained["uri"], skip_unchanged=True)
    assert not isinstance(first, Unchanged) and first.model_version == "1"
    for p in folder.rglob("*.png"):
        p.touch()  # newer files, same contents
    same = training_flow(cfg, tracking_uri=trained["uri"], skip_unchanged=True)
    assert isinstance(same, Unchanged) and same.model_version == "1"
    victim = sorted((folder / "square").glob("*.png"))[0]
    victim.write_bytes((folder / "circle" / "circle-0001.png").read_bytes())  # a circle among the squares
    again = training_flow(cfg, tracking_uri=trained["uri"], skip_unchanged=True)
    assert not isinstance(again, Unchanged) and again.model_version == "2"


def test_the_bundle_saves_per_channel_normalisation_as_json(trained: dict) -> None:
    import mlflow

    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{NAME}/1", dst_path=str(trained["root"] / "m"), tracking_uri=trained["uri"]
        )
    )
    meta = json.loads(next(local.rglob("preprocessor.json")).read_text())
    assert meta["image_shape"] == [3, 32, 32] and meta["image_column"] == "image"
    assert len(meta["channel_mean"]) == 3 and all(0 < m < 1 for m in meta["channel_mean"])
    assert len(meta["channel_std"]) == 3 and all(0 < s < 1 for s in meta["channel_std"])
    assert not list(local.rglob("*.pkl")) and not list(local.rglob("*.pickle"))


def test_predict_on_a_folder_matches_mlflow_serving_of_the_same_images(trained: dict, tmp_path: Path) -> None:
    """Batch: `torchcycle predict --input FOLDER`. Online: `mlflow models serve`, the images as base64 bytes."""
    out = tmp_path / "scored.parquet"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", trained["uri"])
        result = CliRunner().invoke(app, ["predict", "-m", NAME, "-i", str(trained["new"]), "-o", str(out), "--json"])
    assert result.exit_code == 0, cli_output(result)
    batch = pd.read_parquet(out)
    files = sorted(p.name for p in trained["new"].iterdir())
    assert batch["image"].tolist() == files  # the path (relative to the folder), in name order
    assert list(batch.columns) == [
        "image",
        "prediction",
        *(f"proba_{c}" for c in CLASSES),
        "model_name",
        "model_version",
        "model_run_id",
    ]
    assert set(batch["model_version"].astype(str)) == {"1"}
    truth = batch["image"].str.split("-").str[0]
    assert (batch["prediction"] == truth).mean() >= MIN_TEST_ACCURACY - 0.1, batch[["image", "prediction"]]  # 24
    np.testing.assert_allclose(batch[[f"proba_{c}" for c in CLASSES]].sum(axis=1), 1.0, rtol=1e-5)

    images = [base64.b64encode((trained["new"] / f).read_bytes()).decode() for f in files]
    online, refusal = _serve_and_ask(trained["uri"], tmp_path, images)
    assert online["prediction"].tolist() == batch["prediction"].tolist()
    np.testing.assert_allclose(online[[f"proba_{c}" for c in CLASSES]], batch[[f"proba_{c}" for c in CLASSES]],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    # a request whose bytes are no image: MLflow's 400 with the model's message, no traceback
    assert refusal.status_code == 400, refusal.text[:2000]
    assert "not a readable image" in refusal.json()["message"], refusal.text[:2000]
    assert "Traceback" not in refusal.text


def _serve_and_ask(uri: str, tmp_path: Path, images: list[str]):
    import httpx

    with mlflow_serving(uri, f"models:/{NAME}@champion", tmp_path) as base:
        body = {"dataframe_split": {"columns": ["image"], "data": [[b] for b in images]}}
        resp = httpx.post(f"{base}/invocations", json=body, timeout=120)
        assert resp.status_code == 200, resp.text[:3000]
        bad = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"not an image").decode()]]}}
        refusal = httpx.post(f"{base}/invocations", json=bad, timeout=60)
        return pd.DataFrame(resp.json()["predictions"]), refusal


def test_a_table_of_image_paths_scores_like_the_folder(trained: dict, tmp_path: Path) -> None:
    """A CSV of paths relative to its own folder, with an id column: paths and ids carried into the output."""
    table_dir = tmp_path / "t"
    shutil.copytree(trained["new"], table_dir / "pics")
    names = sorted(p.name for p in (table_dir / "pics").iterdir())
    pd.DataFrame({"id": range(len(names)), "image": [f"pics/{n}" for n in names]}).to_csv(
        table_dir / "batch.csv", index=False
    )
    out = tmp_path / "scored.parquet"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", trained["uri"])
        result = CliRunner().invoke(
            app, ["predict", "-m", NAME, "-i", str(table_dir / "batch.csv"), "-o", str(out), "--id-col", "id"]
        )
        assert result.exit_code == 0, cli_output(result)
        scored = pd.read_parquet(out)
        assert scored["id"].tolist() == [str(i) for i in range(len(names))]  # CSV pass-through: its text
        assert scored["image"].tolist() == [f"pics/{n}" for n in names]
        # a missing image file: one error naming it, nothing written
        (table_dir / "pics" / names[3]).unlink()
        out2 = tmp_path / "scored2.parquet"
        result = CliRunner().invoke(app, ["predict", "-m", NAME, "-i", str(table_dir / "batch.csv"), "-o", str(out2)])
    assert result.exit_code == 2, cli_output(result)
    assert f"pics/{names[3]}" in cli_output(result) and "error:" in cli_output(result)
    assert not out2.exists()


def test_a_corrupt_image_among_those_scored_is_named_and_nothing_is_written(trained: dict, tmp_path: Path) -> None:
    folder = tmp_path / "new"
    shutil.copytree(trained["new"], folder)
    victim = sorted(folder.glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated JPEG
    out = tmp_path / "scored.parquet"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", trained["uri"])
        result = CliRunner().invoke(app, ["predict", "-m", NAME, "-i", str(folder), "-o", str(out)])
    text = cli_output(result)
    assert result.exit_code == 2, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and victim.name in errors[0], text
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(
    ("spoil", "needle"),
    [
        (
            lambda f: (f / "square" / "square-0001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40),
            "square-0001.png",
        ),
        (lambda f: (f / "hexagon").mkdir(), "hexagon"),
        (lambda f: [p.unlink() for p in (f / "circle").iterdir()], "circle"),
    ],
    ids=["corrupt-png", "empty-class", "emptied-class"],
)
def test_a_bad_training_folder_is_one_error_line_and_writes_nothing(tmp_path: Path, spoil, needle: str) -> None:
    folder = tmp_path / "train"
    write_shapes(folder, 4, seed=2)
    spoil(folder)
    store = tmp_path / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
        result = CliRunner().invoke(app, ["train", "--config", str(_config(tmp_path, f"images:{folder}"))])
    text = cli_output(result)
    assert result.exit_code == 2, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], text
    if (store / "mlflow.db").exists():  # no run and no model: bad data stops before MLflow hears of it
        client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
        assert not client.search_registered_models()
        assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_scoring_watches_the_class_mix_of_an_image_model(trained: dict, tmp_path: Path) -> None:
    """An image model's drift reference is its predictions on the train split: a batch of circles only is a
    shifted class mix (judged once drift.min_rows rows are scored; 1000 by default, so here recorded only)."""
    circles = tmp_path / "circles"
    circles.mkdir()
    for p in trained["new"].glob("circle-*"):
        shutil.copy(p, circles / p.name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", trained["uri"])
        args = ["predict", "-m", NAME, "-i", str(circles), "-o", str(tmp_path / "c.parquet"), "--json"]
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, cli_output(result)
    drift = json.loads(result.output.strip().splitlines()[-1])["drift"]
    assert drift["status"] == "too-few-rows" and drift["prediction_psi"] >= 0.25, drift
    assert "drift  too-few-rows: PSI predictions" in result.output
    run = MlflowClient(trained["uri"]).get_run(json.loads(result.output.strip().splitlines()[-1])["run_id"])
    assert run.data.metrics["drift_prediction_psi"] == pytest.approx(drift["prediction_psi"])
