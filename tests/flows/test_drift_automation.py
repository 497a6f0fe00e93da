"""Retrain on drift: the Prefect automation `torchcycle deploy` keeps for the retrained model, without a server.

tests/production/test_production.py proves it on a real server and worker: two drift events inside the
cool-down start exactly one retrain, created by the automation, and the worker runs it to COMPLETED."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from typer.testing import CliRunner

from torchcycle.cli import app
from torchcycle.config import config_from_dict
from torchcycle.errors import ConfigError
from torchcycle.flows.deployments import (
    DEFAULT_DRIFT_COOLDOWN_S,
    DRIFT_EVENT,
    drift_automation,
    parse_cooldown,
    plan_drift_automation,
    stale_drift_automations,
)

NAME = "wine-mlp"
DEPLOYMENT = uuid.UUID("00000000-0000-0000-0000-0000000000aa")
BASE = {"name": NAME, "data": {"source": "sklearn:wine"}, "model": {"kind": "mlp"}}


def drift_event(name: str = NAME, version: str = "3", event: str = DRIFT_EVENT):
    """The event the scoring flow emits when a scored batch drifted (resource and payload as specified)."""
    from prefect.server.events.schemas.events import Event

    return Event(
        occurred=datetime.now(UTC),
        event=event,
        resource={
            "prefect.resource.id": f"torchcycle.model-version.{name}.{version}",
            "prefect.resource.name": f"{name} v{version}",
            "torchcycle.model.name": name,
            "torchcycle.model.version": version,
        },
        payload={
            "columns": {"alcohol": 0.61},
            "max_psi": 0.61,
            "threshold": 0.25,
            "prediction_psi": None,
            "rows": 40,
            "scoring_run_id": "abc",
        },
        id=uuid.uuid4(),
    ).receive()


def on_server(core, automation_id: uuid.UUID | None = None):
    """`core` as the server hands it back (prefect.events.schemas.automations.Automation)."""
    from prefect.events.schemas.automations import Automation

    return Automation.model_validate({**core.model_dump(mode="json"), "id": str(automation_id or uuid.uuid4())})


def test_the_automation_runs_the_retrain_deployment_on_drift_of_its_model_only() -> None:
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.server.events.schemas.automations import EventTrigger as ServerTrigger

    core = drift_automation(NAME, DEPLOYMENT, 3600)
    assert core.name == f"retrain-on-drift-{NAME}" and core.enabled and "retrain-on-drift" in core.tags
    trigger = core.trigger
    assert isinstance(trigger, EventTrigger)
    assert trigger.expect == {DRIFT_EVENT} and not trigger.after and not trigger.for_each
    assert trigger.match.model_dump() == {"torchcycle.model.name": NAME}
    assert trigger.posture == Posture.Reactive and trigger.threshold == 1
    assert trigger.within == timedelta(hours=1)  # the cool-down
    assert core.actions == [RunDeployment(source="selected", deployment_id=DEPLOYMENT)]
    assert core.actions[0].parameters is None  # the deployment's own: its config, no force (unchanged = nothing new)
    # Prefect's own server-side matching of the trigger against the scoring flow's event
    served = ServerTrigger.model_validate(trigger.model_dump(mode="json"))
    assert served.covers(drift_event())
    assert served.covers(drift_event(version="4"))  # any version of the model
    assert not served.covers(drift_event(name="digits-cnn"))  # another model's drift retrains nothing here
    assert not served.covers(drift_event(name=f"{NAME}-2"))  # no prefix match
    assert not served.covers(drift_event(event="torchcycle.drift.cleared"))
    # the server's update takes exclude_unset: each union member still says what it is
    sent = core.model_dump(mode="json", exclude_unset=True)
    assert sent["trigger"]["type"] == "event" and sent["actions"][0]["type"] == "run-deployment"
    assert "owner_resource" not in sent  # AutomationUpdate forbids it: a 422


@pytest.mark.parametrize(
    ("given", "seconds"),
    [("30s", 30.0), ("15m", 900.0), ("6h", 21600.0), ("1d", 86400.0), ("90", 90.0), (90, 90.0), ("2.5m", 150.0)],
)
def test_cooldowns_are_durations_like_the_schedule_intervals(given, seconds: float) -> None:
    assert parse_cooldown(given) == seconds
    assert config_from_dict({**BASE, "deployment": {"drift_cooldown": given}}).deployment.drift_cooldown == seconds


@pytest.mark.parametrize("given", ["off", "OFF", "none", False])  # False: YAML's bare off
def test_off_is_no_automation(given) -> None:
    assert parse_cooldown(given) == "off"
    assert config_from_dict({**BASE, "deployment": {"drift_cooldown": given}}).deployment.drift_cooldown == "off"


def test_unset_cooldown_is_none() -> None:
    assert config_from_dict(BASE).deployment.drift_cooldown is None  # deploy: the server's, else one day
    assert DEFAULT_DRIFT_COOLDOWN_S == 86400


@pytest.mark.parametrize("bad", ["0", "0s", "-5m", "soon", "2y", "400d", "0 2 * * *", True, ""])
def test_bad_cooldowns_name_their_key(bad) -> None:
    with pytest.raises(ValueError, match=r"^--drift-cooldown: '.*' is neither a duration of 1 s to a year"):
        parse_cooldown(bad)
    with pytest.raises(ConfigError, match=r"deployment\.drift_cooldown: '.*' is neither a duration"):
        config_from_dict({**BASE, "deployment": {"drift_cooldown": bad}})


def test_a_new_automation_is_created_with_the_default_or_the_given_cooldown() -> None:
    plan = plan_drift_automation(NAME, DEPLOYMENT, None, [])
    assert plan.line == f"retrain-on-drift-{NAME}: automation created, cool-down 86400 s"
    assert plan.create.trigger.within == timedelta(days=1) and plan.update is None and plan.delete == ()
    plan = plan_drift_automation(NAME, DEPLOYMENT, 60.0, [])
    assert plan.create.trigger.within == timedelta(seconds=60) and plan.line.endswith("cool-down 60 s")


def test_the_same_automation_is_left_alone() -> None:
    """The compose worker deploys on every start: nothing changes, not even the open cool-down window (the
    server gives an updated trigger a new id, which would start a fresh window)."""
    existing = [on_server(drift_automation(NAME, DEPLOYMENT, 3600))]
    plan = plan_drift_automation(NAME, DEPLOYMENT, 3600.0, existing)
    assert (plan.create, plan.update, plan.delete) == (None, None, ())
    assert plan.line == f"retrain-on-drift-{NAME}: automation unchanged, cool-down 3600 s"
    kept = plan_drift_automation(NAME, DEPLOYMENT, None, existing)  # not given: the server's (UI edits survive)
    assert kept.update is None and kept.line.endswith("unchanged, cool-down 3600 s (as on the server)")


def test_a_changed_cooldown_or_deployment_updates_it_in_place() -> None:
    current = on_server(drift_automation(NAME, DEPLOYMENT, 3600))
    plan = plan_drift_automation(NAME, DEPLOYMENT, 60.0, [current])
    assert plan.create is None and plan.update[0] == current.id
    assert plan.update[1].trigger.within == timedelta(seconds=60)
    assert plan.line == f"retrain-on-drift-{NAME}: automation updated, cool-down 3600 s -> 60 s"
    other = uuid.uuid4()  # the retrain deployment was deleted and made again: a new id
    moved = plan_drift_automation(NAME, other, None, [current])
    assert moved.update[1].actions[0].deployment_id == other
    assert moved.line == f"retrain-on-drift-{NAME}: automation updated, cool-down 3600 s"


def test_paused_on_the_server_stays_paused_and_duplicates_go() -> None:
    paused = on_server(drift_automation(NAME, DEPLOYMENT, 3600, enabled=False))
    duplicate = on_server(drift_automation(NAME, DEPLOYMENT, 3600))
    plan = plan_drift_automation(NAME, DEPLOYMENT, 3600.0, [paused, duplicate])
    assert plan.update is None and plan.delete == (duplicate.id,)
    assert plan.line.endswith("unchanged, cool-down 3600 s, paused as on the server")
    plan = plan_drift_automation(NAME, DEPLOYMENT, 60.0, [paused])
    assert plan.update[1].enabled is False


def test_off_removes_every_automation_of_that_name() -> None:
    first, second = (on_server(drift_automation(NAME, DEPLOYMENT, s)) for s in (60, 3600))
    plan = plan_drift_automation(NAME, DEPLOYMENT, "off", [first, second])
    assert (plan.create, plan.update, plan.delete) == (None, None, (first.id, second.id))
    assert plan.line == f"retrain-on-drift-{NAME}: automation removed (drift cool-down off)"
    nothing = plan_drift_automation(NAME, DEPLOYMENT, "off", [])
    assert (nothing.create, nothing.update, nothing.delete) == (None, None, ())
    assert nothing.line == f"retrain-on-drift-{NAME}: no automation (drift cool-down off)"


def test_another_models_automation_on_this_deployment_is_stale() -> None:
    """The retrain deployment trains the config's model: a drift automation deploy made for the model it
    trained before would retrain this one on that model's drift."""
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import AutomationCore, EventTrigger

    mine, old = (on_server(drift_automation(n, DEPLOYMENT, 60)) for n in (NAME, "digits-cnn"))
    by_hand = on_server(  # someone's own automation on the same deployment: not deploy's to remove
        AutomationCore(
            name="nightly-extra",
            trigger=EventTrigger(expect={"x"}),
            actions=[RunDeployment(source="selected", deployment_id=DEPLOYMENT)],
        )
    )
    assert stale_drift_automations(NAME, [mine, old, by_hand]) == [old]


