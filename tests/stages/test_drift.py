"""drift: the training reference, streaming counts at scoring time, PSI per column, and how a report is recorded
(MLflow metrics, table, chart, tag; Prefect artifact and event)."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from stage_data import _raw, _train_small

from torchcycle.config import DataConfig, DriftConfig, FeaturesConfig
from torchcycle.errors import DataError
from torchcycle.runtime.drift import DriftCounts, ReferenceProfile, drift_report, psi
from torchcycle.tasks.drift import drift_chart, drift_event, drift_table, metric_names, record_drift
from torchcycle.tasks.features import build_features
from torchcycle.tasks.preprocess import preprocess


def _counts(reference: ReferenceProfile, features: pd.DataFrame, predictions=None) -> DriftCounts:
    counts = DriftCounts.empty(reference)
    counts.update(features, predictions)
    return counts


def _finite(report) -> bool:
    values = [*report.psi.values(), *report.drifted.values(), *report.warned.values()]
    values += [v for v in (report.prediction_psi, report.max_psi) if v is not None]
    return all(math.isfinite(v) for v in values)


# ---- acceptance: real shifts flagged, resampling noise not ---------------------------------------
@pytest.fixture(scope="module")
def tabular():
    """make_classification, 5,000 rows x 20 features, split by the project's own preprocess (3,500 train /
    1,000 test). Chosen over load_breast_cancer: its test split has 114 rows, and PSI noise grows like
    bins / n: there the unshifted test split already reached PSI 0.32 and 20 of 20 bootstrap resamples
    flagged some column (largest 0.92). Measured here (seed 0, 10 bins): largest PSI of the unshifted test
    split 0.019, largest over the 20 bootstrap resamples 0.048, smallest of the 3 shifted columns (x3, x8, x15)
    0.920."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=5000, n_features=20, n_informative=6, n_redundant=4, random_state=0)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(20)]).assign(y=y)
    splits = preprocess(_raw(frame, "y"), DataConfig(source="file:x", target="y"), seed=0)
    prepared = build_features(splits, FeaturesConfig(), DriftConfig())
    return splits, prepared.pipeline.reference


def test_three_shifted_features_are_flagged_and_nothing_else(tabular) -> None:
    splits, reference = tabular
    train = splits.train.drop(columns="y")
    test = splits.test.drop(columns="y")
    assert reference.rows == len(splits.train) and reference.names == list(train.columns)  # train split, no target
    shifted_cols = ["x3", "x8", "x15"]
    shifted = test.assign(**{c: test[c] + train[c].std() for c in shifted_cols})
    before = test.copy()
    report = drift_report(reference, _counts(reference, shifted))
    pd.testing.assert_frame_equal(test, before)  # nothing it was given changed
    assert sorted(report.drifted) == sorted(shifted_cols), report.psi
    assert min(report.psi[c] for c in shifted_cols) >= 0.25
    assert max(v for c, v in report.psi.items() if c not in shifted_cols) < 0.1
    assert report.status == "drift" and report.rows == len(test)
    print(f"smallest shifted PSI {min(report.psi[c] for c in shifted_cols):.3f}")


def test_too_few_rows_are_recorded_but_not_called_drift(tabular) -> None:
    """PSI of a small sample is mostly noise: below drift.min_rows (default 1000) nothing is called drift, so a
    40-row file cannot start a retrain; the values are still there to look at."""
    splits, reference = tabular
    test = splits.test.drop(columns="y")
    small = test.head(200).assign(x3=lambda f: f["x3"] + 5)
    report = drift_report(reference, _counts(reference, small))
    assert report.min_rows == 1000 and not report.enough_rows and report.status == "too-few-rows"
    assert report.psi["x3"] >= 0.25  # recorded all the same
    assert drift_report(reference, _counts(reference, test)).status == "ok"  # 1,000 rows: judged


