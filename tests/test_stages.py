"""Each stage's plain function on tiny data, including the errors it must name."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from torchcycle.config import DataConfig, FeaturesConfig, config_from_dict
from torchcycle.errors import DataError
from torchcycle.runtime.bundle import load_bundle
from torchcycle.tasks.evaluate import evaluate
from torchcycle.tasks.features import build_features
from torchcycle.tasks.ingest import RawData, frame_digest, ingest, read_table
from torchcycle.tasks.preprocess import preprocess
from torchcycle.tasks.register import write_bundle
from torchcycle.tasks.train import train
from torchcycle.tasks.validate import validate


def _raw(frame: pd.DataFrame, target: str = "y", task: str = "classification") -> RawData:
    return RawData(frame, target, task, "test", frame_digest(frame))


def _table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 60
    return pd.DataFrame(
        {
            "num": rng.normal(size=n),
            "cat": rng.choice(["red", "green", "blue"], size=n),
            "y": np.tile(["a", "b", "c"], n // 3),
        }
    )


# ---- ingest -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "rows", "task"),
    [
        ("sklearn:iris", 150, "classification"),
        ("sklearn:diabetes", 442, "regression"),
        ("synthetic:line", 20, "regression"),
        ("synthetic:xor", 4, "classification"),
        ("synthetic:regression", 100, "regression"),
        ("synthetic:linear2d", 1000, "regression"),
        ("synthetic:classification", 100, "classification"),
    ],
)
def test_ingest_sources(source: str, rows: int, task: str) -> None:
    raw = ingest(DataConfig(source=source))
    assert len(raw.frame) == rows and raw.task == task and raw.target in raw.frame
    assert raw.digest == ingest(DataConfig(source=source)).digest  # deterministic


def test_synthetic_line_is_exact() -> None:
    f = ingest(DataConfig(source="synthetic:line")).frame
    assert np.allclose(f["y"], 2 * f["x"] + 1)


def test_ingest_file_csv_and_parquet(tmp_path: Path) -> None:
    frame = _table()
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.parquet"):
        raw = ingest(DataConfig(source=f"file:{tmp_path / name}", target="y"))
        assert raw.task == "classification" and list(raw.frame.columns) == ["num", "cat", "y"]
    reg = ingest(DataConfig(source=f"file:{tmp_path / 't.csv'}", target="num"))
    assert reg.task == "regression"


def test_ingest_file_errors_name_the_problem(tmp_path: Path) -> None:
    _table().to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match="target column 'label' not found"):
        ingest(DataConfig(source=f"file:{tmp_path / 't.csv'}", target="label"))
    with pytest.raises(DataError, match="not found"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="cannot read"):
        read_table(tmp_path / "bad.parquet")
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(DataError, match="unsupported file type"):
        read_table(tmp_path / "t.json")
    import pyarrow as pa
    import pyarrow.parquet as pq

    dup = pa.table([pa.array([1]), pa.array([2]), pa.array([3])], names=["a", "a", "y"])
    pq.write_table(dup, tmp_path / "dup.parquet")
    with pytest.raises(DataError, match="duplicate column names: a"):
        read_table(tmp_path / "dup.parquet")
    (tmp_path / "dup.csv").write_text("a,a,y\n1,2,3\n")
    with pytest.raises(DataError, match="duplicate column names: a"):
        read_table(tmp_path / "dup.csv")


def test_torchvision_mnist_from_idx_files(mnist_root: Path) -> None:
    raw = ingest(DataConfig(source="torchvision:MNIST", root=str(mnist_root)))
    assert raw.frame.shape == (400, 785) and raw.image_shape == (1, 28, 28)
    assert raw.test_mask.sum() == 100  # the official test split is kept
    splits = preprocess(raw, DataConfig(source="torchvision:MNIST", root=str(mnist_root)), seed=0)
    assert len(splits.test) == 100 and len(splits.train) + len(splits.val) == 300


def test_torchvision_missing_files_is_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="MNIST not found"):
        ingest(DataConfig(source="torchvision:MNIST", root=str(tmp_path)))


# ---- validate -----------------------------------------------------------------------------------
def test_validate_ok_and_errors() -> None:
    validate(_raw(_table()))  # 60 rows, two features, three classes: nothing to refuse
    with pytest.raises(DataError, match="target column 'y' is missing"):
        validate(_raw(_table().drop(columns="y")))
    with pytest.raises(DataError, match="no rows"):
        validate(_raw(_table().iloc[:0]))
    with pytest.raises(DataError, match="no feature columns"):
        validate(_raw(_table()[["y"]]))
    with pytest.raises(DataError, match=r"column 'num' fails to hold values \(it is entirely empty\)"):
        validate(_raw(_table().assign(num=np.nan)))
    with pytest.raises(DataError, match=r"column 'num' fails finite \(no \+-inf\) in 60 row\(s\), e\.g\. row 0"):
        validate(_raw(_table().assign(num=np.inf)))
    with pytest.raises(DataError, match="at least 2 classes"):
        validate(_raw(_table().assign(y="a")))
    # lazy: every problem in one message
    with pytest.raises(DataError, match=r"3 problem\(s\): .*'num' fails finite.*'cat' fails to hold.*2 classes"):
        validate(_raw(_table().assign(num=[np.inf] + [1.0] * 59, cat=np.nan, y="a")))
    with pytest.raises(DataError, match="must be numeric for regression"):
        validate(_raw(_table(), task="regression"))


# ---- preprocess ---------------------------------------------------------------------------------
def test_preprocess_split_is_seeded_stratified_and_leaves_input_alone() -> None:
    frame = _table().assign(y=lambda f: f["y"].where(f.index != 0))  # one unlabeled row
    before = frame.copy()
    cfg = DataConfig(source="file:x", target="y", test_size=0.2, val_size=0.2)
    s = preprocess(_raw(frame), cfg, seed=0)
    pd.testing.assert_frame_equal(frame, before)
    assert s.dropped_rows == 1
    assert len(s.train) + len(s.val) + len(s.test) == 59
    assert set(s.test["y"]) == {"a", "b", "c"}  # stratified
    again = preprocess(_raw(frame), cfg, seed=0)
    pd.testing.assert_frame_equal(s.test, again.test)
    other = preprocess(_raw(frame), cfg, seed=1)
    assert not s.test.equals(other.test)


def test_preprocess_zero_sizes_reuse_training_rows() -> None:
    raw = ingest(DataConfig(source="synthetic:xor"))
    s = preprocess(raw, DataConfig(source="synthetic:xor", test_size=0, val_size=0), seed=0)
    assert len(s.train) == len(s.val) == len(s.test) == 4


# ---- features -----------------------------------------------------------------------------------
def test_features_fit_on_train_only_and_one_hot() -> None:
    s = preprocess(_raw(_table()), DataConfig(source="file:x", target="y"), seed=0)
    p = build_features(s, FeaturesConfig())
    # numeric scaled with train statistics: train column mean ~0, std ~1; cat one-hot adds 3 columns
    assert p.x_train.shape[1] == 1 + 3 and p.x_train.dtype == np.float32
    assert abs(p.x_train[:, 0].mean()) < 1e-5
    assert p.pipeline.classes == ["a", "b", "c"] and p.y_train.dtype == np.int64
    unseen = s.test.drop(columns="y").head(2).assign(cat="purple")
    with pytest.raises(DataError, match=r"column 'cat' fails its training categories .* found 'purple'"):
        p.pipeline.transform(unseen)  # the saved contract refuses categories never seen in training
    with pytest.raises(DataError, match="missing input column"):
        p.pipeline.transform(s.test.drop(columns=["num"]))


def test_features_impute_missing_numeric_values() -> None:
    frame = _table()
    frame.loc[::5, "num"] = np.nan
    s = preprocess(_raw(frame), DataConfig(source="file:x", target="y"), seed=0)
    p = build_features(s, FeaturesConfig())
    assert np.isfinite(p.x_train).all() and np.isfinite(p.x_test).all()


def test_image_features_are_normalised() -> None:
    raw = ingest(DataConfig(source="sklearn:digits"))
    s = preprocess(raw, DataConfig(source="sklearn:digits"), seed=0)
    p = build_features(s, FeaturesConfig())
    assert p.pipeline.image_shape == (1, 8, 8)
    assert abs(float(p.x_train.mean())) < 1e-4 and abs(float(p.x_train.std()) - 1) < 1e-3


def test_regression_targets_round_trip() -> None:
    raw = ingest(DataConfig(source="sklearn:diabetes"))
    s = preprocess(raw, DataConfig(source="sklearn:diabetes"), seed=0)
    p = build_features(s, FeaturesConfig())
    assert abs(float(p.y_train.mean())) < 1e-5  # learned in standardised units
    assert np.allclose(p.pipeline.decode_target(p.y_test), s.test["target"], atol=1e-3)


# ---- train, evaluate, bundle ---------------------------------------------------------------------
def _train_small(tmp_path: Path, source: str = "sklearn:iris", kind: str = "mlp"):
    cfg = config_from_dict(
        {
            "name": "t",
            "data": {"source": source},
            "model": {"kind": kind},
            "train": {"epochs": 30, "patience": 0, "lr": 0.01},
        }
    )
    p = build_features(preprocess(ingest(cfg.data), cfg.data, 0), cfg.features)
    trained = train(p, cfg.model, cfg.train, seed=0, device=torch.device("cpu"), progress=False)
    return cfg, p, trained


def test_evaluate_classification_metrics_and_plots(tmp_path: Path) -> None:
    _, p, trained = _train_small(tmp_path)
    report = evaluate(trained, p)
    assert set(report.metrics) == {"test_accuracy", "test_f1_macro", "test_precision_macro", "test_recall_macro"}
    assert 0.8 <= report.metrics["test_accuracy"] <= 1.0
    assert set(report.figures) == {"loss_curve.png", "confusion_matrix.png"}
    assert all(png.startswith(b"\x89PNG") for png in report.figures.values())


def test_evaluate_regression_metrics_and_plots(tmp_path: Path) -> None:
    _, p, trained = _train_small(tmp_path, "sklearn:diabetes", "linear")
    report = evaluate(trained, p)
    assert set(report.metrics) == {"test_mse", "test_mae", "test_r2"}
    assert report.metrics["test_r2"] > 0.3  # in target units, not standardised ones
    assert set(report.figures) == {"loss_curve.png", "predicted_vs_actual.png"}


def test_bundle_round_trip_without_pickle(tmp_path: Path) -> None:
    _, p, trained = _train_small(tmp_path)
    bundle = write_bundle(trained, p, "target", tmp_path / "bundle")
    assert sorted(f.name for f in bundle.iterdir()) == [
        "column_transformer.skops",
        "input_schema.json",
        "model.json",
        "preprocessor.json",
        "weights.safetensors",
    ]
    predictor = load_bundle(bundle)
    rows = p.test_frame.drop(columns="target")
    # the contract came back from JSON: it knows the columns and refuses values training never had
    assert set(predictor.pipeline.contract.columns) == set(rows.columns)
    bad = rows.head(3).copy()
    bad.iloc[1, 0] = np.inf
    with pytest.raises(DataError, match=rf"column '{re.escape(rows.columns[0])}' fails finite .* found inf"):
        predictor.predict(bad)
    out = predictor.predict(rows)
    assert list(out.columns) == ["prediction", "proba_0", "proba_1", "proba_2"]
    expected = trained.build()(torch.from_numpy(p.x_test)).argmax(1).numpy()
    assert (out["prediction"].to_numpy() == expected).all()
    assert np.allclose(out.filter(like="proba_").sum(axis=1), 1.0)


class _Payload:
    """Unpickling this runs `open(marker, 'w')`: proof of execution if the file appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("planted", ["evil.pkl", "weights.pt", "model.pickle"])
