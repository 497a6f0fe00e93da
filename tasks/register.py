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
LOGGED_MODEL_NAME = "model"  # the model's name inside its run
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
    """Log the bundle as a pyfunc in run `run_id` and register it as a version of `name`.

    Safe to run again after a partial success (the task retries): a version of `name` this run already
    made is returned as it is, and a model this run logged completely but did not get to register is
    registered, not logged a second time. One run, one version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    done = version_from_run(client, name, run_id)
    if done is not None:
        return done
    model_uri = logged_model_uri(client, run_id) or _log_model(run_id, bundle_dir, example)
    mv = mlflow.register_model(model_uri, name, tags=tags)
    return RegisteredVersion(name, str(mv.version), f"models:/{name}/{mv.version}", run_id)


def version_from_run(client: Any, name: str, run_id: str) -> RegisteredVersion | None:
    """The version of `name` registered from run `run_id`, else None (the oldest, should there be two)."""
    versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if not versions:
        return None
    mv = min(versions, key=lambda v: int(v.version))
    return RegisteredVersion(name, str(mv.version), f"models:/{name}/{mv.version}", run_id)


def logged_model_uri(client: Any, run_id: str) -> str | None:
    """`models:/<model_id>` of the model an earlier attempt logged in this run, when it finished (READY)."""
    from mlflow.entities import LoggedModelStatus

    experiment_id = client.get_run(run_id).info.experiment_id
    # status is checked here: the SQL store's filter does not match status = 'READY'
    found = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    ready = [m for m in found if m.name == LOGGED_MODEL_NAME and m.status == LoggedModelStatus.READY]
    return f"models:/{max(ready, key=lambda m: m.creation_timestamp).model_id}" if ready else None


def _log_model(run_id: str, bundle_dir: Path, example: pd.DataFrame) -> str:
    import mlflow
    from mlflow.models import infer_signature

    import models
    import tasks

    predictor = load_bundle(bundle_dir)  # proves the bundle loads before anything is logged
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # Known noise: integer pixel/label columns are intended.
        warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column.*")
        signature = infer_signature(example, predictor.predict(example))
        info = mlflow.pyfunc.log_model(
            name=LOGGED_MODEL_NAME,
            python_model=str(PYFUNC_CODE),
            artifacts={"bundle": str(bundle_dir)},
            # Ship the torch model code and bundle loader with the model: it loads anywhere.
            code_paths=[str(Path(models.__file__).parent), str(Path(tasks.__file__).parent)],
            signature=signature,
            input_example=example,
            pip_requirements=[f"{p}=={pkg_version(p)}" for p in _REQUIREMENTS],
        )
    return info.model_uri


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