def test_bootstrap_resamples_of_unshifted_rows_flag_nothing(tabular) -> None:
    splits, reference = tabular
    test = splits.test.drop(columns="y")
    rng = np.random.default_rng(0)
    worst, flagged = [], 0
    for _ in range(20):
        sample = test.iloc[rng.integers(0, len(test), size=len(test))]
        report = drift_report(reference, _counts(reference, sample))
        worst.append(report.max_psi)
        flagged += bool(report.drifted)
    print(f"largest bootstrap PSI {max(worst):.3f}")
    assert flagged <= 1 and max(worst) < 0.25  # >= 19 of 20 flag nothing; measured: none, max 0.048


# ---- categorical columns -------------------------------------------------------------------------
def test_a_changed_category_mix_is_flagged_and_unseen_and_missing_have_buckets() -> None:
    rng = np.random.default_rng(1)
    train = pd.DataFrame({"color": pd.array(rng.choice(["red", "green", "blue"], 3000, p=[0.5, 0.3, 0.2]), "str")})
    reference = ReferenceProfile.from_frame(train)
    profile = reference.by_name["color"]
    assert profile.kind == "categorical" and profile.labels() == [
        "red",
        "green",
        "blue",
        "<other>",
        "<unseen>",
        "<missing>",
    ]
    same = pd.DataFrame({"color": rng.choice(["red", "green", "blue"], 2000, p=[0.5, 0.3, 0.2])})  # object dtype
    assert drift_report(reference, _counts(reference, same)).psi["color"] < 0.02
    mixed = pd.DataFrame({"color": rng.choice(["red", "green", "blue"], 2000, p=[0.2, 0.3, 0.5])})
    assert drift_report(reference, _counts(reference, mixed)).drifted.keys() == {"color"}
    odd = pd.DataFrame({"color": ["red"] * 6 + ["purple", "teal", None, np.nan], "extra": range(10)})
    counts = _counts(reference, odd)
    assert counts.features["color"].tolist() == [6, 0, 0, 0, 2, 2]  # red, ..., <other>, <unseen>, <missing>


def test_past_the_category_cap_the_rest_is_other() -> None:
    train = pd.DataFrame({"id": [f"c{i % 300}" for i in range(3000)], "flag": [True, False, False] * 1000})
    reference = ReferenceProfile.from_frame(train, max_categories=200)
    ids, flag = reference.by_name["id"], reference.by_name["flag"]
    assert len(ids.categories) == 200 and ids.pooled and ids.expected[200] == pytest.approx(100 / 300)
    assert flag.kind == "categorical" and flag.categories == ("False", "True")  # bools are categories
    assert drift_report(reference, _counts(reference, train)).max_psi == pytest.approx(0.0, abs=1e-12)


# ---- exact merging and plain-JSON round trips --------------------------------------------------------
def _mixed_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    x[rng.random(n) < 0.1] = np.nan
    return pd.DataFrame(
        {
            "x": x,
            "k": rng.integers(0, 4, n),
            "nullable": pd.array(rng.integers(0, 9, n), dtype="Int64"),
            "color": pd.array(rng.choice(["red", "green", None], n), dtype="str"),
            "flag": rng.random(n) < 0.3,
            "size": pd.Categorical(rng.choice(["S", "M", "L"], n)),
        }
    )


