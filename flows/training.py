"""The training flow: ingest -> validate -> preprocess -> features -> train -> evaluate -> register -> gate.

Options of `training_flow`:
- `holdout_path`: also write the test split (features and target, never seen in training) there as Parquet,
  a realistic file to score.
- `cache`: preprocess, features, train and evaluate reuse the results of an earlier run with the same config,
  data and code (Prefect's cache, stored without pickle), so a run that failed at register restarts at
  register. False neither reads nor writes the cache.
- `extra_tags`: more tags for the MLflow run and the registered version (a tuned winner names its study).
- `skip_unchanged`: when the latest registered version has this run's data digest, config hash and code
  version, return `Unchanged` without starting an MLflow run or registering anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact

from torchcycle.cache import cached, stage_keys
from torchcycle.checkpoint import checkpoint_path, remove_checkpoint
from torchcycle.config import ExperimentConfig, check_against_task
from torchcycle.models.training import distributed
from torchcycle.tasks.evaluate import evaluate_task
from torchcycle.tasks.features import features_task
from torchcycle.tasks.gate import Decision, default_metric, gate_task
from torchcycle.tasks.ingest import RawData, ingest_task
from torchcycle.tasks.preprocess import preprocess_task
from torchcycle.tasks.register import lineage_tags, register_task, unchanged_version_task
from torchcycle.tasks.score import write_frame_task
from torchcycle.tasks.train import train_task
from torchcycle.tasks.validate import validate_task
from torchcycle.tracking import (
    MlflowEpochLogger,
    describe_run_task,
    flow_run_id,
    log_datasets_task,
    log_evaluation_task,
    log_facts_task,
    log_history_task,
    resolve_tracking_uri,
    tracked_run,
    use_tracking_uri,
)


@dataclass(frozen=True)
class TrainingSummary:
    run_id: str
    model_name: str
    model_version: str
    model_uri: str
    metrics: dict[str, float]
    tracking_uri: str
    flow_run_id: str | None
    device: str
    epochs: int
    decision: Decision | None = None
    holdout_path: str | None = None  # held-out test rows as Parquet, when asked for


def summary_markdown(config: ExperimentConfig, s: TrainingSummary) -> str:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(s.metrics.items()))
    return (
        f"# {config.name}: version {s.model_version}\n\n"
        f"MLflow run `{s.run_id}` · model `{s.model_uri}` · {s.epochs} epochs on {s.device}\n\n"
        f"Gate: {'promoted to champion' if s.decision and s.decision.promote else 'kept as challenger'}"
        f" ({s.decision.reason if s.decision else 'not run'})\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n"
    )


@dataclass(frozen=True)
class Unchanged:
    """A retrain that found nothing new: the latest version was made from the same data, config and code."""

    model_name: str
    model_version: str
    reason: str


@flow(name="training")
def training_flow(
    config: ExperimentConfig,
    tracking_uri: str | None = None,
    holdout_path: str | None = None,
    cache: bool = True,
    skip_unchanged: bool = False,
    extra_tags: dict[str, str] | None = None,
) -> TrainingSummary | Unchanged:
    """Train, evaluate, register and gate one experiment (the module docstring says what each option does)."""
    uri = resolve_tracking_uri(tracking_uri)
    use_tracking_uri(uri)
    # Bad data stops here, before an MLflow run exists: nothing is written for input that cannot train.
    raw = ingest_task(config.data)
    validate_task(raw)
    check_against_task(config, raw.task)  # model kind and gate metric against the task the data turned out to be
    lineage = lineage_tags(raw.digest, config.config_hash())
    same = unchanged_version_task(uri, config.name, lineage) if skip_unchanged else None
    if same is not None:
        return Unchanged(config.name, same, f"data, config and code are those of version {same}")
    ckpt = checkpoint_path(config.name, config.config_hash(), raw.digest)
    tags = {**run_tags(config), **(extra_tags or {})}
    with tracked_run(uri, config.experiment, run_name(config.name), config.flat_params(), tags) as run_id:
        summary = _tracked(config, raw, uri, run_id, cache, holdout_path, extra_tags or {})
        describe_run_task(uri, run_id, summary_markdown(config, summary))
    remove_checkpoint(ckpt)  # registered and gated: nothing left to resume
    create_markdown_artifact(
        markdown=summary_markdown(config, summary),
        key="training-summary",
        description=f"{config.name} v{summary.model_version}",
    )
    return summary


def _tracked(
    config: ExperimentConfig,
    raw: RawData,
    uri: str,
    run_id: str,
    cache: bool,
    holdout: str | None,
    extra_tags: dict[str, str],
) -> TrainingSummary:
    """preprocess -> features -> train -> evaluate -> register -> gate, inside MLflow run `run_id`."""
    world = distributed()[1]
    key = stage_keys(config.config_hash(), raw.digest, world, enabled=cache)
    splits = cached(preprocess_task, key("preprocess"))(raw, config.data, config.seed)
    prepared = cached(features_task, key("features"))(splits, config.features, config.drift)
    log_datasets_task(uri, run_id, splits.named(), name=config.name, source=config.data.source, target=raw.target)
    log_facts_task(uri, run_id, *splits.facts())
    if holdout:
        write_frame_task(prepared.test_frame, Path(holdout))
    ckpt = checkpoint_path(config.name, config.config_hash(), raw.digest)
    # Under DDP every rank must take part in training, so rank 0 never takes it from the cache.
    trained = cached(train_task, key("train") if world == 1 else None)(
        prepared, config.model, config.train, config.seed, MlflowEpochLogger(MlflowClient(uri), run_id), ckpt
    )
    log_history_task(uri, run_id, trained.fit.history)  # epochs trained by an earlier run
    log_facts_task(uri, run_id, trained.resolved_params())
    report = cached(evaluate_task, key("evaluate"))(trained, prepared)
    log_evaluation_task(uri, run_id, report.metrics, report.figures)
    tags = {**lineage_tags(raw.digest, config.config_hash()), "prefect_flow_run_id": flow_run_id(), **extra_tags}
    reg = register_task(trained, prepared, raw.target, tracking_uri=uri, run_id=run_id, name=config.name, tags=tags)
    metric = config.gate.metric or default_metric(raw.task)
    decision = gate_task(
        tracking_uri=uri,
        name=reg.name,
        version=reg.version,
        metric=metric,
        challenger_value=report.metrics[metric],
        margin=config.gate.margin,
        test_frame=prepared.test_frame,
        target=raw.target,
        flow_run_id=flow_run_id(),
    )
    return TrainingSummary(
        run_id=run_id,
        model_name=reg.name,
        model_version=reg.version,
        model_uri=reg.model_uri,
        metrics=report.metrics,
        tracking_uri=uri,
        flow_run_id=flow_run_id() or None,
        device=trained.device,
        epochs=len(trained.fit.history),
        decision=decision,
        holdout_path=holdout,
    )


def run_name(name: str) -> str:
    return f"{name}-{runtime.flow_run.name or 'local'}"


def run_tags(config: ExperimentConfig) -> dict[str, str]:
    """The MLflow run's tags: which Prefect flow run made it, from which config, on how many DDP ranks."""
    return {
        "prefect.flow_run_id": flow_run_id(),
        "prefect.flow_run_name": str(runtime.flow_run.name or ""),
        "torchcycle.config_hash": config.config_hash(),
        "torchcycle.model_kind": config.model.kind,
        "torchcycle.world_size": str(distributed()[1]),  # >1: trained with torch DDP, logged by rank 0 only
    }