@pytest.fixture()
def api_url():
    """A PREFECT_API_URL where nothing answers: these tests must not reach a server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        yield


def test_a_bad_cooldown_option_is_one_error_line(api_url) -> None:
    result = CliRunner().invoke(app, ["deploy", "--drift-cooldown", "whenever"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        "error: --drift-cooldown: 'whenever' is neither a duration of 1 s to a year (90, 30s, 15m, 6h, 1d) nor 'off'"
    )


def test_a_server_refusing_the_automation_is_one_error_line_exit_2(tmp_path, monkeypatch, api_url) -> None:
    """Deploy's deployments went through; the automation call gets a 401: the same line as any refusal."""
    import prefect
    import prefect.client.orchestration as orchestration
    from prefect.exceptions import PrefectHTTPStatusError

    from torchcycle import cli

    class Refusing:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read_automations_by_name(self, name):
            request = httpx.Request("POST", "http://prefect-server:4200/api/automations/filter")
            response = httpx.Response(401, request=request, json={"exception_message": "Unauthorized"})
            error = httpx.HTTPStatusError("401 Unauthorized", request=request, response=response)
            raise PrefectHTTPStatusError.from_httpx_error(error)

    config = tmp_path / "c.yaml"
    config.write_text(f"name: {NAME}\ndata: {{source: 'sklearn:wine'}}\nmodel: {{kind: mlp}}\n")
    monkeypatch.setattr(cli, "_ensure_process_pool", lambda pool: None)
    monkeypatch.setattr(cli, "_with_server_schedules", lambda specs: (specs, [], {}))
    monkeypatch.setattr(cli, "_deployment_id", lambda spec: DEPLOYMENT)
    monkeypatch.setattr(prefect, "deploy", lambda *a, **k: [DEPLOYMENT, uuid.uuid4()])
    monkeypatch.setattr(orchestration, "get_client", lambda **kwargs: Refusing())
    result = CliRunner().invoke(
        app,
        ["deploy", "--config", str(config), "--retrain-schedule", "off", "--score-schedule", "off"],
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the Prefect server refused the request (401"), lines
    assert lines[0].endswith("check PREFECT_API_AUTH_STRING")