def test_counts_of_chunks_merge_exactly_in_any_order_and_round_trip() -> None:
    train, scored = _mixed_frame(2000, 0), _mixed_frame(3001, 1)
    predictions = pd.DataFrame({"prediction": np.random.default_rng(2).choice(["a", "b"], len(scored))})
    reference = ReferenceProfile.from_frame(train).with_predictions(
        np.random.default_rng(3).choice(["a", "b"], len(train)), "classification", classes=["a", "b"]
    )
    whole = _counts(reference, scored, predictions)
    cuts = [0, 17, 1900, len(scored)]  # three chunks of arbitrary sizes
    parts = [_counts(reference, scored.iloc[a:b], predictions.iloc[a:b]) for a, b in itertools.pairwise(cuts)]
    for order in itertools.permutations(parts):
        left = order[0].merge(order[1]).merge(order[2])
        right = order[0].merge(order[1].merge(order[2]))
        assert left == whole and right == whole
    assert whole.rows == len(scored) and whole.prediction_rows == len(scored)
    assert all(int(v.sum()) == len(scored) for v in whole.features.values())  # every row in one bucket

    data = json.loads(json.dumps(whole.to_dict()))  # JSON-able
    assert DriftCounts.from_dict(data, reference) == whole
    text = reference.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-finite {c} in the reference"))
    again = ReferenceProfile.from_json(text)
    assert again == reference and again.to_json() == text and again.fingerprint == reference.fingerprint
    assert drift_report(again, DriftCounts.from_dict(data, again)) == drift_report(reference, whole)

    other = ReferenceProfile.from_frame(scored)
    with pytest.raises(ValueError, match="different reference"):
        whole.merge(DriftCounts.empty(other))
    with pytest.raises(ValueError, match="another reference"):
        DriftCounts.from_dict(data, other)
    with pytest.raises(DataError, match=r"missing input column.*color"):
        whole.update(scored.drop(columns="color"))
    with pytest.raises(DataError, match="2 predictions for 3 rows"):
        whole.update(scored.head(3), predictions.head(2))
    assert whole == DriftCounts.from_dict(data, reference)  # a refused batch counts nothing
    assert pickle.loads(pickle.dumps(whole)) == whole  # as Dask ships it between workers


# ---- prediction drift --------------------------------------------------------------------------------
def test_prediction_drift_classification_and_regression() -> None:
    rng = np.random.default_rng(4)
    features = pd.DataFrame({"x": rng.normal(size=4000)})
    labels = rng.choice([0, 1, 2], 4000, p=[0.6, 0.3, 0.1])
    reference = ReferenceProfile.from_frame(features).with_predictions(labels, "classification", classes=[0, 1, 2])
    assert reference.prediction.categories == ("0", "1", "2")  # labels as text, every class
    scored_same = pd.DataFrame({"prediction": pd.Series(labels, dtype="int64"), "proba_0": 0.5})
    same = drift_report(reference, _counts(reference, features, scored_same))
    assert same.prediction_psi == pytest.approx(0.0, abs=1e-12)
    resampled = pd.DataFrame({"prediction": rng.choice([0, 1, 2], 4000, p=[0.6, 0.3, 0.1])})
    assert drift_report(reference, _counts(reference, features, resampled)).prediction_psi < 0.01
    shifted = pd.DataFrame({"prediction": rng.choice([0, 1, 2], 4000, p=[0.2, 0.3, 0.5])})
    report = drift_report(reference, _counts(reference, features, shifted))
    assert report.prediction_psi >= report.threshold and report.prediction_drifted and report.status == "drift"
    assert report.drifted == {}  # the inputs did not move
    no_predictions = drift_report(reference, _counts(reference, features))
    assert no_predictions.prediction_psi is None and no_predictions.status == "ok"

    values = rng.normal(100, 15, size=4000)
    reg = ReferenceProfile.from_frame(features).with_predictions(pd.DataFrame({"prediction": values}), "regression")
    assert reg.prediction.kind == "numeric" and reg.task == "regression"
    assert drift_report(reg, _counts(reg, features, pd.DataFrame({"prediction": values}))).prediction_psi < 1e-12
    moved = pd.DataFrame({"prediction": values + 15})
    assert drift_report(reg, _counts(reg, features, moved)).prediction_psi >= 0.25


