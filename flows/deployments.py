"""Scheduled deployments: `retrain` (default nightly), `score` (default hourly) and `tune` (on demand).

`torchcycle serve` runs them in-process on one machine; `torchcycle deploy` registers them with the
Prefect server at PREFECT_API_URL on a process work pool, for `prefect worker start` to pick up.
Schedules come from the command line, else the config's `deployment:` section, else the schedule the
server already has (edited in the UI, say), else the defaults below.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from prefect import flow, get_run_logger

from torchcycle.config import ScheduleSpec, load_config
from torchcycle.flows.scoring import score_files
from torchcycle.flows.training import TrainingSummary, Unchanged, training_flow
from torchcycle.flows.tuning import tune_study
from torchcycle.registry import ModelRef
from torchcycle.tasks.drift import EVENT
from torchcycle.tasks.score import plan_scoring_task
from torchcycle.tracking import resolve_tracking_uri

DEFAULT_SCHEDULES = {
    "retrain": ScheduleSpec("cron", "0 2 * * *", "UTC"),  # nightly, 02:00 UTC
    "score": ScheduleSpec("cron", "0 * * * *", "UTC"),  # hourly
    "tune": ScheduleSpec("off"),  # a study is started when someone asks for one (UI, API, or a schedule set)
}


@flow(name="retrain")
def retrain(
    config_path: str = "configs/digits_cnn.yaml",
    overrides: list[str] | None = None,
    cache: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Train, evaluate, register and gate the experiment in `config_path` (a YAML path on the worker),
    unless the latest version was made from the same data, config and code: then nothing is registered.
    `force=True` trains and registers anyway; `cache=False` also runs every stage again."""
    result = training_flow(load_config(config_path, overrides or []), cache=cache, skip_unchanged=not force)
    if isinstance(result, Unchanged):
        get_run_logger().info("nothing new for %s: %s; nothing registered", result.model_name, result.reason)
        return {"status": "unchanged", "model_name": result.model_name, "model_version": result.model_version}
    return {
        "status": "registered",
        "model_name": result.model_name,
        "model_version": result.model_version,
        "promoted": bool(result.decision and result.decision.promote),
        "run_id": result.run_id,
        "metrics": result.metrics,
    }


@flow(name="score")
def score(
    model: str = "digits-cnn",
    input: str = "data/incoming",
    output: str = "data/scored",
    id_cols: list[str] | None = None,
    dask: str | None = None,
) -> dict[str, Any]:
    """Score every new file under `input` with `model` (NAME = NAME@champion) into the `output` directory.

    One output file per input and model version: files already scored by this version are skipped.
    With nothing to do (no champion yet, no input files, all scored) the run completes with the reason
    and writes no MLflow run. `dask`: a Dask scheduler (tcp://HOST:PORT) to score the files on."""
    plan = plan_scoring_task(resolve_tracking_uri(), ModelRef.parse(model), input, output)
    if plan.idle:
        get_run_logger().info("nothing to score: %s", plan.idle)
        return {"status": "idle", "reason": plan.idle}
    result = score_files(model, input, output, dask=dask, id_cols=id_cols)
    return {
        "status": "scored",
        "model_version": result.model.version,
        "rows": result.rows,
        "scored": [f.output for f in result.files if not f.skipped],
        "skipped": [f.input for f in result.files if f.skipped],
        "run_id": result.scoring_run_id,
    }


@flow(name="tune")
def tune(
    config_path: str = "configs/digits_cnn.yaml",
    overrides: list[str] | None = None,
    trials: int = 20,
    parallel: int = 1,
    study: str | None = None,
    timeout: float | None = None,
    dask: str | None = None,
) -> dict[str, Any]:
    """An Optuna study of the config's tune.space (README: Tuning), then its winner trained, registered and
    gated. `study`: resume or extend that study (None: a new one per run); `dask`: run trials there."""
    s = tune_study(load_config(config_path, overrides or []), trials, parallel, dask, study=study, timeout=timeout)
    winner = s.winner
    return {
        "study": s.study,
        "run_id": s.parent_run_id,
        "flow_run_id": s.flow_run_id,  # the tuning flow run: its trials are its task runs
        "trials": s.counts,
        "best_trial": s.best_number,
        "best_value": s.best_value,
        "best_params": s.best_params,
        "model_version": winner.model_version if winner is not None else None,
        "registered": isinstance(winner, TrainingSummary),
    }


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    flow_name: str  # attribute of this module, also the entrypoint's function
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    schedule: ScheduleSpec | None = None  # None: keep the server's, or the default for a new deployment


