"""The main job: train the default config, gate it, then batch-score held-out rows with the champion."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow

from torchcycle.config import ExperimentConfig
from torchcycle.flows.scoring import scoring_flow
from torchcycle.flows.training import TrainingSummary, training_flow
from torchcycle.tasks.score import ScoreResult
from torchcycle.tracking import resolve_tracking_uri


@dataclass(frozen=True)
class LifecycleSummary:
    training: TrainingSummary
    scoring: ScoreResult
    sample_path: str
    scored_path: str


@flow(name="lifecycle")
def lifecycle_flow(
    config: ExperimentConfig, tracking_uri: str | None = None, workdir: str = "outputs"
) -> LifecycleSummary:
    """Both flows as subflows: each keeps its own Prefect run and MLflow run."""
    uri = resolve_tracking_uri(tracking_uri)
    out = Path(workdir) / config.name
    sample = out / "holdout.parquet"
    training = training_flow(config, uri, holdout_path=str(sample))
    # Production scores with whatever holds `champion`, which the gate may have left unchanged.
    scored = out / "holdout.scored.parquet"
    result = scoring_flow(f"{training.model_name}@champion", str(sample), str(scored), tracking_uri=uri)
    return LifecycleSummary(training, result, str(sample), str(scored))