def test_bundle_refuses_planted_pickles_without_running_them(tmp_path: Path, planted: str) -> None:
    import pickle

    _, p, trained = _train_small(tmp_path)
    bundle = write_bundle(trained, p, "target", tmp_path / "bundle")
    marker = tmp_path / "pwned"
    (bundle / planted).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(DataError, match=f"unexpected file.*{planted}"):
        load_bundle(bundle)
    assert not marker.exists()


def test_bundle_refuses_a_pickle_in_place_of_the_weights(tmp_path: Path) -> None:
    import pickle

    _, p, trained = _train_small(tmp_path)
    bundle = write_bundle(trained, p, "target", tmp_path / "bundle")
    marker = tmp_path / "pwned"
    (bundle / "weights.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(Exception, match=r"(?i)safetensor|header|deserializ"):
        load_bundle(bundle)
    assert not marker.exists()


def test_file_source_reads_a_directory_or_glob_of_files_in_name_order(tmp_path: Path) -> None:
    frame = pd.DataFrame({"x": np.arange(6.0), "y": [0, 1, 0, 1, 0, 1]})
    folder = tmp_path / "training"
    folder.mkdir()
    frame.iloc[3:].to_csv(folder / "b.csv", index=False)
    frame.iloc[:3].to_parquet(folder / "a.parquet")
    for source in (f"file:{folder}", f"file:{folder}/*"):
        raw = ingest(DataConfig(source=source, target="y"))
        assert raw.frame["x"].tolist() == frame["x"].tolist()  # a.parquet, then b.csv
    one = ingest(DataConfig(source=f"file:{folder}/a.parquet", target="y"))
    assert one.digest != raw.digest  # the digest covers every file
    pd.DataFrame({"x": [1.0], "z": [0]}).to_csv(folder / "c.csv", index=False)
    with pytest.raises(DataError, match=r"c\.csv does not have the columns of .*a\.parquet"):
        ingest(DataConfig(source=f"file:{folder}", target="y"))
    with pytest.raises(DataError, match=r"no \.csv or \.parquet files"):
        ingest(DataConfig(source=f"file:{tmp_path}/none/*.parquet", target="y"))


def test_files_of_one_table_must_agree_on_numbers(tmp_path: Path) -> None:
    pd.DataFrame({"x": [1.0, 2.0], "y": [0, 1]}).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame({"x": ["high", "low"], "y": [1, 0]}).to_parquet(tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"column 'x' holds str in .*b\.parquet but float64 in .*a\.parquet"):
        ingest(DataConfig(source=f"file:{tmp_path}", target="y"))


def test_na_text_is_a_value_in_a_text_column_and_missing_in_a_number_column(tmp_path: Path) -> None:
    """pandas' default would read the class 'NA' (or the country code) as missing and drop those rows."""
    from torchcycle.tasks.ingest import read_table

    path = tmp_path / "na.csv"
    path.write_text("x1,color,label,n\n1.5,NA,NA,NA\n2.5,red,US,3\n3,None,FR,\n")
    frame = read_table(path)
    assert frame["label"].tolist() == ["NA", "US", "FR"] and frame["color"].tolist() == ["NA", "red", "None"]
    assert frame["n"].isna().tolist() == [True, False, True] and frame["n"].iloc[1] == 3.0