def default_specs(
    config_path: str = "configs/digits_cnn.yaml",
    model: str = "digits-cnn",
    score_input: str = "data/incoming",
    score_output: str = "data/scored",
    schedules: dict[str, ScheduleSpec | None] | None = None,
    score_dask: str | None = None,
) -> tuple[DeploymentSpec, ...]:
    schedules = schedules or {}
    score_params: dict[str, Any] = {"model": model, "input": score_input, "output": score_output}
    dask_param = {"dask": score_dask} if score_dask else {}  # the tune deployment runs its trials there too
    score_params.update(dask_param)
    return (
        DeploymentSpec(
            "retrain",
            "retrain",
            "Retrain of the config when its data, config or code changed; the gate decides the champion.",
            {"config_path": config_path, "overrides": []},
            ("torchcycle", "training"),
            schedules.get("retrain"),
        ),
        DeploymentSpec(
            "score",
            "score",
            "Batch scoring of new files with the champion; already scored files are skipped.",
            score_params,
            ("torchcycle", "scoring"),
            schedules.get("score"),
        ),
        DeploymentSpec(
            "tune",
            "tune",
            "An Optuna study of the config's tune.space; the winner is trained, registered and gated.",
            {"config_path": config_path, "overrides": [], "trials": 20, "parallel": 1, **dask_param},
            ("torchcycle", "tuning"),
            schedules.get("tune"),
        ),
    )


def spec_from_server(schedule: Any) -> ScheduleSpec | None:
    """A server-side schedule (CronSchedule / IntervalSchedule) as a ScheduleSpec; None for other kinds."""
    if getattr(schedule, "cron", None):
        return ScheduleSpec("cron", schedule.cron, schedule.timezone or "UTC")
    if getattr(schedule, "interval", None):
        return ScheduleSpec("interval", f"{schedule.interval.total_seconds():g}")
    return None


def prefect_schedules(spec: ScheduleSpec) -> list[Any]:
    from prefect.schedules import Cron, Interval

    if spec.kind == "cron":
        return [Cron(spec.value, timezone=spec.timezone)]
    if spec.kind == "interval":
        return [Interval(timedelta(seconds=float(spec.value)))]
    return []


def resolve_schedules(
    specs: tuple[DeploymentSpec, ...], existing: dict[str, list[Any]]
) -> tuple[tuple[DeploymentSpec, ...], list[str]]:
    """Fill each spec's schedule (given > the server's current one > default) and say what changes.

    `existing`: deployment name -> its server-side schedules (absent: not deployed yet)."""
    out, lines = [], []
    for spec in specs:
        current = existing.get(spec.name)
        now = [spec_from_server(s.schedule) for s in current] if current is not None else None
        now_text = ", ".join(s.describe() if s else "a custom schedule" for s in now) if now else "no schedule"
        if spec.schedule is not None:
            chosen = spec.schedule
        elif now is not None:
            out.append(spec)  # keep whatever the server has, exactly
            lines.append(f"{spec.name}: schedule kept as on the server ({now_text})")
            continue
        else:
            chosen = DEFAULT_SCHEDULES[spec.name]
        if now is None:
            lines.append(f"{spec.name}: new, {chosen.describe()}")
        elif now_text == chosen.describe():
            lines.append(f"{spec.name}: schedule unchanged ({now_text})")
        else:
            lines.append(f"{spec.name}: schedule {now_text} -> {chosen.describe()}")
        out.append(replace(spec, schedule=chosen))
    return tuple(out), lines


