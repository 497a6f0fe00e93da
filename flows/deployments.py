"""Scheduled deployments: `retrain` (nightly) and `score` (hourly), defined in code.

`torchcycle serve` runs them in-process on one machine; `torchcycle deploy` registers them with the
Prefect server at PREFECT_API_URL on a process work pool, for `prefect worker start` to pick up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect import flow

from flows.scoring import scoring_flow
from flows.training import training_flow
from tasks.config import load_config


@flow(name="retrain")
def retrain(
    config_path: str = "configs/digits_cnn.yaml", overrides: list[str] | None = None, cache: bool = True
) -> dict[str, Any]:
    """Train, evaluate, register and gate the experiment in `config_path` (a YAML path on the worker).
    Unchanged data and config reuse the cached stages; `cache=False` trains again regardless."""
    summary = training_flow(load_config(config_path, overrides or []), cache=cache)
    return {
        "model_name": summary.model_name,
        "model_version": summary.model_version,
        "promoted": bool(summary.decision and summary.decision.promote),
        "run_id": summary.run_id,
        "metrics": summary.metrics,
    }


@flow(name="score")
def score(
    model: str = "digits-cnn",
    input: str = "data/incoming",
    output: str = "data/scored",
    id_cols: list[str] | None = None,
) -> dict[str, Any]:
    """Score every new file under `input` with `model` (NAME = NAME@champion) into the `output` directory.

    One output file per input and model version: files already scored by this version are skipped,
    so an hourly schedule only does new work."""
    result = scoring_flow(model, input, output, id_cols)
    return {
        "model_version": result.model.version,
        "rows": result.rows,
        "scored": [f.output for f in result.files if not f.skipped],
        "skipped": [f.input for f in result.files if f.skipped],
        "run_id": result.scoring_run_id,
    }


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    flow_name: str  # attribute of this module, also the entrypoint's function
    cron: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()


def default_specs(
    config_path: str = "configs/digits_cnn.yaml",
    model: str = "digits-cnn",
    score_input: str = "data/incoming",
    score_output: str = "data/scored",
) -> tuple[DeploymentSpec, ...]:
    return (
        DeploymentSpec(
            "retrain",
            "retrain",
            "0 2 * * *",  # nightly, 02:00 UTC
            "Nightly retrain of the default config; the gate decides whether it becomes champion.",
            {"config_path": config_path, "overrides": []},
            ("torchcycle", "training"),
        ),
        DeploymentSpec(
            "score",
            "score",
            "0 * * * *",  # hourly
            "Hourly batch scoring of new files with the champion; already scored files are skipped.",
            {"model": model, "input": score_input, "output": score_output},
            ("torchcycle", "scoring"),
        ),
    )


def runner_deployments(specs: tuple[DeploymentSpec, ...], source: str | None = None) -> list[Any]:
    """RunnerDeployments for `prefect.serve` (source=None: this process's flows) or `prefect.deploy`
    (source: the project directory as the worker sees it; the worker runs the flow from there)."""
    from prefect.schedules import Cron

    flows = {"retrain": retrain, "score": score}
    out = []
    for spec in specs:
        obj = flows[spec.flow_name]
        if source is not None:
            obj = obj.from_source(source=source, entrypoint=f"flows/deployments.py:{spec.flow_name}")
        out.append(
            obj.to_deployment(
                name=spec.name,
                schedules=[Cron(spec.cron, timezone="UTC")],
                parameters=spec.parameters,
                tags=list(spec.tags),
                description=spec.description,
            )
        )
    return out
