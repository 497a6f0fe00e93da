"""The training flow: ingest -> validate -> preprocess -> features -> train -> evaluate -> register."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact

from models.training import distributed
from tasks.checkpoint import checkpoint_path, remove_checkpoint
from tasks.config import ExperimentConfig, check_against_task
from tasks.evaluate import evaluate_task
from tasks.features import features_task
from tasks.ingest import ingest_task
from tasks.preprocess import preprocess_task
from tasks.promote import Decision, default_metric, gate_task
from tasks.register import register_task, unchanged_version_task
from tasks.scoring import write_frame_task
from tasks.stage_cache import cached, code_version, stage_key
from tasks.tracking import (
    MlflowEpochLogger,
    finish_run_task,
    log_evaluation_task,
    log_history_task,
    prepare_store,
    resolve_tracking_uri,
    start_run_task,
)
from tasks.train import train_task
from tasks.validate import validate_task


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
) -> TrainingSummary | Unchanged:
    """Train, evaluate, register and gate one experiment. `holdout_path`: also write the test split
    (features and target, never seen in training) there as Parquet, a realistic file to score.

    `cache`: preprocess, features, train and evaluate reuse the results of an earlier run with the same
    config, data and code (Prefect's cache, stored without pickle), so a run that failed at register
    restarts at register. False neither reads nor writes the cache.

    `skip_unchanged`: when the latest registered version has this run's data digest, config hash and code
    version, return `Unchanged` without starting an MLflow run or registering anything."""
    uri = resolve_tracking_uri(tracking_uri)
    prepare_store(uri)
    flow_run_id = str(runtime.flow_run.id) if runtime.flow_run.id else None
    run_tags = {
        "prefect.flow_run_id": flow_run_id or "",
        "prefect.flow_run_name": str(runtime.flow_run.name or ""),
        "torchcycle.config_hash": config.config_hash(),
        "torchcycle.model_kind": config.model.kind,
        "torchcycle.world_size": str(distributed()[1]),  # >1: trained with torch DDP, logged by rank 0 only
    }
    # Bad data stops here, before an MLflow run exists: nothing is written for input that cannot train.
    raw = ingest_task(config.data)
    validate_task(raw)
    check_against_task(config, raw.task)  # model kind and gate metric against the task the data turned out to be
    lineage = {"data_digest": raw.digest, "config_hash": config.config_hash(), "code_version": code_version()}
    if skip_unchanged:
        same = unchanged_version_task(uri, config.name, lineage)
        if same is not None:
            return Unchanged(config.name, same, f"data, config and code are those of version {same}")
    run_id = start_run_task(
        uri, config.experiment, f"{config.name}-{runtime.flow_run.name or 'local'}", config.flat_params(), run_tags
    )
    try:
        world = distributed()[1]

        def key(stage: str) -> str | None:
            return stage_key(stage, config.config_hash(), raw.digest, world) if cache else None

        splits = cached(preprocess_task, key("preprocess"))(raw, config.data, config.seed)
        prepared = cached(features_task, key("features"))(splits, config.features)
        if holdout_path:
            write_frame_task(prepared.test_frame, Path(holdout_path))
        ckpt = checkpoint_path(config.name, config.config_hash(), raw.digest)
        # Under DDP every rank must take part in training, so rank 0 never takes it from the cache.
        trained = cached(train_task, key("train") if world == 1 else None)(
            prepared,
            config.model,
            config.train,
            config.seed,
            callback=MlflowEpochLogger(MlflowClient(uri), run_id),
            checkpoint=ckpt,
        )
        log_history_task(uri, run_id, trained.fit.history)  # epochs trained by an earlier run
        report = cached(evaluate_task, key("evaluate"))(trained, prepared)
        log_evaluation_task(uri, run_id, report.metrics, report.figures)
        version_tags = {**lineage, "prefect_flow_run_id": flow_run_id or ""}
        metric = config.gate.metric or default_metric(raw.task)
        reg = register_task(
            trained, prepared, raw.target, tracking_uri=uri, run_id=run_id, name=config.name, tags=version_tags
        )
        decision = gate_task(
            tracking_uri=uri,
            name=reg.name,
            version=reg.version,
            metric=metric,
            challenger_value=report.metrics[metric],
            margin=config.gate.margin,
            test_frame=prepared.test_frame,
            target=raw.target,
            flow_run_id=flow_run_id or "",
        )
    except BaseException:
        finish_run_task(uri, run_id, "FAILED")
        raise
    finish_run_task(uri, run_id)
    remove_checkpoint(ckpt)  # registered and gated: nothing left to resume
    summary = TrainingSummary(
        run_id=run_id,
        model_name=reg.name,
        model_version=reg.version,
        model_uri=reg.model_uri,
        metrics=report.metrics,
        tracking_uri=uri,
        flow_run_id=flow_run_id,
        device=trained.device,
        epochs=len(trained.fit.history),
        decision=decision,
        holdout_path=holdout_path,
    )
    create_markdown_artifact(
        markdown=summary_markdown(config, summary), key="training-summary", description=f"{config.name} v{reg.version}"
    )
    return summary
