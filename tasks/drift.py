"""Drift: a scoring run's drift report (torchcycle.runtime.drift) recorded in MLflow and Prefect, and an event
for automations when columns drifted.

The plain functions take their clients and values as arguments; the @task wrapper at the bottom adds the
retries (its writes are idempotent) and the Prefect artifact and event.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
import re
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event

from torchcycle.retry import io_task_options
from torchcycle.runtime.drift import ColumnProfile, DriftCounts, DriftReport, ReferenceProfile

EVENT = "torchcycle.drift.detected"  # an automation matches it by `torchcycle.model.name`: keep these names
ARTIFACT_KEY = "drift-report"
TABLE_FILE = "drift/drift_table.json"
CHART_FILE = "drift/drift_chart.png"
METRIC_PREFIX = "drift_psi."
CHART_COLUMNS = 15  # bars in the PSI chart
DETAIL_COLUMNS = 3  # worst columns shown bin by bin
DETAIL_BUCKETS = 12  # buckets shown per detail panel (the rest summed)
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
MAX_METRIC_KEY = 250  # MLflow's key length limit
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")  # MLflow's metric characters, ASCII only
PREDICTION_BAR = "(model prediction)"
STATUS_COLORS = {"ok": "#4c9a2a", "warn": "#e69f00", "drift": "#c0392b", "no-data": "#999999"}


def metric_names(columns: Iterable[str], prefix: str = METRIC_PREFIX) -> dict[str, str]:
    """column -> a metric name MLflow accepts, unique: a column whose name needs changing (characters MLflow
    refuses, a path that does not normalise to itself such as `a//b`, too long) gets a hash of its own name
    as a suffix, so two columns that clean to one name never share a metric."""
    columns = list(columns)
    out: dict[str, str] = {}
    used: set[str] = set()

    def fits(name: str) -> bool:
        return len(name) <= MAX_METRIC_KEY and posixpath.normpath(name) == name and not _UNSAFE.search(name)

    # names MLflow takes as they are keep them; only changed ones may move
    for col in sorted(columns, key=lambda c: not fits(prefix + c)):
        name = prefix + col
        if not fits(name):
            digest = hashlib.sha256(col.encode("utf-8", "surrogatepass")).hexdigest()
            clean = _UNSAFE.sub("_", col).replace("/", "_")[: MAX_METRIC_KEY - len(prefix) - 20]
            name, n = f"{prefix}{clean}-{digest[:8]}", 8
            while name in used and n < len(digest):  # a clean name that happens to equal this one
                n += 4
                name = f"{prefix}{clean}-{digest[:n]}"
        if name in used:
            raise ValueError(f"cannot give column {col!r} a metric name of its own")
        used.add(name)
        out[col] = name
    return {c: out[c] for c in columns}


def drift_table(report: DriftReport, reference: ReferenceProfile | None = None) -> pd.DataFrame:
    """One row per feature (worst first), then the predictions: column, kind, psi, status (ok / warn / drift;
    no-data when nothing was counted), the train split's mean and std (numeric columns, from `reference`)."""
    profiles = reference.by_name if reference is not None else {}
    order = [c for c, _ in report.worst()] if report.judged else (reference.names if reference else [])
    rows = []
    for col in order:
        p = profiles.get(col)
        value = report.psi.get(col)
        rows.append(
            {
                "column": col,
                "kind": p.kind if p else None,
                "psi": value,
                "status": report.column_status(value) if value is not None else "no-data",
                "reference_mean": p.mean if p else None,
                "reference_std": p.std if p else None,
            }
        )
    if report.prediction_psi is not None:
        rows.append(
            {
                "column": "prediction",
                "kind": "prediction",
                "psi": report.prediction_psi,
                "status": report.column_status(report.prediction_psi),
                "reference_mean": reference.prediction.mean if reference and reference.prediction else None,
                "reference_std": reference.prediction.std if reference and reference.prediction else None,
            }
        )
    columns = ["column", "kind", "psi", "status", "reference_mean", "reference_std"]
    return pd.DataFrame(rows, columns=columns).astype({"psi": "float64"})


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts: NaN becomes None."""
    return [
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        for row in table.astype(object).to_dict(orient="records")
    ]


# ---- the chart -------------------------------------------------------------------------------------
def _detail(ax: Any, profile: ColumnProfile, counts: np.ndarray, value: float, status: str) -> None:
    """Reference vs scored share of rows per bucket of one column; buckets empty on both sides left out."""
    labels = profile.labels()
    expected = np.asarray(profile.expected)
    actual = counts / counts.sum() if counts.sum() else np.zeros_like(expected)
    keep = np.flatnonzero((expected > 0) | (actual > 0))
    if profile.kind == "categorical" and len(keep) > DETAIL_BUCKETS:  # the largest, the rest summed
        top = keep[np.argsort(-np.maximum(expected[keep], actual[keep]), kind="stable")[:DETAIL_BUCKETS]]
        rest = np.setdiff1d(keep, top)
        keep = np.sort(top)
        labels = [labels[i] for i in keep] + [f"({len(rest)} more)"]
        expected = np.append(expected[keep], expected[rest].sum())
        actual = np.append(actual[keep], actual[rest].sum())
    else:
        labels, expected, actual = [labels[i] for i in keep], expected[keep], actual[keep]
    x = np.arange(len(labels))
    ax.bar(x - 0.2, expected, 0.4, label="training (reference)", color="#9e9e9e")
    ax.bar(x + 0.2, actual, 0.4, label="scored", color=STATUS_COLORS[status])
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("share of rows")
    stats = f"; train mean {profile.mean:.3g}, std {profile.std:.3g}" if profile.mean is not None else ""
    ax.set_title(f"{profile.name}: PSI {value:.3f} ({status}){stats}", fontsize=10, loc="left")
    ax.grid(axis="y", alpha=0.3)


def drift_chart(report: DriftReport, reference: ReferenceProfile, counts: DriftCounts) -> Any:
    """A matplotlib Figure (no pyplot, so no display and no global figure state): the worst columns' PSI
    against the thresholds, and reference vs scored proportions per bin of the 3 worst."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = len(reference.columns)
    title = f"Input drift: {report.rows:,} scored rows vs {reference.rows:,} training rows · status {report.status}"
    if not report.judged:
        fig = Figure(figsize=(8, 3), layout="constrained")
        fig.suptitle(title, fontsize=13)
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, f"no rows scored: nothing to judge ({n} columns)", ha="center", va="center", fontsize=12)
        ax.set_axis_off()
        return fig
    fig = Figure(figsize=(15, 10), layout="constrained")
    grid = fig.add_gridspec(DETAIL_COLUMNS, 2, width_ratios=[1, 1.5])
    ax = fig.add_subplot(grid[:, 0])
    pred = "" if report.prediction_psi is None else f" · prediction PSI {report.prediction_psi:.3f}"
    fig.suptitle(
        f"{title}\n{len(report.drifted)} of {n} columns drifted (PSI >= {report.threshold:g}), "
        f"{len(report.warned)} warn (>= {report.warn:g}){pred}",
        fontsize=13,
    )

    bars = report.worst(CHART_COLUMNS)
    if report.prediction_psi is not None:
        bars = [(PREDICTION_BAR, report.prediction_psi), *bars]
    names = [b[0] for b in bars][::-1]  # worst at the top
    values = np.asarray([b[1] for b in bars][::-1])
    # a huge PSI would squash the thresholds against 0: the axis stops at 2 and longer bars say so
    xmax = max(3 * report.threshold, min(float(values.max()), 2.0)) * 1.15
    colors = [STATUS_COLORS[report.column_status(v)] for v in values]
    drawn = ax.barh(names, np.minimum(values, xmax), color=colors)
    for bar, name in zip(drawn, names, strict=True):
        if name == PREDICTION_BAR:
            bar.set_hatch("//")
            bar.set_edgecolor("white")
    for y, v in enumerate(values):
        clipped = v > xmax
        ax.text(
            min(v, xmax) * (0.98 if clipped else 1.0) + (0 if clipped else xmax * 0.01),
            y,
            f"{v:.3f}" + (" ▸" if clipped else ""),
            va="center",
            ha="right" if clipped else "left",
            color="white" if clipped else "black",
            fontsize=8,
        )
    ax.axvline(report.warn, color=STATUS_COLORS["warn"], linestyle="--")
    ax.axvline(report.threshold, color=STATUS_COLORS["drift"], linestyle="--")
    ax.set_xlim(0, xmax)
    ax.set_xlabel("population stability index (PSI)")
    ax.set_title(f"PSI per column, worst {min(CHART_COLUMNS, n)} of {n}", loc="left")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(
        handles=[
            Line2D([], [], color=STATUS_COLORS["warn"], linestyle="--", label=f"warn {report.warn:g}"),
            Line2D([], [], color=STATUS_COLORS["drift"], linestyle="--", label=f"drift {report.threshold:g}"),
            *(Patch(color=STATUS_COLORS[s], label=s) for s in ("ok", "warn", "drift")),
        ],
        loc="lower right",
        fontsize=8,
    )
    for i, (col, value) in enumerate(report.worst(DETAIL_COLUMNS)):
        detail = fig.add_subplot(grid[i, 1])
        _detail(detail, reference.by_name[col], counts.features[col], value, report.column_status(value))
        if i == 0:
            detail.legend(fontsize=8)
    return fig


