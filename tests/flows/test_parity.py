"""Every table that trains also scores its own rows, the same way on every path: the evaluate stage's predictions
for the test rows, `torchcycle predict` (the Scorer streaming the CSV), Dask's work units (row groups of the same
cells as Parquet), the logged pyfunc given `pandas.read_csv` rows, and `mlflow models serve`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import cli_output, mlflow_serving, prefect_logs_follow_stderr
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from torchcycle.config import config_from_dict
from torchcycle.errors import DataError
from torchcycle.models.inference import predict as torch_predict
from torchcycle.registry import ResolvedModel
from torchcycle.tables import read_csv_text
from torchcycle.tasks.features import build_features
from torchcycle.tasks.ingest import ingest
from torchcycle.tasks.preprocess import preprocess
from torchcycle.tasks.register import input_example, input_signature, write_bundle
from torchcycle.tasks.score import Scorer, plan_units
from torchcycle.tasks.train import train
from torchcycle.tasks.validate import validate

WORDS = ["red", "green", "blue", "teal", "plum", "Anvers", "N/A-ish"]  # text that no reader takes for a number


@st.composite
def tables(draw) -> tuple[pd.DataFrame, str]:
    """A table as users export them: a row id, 1-5 columns of numbers, whole numbers, text, booleans or dates,
    each with some empty cells, and a class or number target."""
    n = draw(st.integers(30, 70))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    frame = pd.DataFrame({"row_id": [f"r{i:03d}" for i in range(n)]})
    signal = np.zeros(n)
    kinds = st.lists(st.sampled_from(["float", "int", "text", "bool", "date"]), min_size=1, max_size=5)
    for i, kind in enumerate(draw(kinds)):
        holes = rng.random(n) < draw(st.sampled_from([0.0, 0.1, 0.3]))
        if kind == "float":
            values = np.round(rng.normal(0, 10, n), 3)
            signal += values / 10
            column = pd.Series(values).mask(holes)
        elif kind == "int":
            values = rng.integers(-5, 50, n)
            signal += values / 25
            column = pd.Series(values).astype(object).mask(holes)
        elif kind == "text":
            values = rng.choice(WORDS[: draw(st.integers(2, len(WORDS)))], n)
            signal += values == "red"
            column = pd.Series(values, dtype=object).mask(holes)
        elif kind == "bool":
            values = rng.random(n) < 0.5
            signal += values
            column = pd.Series(values, dtype=object).mask(holes)
        else:
            days = pd.Timestamp("2020-01-01") + pd.to_timedelta(rng.integers(0, 900, n), unit="D")
            signal += days.month.to_numpy() / 6
            column = pd.Series(days.strftime("%Y-%m-%d"), dtype=object).mask(holes)
        frame[f"c{i}_{kind}"] = column
    noisy = signal + rng.normal(0, 0.5, n)
    if draw(st.booleans()):
        frame["target"] = np.where(noisy > np.median(noisy), "yes", "no")
    else:
        frame["target"] = np.round(noisy * 100, 2)
    return frame, "target"


def _fit(frame: pd.DataFrame, target: str, root: Path):
    path = root / "table.csv"
    frame.to_csv(path, index=False)
    cfg = config_from_dict(
        {
            "name": "parity",
            "data": {"source": f"file:{path}", "target": target},
            "model": {"kind": "mlp", "hidden": [16, 16]},  # bins and members: the defaults (auto)
            "train": {"epochs": 2, "patience": 0},
        }
    )
    raw = ingest(cfg.data)
    validate(raw)
    prepared = build_features(preprocess(raw, cfg.data, cfg.seed), cfg.features)
    trained = train(prepared, cfg.model, cfg.train, seed=0, device=torch.device("cpu"), progress=False)
    return prepared, trained


def _evaluated(prepared, trained) -> pd.DataFrame:
    """The evaluate stage's predictions for the test rows (tasks/evaluate.py), by row id."""
    out = torch_predict(trained.build(), torch.from_numpy(prepared.model_inputs(prepared.x_test)), torch.device("cpu"))
    pipe = prepared.pipeline
    if pipe.task == "regression":
        pred = pipe.decode_target(out[:, 0].numpy())
    else:
        pred = np.asarray(pipe.classes, dtype=object)[out.argmax(1).numpy()]
    return pd.DataFrame({"row_id": prepared.test_frame["row_id"].to_numpy(), "prediction": pred})


def _log_pyfunc(prepared, trained, root: Path) -> Path:
    """The model as torchcycle logs it (tasks/register.py), saved to a folder: code, bundle, signature."""
    import mlflow

    from torchcycle.model_code import ENTRY, model_code, stage_code
    from torchcycle.runtime.bundle import load_bundle

    bundle = write_bundle(trained, prepared, "target", root / "bundle")
    code = model_code()
    example = input_example(prepared, "target")
    target = root / "pyfunc"
    mlflow.pyfunc.save_model(
        str(target),
        python_model=str(code.modules[ENTRY]),
        artifacts={"bundle": str(bundle)},
        code_paths=[str(stage_code(root / "code", code))],
        signature=input_signature(load_bundle(bundle), example),
        pip_requirements=list(code.requirements),  # as registered (inferring them would load the model again)
    )
    return target


def _scorer(pyfunc) -> Scorer:
    from torchcycle.tasks.score import loaded_model

    return loaded_model(pyfunc).scorer(ResolvedModel("parity", "1", "r"), ("row_id",), 16)[0]


def _assert_same(a: pd.DataFrame, b: pd.DataFrame, what: str) -> None:
    a = a.set_index("row_id").sort_index()
    b = b.set_index("row_id").loc[lambda f: f.index.isin(a.index)].sort_index()
    assert list(a.index) == list(b.index), what
    if a["prediction"].dtype.kind == "f":
        np.testing.assert_allclose(a["prediction"], b["prediction"], rtol=1e-6, err_msg=what)
    else:
        assert a["prediction"].tolist() == b["prediction"].tolist(), what


