"""Batch scoring: streaming, schema enforcement, atomic output, lineage, tracking, and parity with MLflow serving."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import artifact_markdown, mlflow_serving, register_classifier, scoring_table
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from torchcycle.cli import app
from torchcycle.errors import DataError
from torchcycle.flows.scoring import scoring_flow
from torchcycle.registry import ModelRef, ResolvedModel
from torchcycle.tables import atomic_parquet, check_schema, find_inputs
from torchcycle.tasks.score import Scorer, plan_scoring, score_batch

NAME = "scoring-test"


_table = scoring_table


# ---- plain functions ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("m", ModelRef("m", "champion")),
        ("m@challenger", ModelRef("m", "challenger")),
        ("m/3", ModelRef("m", None, "3")),
        ("models:/m@champion", ModelRef("m", "champion")),
    ],
)
def test_model_reference_forms(ref: str, expected: ModelRef) -> None:
    assert ModelRef.parse(ref) == expected


@pytest.mark.parametrize("ref", ["", "m/x", "m@", "a b", "m/1@champion"])
def test_bad_model_reference_is_a_data_error(ref: str) -> None:
    with pytest.raises(DataError, match="bad model reference"):
        ModelRef.parse(ref)


def test_find_inputs_file_dir_and_glob(tmp_path: Path) -> None:
    for name in ("b.csv", "a.parquet", "notes.txt", ".a.parquet.partial"):
        (tmp_path / name).write_text("x")
    assert find_inputs(tmp_path) == [tmp_path / "a.parquet", tmp_path / "b.csv"]
    assert find_inputs(tmp_path / "b.csv") == [tmp_path / "b.csv"]
    assert find_inputs(str(tmp_path / "*.csv")) == [tmp_path / "b.csv"]
    with pytest.raises(DataError, match="input not found"):
        find_inputs(tmp_path / "missing.csv")
    with pytest.raises(DataError, match=r"no \.csv or \.parquet files"):
        find_inputs(str(tmp_path / "*.json"))


def test_check_schema_reports_every_problem_at_once() -> None:
    schema = pa.schema([("x1", pa.string()), ("x1", pa.string()), ("color", pa.bool_()), ("prediction", pa.int8())])
    expected = {"x1": "number", "x2": "number", "color": "string"}
    with pytest.raises(DataError) as err:
        check_schema(schema, expected, "in.parquet")
    msg = str(err.value)
    assert "duplicate column name(s) x1" in msg
    assert "missing column(s) 'x2'" in msg
    assert "'color' must be string, found bool" in msg
    assert "prediction would be overwritten" in msg


def test_check_schema_accepts_ints_for_numbers_and_empty_columns_but_not_bools() -> None:
    schema = pa.schema([("x1", pa.int32()), ("x2", pa.float32()), ("color", pa.null()), ("extra", pa.string())])
    check_schema(schema, {"x1": "number", "x2": "number", "color": "string"}, "in.csv")
    # codes a writer stored as numbers: each scores as the training category of its value (test_columns)
    check_schema(schema.set(2, pa.field("color", pa.int64())), {"color": "string"}, "in.parquet")
    with pytest.raises(DataError, match="'x2' must be number, found bool"):
        check_schema(schema.set(1, pa.field("x2", pa.bool_())), {"x2": "number"}, "in.csv")


def test_score_batch_keeps_rows_order_and_adds_lineage() -> None:
    batch = pa.RecordBatch.from_pydict({"id": [3, 1, 2], "x1": [0.5, -1.0, 2.0], "note": ["a", "b", "c"]})
    model = ResolvedModel("m", "7", "run1")

    def predict(frame: pd.DataFrame) -> pd.DataFrame:  # a stand-in model: doubles the feature
        return pd.DataFrame({"prediction": frame["x1"] * 2})

    out = score_batch(batch, predict, {"x1": "number"}, ["id", "note"], model)
    assert out.column_names == ["id", "note", "prediction", "model_name", "model_version", "model_run_id"]
    assert out.column("id").to_pylist() == [3, 1, 2]
    assert out.column("prediction").to_pylist() == [1.0, -2.0, 4.0]
    assert set(out.column("model_version").to_pylist()) == {"7"}


def test_atomic_parquet_leaves_nothing_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.parquet"
    batch = pa.RecordBatch.from_pydict({"a": [1, 2]})
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_parquet(target) as write:
        write(batch)
        raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []
    with atomic_parquet(target) as write:
        write(batch)
    assert pq.read_table(target).num_rows == 2 and list(tmp_path.iterdir()) == [target]


def test_scorer_streams_in_bounded_batches(tmp_path: Path) -> None:
    frame = pd.DataFrame({"row_id": np.arange(1000), "x1": np.linspace(0, 1, 1000)})
    src = tmp_path / "in.parquet"
    frame.to_parquet(src, row_group_size=100)
    sizes: list[int] = []

    def predict(f: pd.DataFrame) -> pd.DataFrame:
        sizes.append(len(f))
        return pd.DataFrame({"prediction": f["x1"] + 1})

    scorer = Scorer(
        predict, {"x1": "number"}, ResolvedModel("m", "1", "r"), ("row_id",), batch_rows=128, progress=False
    )
    result = scorer.score([src], tmp_path / "out.parquet")
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert max(sizes) <= 128 and sum(sizes) == 1000 and result.rows == 1000
    assert out["row_id"].tolist() == list(range(1000))
    np.testing.assert_allclose(out["prediction"], frame["x1"] + 1)


# ---- the flow on a registered model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def registered(tmp_path_factory, prefect_harness) -> dict:
    """One trained and registered classifier (champion v1) in a module-wide MLflow store."""
    root = tmp_path_factory.mktemp("scoring")
    return {"uri": register_classifier(root, NAME), "root": root}


def _input(root: Path, n: int = 500, seed: int = 1) -> pd.DataFrame:
    frame = _table(n, seed).drop(columns=["label"])
    frame.insert(0, "row_id", np.arange(n)[::-1])  # ids in descending order: order must be kept, not sorted
    frame["note"] = [f"n{i}" for i in range(n)]  # an extra column, passed through
    return frame


@pytest.mark.usefixtures("prefect_harness")
def test_scoring_flow_matches_the_registered_pyfunc_and_records_lineage(registered: dict, tmp_path: Path) -> None:
    uri = registered["uri"]
    frame = _input(tmp_path)
    src = tmp_path / "in.csv"
    frame.to_csv(src, index=False)
    out = tmp_path / "scored.parquet"

    result = scoring_flow(NAME, str(src), str(out), ["row_id"], batch_rows=64, tracking_uri=uri)

    scored = pd.read_parquet(out)
    assert len(scored) == len(frame) == result.rows
    # same rows, same order; a CSV pass-through column is carried as the text it holds
    assert scored["row_id"].tolist() == frame["row_id"].astype(str).tolist()
    assert scored["note"].tolist() == frame["note"].tolist()
    assert list(scored.columns) == [
        "row_id", "note", "prediction", "proba_high", "proba_low", "model_name", "model_version", "model_run_id",
    ]  # fmt: skip
    expected = mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict(frame.drop(columns=["row_id", "note"]))
    assert scored["prediction"].tolist() == expected["prediction"].tolist()
    np.testing.assert_allclose(scored["proba_high"], expected["proba_high"], rtol=1e-6)
    client = MlflowClient(uri)
    mv = client.get_model_version_by_alias(NAME, "champion")
    assert set(scored["model_name"].astype(str)) == {NAME}
    assert set(scored["model_version"].astype(str)) == {"1"}
    assert set(scored["model_run_id"].astype(str)) == {mv.run_id}

    run = client.get_run(result.scoring_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["rows"] == len(frame) and run.data.metrics["seconds"] > 0
    assert run.data.params["model_version"] == "1" and run.data.tags["input_digest"] == result.input_digest
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    assert f"Scored with {NAME} v1" in artifact_markdown(flow_run_id)


@pytest.mark.usefixtures("prefect_harness")
def test_directory_mode_writes_one_file_per_input_and_skips_scored_ones(registered: dict, tmp_path: Path) -> None:
    uri = registered["uri"]
    inputs = tmp_path / "in"
    inputs.mkdir()
    _input(tmp_path, 40, seed=2).to_parquet(inputs / "day1.parquet")
    _input(tmp_path, 30, seed=3).to_csv(inputs / "day2.csv", index=False)
    outdir = tmp_path / "out"

    first = scoring_flow(f"{NAME}/1", str(inputs), str(outdir), tracking_uri=uri)
    names = sorted(p.name for p in outdir.iterdir())
    assert names == [f"day1.parquet.{NAME}-v1.parquet", f"day2.csv.{NAME}-v1.parquet"]
    assert [len(pd.read_parquet(outdir / n)) for n in names] == [40, 30] and first.rows == 70

    again = scoring_flow(f"{NAME}/1", str(inputs), str(outdir), tracking_uri=uri)
    assert again.rows == 0 and all(f.skipped for f in again.files)


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda f: f.drop(columns=["x2"]), "missing column(s) 'x2'"),
        (lambda f: f.assign(x1="abc"), "column 'x1' must be number: 20 row(s) are not, e.g. row 0, 1, 2: found 'abc'"),
    ],
)
def test_schema_violations_write_nothing(registered: dict, tmp_path: Path, mutate, needle: str) -> None:
    src = tmp_path / "bad.parquet"
    mutate(_input(tmp_path, 20)).to_parquet(src)
    out = tmp_path / "out" / "scored.parquet"
    with pytest.raises(DataError) as err:
        scoring_flow(NAME, str(src), str(out), tracking_uri=registered["uri"])
    assert needle in str(err.value)
    assert not out.exists() and not list(out.parent.glob("*"))


@pytest.mark.usefixtures("prefect_harness")
def test_bad_value_deep_in_a_csv_leaves_no_output(registered: dict, tmp_path: Path) -> None:
    """The bad row is past the first streamed block: batches were already written to the partial file."""
    frame = _input(tmp_path, 120_000)
    src = tmp_path / "big.csv"
    frame.to_csv(src, index=False)
    with open(src, "a") as fh:
        fh.write("999,not-a-number,3,red,n999\n")
    out = tmp_path / "scored.parquet"
    needle = r"big\.csv: column 'x1' must be number: 1 row\(s\) are not, e\.g\. row 120000: found 'not-a-number'"
    with pytest.raises(DataError, match=needle):
        scoring_flow(NAME, str(src), str(out), batch_rows=4096, tracking_uri=registered["uri"])
    assert list(tmp_path.glob("*.parquet*")) == []


def test_unknown_model_version_is_a_clear_error(registered: dict, tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    _input(tmp_path, 5).to_csv(src, index=False)
    with pytest.raises(DataError, match=f"no model version for '{NAME}/9'"):
        scoring_flow(f"{NAME}/9", str(src), str(tmp_path / "o.parquet"), tracking_uri=registered["uri"])


def test_predict_command_json_and_bad_input_exit_codes(registered: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    src = tmp_path / "in.parquet"
    _input(tmp_path, 25).to_parquet(src)
    out = tmp_path / "o.parquet"
    runner = CliRunner()
    ok = runner.invoke(app, ["predict", "--model", NAME, "--input", str(src), "--output", str(out), "--json"])
    assert ok.exit_code == 0, ok.output
    payload = json.loads(ok.stdout.strip().splitlines()[-1])
    assert payload["rows"] == 25 and payload["model_version"] == "1" and Path(payload["output"]) == out

    missing = runner.invoke(app, ["predict", "-m", NAME, "-i", str(tmp_path / "nope.csv"), "-o", str(out)])
    assert missing.exit_code == 2 and "input not found" in missing.output
    bad_ref = runner.invoke(app, ["predict", "-m", "x/y/z", "-i", str(src), "-o", str(out)])
    assert bad_ref.exit_code == 2 and "bad model reference" in bad_ref.output


def test_mlflow_serving_answers_like_batch_scoring(registered: dict, tmp_path: Path) -> None:
    """`mlflow models serve` (MLflow's own server) on a loopback port gives the batch path's predictions."""
    frame = _input(tmp_path, 50).drop(columns=["note"])
    src = tmp_path / "in.parquet"
    frame.to_parquet(src)
    out = tmp_path / "scored.parquet"
    scoring_flow(NAME, str(src), str(out), ["row_id"], tracking_uri=registered["uri"])
    batch = pd.read_parquet(out)

    with mlflow_serving(registered["uri"], f"models:/{NAME}@champion", tmp_path, startup_s=120) as base:
        import httpx

        features = frame.drop(columns=["row_id"])
        body = {"dataframe_split": json.loads(features.to_json(orient="split", index=False))}
        resp = httpx.post(f"{base}/invocations", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        online = pd.DataFrame(resp.json()["predictions"])
        # Bad requests: MLflow's 400 carrying the model's own message; no stack trace, no server paths.
        row = features.iloc[:1].astype(object)
        for change, needle in [
            ({"x1": 1e308}, "overflow the model's float32 arithmetic"),
            ({"x1": None}, "'x1' fails not-null"),
            ({"x1": "lots"}, "column 'x1' must be number"),
        ]:
            bad = row.assign(**change)
            body = {"dataframe_split": json.loads(bad.to_json(orient="split", index=False))}
            answer = httpx.post(f"{base}/invocations", json=body, timeout=60)
            assert answer.status_code == 400, (change, answer.status_code, answer.text[:2000])
            assert needle in answer.json()["message"], (change, answer.text[:2000])
            assert "Traceback" not in answer.text and str(Path.cwd()) not in answer.text, answer.text[:2000]
    assert online["prediction"].tolist() == batch["prediction"].tolist()
    np.testing.assert_allclose(online["proba_high"], batch["proba_high"], rtol=1e-6)


@pytest.mark.usefixtures("prefect_harness")
def test_run_command_trains_gates_and_scores_held_out_rows(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = tmp_path / "wine.yaml"
    config.write_text(
        "name: wine-run\nexperiment: tests\ndata: {source: 'sklearn:wine'}\n"
        "model: {kind: mlp, hidden: [16]}\ntrain: {epochs: 40, patience: 0, lr: 0.01}\n"
    )
    result = CliRunner().invoke(app, ["run", "--config", str(config), "--workdir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "promoted to champion" in result.output and "scored 36 rows" in result.output
    holdout = pd.read_parquet(tmp_path / "out" / "wine-run" / "holdout.parquet")
    scored = pd.read_parquet(tmp_path / "out" / "wine-run" / "holdout.scored.parquet")
    assert len(scored) == len(holdout) == 36
    # the held-out label is passed through, so the scored file can be checked against the truth
    assert (scored["target"] == scored["prediction"]).mean() >= 0.9


class _Registry:
    """The two MlflowClient calls resolve_model makes; `champion` None: no version has the alias yet."""

    def __init__(self, champion: str | None) -> None:
        self.champion = champion

    def get_model_version_by_alias(self, name: str, alias: str):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import ErrorCode

        if self.champion is None:
            raise MlflowException("no alias", error_code=ErrorCode.Value("RESOURCE_DOES_NOT_EXIST"))
        return type("MV", (), {"name": name, "version": self.champion, "run_id": "r1"})()


def test_plan_scoring_says_why_there_is_nothing_to_do(tmp_path: Path) -> None:
    ref, incoming, out = ModelRef("m", alias="champion"), tmp_path / "incoming", tmp_path / "scored"
    assert plan_scoring(_Registry("1"), ref, str(incoming), out).idle == f"input not found: {incoming}"
    incoming.mkdir()
    assert plan_scoring(_Registry("1"), ref, str(incoming), out).idle == (
        f"no .csv or .parquet files (or images, for a model of images) in {incoming}"
    )
    _table(3).to_parquet(incoming / "a.parquet")
    no_champion = plan_scoring(_Registry(None), ref, str(incoming), out)
    assert no_champion.idle == "no model version for 'm@champion' in the registry (train one first)"
    work = plan_scoring(_Registry("1"), ref, str(incoming), out)
    assert work.idle is None and work.model == ResolvedModel("m", "1", "r1")
    out.mkdir()
    (out / "a.parquet.m-v1.parquet").write_bytes(b"")  # scored by v1 already
    assert plan_scoring(_Registry("1"), ref, str(incoming), out).idle == (
        f"all 1 file(s) in {incoming} already scored by m v1"
    )
    assert plan_scoring(_Registry("2"), ref, str(incoming), out).idle is None  # a new champion scores again
    (incoming / "x.json").write_text("{}")
    with pytest.raises(DataError, match="unsupported input file type"):  # a real problem still fails
        plan_scoring(_Registry("1"), ref, str(incoming / "*"), out)


@pytest.mark.usefixtures("prefect_harness")
def test_scoring_records_drift_and_flags_only_the_shifted_feature(registered: dict, tmp_path: Path) -> None:
    """The model's reference (its train split) against what is scored: the same population is ok, x1 moved by
    one standard deviation is flagged by name, in the scoring run's metrics, tag, table and chart."""
    uri = registered["uri"]
    client = MlflowClient(uri)
    same = _table(3000, seed=11).drop(columns=["label"])
    same.to_parquet(tmp_path / "same.parquet")
    ok = scoring_flow(NAME, str(tmp_path / "same.parquet"), str(tmp_path / "same.out.parquet"), tracking_uri=uri)
    assert ok.drift.status == "ok" and ok.drift.max_psi < 0.1 and not ok.drift.drifted

    shifted = same.assign(x1=same["x1"] + _table(600)["x1"].std())
    shifted.to_parquet(tmp_path / "shifted.parquet")
    moved = scoring_flow(NAME, str(tmp_path / "shifted.parquet"), str(tmp_path / "moved.parquet"), tracking_uri=uri)
    assert list(moved.drift.drifted) == ["x1"] and moved.drift.psi["x1"] >= 0.25
    run = client.get_run(moved.scoring_run_id)
    assert run.data.tags["drift_status"] == "drift"
    assert run.data.metrics["drift_psi.x1"] >= 0.25 and run.data.metrics["drift_psi.color"] < 0.1
    assert run.data.metrics["drift_max_psi"] == pytest.approx(moved.drift.psi["x1"])
    names = {a.path for a in client.list_artifacts(moved.scoring_run_id, "drift")}
    assert names == {"drift/drift_chart.png", "drift/drift_table.json"}
    assert client.get_run(ok.scoring_run_id).data.tags["drift_status"] == "ok"