# ---- cost --------------------------------------------------------------------------------------------
def test_counting_1m_rows_x_20_columns_is_cheap_next_to_scoring() -> None:
    """Scoring 1M x 20 float rows takes ~1.2 s on the project's 2-core machine (README, bench_predict):
    counting must stay well under a tenth of that (0.12 s); the bound here is generous for a shared box."""
    rng = np.random.default_rng(5)
    n, batch = 1_000_000, 65_536
    frame = pd.DataFrame(rng.normal(size=(n, 20)), columns=[f"f{i}" for i in range(20)])
    reference = ReferenceProfile.from_frame(frame.iloc[:100_000])
    batches = [frame.iloc[s : s + batch] for s in range(0, n, batch)]  # as the scorer's record batches arrive
    best = math.inf
    for _ in range(3):
        counts = DriftCounts.empty(reference)
        started = time.perf_counter()
        for b in batches:
            counts.update(b)
        best = min(best, time.perf_counter() - started)
    print(f"drift counts: 1M rows x 20 columns in {best:.3f} s")
    assert counts.rows == n
    assert best < 0.3, best


# ---- degenerate inputs -------------------------------------------------------------------------------
def test_no_rows_an_all_missing_column_and_a_constant_column_give_no_nan() -> None:
    rng = np.random.default_rng(6)
    train = pd.DataFrame({"x": rng.normal(size=500), "const": 7.0, "c": rng.choice(["a", "b"], 500)})
    reference = ReferenceProfile.from_frame(train)
    const = reference.by_name["const"]
    assert const.labels() == ["< 7", "= 7", "> 7", "<missing>"] and const.std == 0.0

    empty = drift_report(reference, DriftCounts.empty(reference))
    assert (empty.rows, empty.psi, empty.max_psi, empty.prediction_psi, empty.status) == (0, {}, None, None, "no-data")
    assert not empty.judged and _finite(empty)

    scored = pd.DataFrame({"x": np.nan, "const": 7.0, "c": pd.Series([None] * 50, dtype=object)}, index=range(50))
    report = drift_report(reference, _counts(reference, scored))
    assert _finite(report) and set(report.drifted) == {"x", "c"} and report.psi["const"] == 0.0
    moved = drift_report(reference, _counts(reference, train.assign(const=8.0)))
    assert moved.drifted.keys() == {"const"} and _finite(moved)  # a constant that moves is seen

    for r in (empty, report, moved):  # the table and chart take these too
        table = drift_table(r, reference)
        assert list(table.columns) == ["column", "kind", "psi", "status", "reference_mean", "reference_std"]
        assert len(table) == 3
        drift_chart(r, reference, _counts(reference, scored if r is report else train)).savefig(
            Path("/dev/null"), format="png"
        )
    assert set(drift_table(empty, reference)["status"]) == {"no-data"}

    assert psi(np.array([0.5, 0.5, 0.0]), np.array([0.0, 0.0, 1.0])) == pytest.approx(
        (1e-4 - 0.5) * math.log(1e-4 / 0.5) * 2 + (1 - 1e-4) * math.log(1 / 1e-4)
    )
    with pytest.raises(DataError, match="0 rows"):
        ReferenceProfile.from_frame(train.head(0))


# ---- MLflow --------------------------------------------------------------------------------------------
def test_metric_names_are_valid_for_mlflow_and_never_collide() -> None:
    from mlflow.utils.validation import _validate_metric_name

    columns = ["plain", "a b?", "a b!", "x/", "a//b", "../up", "ok/path", "é", "a_b", "y" * 400, "z" * 401]
    names = metric_names(columns)
    assert list(names) == columns and len(set(names.values())) == len(columns)
    assert (
        names["plain"] == "drift_psi.plain"
        and names["ok/path"] == "drift_psi.ok/path"
        and names["a_b"] == "drift_psi.a_b"
    )
    for name in names.values():
        _validate_metric_name(name)  # raises on anything MLflow refuses
        assert len(name) <= 250