@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,  # the same tables on every run: CI is reproducible
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(table=tables())
def test_every_table_that_trains_scores_its_own_rows_alike_on_every_path(table) -> None:
    import mlflow

    frame, target = table
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            prepared, trained = _fit(frame, target, root)
        except DataError:  # the property is about tables that train (a split left one class, say)
            assume(False)
        rows = root / "rows.csv"
        frame.drop(columns=target).to_csv(rows, index=False)
        pyfunc = mlflow.pyfunc.load_model(str(_log_pyfunc(prepared, trained, root)))
        scorer = _scorer(pyfunc)

        # torchcycle predict: the CSV streamed in batches of 16 rows
        scorer.score([rows], root / "cli.parquet")
        cli = pq.read_table(root / "cli.parquet").to_pandas()
        assert len(cli) == len(frame) and cli["row_id"].tolist() == frame["row_id"].tolist()

        # Dask's work units: the same cells as Parquet in row groups of 10, scored unit by unit into parts
        pq.write_table(pa.Table.from_pandas(read_csv_text(rows)), root / "rows.parquet", row_group_size=10)
        units = plan_units([(root / "rows.parquet", root / "dask.parquet")], unit_rows=20, batch_rows=10)
        assert len(units) > 1
        parts = [scorer.score_unit(u, root / f"part{u.index}.parquet") for u in units]
        dask = pd.concat([pq.read_table(p.part).to_pandas() for p in parts], ignore_index=True)

        # the pyfunc, as a user calls it on pandas.read_csv's rows (through MLflow's own checks)
        theirs = pd.read_csv(rows)
        pyfunc_out = pyfunc.predict(theirs.drop(columns="row_id")).assign(row_id=theirs["row_id"])

        for name, other in [("dask units", dask), ("pyfunc", pyfunc_out)]:
            _assert_same(cli, other, name)
        _assert_same(_evaluated(prepared, trained), cli, "evaluate stage vs predict")


@pytest.mark.usefixtures("prefect_harness")
def test_a_real_export_trains_then_scores_its_held_out_rows_on_the_cli_and_the_server(
    tmp_path: Path, monkeypatch
) -> None:
    """The reported case: a CSV whose text column has empty cells (and NA, dates, an ID, a constant column,
    booleans) trains with `torchcycle train`; `torchcycle predict` scores its held-out rows, and
    `mlflow models serve` answers the same rows (JSON from pandas.read_csv: empty cells are null) alike."""
    from typer.testing import CliRunner

    from torchcycle.cli import app

    rng = np.random.default_rng(3)
    n = 300
    x = rng.normal(size=n)
    shop = pd.Series(rng.choice(["north", "south", "east"], n), dtype=object).mask(rng.random(n) < 0.2)
    frame = pd.DataFrame(
        {
            "customer": [f"C{i:05d}" for i in range(n)],
            "x": np.round(x, 4),
            "shop": shop,
            "member": pd.Series(rng.random(n) < 0.4, dtype=object).mask(rng.random(n) < 0.1),
            "since": pd.Series(
                (pd.Timestamp("2021-01-01") + pd.to_timedelta(rng.integers(0, 700, n), unit="D")).strftime("%Y-%m-%d")
            ),
            "country": "BE",
            "label": np.where(x + (shop == "north") > 0.4, "buy", "skip"),
        }
    )
    held_out = frame.iloc[250:]
    frame.iloc[:250].to_csv(tmp_path / "train.csv", index=False, na_rep="NA")
    held_out.drop(columns="label").to_csv(tmp_path / "new.csv", index=False)  # empty cells, as a spreadsheet
    (tmp_path / "c.yaml").write_text(
        f"name: shop\ndata:\n  source: file:{tmp_path / 'train.csv'}\n  target: label\n"
        "model:\n  kind: mlp\n  hidden: [16]\ntrain:\n  epochs: 5\n"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    prefect_logs_follow_stderr()
    runner = CliRunner()
    trained = runner.invoke(app, ["train", "--config", str(tmp_path / "c.yaml")])
    assert trained.exit_code == 0, cli_output(trained)
    out = tmp_path / "scored.parquet"
    scored = runner.invoke(app, ["predict", "-m", "shop", "-i", str(tmp_path / "new.csv"), "-o", str(out)])
    assert scored.exit_code == 0, cli_output(scored)
    batch = pd.read_parquet(out)
    assert len(batch) == 50 and batch["customer"].tolist() == held_out["customer"].tolist()

    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(MlflowClient(uri).get_model_version("shop", "1").run_id)
    left_out = run.data.params["data.left_out"]
    assert "customer (an ID" in left_out and "country (constant" in left_out
    with mlflow_serving(uri, "models:/shop/1", tmp_path, startup_s=120) as base:
        import httpx

        rows = pd.read_csv(tmp_path / "new.csv").drop(columns="customer")
        body = {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}
        resp = httpx.post(f"{base}/invocations", json=body, timeout=60)
        assert resp.status_code == 200, resp.text[:2000]
        online = pd.DataFrame(resp.json()["predictions"])
        bad = rows.head(1).astype(object).assign(x="lots")
        answer = httpx.post(
            f"{base}/invocations",
            json={"dataframe_split": json.loads(bad.to_json(orient="split", index=False))},
            timeout=60,
        )
        assert answer.status_code == 400 and "column 'x' must be number" in answer.json()["message"], answer.text
    assert online["prediction"].tolist() == batch["prediction"].tolist()
    np.testing.assert_allclose(online["proba_buy"], batch["proba_buy"], rtol=1e-6)
