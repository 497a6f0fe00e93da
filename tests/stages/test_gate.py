"""Promotion gate and model-version lifecycle."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from torchcycle import registry
from torchcycle.cli import app
from torchcycle.config import config_from_dict
from torchcycle.flows.training import training_flow
from torchcycle.tasks.gate import should_promote


# ---- the pure decision ----------------------------------------------------------------------------
def test_first_version_becomes_champion() -> None:
    d = should_promote("test_accuracy", 0.5, None)
    assert d.promote and "first version" in d.reason


@pytest.mark.parametrize(
    ("new", "old", "margin", "promote"),
    [
        (0.95, 0.90, 0.0, True),
        (0.90, 0.95, 0.0, False),
        (0.90, 0.90, 0.0, False),  # a tie keeps the champion
        (0.92, 0.90, 0.05, False),
        (0.96, 0.90, 0.05, True),
        (math.nan, 0.9, 0.0, False),
    ],
)
def test_higher_is_better(new: float, old: float, margin: float, promote: bool) -> None:
    d = should_promote("test_accuracy", new, old, margin, "1")
    assert d.promote is promote
    assert d.champion == old and d.champion_version == "1" and d.metric in d.reason


def test_lower_is_better_for_errors() -> None:
    assert should_promote("test_mse", 1.0, 2.0, 0.0, "1").promote
    assert not should_promote("test_mse", 2.0, 1.0, 0.0, "1").promote


# ---- through the flow and the registry -------------------------------------------------------------
def _cfg(*sets: str):
    raw = {
        "name": "gate-test",
        "experiment": "tests",
        "data": {"source": "sklearn:iris"},
        "model": {"kind": "mlp", "hidden": [16]},
        "train": {"epochs": 40, "patience": 0, "lr": 0.01},
    }
    return config_from_dict(raw, list(sets))


@pytest.mark.usefixtures("prefect_harness")
def test_worse_model_is_never_promoted_and_lifecycle_commands(tracking_uri: str, monkeypatch) -> None:
    client = MlflowClient(tracking_uri)
    first = training_flow(_cfg(), tracking_uri=tracking_uri)
    assert first.decision.promote
    assert str(client.get_model_version_by_alias("gate-test", "champion").version) == "1"

    # Deliberately degraded challenger: one epoch at a tiny learning rate is near chance on iris.
    worse = training_flow(_cfg("train.epochs=1", "train.lr=0.00001"), tracking_uri=tracking_uri)
    assert not worse.decision.promote
    assert worse.decision.champion is not None and worse.decision.challenger < worse.decision.champion
    assert str(client.get_model_version_by_alias("gate-test", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("gate-test", "challenger").version) == "2"
    tags = client.get_model_version("gate-test", "2").tags
    assert tags["validation_status"] == "rejected" and tags["gate_metric"] == "test_accuracy"
    assert float(tags["gate_champion_value"]) > float(tags["gate_challenger_value"])
    assert tags["gate_flow_run_id"] == worse.flow_run_id and tags["gate_reason"]
    assert client.get_model_version("gate-test", "1").tags["validation_status"] == "passed"

    rows = registry.list_versions(client, "gate-test")
    assert [(r.version, r.aliases, r.status) for r in rows] == [
        ("2", ("challenger",), "rejected"),
        ("1", ("champion",), "passed"),
    ]

    # CLI: manual promotion, rollback, and errors that change nothing
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    runner = CliRunner()
    listed = runner.invoke(app, ["models", "gate-test"])
    assert listed.exit_code == 0 and "challenger" in listed.output and "rejected" in listed.output
    promoted = runner.invoke(app, ["promote", "gate-test", "2"])
    assert promoted.exit_code == 0, promoted.output
    assert str(client.get_model_version_by_alias("gate-test", "champion").version) == "2"
    assert client.get_model_version("gate-test", "2").tags["validation_status"] == "manual"
    rolled = runner.invoke(app, ["rollback", "gate-test"])
    assert rolled.exit_code == 0 and "v2 -> v1" in rolled.output
    assert str(client.get_model_version_by_alias("gate-test", "champion").version) == "1"
    assert client.get_model_version("gate-test", "1").tags["rolled_back_from"] == "2"

    for args, needle in (
        (["promote", "gate-test", "99"], "has no version 99"),
        (["promote", "nope", "1"], "no registered model named 'nope'"),
        (["rollback", "gate-test"], "no previous champion"),
        (["models", "nope"], "no registered model named 'nope'"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and needle in result.output, (args, result.output)
    assert str(client.get_model_version_by_alias("gate-test", "champion").version) == "1"


@pytest.mark.usefixtures("prefect_harness")
def test_concurrent_gates_are_serialised_one_champion_both_recorded(tracking_uri: str, tmp_path) -> None:
    """Two gates of one model at once: the second sees the first's result, not the stale champion."""
    import pandas as pd
    from prefect import flow

    from torchcycle.tasks.gate import gate_task

    cfg = config_from_dict(
        {
            "name": "race",
            "experiment": "tests",
            "data": {"source": "sklearn:wine"},
            "model": {"kind": "mlp", "hidden": [8]},
            "train": {"epochs": 5, "patience": 0, "lr": 0.01},
        }
    )
    holdout = tmp_path / "holdout.parquet"
    training_flow(cfg, tracking_uri=tracking_uri, holdout_path=str(holdout))  # v1, champion
    training_flow(cfg, tracking_uri=tracking_uri)  # v2
    training_flow(cfg, tracking_uri=tracking_uri)  # v3
    client = MlflowClient(tracking_uri)
    client.set_registered_model_alias("race", "champion", "1")
    test_frame = pd.read_parquet(holdout)

    @flow
    def two_gates() -> None:
        common = {"tracking_uri": tracking_uri, "name": "race", "metric": "test_accuracy", "margin": 0.0}
        common |= {"test_frame": test_frame, "target": "target", "flow_run_id": "race-test"}
        # challenger values above any real accuracy: each gate promotes over whatever champion it sees
        futures = [gate_task.submit(version=v, challenger_value=2.0, **common) for v in ("2", "3")]
        for f in futures:
            f.result()

    two_gates()
    tags = {v: client.get_model_version("race", v).tags for v in ("2", "3")}
    assert all(t["gate_flow_run_id"] == "race-test" and t["validation_status"] == "passed" for t in tags.values())
    seen = {v: t["gate_champion_version"] for v, t in tags.items()}
    first = next(v for v, c in seen.items() if c == "1")  # only one gate saw the old champion
    second = "3" if first == "2" else "2"
    assert seen[second] == first  # the other waited and compared against the first one's result
    assert str(client.get_model_version_by_alias("race", "champion").version) == second


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_gate_lock_lets_one_gate_of_a_model_in_at_a_time(store: str, tmp_path) -> None:
    """The embedded store's file lock and a server store's Prefect limit: holders of one model never overlap,
    another model's gate does not wait for them."""
    import itertools
    import threading
    import time

    from torchcycle.tasks.gate import gate_lock

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if store == "sqlite" else "http://mlflow.invalid:5000"
    spans: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}

    def hold(name: str) -> None:
        with gate_lock(name, uri):
            start = time.monotonic()
            time.sleep(0.3)
            spans[name].append((start, time.monotonic()))

    threads = [threading.Thread(target=hold, args=(n,)) for n in ("a", "a", "a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a = sorted(spans["a"])
    assert len(a) == 3 and all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(a)), a
    (b,) = spans["b"]
    assert b[0] < a[-1][0], "model b's gate waited for model a's"


# ---- retries: a retried register or gate makes no second version, decision or history entry -------
@pytest.fixture(scope="module")
def tiny():
    """iris, softmax, 2 epochs: a real model in about a second, for tests that need one in the registry."""
    import torch

    from torchcycle.tasks.features import build_features
    from torchcycle.tasks.ingest import ingest
    from torchcycle.tasks.preprocess import preprocess
    from torchcycle.tasks.train import train

    cfg = config_from_dict(
        {"name": "tiny", "data": {"source": "sklearn:iris"}, "model": {"kind": "softmax"}, "train": {"epochs": 2}}
    )
    prepared = build_features(preprocess(ingest(cfg.data), cfg.data, cfg.seed), cfg.features)
    trained = train(prepared, cfg.model, cfg.train, seed=cfg.seed, device=torch.device("cpu"), progress=False)
    return prepared, trained


def _new_run(uri: str) -> str:
    from torchcycle.tracking import prepare_store, start_run_task

    prepare_store(uri)
    return start_run_task.fn(uri, "tests", "retry", {}, {})


def _register(uri: str, tiny, tmp_path, name: str, run_id: str | None = None):
    from torchcycle.tasks.register import input_example, register_model, write_bundle

    prepared, trained = tiny
    bundle = write_bundle(trained, prepared, "target", Path(tempfile.mkdtemp(dir=tmp_path)) / "bundle")
    return register_model(
        tracking_uri=uri,
        run_id=run_id or _new_run(uri),
        name=name,
        bundle_dir=bundle,
        example=input_example(prepared, "target"),
        tags={"origin": "test"},
    )


def _versions(client: MlflowClient, name: str) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'"))


def _logged_models(client: MlflowClient, run_id: str) -> list:
    experiment_id = client.get_run(run_id).info.experiment_id
    return client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")


def test_register_twice_from_one_run_is_one_version(tracking_uri: str, tiny, tmp_path) -> None:
    run_id = _new_run(tracking_uri)
    first = _register(tracking_uri, tiny, tmp_path, "once", run_id)
    again = _register(tracking_uri, tiny, tmp_path, "once", run_id)  # a retry after the first attempt succeeded
    client = MlflowClient(tracking_uri)
    assert again == first and first.version == "1"
    assert _versions(client, "once") == ["1"] and len(_logged_models(client, run_id)) == 1
    assert client.get_model_version("once", "1").tags["origin"] == "test"


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("lost", ["after-registering", "before-registering"])
def test_register_task_retried_after_a_partial_success_is_one_version(
    tracking_uri: str, tiny, monkeypatch, lost: str
) -> None:
    """The first attempt fails once the model is logged: with the version made (the server's answer was
    lost), or before it. Prefect retries the task; the run ends with one logged model and one version."""
    from prefect import flow

    from torchcycle.tasks.register import register_task

    real_register = MlflowClient.create_model_version
    calls: list[str] = []

    def flaky(self, name, source, *args, **kwargs):
        calls.append(source)
        if len(calls) == 1:
            if lost == "after-registering":
                real_register(self, name, source, *args, **kwargs)
            raise ConnectionError("connection reset by peer")
        return real_register(self, name, source, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_model_version", flaky)
    prepared, trained = tiny
    run_id = _new_run(tracking_uri)
    retrying = register_task.with_options(retry_delay_seconds=0)

    @flow
    def register_once():
        return retrying(trained, prepared, "target", tracking_uri=tracking_uri, run_id=run_id, name="flaky", tags={})

    reg = register_once()
    client = MlflowClient(tracking_uri)
    assert reg.version == "1" and _versions(client, "flaky") == ["1"]
    assert len(_logged_models(client, run_id)) == 1  # the retry registered what the first attempt logged
    # after: the retry found the version and registered nothing; before: it registered the same logged model
    assert calls == [calls[0]] * (1 if lost == "after-registering" else 2)


def _gate(client: MlflowClient, uri: str, tiny, name: str, version: str, value: float, flow_run_id: str):
    from torchcycle.tasks.gate import decide_and_record

    prepared = tiny[0]
    return decide_and_record(
        client, uri, name, version, "test_accuracy", value, 0.0, prepared.test_frame, "target", flow_run_id
    )


def _champion(client: MlflowClient, name: str) -> str:
    return str(client.get_model_version_by_alias(name, "champion").version)


def _history(client: MlflowClient, name: str) -> list[str]:
    return registry.champion_history(client.get_registered_model(name))


def _same_decision(a, b) -> bool:
    """Equal, the scores to the 6 significant digits the tags keep."""

    def kept(d):
        champion = None if d.champion is None else float(f"{d.champion:.6g}")
        return dataclasses.replace(d, challenger=float(f"{d.challenger:.6g}"), champion=champion)

    return kept(a) == kept(b)


def test_gate_twice_returns_the_recorded_decision(tracking_uri: str, tiny, tmp_path, monkeypatch) -> None:
    import mlflow

    from torchcycle.tasks.gate import recorded_decision

    client = MlflowClient(tracking_uri)
    for _ in range(2):
        _register(tracking_uri, tiny, tmp_path, "twice")
    assert _gate(client, tracking_uri, tiny, "twice", "1", 0.5, "flow-1").promote  # first version
    decided = _gate(client, tracking_uri, tiny, "twice", "2", 2.0, "flow-2")  # 2.0 beats any real accuracy
    assert decided.promote and decided.champion_version == "1"
    tags = client.get_model_version("twice", "2").tags

    def no_scoring(*args, **kwargs):
        raise AssertionError("a retried gate scored the champion again")

    monkeypatch.setattr(mlflow.pyfunc, "load_model", no_scoring)
    # the task retried after the first attempt succeeded; a lower value proves nothing is decided again
    again = _gate(client, tracking_uri, tiny, "twice", "2", 0.0, "flow-2")
    assert _same_decision(again, decided) and again == recorded_decision(tags)
    assert client.get_model_version("twice", "2").tags == tags
    assert _champion(client, "twice") == "2" and _history(client, "twice") == ["1"]


def test_gate_retried_after_crashes_moves_the_alias_once(tracking_uri: str, tiny, tmp_path, monkeypatch) -> None:
    """Attempt 1 dies halfway through the tags, attempt 2 after the tags and the history entry but before
    the alias moves, attempt 3 finishes: one decision, one history entry, champion moved once."""
    client = MlflowClient(tracking_uri)
    for _ in range(3):
        _register(tracking_uri, tiny, tmp_path, "crash")
    _gate(client, tracking_uri, tiny, "crash", "1", 0.5, "flow-1")

    def fail_at(method: str, call: int) -> None:
        real, calls = getattr(client, method), []

        def flaky(*args):
            calls.append(args)
            if len(calls) == call:
                raise ConnectionError("connection reset by peer")
            return real(*args)

        monkeypatch.setattr(client, method, flaky)

    fail_at("set_model_version_tag", 3)
    with pytest.raises(ConnectionError):
        _gate(client, tracking_uri, tiny, "crash", "2", 2.0, "flow-2")
    assert "gate_flow_run_id" not in client.get_model_version("crash", "2").tags  # not recorded: decide again
    monkeypatch.undo()

    fail_at("set_registered_model_alias", 1)
    with pytest.raises(ConnectionError):
        _gate(client, tracking_uri, tiny, "crash", "2", 2.0, "flow-2")
    assert client.get_model_version("crash", "2").tags["gate_flow_run_id"] == "flow-2"  # recorded
    assert _champion(client, "crash") == "1" and _history(client, "crash") == ["1"]  # alias not moved yet
    monkeypatch.undo()

    decided = _gate(client, tracking_uri, tiny, "crash", "2", 2.0, "flow-2")
    assert decided.promote and _champion(client, "crash") == "2" and _history(client, "crash") == ["1"]

    # A rejected version: its retry leaves `challenger` where it is, and history alone.
    rejected = _gate(client, tracking_uri, tiny, "crash", "3", -1.0, "flow-3")
    assert not rejected.promote and str(client.get_model_version_by_alias("crash", "challenger").version) == "3"
    assert _same_decision(_gate(client, tracking_uri, tiny, "crash", "3", 2.0, "flow-3"), rejected)
    assert _champion(client, "crash") == "2" and _history(client, "crash") == ["1"]

    # Another flow run gating an already gated version is no retry: it decides afresh.
    registry.rollback(client, "crash")  # champion v1 again
    assert not _gate(client, tracking_uri, tiny, "crash", "2", -1.0, "flow-4").promote
    tags = client.get_model_version("crash", "2").tags
    assert tags["validation_status"] == "rejected" and tags["gate_flow_run_id"] == "flow-4"
    assert _champion(client, "crash") == "1" and _history(client, "crash") == []


@pytest.mark.usefixtures("prefect_harness")
def test_gate_task_retried_after_recording_returns_the_same_decision(
    tracking_uri: str, tiny, tmp_path, monkeypatch
) -> None:
    """The Prefect task fails after the decision is recorded (its artifact could not be written); the
    retry returns the decision without a second history entry."""
    import prefect.artifacts
    from prefect import flow

    from torchcycle.tasks.gate import gate_task

    client = MlflowClient(tracking_uri)
    for _ in range(2):
        _register(tracking_uri, tiny, tmp_path, "artifact")
    _gate(client, tracking_uri, tiny, "artifact", "1", 0.5, "flow-1")
    real_artifact = prefect.artifacts.create_markdown_artifact
    calls: list[str] = []

    def flaky(*args, **kwargs):
        calls.append(kwargs["markdown"])
        if len(calls) == 1:
            raise ConnectionError("Prefect API unreachable")
        return real_artifact(*args, **kwargs)

    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", flaky)
    retrying = gate_task.with_options(retry_delay_seconds=0)

    @flow
    def gate_once():
        return retrying(
            tracking_uri=tracking_uri,
            name="artifact",
            version="2",
            metric="test_accuracy",
            challenger_value=2.0,
            margin=0.0,
            test_frame=tiny[0].test_frame,
            target="target",
            flow_run_id="flow-2",
        )

    decision = gate_once()
    assert decision.promote and len(calls) == 2 and calls[0] == calls[1]  # the same decision, reported twice
    assert _champion(client, "artifact") == "2" and _history(client, "artifact") == ["1"]
