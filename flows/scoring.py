"""The batch-scoring flow: resolve the model version, load it through MLflow, score files, record the run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from torchcycle.registry import ModelRef
from torchcycle.tables import DEFAULT_BATCH_ROWS, find_inputs
from torchcycle.tasks.score import (
    ScoreResult,
    check_output,
    load_model_task,
    log_scoring_task,
    resolve_model_task,
    score_task,
    summary_markdown,
)
from torchcycle.tracking import flow_run_id, resolve_tracking_uri, tracked_run, use_tracking_uri

SCORING_EXPERIMENT = "scoring"


@flow(name="scoring")
def scoring_flow(
    model: str,
    input: str,
    output: str,
    id_cols: list[str] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    tracking_uri: str | None = None,
    experiment: str = SCORING_EXPERIMENT,
) -> ScoreResult:
    """Score a file, directory or glob of CSV/Parquet with `model` (NAME, NAME@alias, NAME/version).

    `output` ending in .parquet is one file for all inputs; anything else is a directory with one
    file per input and model version, and inputs already scored by that version are skipped."""
    uri = resolve_tracking_uri(tracking_uri)
    use_tracking_uri(uri)
    ref = ModelRef.parse(model)
    inputs = find_inputs(input)
    resolved = resolve_model_task(uri, ref)
    check_output(input, inputs, Path(output), resolved)  # before a byte is read or an MLflow run exists
    loaded = load_model_task(uri, resolved)
    params = {
        "model_ref": str(ref),
        "model_uri": resolved.uri,
        "model_name": resolved.name,
        "model_version": resolved.version,
        "input": str(input),
        "output": str(output),
        "batch_rows": str(batch_rows),
    }
    tags = {"prefect.flow_run_id": flow_run_id(), "model_run_id": resolved.run_id, "torchcycle.kind": "scoring"}
    with tracked_run(uri, experiment, f"score-{resolved.name}-v{resolved.version}", params, tags) as run_id:
        result = score_task(loaded, resolved, inputs, Path(output), tuple(id_cols or ()), batch_rows)
        log_scoring_task(uri, run_id, result)
    result = replace(result, scoring_run_id=run_id)
    create_markdown_artifact(
        markdown=summary_markdown(result) + f"\nMLflow run `{run_id}`\n",
        key="scoring-summary",
        description=f"{resolved.name} v{resolved.version}: {result.rows} rows",
    )
    return result
