"""The stage cache's serializer and keys: every stage output round-trips without pickle, and a stored
record that is not ours (a pickle, a class outside torchcycle) is refused without being executed."""

from __future__ import annotations

import base64
import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from torchcycle.cache import SafeSerializer, cached, stage_key
from torchcycle.config import DataConfig, FeaturesConfig, ModelSpec, TrainSection
from torchcycle.errors import DataError
from torchcycle.tasks.evaluate import evaluate
from torchcycle.tasks.features import build_features
from torchcycle.tasks.ingest import ingest
from torchcycle.tasks.preprocess import preprocess
from torchcycle.tasks.train import train


@pytest.fixture(scope="module")
def stages():
    """Real outputs of each cached stage on the wine data (categorical-free) and a toy mixed table."""
    data = DataConfig(source="sklearn:wine")
    splits = preprocess(ingest(data), data, seed=0)
    prepared = build_features(splits, FeaturesConfig())
    spec = ModelSpec(kind="mlp", hidden=[16])
    trained = train(
        prepared, spec, TrainSection(epochs=3, patience=0), seed=0, device=torch.device("cpu"), progress=False
    )
    return splits, prepared, trained, evaluate(trained, prepared)


def _roundtrip(obj):
    blob = SafeSerializer().dumps(obj)
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(blob))) as zf:
        for name in zf.namelist():  # nothing inside is a pickle stream (protocol 2+ starts with 0x80)
            assert not zf.read(name).startswith(b"\x80"), name
    return SafeSerializer().loads(blob)


def test_every_stage_output_roundtrips(stages) -> None:
    splits, prepared, trained, report = stages
    s2 = _roundtrip(splits)
    pd.testing.assert_frame_equal(s2.train, splits.train)
    assert (s2.target, s2.task, s2.image_shape) == (splits.target, splits.task, splits.image_shape)

    p2 = _roundtrip(prepared)
    np.testing.assert_array_equal(p2.x_train, prepared.x_train)
    np.testing.assert_array_equal(p2.y_test, prepared.y_test)
    pd.testing.assert_frame_equal(p2.test_frame, prepared.test_frame)
    # the fitted scikit-learn pipeline and the data contract came back working
    np.testing.assert_allclose(p2.pipeline.transform(prepared.test_frame), prepared.x_test, rtol=1e-6)
    with pytest.raises(DataError, match="missing input column"):
        p2.pipeline.transform(prepared.test_frame.drop(columns=prepared.test_frame.columns[0]))

    t2 = _roundtrip(trained)
    assert t2.config == trained.config and t2.fit == trained.fit
    for k, v in trained.state_dict.items():
        assert torch.equal(t2.state_dict[k], v)
    x = torch.tensor(prepared.x_test)
    assert torch.equal(t2.build()(x), trained.build()(x))

    r2 = _roundtrip(report)
    assert r2.metrics == report.metrics and r2.figures == report.figures


def test_keys_change_with_config_data_and_world_size() -> None:
    base = stage_key("train", "cfg", "data")
    assert base == stage_key("train", "cfg", "data")
    others = [
        stage_key("evaluate", "cfg", "data"),
        stage_key("train", "cfg2", "data"),
        stage_key("train", "cfg", "data2"),
        stage_key("train", "cfg", "data", world_size=2),
    ]
    assert len({base, *others}) == 5


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.target),))


@pytest.mark.usefixtures("prefect_harness")
def test_a_planted_pickle_record_is_refused_without_running(tmp_path: Path, monkeypatch) -> None:
    """Prefect decodes a record with the serializer the file names; the key function refuses it first,
    Prefect logs that refusal and the stage simply runs again."""
    from prefect import flow, task

    monkeypatch.setenv("TORCHCYCLE_CACHE_DIR", str(tmp_path / "cache"))
    _Payload.target = str(tmp_path / "pwned")
    payload = base64.b64encode(pickle.dumps(_Payload())).decode()
    key = stage_key("train", "cfg", "data")
    (tmp_path / "cache").mkdir()
    record = {"metadata": {"serializer": {"type": "pickle", "picklelib": "pickle"}}, "result": payload}
    (tmp_path / "cache" / key).write_text(json.dumps(record))
    runs = []

    @task
    def stage() -> int:
        runs.append(1)
        return 41 + len(runs)

    @flow
    def pipeline() -> int:
        return cached(stage, key)()

    assert pipeline() == 42  # computed, not the planted result
    assert runs == [1]
    assert not (tmp_path / "pwned").exists()
    # the refusal itself (Prefect logs it and then runs the stage uncached)
    with pytest.raises(DataError, match=r"refusing cached result .* serializer 'pickle'"):
        cached(stage, key).cache_policy.cache_key_fn(None, {})


def test_a_tree_naming_a_foreign_class_is_refused() -> None:
    tree = {"$": "dataclass", "cls": "subprocess:Popen", "fields": {"args": ["touch", "/tmp/x"]}}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("tree.json", json.dumps(tree))
    with pytest.raises(DataError, match="refusing to build subprocess:Popen"):
        SafeSerializer().loads(base64.b64encode(buf.getvalue()))
    with pytest.raises(DataError, match="cached result is corrupt"):
        SafeSerializer().loads(b"not base64 at all!")


def test_objects_that_would_need_pickle_are_not_cached() -> None:
    with pytest.raises(TypeError, match="cannot cache a set"):
        SafeSerializer().dumps({"a": {1, 2}})
    with pytest.raises(ValueError):  # object arrays need pickle; np.save refuses with allow_pickle=False
        SafeSerializer().dumps(np.array([object()], dtype=object))
