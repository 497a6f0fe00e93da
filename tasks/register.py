"""Register: log the model as an MLflow pyfunc (models-from-code, no pickle) and add a registry version."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task

from tasks.bundle import load_bundle, save_bundle
from tasks.features import Prepared
from tasks.retry import io_task_options
from tasks.train import TrainedModel

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# What a version was made from; equal on all three means training again would make the same model.
LINEAGE_TAGS = ("data_digest", "config_hash", "code_version")
_REQUIREMENTS = ("torch", "numpy", "pandas", "scikit-learn", "skops", "safetensors", "pyarrow", "mlflow")


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    model_uri: str  # models:/NAME/VERSION
    run_id: str


def write_bundle(trained: TrainedModel, prepared: Prepared, target: str, directory: Path) -> Path:
    return save_bundle(
        directory,
        kind=trained.kind,
        model_config=trained.config,
        state_dict=trained.state_dict,
        pipeline=prepared.pipeline,
        target=target,
    )


def input_example(prepared: Prepared, target: str, rows: int = 5) -> pd.DataFrame:
    return prepared.test_frame.drop(columns=[target]).head(rows).reset_index(drop=True)


def register_model(
    *,
    tracking_uri: str,
    run_id: str,
    name: str,
    bundle_dir: Path,
    example: pd.DataFrame,
    tags: dict[str, str],
) -> RegisteredVersion:
    import mlflow
    from mlflow.models import infer_signature

    import models
    import tasks

    mlflow.set_tracking_uri(tracking_uri)
    predictor = load_bundle(bundle_dir)  # proves the bundle loads before anything is registered
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # Known noise: integer pixel/label columns are intended.
        warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column.*")
        signature = infer_signature(example, predictor.predict(example))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={"bundle": str(bundle_dir)},
            # Ship the torch model code and bundle loader with the model: it loads anywhere.
            code_paths=[str(Path(models.__file__).parent), str(Path(tasks.__file__).parent)],
            signature=signature,
            input_example=example,
            pip_requirements=[f"{p}=={pkg_version(p)}" for p in _REQUIREMENTS],
        )
    mv = mlflow.register_model(info.model_uri, name, tags=tags)
    return RegisteredVersion(name, str(mv.version), f"models:/{name}/{mv.version}", run_id)


@task(name="register", **io_task_options())
def register_task(
    trained: TrainedModel,
    prepared: Prepared,
    target: str,
    *,
    tracking_uri: str,
    run_id: str,
    name: str,
    tags: dict[str, str],
) -> RegisteredVersion:
    with tempfile.TemporaryDirectory() as tmp:
        bundle = write_bundle(trained, prepared, target, Path(tmp) / "bundle")
        reg = register_model(
            tracking_uri=tracking_uri,
            run_id=run_id,
            name=name,
            bundle_dir=bundle,
            example=input_example(prepared, target),
            tags=tags,
        )
    get_run_logger().info("registered %s version %s", reg.name, reg.version)
    return reg


def unchanged_version(client: Any, name: str, lineage: dict[str, str]) -> str | None:
    """The latest version of `name` when its lineage tags equal `lineage`, else None."""
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        return None
    latest = max(versions, key=lambda mv: int(mv.version))
    tags = latest.tags or {}
    return str(latest.version) if all(tags.get(k) == lineage[k] for k in LINEAGE_TAGS) else None


@task(name="check-unchanged", **io_task_options())
def unchanged_version_task(tracking_uri: str, name: str, lineage: dict[str, str]) -> str | None:
    from mlflow.tracking import MlflowClient

    return unchanged_version(MlflowClient(tracking_uri), name, lineage)
