"""Columns as users' exports have them: each class trains, and the model scores its own rows read back from the
file, the way `torchcycle predict` reads them (the Scorer) and the way the pyfunc gets them (pandas.read_csv)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from torchcycle.config import config_from_dict
from torchcycle.errors import DataError
from torchcycle.registry import ResolvedModel
from torchcycle.runtime.bundle import Predictor, load_bundle
from torchcycle.tasks.features import build_features
from torchcycle.tasks.ingest import ingest
from torchcycle.tasks.preprocess import preprocess
from torchcycle.tasks.register import write_bundle
from torchcycle.tasks.score import Scorer
from torchcycle.tasks.train import train
from torchcycle.tasks.validate import validate

QUICK = {"epochs": 3, "patience": 0, "batch_size": 32}  # the column handling is under test, not the fit


def fit_file(path: Path, target: str, tmp_path: Path, **sections) -> tuple:
    """Train a small MLP on a file through the stages: (splits, prepared, the loaded bundle's Predictor)."""
    raw_cfg = {"name": "t", "data": {"source": f"file:{path}", "target": target, **sections.pop("data", {})}}
    raw_cfg |= {"model": {"kind": "mlp", "hidden": [16], "members": 1}, "train": QUICK, **sections}
    cfg = config_from_dict(raw_cfg)
    raw = ingest(cfg.data)
    validate(raw)
    splits = preprocess(raw, cfg.data, cfg.seed)
    prepared = build_features(splits, cfg.features)
    trained = train(prepared, cfg.model, cfg.train, seed=0, device=torch.device("cpu"), progress=False)
    return splits, prepared, load_bundle(write_bundle(trained, prepared, target, tmp_path / "bundle"))


def score_file(predictor: Predictor, path: Path, tmp_path: Path) -> pd.DataFrame:
    """What `torchcycle predict` writes for `path`: the file streamed in batches, read by the model's kinds."""
    pipe = predictor.pipeline
    scorer = Scorer(
        predictor.predict_canonical,
        pipe.input_kinds(),
        ResolvedModel("t", "1", "r"),
        batch_rows=7,  # several batches: every batch is read alone, as a large file's are
        progress=False,
        outputs=tuple(predictor.output_columns),
        prepare=pipe.canonical,
    )
    out = tmp_path / "scored.parquet"
    scorer.score([path], out)
    return pq.read_table(out).to_pandas()


def export(frame: pd.DataFrame, path: Path, na_rep: str = "") -> Path:
    frame.to_csv(path, index=False, na_rep=na_rep)
    return path


def _rows(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return pd.DataFrame({"x": x, "y": np.where(x + rng.normal(0, 0.3, n) > 0, "yes", "no")})


@pytest.mark.parametrize("na_rep", ["", "NA"])  # a spreadsheet's export, R's write.csv
def test_missing_cells_of_every_kind_train_and_score_as_missing(tmp_path: Path, na_rep: str) -> None:
    n = 80
    frame = _rows(n).assign(
        text=np.where(np.arange(n) % 3 == 0, None, np.where(np.arange(n) % 2, "red", "blue")),
        number=np.where(np.arange(n) % 4 == 0, np.nan, np.arange(n) * 1.5),
        flag=pd.Series(np.where(np.arange(n) % 5 == 0, None, np.arange(n) % 2 == 0), dtype=object),
        when=pd.Series(pd.date_range("2024-01-01", periods=n, freq="D").astype(str)).where(np.arange(n) % 6 != 0),
    )
    path = export(frame, tmp_path / "t.csv", na_rep)
    splits, _prepared, predictor = fit_file(path, "y", tmp_path)
    assert splits.kinds == {
        "x": "number",
        "y": "string",
        "text": "string",
        "number": "number",
        "flag": "bool",
        "when": "datetime",
    }
    rows = export(frame.drop(columns="y"), tmp_path / "rows.csv", na_rep)
    scored = score_file(predictor, rows, tmp_path)
    assert len(scored) == n and scored["prediction"].isin(["yes", "no"]).all()
    # pandas.read_csv's rows, as a pyfunc caller has them: the same predictions
    theirs = predictor.predict(pd.read_csv(rows))
    assert scored["prediction"].tolist() == theirs["prediction"].tolist()
    np.testing.assert_allclose(scored["proba_yes"], theirs["proba_yes"], rtol=1e-6)


def test_dates_become_their_parts_at_training_and_at_scoring(tmp_path: Path) -> None:
    n = 120
    days = pd.date_range("2023-01-02 08:00", periods=n, freq="37h")
    frame = pd.DataFrame({"when": days.strftime("%Y-%m-%d %H:%M:%S"), "y": np.where(days.weekday < 5, "work", "rest")})
    _, prepared, predictor = fit_file(export(frame, tmp_path / "t.csv"), "y", tmp_path)
    assert predictor.pipeline.date_parts == {"when": ["year", "month", "day", "weekday", "hour"]}
    assert prepared.n_features == 5  # the parts; the date itself is no feature
    scored = score_file(predictor, export(frame.drop(columns="y"), tmp_path / "rows.csv"), tmp_path)
    again = predictor.predict(frame.drop(columns="y").assign(when=pd.to_datetime(frame["when"])))  # typed dates
    assert scored["prediction"].tolist() == again["prediction"].tolist()
    with pytest.raises(DataError, match=r"column 'when' must be a date .*found '31/12/2024'"):
        predictor.predict(pd.DataFrame({"when": ["31/12/2024"]}))


def test_ids_and_constant_columns_are_left_out_and_said(tmp_path: Path) -> None:
    n = 60
    frame = _rows(n).assign(
        rownames=np.arange(1, n + 1),  # R's row names
        key=[f"c-{i:04d}" for i in range(n)],  # a customer key
        region="Anvers",  # one value everywhere
        empty=np.nan,
        sometimes=np.where(np.arange(n) % 2, "yes", None),  # one value or empty: two, kept
        measure=np.linspace(0, 1, n) ** 2,  # distinct on every row, but no count of rows: kept
    )
    path = export(frame, tmp_path / "t.csv")
    splits, _prepared, predictor = fit_file(path, "y", tmp_path, data={"ignore": ["x"]})
    assert splits.left_out == {
        "x": "left out by data.ignore",
        "rownames": "an ID: distinct whole numbers on every row, named as an ID",
        "key": "an ID: distinct text on every row",
        "region": "constant: 'Anvers' in every row",
        "empty": "constant: no value at all",
    }
    assert predictor.pipeline.columns == ["sometimes", "measure"]
    params, _metrics, docs = splits.facts()
    assert "rownames (an ID" in params["data.left_out"] and docs["columns.json"]["left_out"] == splits.left_out
    scored = score_file(predictor, export(frame.drop(columns="y"), tmp_path / "rows.csv"), tmp_path)
    # the columns that are no input come through to the output, in the file's order, before the prediction
    assert list(scored.columns[:6]) == ["x", "rownames", "key", "region", "empty", "prediction"]
    assert scored["key"].tolist() == frame["key"].tolist()
    only_ids = frame[["rownames", "key", "y"]]
    with pytest.raises(DataError, match=r"no feature column a model can learn from: 'rownames' \(an ID"):
        fit_file(export(only_ids, tmp_path / "ids.csv"), "y", tmp_path)
    with pytest.raises(DataError, match=r"data.ignore names column\(s\) 'nope' that .* does not have"):
        fit_file(path, "y", tmp_path, data={"ignore": ["nope"]})


def test_a_category_of_5000_values_is_bounded_and_new_values_share_its_other_column(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 12_000
    common = [f"shop-{i}" for i in range(20)]
    rare = rng.random(n) < 0.5
    names = np.array([f"rare-{k % 5000}" for k in np.cumsum(rare)])  # the k-th rare row: 5,000 values in turn
    shop = np.where(rare, names, rng.choice(common, n))
    frame = pd.DataFrame({"shop": shop, "x": rng.normal(size=n)})
    frame["y"] = np.where(frame["x"] + (frame["shop"] == "shop-3") > 0.5, "a", "b")
    assert frame["shop"].nunique() >= 5000
    _, prepared, predictor = fit_file(export(frame, tmp_path / "t.csv"), "y", tmp_path, features={"max_categories": 30})
    assert prepared.n_features == 1 + 30 + 1  # x, the 30 most frequent shops, one column for all the others
    encoder = predictor.pipeline.transformer.named_transformers_["cat"]
    rows = pd.DataFrame({"shop": ["rare-17", "never-seen", "shop-3"], "x": [0.0, 0.0, 0.0]})
    x = predictor.pipeline.transform(rows)
    assert (x[0] == x[1]).all() and not (x[1] == x[2]).all()  # a value never seen: as a rare one
    assert encoder.infrequent_categories_[0] is not None
    scored = score_file(predictor, export(rows, tmp_path / "rows.csv"), tmp_path)
    assert scored["prediction"].iloc[0] == scored["prediction"].iloc[1]


def test_codes_read_as_numbers_score_as_the_categories_they_were_in_training(tmp_path: Path) -> None:
    """Codes '007', '012', 'A7': the held-out rows have no letter, so pandas.read_csv gives 7, 12 and a Parquet
    writer stores int64. Each path scores them as '007', '012', as the CSV's own text is read."""
    rng = np.random.default_rng(0)
    n = 400
    frame = pd.DataFrame({"code": rng.choice(["007", "012", "A7", "B9"], n), "x": rng.normal(size=n)})
    frame["y"] = np.where(frame["code"].isin(["007", "A7"]), "in", "out")
    train = {"epochs": 30, "patience": 0, "batch_size": 32, "lr": 0.01}
    _, _, predictor = fit_file(export(frame, tmp_path / "t.csv"), "y", tmp_path, train=train)
    held = pd.DataFrame({"code": ["007", "012", "007", "012"], "x": [0.1, -0.2, 0.3, 0.0]})
    as_text = score_file(predictor, export(held, tmp_path / "rows.csv"), tmp_path)
    assert as_text["prediction"].tolist() == ["in", "out", "in", "out"]
    read = pd.read_csv(tmp_path / "rows.csv")
    assert read["code"].dtype == np.int64  # what pandas makes of them
    by_pandas = predictor.predict(read)
    assert by_pandas["prediction"].tolist() == as_text["prediction"].tolist()
    np.testing.assert_array_equal(by_pandas["proba_in"].to_numpy(), as_text["proba_in"].to_numpy())
    read.to_parquet(tmp_path / "rows.parquet")  # int64 codes in Parquet: scored alike, not refused
    as_ints = score_file(predictor, tmp_path / "rows.parquet", tmp_path)
    np.testing.assert_array_equal(as_ints["proba_in"].to_numpy(), as_text["proba_in"].to_numpy())
    as_json = predictor.predict(pd.DataFrame({"code": [7, "012", 7.0, 12], "x": held["x"]}))  # a client's mix
    np.testing.assert_array_equal(as_json["proba_in"].to_numpy(), as_text["proba_in"].to_numpy())
    # a number no category has: the "other" feature, as the text '5' would be
    five = predictor.pipeline.transform(pd.DataFrame({"code": [5, "5"], "x": [0.0, 0.0]}))
    assert (five[0] == five[1]).all()


def test_rows_with_no_label_are_dropped_counted_and_still_scored(tmp_path: Path) -> None:
    frame = _rows(90)
    frame.loc[::9, "y"] = None
    frame.loc[::9, "x"] = np.nan  # the unlabelled rows alone hold holes: still part of the table scored
    splits, _prepared, predictor = fit_file(export(frame, tmp_path / "t.csv"), "y", tmp_path)
    assert splits.dropped_rows == 10 and len(splits.train) + len(splits.val) + len(splits.test) == 80
    assert splits.facts()[1] == {"rows_unlabeled": 10.0}
    scored = score_file(predictor, export(frame.drop(columns="y"), tmp_path / "rows.csv"), tmp_path)
    assert len(scored) == 90 and scored["prediction"].notna().all()


def test_whole_number_labels_with_holes_are_classes(tmp_path: Path) -> None:
    frame = _rows(90).assign(y=lambda f: (f["y"] == "yes").astype(float))
    frame.loc[::9, "y"] = np.nan  # pandas reads the 0/1 label as floats
    splits, _prepared, predictor = fit_file(export(frame, tmp_path / "t.csv"), "y", tmp_path)
    assert splits.task == "classification" and predictor.pipeline.classes == [0, 1]
    assert predictor.output_columns == ["prediction", "proba_0", "proba_1"]


def test_balanced_class_weights_raise_the_rare_class_recall(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 2000
    x = rng.normal(size=(n, 2))
    y = np.where(x[:, 0] + 0.5 * rng.normal(size=n) > 1.6, "rare", "common")  # about 6 %
    path = export(pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "y": y}), tmp_path / "t.csv")
    recall = {}
    for weight in ("none", "balanced"):
        cfg = {"epochs": 15, "patience": 0, "batch_size": 64, "class_weight": weight}
        _, prepared, predictor = fit_file(path, "y", tmp_path / weight, train=cfg)
        truth = prepared.test_frame["y"].to_numpy()
        pred = predictor.predict(prepared.test_frame.drop(columns="y"))["prediction"].to_numpy()
        recall[weight] = (pred[truth == "rare"] == "rare").mean()
    assert recall["balanced"] > recall["none"] + 0.1, recall