def runner_deployments(
    specs: tuple[DeploymentSpec, ...], source: str | None = None, existing: dict[str, list[Any]] | None = None
) -> list[Any]:
    """RunnerDeployments for `prefect.serve` (source=None: this process's flows) or `prefect.deploy`
    (source: the project directory as the worker sees it; the worker runs the flow from there).

    A spec without a schedule carries the server's schedules in `existing` over unchanged. Every
    deployment runs one flow run at a time: a run due while the last one still runs is cancelled, not
    stacked (an hourly score that overruns does not double up)."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    flows = {"retrain": retrain, "score": score}
    out = []
    for spec in specs:
        obj = flows[spec.flow_name]
        if source is not None:
            obj = obj.from_source(source=source, entrypoint=f"flows/deployments.py:{spec.flow_name}")
        if spec.schedule is not None:
            schedules: list[Any] = prefect_schedules(spec.schedule)
        else:
            schedules = [
                DeploymentScheduleCreate(schedule=s.schedule, active=s.active) for s in (existing or {})[spec.name]
            ]
        out.append(
            obj.to_deployment(
                name=spec.name,
                schedules=schedules,
                parameters=spec.parameters,
                tags=list(spec.tags),
                description=spec.description,
                concurrency_limit=ConcurrencyLimitConfig(
                    limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
                ),
            )
        )
    return out


def read_existing(names: tuple[tuple[str, str], ...]) -> dict[str, list[Any]]:
    """Server-side schedules of the deployments `(flow_name, name)` that exist at PREFECT_API_URL."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    out: dict[str, list[Any]] = {}
    with get_client(sync_client=True) as client:
        for flow_name, name in names:
            try:
                out[name] = list(client.read_deployment_by_name(f"{flow_name}/{name}").schedules)
            except ObjectNotFound:
                continue
    return out


# ---- retrain on drift: a Prefect automation -----------------------------------------------------------------
DRIFT_EVENT = EVENT  # the scoring flow's (tasks/drift.py), when a scored batch drifted from the training data
DEFAULT_DRIFT_COOLDOWN_S = 86400.0  # one retrain per drifted day, however many files were scored that day
DRIFT_TAG = "retrain-on-drift"  # marks the automations deploy manages (and may remove)


def drift_automation_name(model_name: str) -> str:
    return f"retrain-on-drift-{model_name}"


