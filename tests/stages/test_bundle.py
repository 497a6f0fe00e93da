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