# ---- MLflow and Prefect ----------------------------------------------------------------------------
def record_drift(
    client: Any, run_id: str, report: DriftReport, reference: ReferenceProfile, counts: DriftCounts
) -> None:
    """Log the report to MLflow run `run_id`: metrics `drift_psi.<column>`, `drift_max_psi`,
    `drift_prediction_psi`, `drift_rows`, `drift_columns_drifted` (PSI metrics only when rows were counted),
    the table `drift/drift_table.json`, the chart `drift/drift_chart.png` and the tag `drift_status`.
    Safe to repeat: metrics and the chart are overwritten, and the table is written only once (MLflow's
    log_table appends to an existing table)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values: dict[str, float] = {"drift_rows": report.rows, "drift_columns_drifted": len(report.drifted)}
    if report.judged:
        names = metric_names(report.psi)
        values.update({names[c]: v for c, v in report.psi.items()})
        values["drift_max_psi"] = report.max_psi if report.max_psi is not None else 0.0
        if report.prediction_psi is not None:
            values["drift_prediction_psi"] = report.prediction_psi
    metrics = [Metric(k, float(v), now, 0) for k, v in values.items()]
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])
    client.set_tag(run_id, "drift_status", report.status)
    logged = {f.path for f in client.list_artifacts(run_id, posixpath.dirname(TABLE_FILE))}
    if TABLE_FILE not in logged:
        client.log_table(run_id, drift_table(report, reference), TABLE_FILE)
    client.log_figure(
        run_id, drift_chart(report, reference, counts), CHART_FILE, save_kwargs={"dpi": 100, "bbox_inches": "tight"}
    )


def drift_event(model_name: str, version: str, report: DriftReport, scoring_run_id: str) -> dict[str, Any]:
    """The event `emit_drift_event` sends (name, resource, payload)."""
    version = str(version)
    return {
        "event": EVENT,
        "resource": {
            "prefect.resource.id": f"torchcycle.model-version.{model_name}.{version}",
            "prefect.resource.name": f"{model_name} v{version}",
            "torchcycle.model.name": model_name,
            "torchcycle.model.version": version,
        },
        "payload": {
            "columns": dict(report.drifted),
            "max_psi": report.max_psi,
            "threshold": report.threshold,
            "prediction_psi": report.prediction_psi,
            "rows": report.rows,
            "scoring_run_id": scoring_run_id,
        },
    }


def emit_drift_event(model_name: str, version: str, report: DriftReport, scoring_run_id: str) -> None:
    """Tell Prefect (and its automations) that `model_name` v`version` saw drifted inputs in a scoring run."""
    emit_event(**drift_event(model_name, version, report, scoring_run_id))


@task(name="record-drift", **io_task_options())
def record_drift_task(
    tracking_uri: str,
    run_id: str,
    model_name: str,
    version: str,
    report: DriftReport,
    reference: ReferenceProfile,
    counts: DriftCounts,
) -> None:
    """record_drift, a `drift-report` table artifact, and the drift event when columns drifted. It retries
    because it is idempotent I/O: a retry rewrites the same metrics, tag, chart and artifact; the event is the
    last step, so only a failure to send it sends it again."""
    from mlflow.tracking import MlflowClient

    record_drift(MlflowClient(tracking_uri), run_id, report, reference, counts)
    worst = f"max PSI {report.max_psi:.3f}" if report.max_psi is not None else "no rows scored"
    create_table_artifact(
        table=_records(drift_table(report, reference)),
        key=ARTIFACT_KEY,
        description=f"{model_name} v{version}: drift {report.status}, {worst}, {report.rows} rows",
    )
    if report.status == "drift":  # the inputs moved, or what the model answers did, over enough rows
        emit_drift_event(model_name, version, report, run_id)
        get_run_logger().warning(
            "drift in %d column(s) of %s v%s: %s",
            len(report.drifted),
            model_name,
            version,
            ", ".join(list(report.drifted)[:10]),
        )