def test_record_drift_logs_metrics_table_chart_and_tag(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("scoring", str(tmp_path / "artifacts"))).info.run_id
    rng = np.random.default_rng(7)
    train = pd.DataFrame({"x": rng.normal(size=2000), "odd name?": rng.normal(size=2000), "odd name!": 1.0})
    reference = ReferenceProfile.from_frame(train).with_predictions(
        rng.choice(["no", "yes"], 2000), "classification", ["no", "yes"]
    )
    scored = train.assign(x=train["x"] + 2)
    counts = _counts(reference, scored, pd.DataFrame({"prediction": rng.choice(["no", "yes"], 2000)}))
    report = drift_report(reference, counts)
    record_drift(client, run_id, report, reference, counts)
    record_drift(client, run_id, report, reference, counts)  # a retry writes the same, no second table

    run = client.get_run(run_id)
    metrics = run.data.metrics
    names = metric_names(reference.names)
    assert len({names["odd name?"], names["odd name!"]}) == 2
    for col in reference.names:
        assert metrics[names[col]] == pytest.approx(report.psi[col])
    assert metrics["drift_max_psi"] == pytest.approx(report.max_psi) and metrics["drift_rows"] == 2000
    assert metrics["drift_prediction_psi"] == pytest.approx(report.prediction_psi)
    assert metrics["drift_columns_drifted"] == 1 and run.data.tags["drift_status"] == "drift"
    files = {f.path: f.file_size for f in client.list_artifacts(run_id, "drift")}
    assert set(files) == {"drift/drift_table.json", "drift/drift_chart.png"} and files["drift/drift_chart.png"] > 10_000
    local = Path(client.download_artifacts(run_id, "drift", str(tmp_path / "got")))
    assert (local / "drift_chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((local / "drift_table.json").read_text())
    assert table["columns"][:4] == ["column", "kind", "psi", "status"]
    assert len(table["data"]) == 4 and table["data"][0][:2] == ["x", "numeric"]  # 3 features + prediction


def test_the_drift_event_names_the_model_version() -> None:
    rng = np.random.default_rng(8)
    train = pd.DataFrame({"x": rng.normal(size=1000)})
    reference = ReferenceProfile.from_frame(train)
    report = drift_report(reference, _counts(reference, train + 3))
    event = drift_event("churn", 3, report, "run123")
    assert event == {
        "event": "torchcycle.drift.detected",
        "resource": {
            "prefect.resource.id": "torchcycle.model-version.churn.3",
            "prefect.resource.name": "churn v3",
            "torchcycle.model.name": "churn",
            "torchcycle.model.version": "3",
        },
        "payload": {
            "columns": report.drifted,
            "max_psi": report.max_psi,
            "threshold": 0.25,
            "prediction_psi": None,
            "rows": 1000,
            "scoring_run_id": "run123",
        },
    }
    assert list(event["payload"]["columns"]) == ["x"]


@pytest.mark.usefixtures("prefect_harness")
def test_the_task_records_an_artifact_and_emits_the_event_to_prefect(tracking_uri: str, tmp_path: Path) -> None:
    """Through Prefect as the scoring flow calls it: the event reaches the server, where automations see it."""
    import httpx
    from mlflow.tracking import MlflowClient
    from prefect import flow
    from prefect.settings import PREFECT_API_URL

    from torchcycle.tasks.drift import record_drift_task

    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("scoring", str(tmp_path / "artifacts"))).info.run_id
    rng = np.random.default_rng(9)
    train = pd.DataFrame({"x": rng.normal(size=1000), "y": rng.normal(size=1000)})
    reference = ReferenceProfile.from_frame(train)
    counts = _counts(reference, train.assign(x=train["x"] + 2))
    report = drift_report(reference, counts)
    model = f"drift-test-{uuid.uuid4().hex[:8]}"
    # the same shift in 40 rows: recorded, but too few rows to call drift, so no event (no retrain)
    few = _counts(reference, train.head(40).assign(x=train["x"].head(40) + 2))
    few_run = client.create_run(client.get_experiment_by_name("scoring").experiment_id).info.run_id

    @flow
    def scoring() -> None:
        record_drift_task(tracking_uri, few_run, model, "1", drift_report(reference, few), reference, few)
        record_drift_task(tracking_uri, run_id, model, "2", report, reference, counts)

    scoring()
    assert client.get_run(few_run).data.tags["drift_status"] == "too-few-rows"
    assert client.get_run(run_id).data.tags["drift_status"] == "drift"
    api = PREFECT_API_URL.value()
    resp = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": ["drift-report"]}}}, timeout=30)
    resp.raise_for_status()
    assert any(model in (a.get("description") or "") for a in resp.json())
    body = {"filter": {"event": {"name": ["torchcycle.drift.detected"]}}, "limit": 50}
    found = []
    for _ in range(60):  # the server stores events a moment after they arrive
        resp = httpx.post(f"{api}/events/filter", json=body, timeout=30)
        resp.raise_for_status()
        found = [e for e in resp.json()["events"] if e["resource"].get("torchcycle.model.name") == model]
        if found:
            break
        time.sleep(0.5)
    assert found, "no torchcycle.drift.detected event reached the server"
    time.sleep(1)  # the first task's event, had it sent one, was stored before the second's
    found = [e for e in httpx.post(f"{api}/events/filter", json=body, timeout=30).json()["events"]
             if e["resource"].get("torchcycle.model.name") == model]  # fmt: skip
    assert [e["resource"]["torchcycle.model.version"] for e in found] == ["2"], "too few rows must send no event"
    event = found[0]
    assert event["resource"]["prefect.resource.id"] == f"torchcycle.model-version.{model}.2"
    assert event["payload"]["columns"].keys() == {"x"} and event["payload"]["scoring_run_id"] == run_id


