"""Where MLflow tracking goes: $MLFLOW_TRACKING_URI or the embedded SQLite store under mlflow/.

Imports nothing heavy (no MLflow, no Prefect), so the CLI resolves the URI and reports errors about it
without paying for either."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STORE_DIR = "mlflow"  # embedded store, relative to the working directory


def default_tracking_uri(store_dir: str | Path = DEFAULT_STORE_DIR) -> str:
    return f"sqlite:///{Path(store_dir).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """Explicit value, else $MLFLOW_TRACKING_URI, else the embedded SQLite store under mlflow/."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def artifact_root_for(tracking_uri: str) -> str | None:
    """Local SQLite stores keep artifacts beside the database; a server decides for itself."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").resolve().as_uri()
    return None


def prepare_store(tracking_uri: str) -> None:
    """Create the embedded store's folder (only for local SQLite). Called at the edge, never on import."""
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