def parse_cooldown(value: str | bool | int | float, key: str = "--drift-cooldown") -> float | str:
    """A drift cool-down as the command line or a config gives it: seconds (90, 30s, 15m, 6h, 1d) or
    "off" (no automation). ValueError names `key`. The config's deployment.drift_cooldown goes through
    the same validator (DeploymentSection's), so both accept the same values."""
    from pydantic import ValidationError

    from torchcycle.config import DeploymentSection

    try:
        return DeploymentSection(drift_cooldown=value).drift_cooldown
    except ValidationError as err:
        raise ValueError(f"{key}: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def drift_automation(model_name: str, deployment_id: Any, cooldown_s: float, enabled: bool = True) -> Any:
    """The automation that retrains `model_name` when its scoring reports drift: a reactive EventTrigger on
    DRIFT_EVENT whose resource is that model, threshold 1 within `cooldown_s`; its action runs the retrain
    deployment `deployment_id` with that deployment's own parameters.

    The window is the cool-down. Prefect's trigger service (prefect/server/events/triggers.py, `evaluate`)
    fires a reactive trigger as soon as its bucket holds `threshold` events, removes the bucket and starts
    the next one at max(end of this one, now). Drift events before that start are ignored as "late", so
    the first drift event fires at once and the rest of its window start nothing: at most one retrain per
    window."""
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    # `type` given although it is the default: the client updates with exclude_unset, and the server needs it
    return AutomationCore(
        name=drift_automation_name(model_name),
        description=(
            f"Retrain {model_name} when a scored batch drifted ({DRIFT_EVENT}): the first drift event starts "
            f"the retrain deployment, later ones within {cooldown_s:g} s start nothing. Managed by torchcycle deploy."
        ),
        enabled=enabled,
        tags=["torchcycle", DRIFT_TAG],
        trigger=EventTrigger(
            type="event",
            expect={DRIFT_EVENT},
            match={"torchcycle.model.name": model_name},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(seconds=cooldown_s),
        ),
        actions=[RunDeployment(type="run-deployment", source="selected", deployment_id=deployment_id)],
    )


@dataclass(frozen=True)
class AutomationPlan:
    """What deploy does with a model's drift automation, and the line that says so."""

    line: str
    create: Any = None  # an AutomationCore to create
    update: tuple[Any, Any] | None = None  # (id, AutomationCore): replace that automation's definition
    delete: tuple[Any, ...] = ()  # ids


def _cooldown_of(automation: Any) -> float | None:
    within = getattr(automation.trigger, "within", None)
    return within.total_seconds() if within else None


def _definition(automation: Any) -> dict[str, Any]:
    from prefect.events.schemas.automations import AutomationCore

    return AutomationCore.model_validate(automation.model_dump(exclude={"id"})).model_dump(mode="json")


def plan_drift_automation(
    model_name: str, deployment_id: Any, cooldown: float | str | None, existing: list[Any]
) -> AutomationPlan:
    """Create, update, keep or remove the automation of `model_name`, given the server's automations of
    that name (`existing`, newest first; any beyond the first are duplicates and go).

    `cooldown`: seconds, "off" (remove it), or None (not given: the server's cool-down, else the default).
    Whether the automation is enabled stays as on the server (paused in the UI stays paused)."""
    name = drift_automation_name(model_name)
    current, duplicates = (existing[0], tuple(a.id for a in existing[1:])) if existing else (None, ())
    if cooldown == "off":
        if current is None:
            return AutomationPlan(f"{name}: no automation (drift cool-down off)")
        return AutomationPlan(f"{name}: automation removed (drift cool-down off)", delete=(current.id, *duplicates))
    now = _cooldown_of(current) if current is not None else None
    chosen = float(cooldown) if cooldown is not None else now or DEFAULT_DRIFT_COOLDOWN_S
    desired = drift_automation(model_name, deployment_id, chosen, enabled=current.enabled if current else True)
    paused = "" if desired.enabled else ", paused as on the server"
    if current is None:
        return AutomationPlan(f"{name}: automation created, cool-down {chosen:g} s", create=desired)
    if _definition(current) == _definition(desired):
        kept = " (as on the server)" if cooldown is None else ""
        return AutomationPlan(f"{name}: automation unchanged, cool-down {chosen:g} s{kept}{paused}", delete=duplicates)
    change = f"cool-down {now:g} s -> {chosen:g} s" if now != chosen else f"cool-down {chosen:g} s"
    return AutomationPlan(
        f"{name}: automation updated, {change}{paused}", update=(current.id, desired), delete=duplicates
    )


def stale_drift_automations(model_name: str, related: list[Any]) -> list[Any]:
    """Drift automations deploy made for another model that run this retrain deployment (`related`: the
    automations related to it): it trains `model_name` now, so another model's drift must not start it."""
    name = drift_automation_name(model_name)
    return [a for a in related if DRIFT_TAG in a.tags and a.name != name]


def sync_drift_automation(model_name: str, deployment_id: Any, cooldown: float | str | None) -> list[str]:
    """Apply plan_drift_automation on the server at PREFECT_API_URL; the lines say what was done."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        plan = plan_drift_automation(
            model_name, deployment_id, cooldown, client.read_automations_by_name(drift_automation_name(model_name))
        )
        stale = stale_drift_automations(
            model_name, client.read_resource_related_automations(f"prefect.deployment.{deployment_id}")
        )
        if plan.create is not None:
            client.create_automation(plan.create)
        if plan.update is not None:
            client.update_automation(*plan.update)
        for automation_id in (*plan.delete, *(a.id for a in stale)):
            client.delete_automation(automation_id)
    return [plan.line, *(f"{a.name}: automation removed (this retrain deployment trains {model_name})" for a in stale)]
