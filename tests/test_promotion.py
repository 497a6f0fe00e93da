"""Promotion gate and model-version lifecycle."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.training import training_flow
from tasks import registry
from tasks.config import config_from_dict
from tasks.promote import should_promote
from torchcycle.cli import app


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

    from tasks.promote import gate_task

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