# ---- the bundle and the stage cache ---------------------------------------------------------------------
def test_the_bundle_carries_the_reference_and_old_bundles_load_without(tmp_path: Path) -> None:
    from torchcycle.cache import SafeSerializer
    from torchcycle.runtime.bundle import load_bundle
    from torchcycle.tasks.ingest import ingest
    from torchcycle.tasks.register import write_bundle

    cfg, prepared, trained = _train_small(tmp_path)
    ref = prepared.pipeline.reference
    assert ref is not None and ref.prediction is None  # predictions join when the bundle is written
    cached = SafeSerializer().loads(SafeSerializer().dumps(prepared))  # the stage cache keeps it
    assert cached.pipeline.reference == ref

    bundle = write_bundle(trained, prepared, "target", tmp_path / "bundle")
    assert prepared.pipeline.reference is ref and ref.prediction is None  # the stage's output is not changed
    predictor = load_bundle(bundle)
    loaded = predictor.pipeline.reference
    assert loaded.columns == ref.columns and (loaded.warn, loaded.threshold) == (0.1, 0.25)
    assert loaded.task == "classification" and loaded.prediction.categories == ("0", "1", "2")
    # the prediction reference is what the loaded model predicts on the train split: no drift against itself
    train = preprocess(ingest(cfg.data), cfg.data, 0).train.drop(columns="target")
    counts = _counts(loaded, train, predictor.predict(train))
    report = drift_report(loaded, counts)
    assert report.prediction_psi == pytest.approx(0.0, abs=1e-12) and report.max_psi == pytest.approx(0.0, abs=1e-12)

    (bundle / "drift_reference.json").unlink()  # a model bundled before drift monitoring
    old = load_bundle(bundle)
    assert old.pipeline.reference is None
    rows = prepared.test_frame.drop(columns="target")
    pd.testing.assert_frame_equal(old.predict(rows), predictor.predict(rows))


def test_config_thresholds_travel_in_the_reference() -> None:
    frame = pd.DataFrame({"num": np.sqrt(np.arange(60.0)), "y": np.tile(["a", "b", "c"], 20)})
    splits = preprocess(_raw(frame), DataConfig(source="file:x", target="y"), seed=0)
    reference = build_features(
        splits, FeaturesConfig(), DriftConfig(bins=4, warn=0.05, threshold=0.5)
    ).pipeline.reference
    assert (reference.bins, reference.warn, reference.threshold) == (4, 0.05, 0.5)
    assert len(reference.by_name["num"].edges) == 3 and reference.names == ["num"]
    report = drift_report(reference, DriftCounts.empty(reference))
    assert (report.warn, report.threshold) == (0.05, 0.5)
