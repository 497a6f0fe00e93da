"""The model bundle register writes and the runtime loads: a round trip without pickle, and planted
pickles refused unopened."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from stage_data import _train_small

from torchcycle.errors import DataError
from torchcycle.runtime.bundle import load_bundle
from torchcycle.tasks.register import write_bundle


def test_bundle_round_trip_without_pickle(tmp_path: Path) -> None:
    _, p, trained = _train_small(tmp_path)
    bundle = write_bundle(trained, p, "target", tmp_path / "bundle")
    assert sorted(f.name for f in bundle.iterdir()) == [
        "column_transformer.skops",
        "drift_reference.json",
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


@pytest.mark.parametrize("dtype", ["float64", "float32", "int64", "Int64", "mixed", "float32+int8", "float32+bool"])
@pytest.mark.parametrize("scale", [True, False])
def test_numeric_transform_is_scikit_learns_bit_for_bit(dtype: str, scale: bool) -> None:
    """Numeric columns, median-imputed and standardised: the pipeline's numpy transform gives scikit-learn's
    numbers exactly (on the columns as the model reads them, torchcycle.runtime.cells), holes included; a
    categorical column or a column empty in training keeps scikit-learn's."""
    import pandas as pd

    from torchcycle.runtime.bundle import FeaturePipeline

    rng = np.random.default_rng(7)
    frame = pd.DataFrame(rng.normal(3.0, 2.5, size=(400, 4)) * 10, columns=["a", "b", "c", "d"])
    if dtype == "mixed":
        frame["b"] = frame["b"].astype("float32")
        frame["c"] = rng.integers(-5, 5, len(frame))
    elif dtype.startswith("float32+"):  # scikit-learn keeps float32 with these: so must the numpy path
        frame = frame.astype("float32")
        small = rng.integers(-5, 5, len(frame))
        frame["c"] = small.astype("int8") if dtype.endswith("int8") else small > 0
    elif dtype in ("int64", "Int64"):
        frame = frame.round().astype(dtype)
    else:
        frame = frame.astype(dtype)
    train = frame.assign(y=rng.integers(0, 2, len(frame)))
    train.loc[::9, "a"] = None  # holes in training: the contract lets them through at scoring too
    pipe = FeaturePipeline.fit(train, "y", "classification", [0, 1], None, scale)
    rows = train.drop(columns="y").iloc[::-1].copy()
    rows.iloc[:50, 0] = None
    assert pipe._affine() is not None
    fast = pipe.transform(rows)
    expected = np.asarray(pipe.transformer.transform(pipe.canonical(rows)[pipe.columns]), dtype=np.float32)
    assert fast.dtype == np.float32 and fast.shape == (len(rows), 4)
    assert np.array_equal(fast, expected) and np.isfinite(fast).all()

    with_text = train.assign(kind=rng.choice(["x", "y"], len(train)))
    assert FeaturePipeline.fit(with_text, "y", "classification", [0, 1], None, scale)._affine() is None
    empty = train.assign(e=np.nan)  # scikit-learn drops a column empty in training
    assert FeaturePipeline.fit(empty, "y", "classification", [0, 1], None, scale)._affine() is None


def test_numeric_fast_path_refuses_what_the_contract_refuses() -> None:
    """The one float array the numeric path checks: a hole where training had holes passes; a hole elsewhere,
    an inf and text in a number column are each refused by the contract with its message, never a numpy error."""
    import pandas as pd

    from torchcycle.runtime.bundle import FeaturePipeline

    rng = np.random.default_rng(3)
    train = pd.DataFrame(rng.normal(size=(300, 3)), columns=["a", "b", "c"]).assign(y=rng.integers(0, 2, 300))
    train.loc[::10, "a"] = np.nan  # nullable: a
    pipe = FeaturePipeline.fit(train, "y", "classification", [0, 1], None, True)
    rows = train.drop(columns="y").head(20).copy()
    assert pipe._affine() is not None and pipe.transform(rows).shape == (20, 3)
    hole = rows.copy()
    hole.loc[5, "b"] = np.nan
    with pytest.raises(DataError, match=r"column 'b'.*null"):
        pipe.transform(hole)
    inf = rows.copy()
    inf.loc[7, "c"] = -np.inf
    with pytest.raises(DataError, match=r"column 'c' fails finite"):
        pipe.transform(inf)
    text = rows.astype({"b": object})
    text.loc[3, "b"] = "1.5x"
    with pytest.raises(DataError, match=r"'b'"):
        pipe.transform(text)
    huge = rows.astype({"b": object})
    huge.loc[4, "b"] = 10**400  # no float holds it
    with pytest.raises(DataError, match=r"'b'"):
        pipe.transform(huge)
