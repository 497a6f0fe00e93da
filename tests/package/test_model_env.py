"""A registered model where users load it: beside their own `models` and `tasks` packages, and in a fresh
virtual environment built from nothing but the model's own requirements.txt (and the project's constraints)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import labelled_table, train_store

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
name: envcheck
data:
  source: "file:{train}"
  target: label
model:
  kind: mlp
  hidden: [16]
train:
  epochs: 3
  batch_size: 32
  device: cpu
"""

# Loads the model from a local directory, scores rows, writes the predictions; run by another interpreter.
LOAD_AND_PREDICT = """
import json, sys
import pandas as pd
import mlflow
model_dir, rows, out = sys.argv[1:4]
import models, tasks  # the user's own packages, first on sys.path
assert (models.WHO, tasks.WHO) == ("user", "user"), (models.__file__, tasks.__file__)
pred = mlflow.pyfunc.load_model(model_dir).predict(pd.read_parquet(rows))
import models, tasks
assert (models.WHO, tasks.WHO) == ("user", "user"), "loading the model replaced the user's packages"
import torchcycle
pred.to_parquet(out)
print(json.dumps({"torchcycle": torchcycle.__file__}))
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    """A registered model, its files, some rows and what batch scoring (`torchcycle predict`) made of them."""
    import mlflow
    from typer.testing import CliRunner

    from torchcycle.cli import app

    root = tmp_path_factory.mktemp("model-env")
    store = train_store(root, CONFIG)
    rows = root / "rows.parquet"
    labelled_table(50, seed=7).drop(columns=["label"]).to_parquet(rows)
    scored = root / "scored.parquet"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store["uri"])
        result = CliRunner().invoke(
            app, ["predict", "--model", "envcheck/1", "--input", str(rows), "--output", str(scored)]
        )
    assert result.exit_code == 0, result.output
    local = mlflow.artifacts.download_artifacts(
        artifact_uri="models:/envcheck/1", dst_path=str(root / "model"), tracking_uri=store["uri"]
    )
    user = root / "user-project"
    for package in ("models", "tasks"):  # what ML repositories often have: their own models/ and tasks/
        (user / package).mkdir(parents=True)
        (user / package / "__init__.py").write_text('WHO = "user"\n')
    return {"dir": Path(local), "rows": rows, "scored": scored, "user": user, "root": root}


def _load_elsewhere(python: str, model: dict, out: Path, env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [python, "-c", LOAD_AND_PREDICT, str(model["dir"]), str(model["rows"]), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=model["user"],
        env={**env, "PYTHONPATH": str(model["user"])},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _same_as_batch(model: dict, out: Path) -> None:
    batch = pd.read_parquet(model["scored"])
    online = pd.read_parquet(out)
    assert len(online) == len(batch) == 50
    pd.testing.assert_series_equal(online["prediction"], batch["prediction"], check_names=False, check_dtype=False)
    proba = [c for c in batch.columns if c.startswith("proba_")]
    assert proba and [c for c in online.columns if c.startswith("proba_")] == proba
    pd.testing.assert_frame_equal(online[proba], batch[proba], check_dtype=False)


def test_the_model_ships_only_its_runtime_under_one_name(model: dict) -> None:
    shipped = sorted(str(p.relative_to(model["dir"] / "code")) for p in (model["dir"] / "code").rglob("*.py"))
    assert all(p.startswith("torchcycle/") for p in shipped), shipped
    assert "torchcycle/runtime/bundle.py" in shipped and "torchcycle/models/mlp.py" in shipped
    # the stages, flows, CLI and training loop stay home: loading needs none of them
    assert not [p for p in shipped if p.startswith(("torchcycle/tasks", "torchcycle/flows", "torchcycle/cli"))]
    assert "torchcycle/models/training.py" not in shipped and "torchcycle/idx.py" not in shipped
    requirements = (model["dir"] / "requirements.txt").read_text().split()
    names = {r.split("==")[0] for r in requirements}
    assert {"torch", "pandas", "pandera", "scikit-learn", "skops", "safetensors", "mlflow"} <= names
    assert not names & {"prefect", "tqdm", "typer", "torchcycle"}, names  # what loading does not import
    assert all("==" in r for r in requirements), requirements  # pinned to the tested versions


def test_loads_and_predicts_beside_a_users_own_models_and_tasks_packages(model: dict, tmp_path: Path) -> None:
    out = tmp_path / "pred.parquet"
    _load_elsewhere(sys.executable, model, out, {"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    _same_as_batch(model, out)


def _fresh_env(requirements: Path) -> Path:
    """A virtualenv with only the model's requirements (pinned by constraints.txt), built once per content:
    re-runs reuse it, since installing torch takes minutes."""
    text = requirements.read_text() + (ROOT / "constraints.txt").read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("TORCHCYCLE_TEST_VENVS") or Path.home() / ".cache" / "torchcycle" / "model-venvs")
    venv = cache / digest
    if (venv / "ok").is_file():
        return venv
    import shutil

    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    proc = subprocess.run(
        [*pip, "-r", str(requirements), "-c", str(ROOT / "constraints.txt")],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (venv / "ok").write_text(requirements.read_text())
    return venv


@pytest.mark.timeout(1800)
def test_a_fresh_env_from_the_models_own_requirements_answers_like_batch_scoring(model: dict, tmp_path: Path) -> None:
    venv = _fresh_env(model["dir"] / "requirements.txt")
    python = str(venv / "bin" / "python")
    # torchcycle is not installed there: everything the model needs comes from its requirements and its code
    check = subprocess.run([python, "-c", "import torchcycle"], capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode != 0 and "No module named 'torchcycle'" in check.stderr
    out = tmp_path / "pred.parquet"
    loaded = _load_elsewhere(python, model, out, {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert loaded["torchcycle"].startswith(str(model["dir"] / "code")), loaded  # the model's own copy
    _same_as_batch(model, out)


# Loads an image model from a local directory and scores encoded image files; run by the fresh env's interpreter.
LOAD_IMAGES = """
import json, sys
from pathlib import Path
import pandas as pd
import mlflow
model_dir, folder, out = sys.argv[1:4]
files = sorted(Path(folder).iterdir())
frame = pd.DataFrame({"image": [f.read_bytes() for f in files]})
pred = mlflow.pyfunc.load_model(model_dir).predict(frame)
pred.insert(0, "image", [f.name for f in files])
pred.to_parquet(out)
"""


@pytest.mark.timeout(1800)
def test_an_image_model_answers_in_a_fresh_env_as_torchcycle_predict_does(
    model: dict, tmp_path: Path, prefect_harness
) -> None:
    """The image path of the runtime (torchvision decoding, PIL's header check) needs nothing the model's
    requirements do not list: a model trained on a folder scores image bytes in the fresh env like batch scoring."""
    import mlflow
    from conftest import cli_output
    from typer.testing import CliRunner

    from torchcycle.cli import app
    from torchcycle.image_demo import write_shapes

    write_shapes(tmp_path / "train", 20, seed=0)
    write_shapes(tmp_path / "new", 3, seed=4, labelled=False)
    cfg = (ROOT / "configs" / "images_cnn.yaml").read_text().replace("data/shapes/train", str(tmp_path / "train"))
    (tmp_path / "img.yaml").write_text(cfg.replace("epochs: 25", "epochs: 2"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    scored = tmp_path / "scored.parquet"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for args in (
            ["train", "--config", str(tmp_path / "img.yaml")],
            ["predict", "-m", "images-cnn", "-i", str(tmp_path / "new"), "-o", str(scored)],
        ):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, cli_output(result)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri="models:/images-cnn/1", dst_path=str(tmp_path / "model"), tracking_uri=uri
    )
    requirements = Path(local) / "requirements.txt"
    assert requirements.read_text() == (model["dir"] / "requirements.txt").read_text()  # one runtime, one env
    venv = _fresh_env(requirements)
    out = tmp_path / "online.parquet"
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", LOAD_IMAGES, local, str(tmp_path / "new"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch, online = pd.read_parquet(scored), pd.read_parquet(out)
    assert online["image"].tolist() == batch["image"].tolist() and len(batch) == 9
    assert online["prediction"].tolist() == batch["prediction"].tolist()
    proba = [c for c in batch.columns if c.startswith("proba_")]
    pd.testing.assert_frame_equal(online[proba], batch[proba], check_dtype=False)
