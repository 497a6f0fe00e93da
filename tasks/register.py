"""Register: log the model as an MLflow pyfunc (models-from-code, no pickle) and add a registry version."""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import get_run_logger, task

from torchcycle.cache import code_version
from torchcycle.model_code import ENTRY, model_code, stage_code
from torchcycle.models.inference import predict as torch_predict
from torchcycle.retry import io_task_options
from torchcycle.runtime.bundle import FeaturePipeline, load_bundle, save_bundle
from torchcycle.runtime.drift import ReferenceProfile
from torchcycle.tasks.features import Prepared
from torchcycle.tasks.train import TrainedModel
from torchcycle.tracking import require_tracking_uri

# What a version was made from; equal on all three means training again would make the same model.
LINEAGE_TAGS = ("data_digest", "config_hash", "code_version")
LOGGED_MODEL_NAME = "model"  # the model's name inside its run


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    model_uri: str  # models:/NAME/VERSION
    run_id: str


def write_bundle(trained: TrainedModel, prepared: Prepared, target: str, directory: Path) -> Path:
    """The bundle of `trained`; its drift reference gains the model's predictions on the train split."""
    pipeline = prepared.pipeline
    if pipeline.reference is not None:
        x_train = prepared.model_inputs(prepared.x_train)
        reference = prediction_reference(pipeline.reference, trained, x_train, pipeline)
        pipeline = dataclasses.replace(pipeline, reference=reference)  # a copy: the stage's output stays as it was
    return save_bundle(
        directory,
        kind=trained.kind,
        model_config=trained.config,
        state_dict=trained.state_dict,
        pipeline=pipeline,
        target=target,
    )


def train_predictions(trained: TrainedModel, x: np.ndarray, pipeline: FeaturePipeline) -> np.ndarray:
    """(N,) what the model predicts for prepared inputs `x` (N, F), decoded as the Predictor does: class labels
    (object array) or values in target units. In batches on the CPU."""
    out = torch_predict(trained.build(), torch.from_numpy(x), torch.device("cpu"))  # (N, C) logits or (N, 1)
    if pipeline.task == "regression":
        return pipeline.decode_target(out[:, 0].numpy()) if len(out) else np.empty(0)
    classes = np.asarray(pipeline.classes, dtype=object)
    return classes[out.argmax(1).numpy()] if len(out) else classes[:0]


def prediction_reference(
    reference: ReferenceProfile, trained: TrainedModel, x_train: np.ndarray, pipeline: FeaturePipeline
) -> ReferenceProfile:
    """`reference` with the distribution of the model's predictions on its own train split."""
    values = train_predictions(trained, x_train, pipeline)
    return reference.with_predictions(values, pipeline.task, classes=pipeline.classes)


def input_example(prepared: Prepared, target: str, rows: int = 5) -> pd.DataFrame:
    """A few held-out rows of the model's input columns, as the model reads them."""
    return prepared.test_frame[prepared.pipeline.columns].head(rows).reset_index(drop=True)


def input_signature(predictor: Any, example: pd.DataFrame) -> Any:
    """The model's signature: its input columns by name, each untyped (MLflow's AnyType) but image bytes, and its
    outputs as inferred. Untyped because MLflow's own checks would refuse what readers give for one column on
    different days (pandas.read_csv reads whole numbers as int64, which MLflow will not turn into a double; a
    batch whose text column happens to be empty comes as float NaN): the model reads every cell itself, by the
    kind it recorded (torchcycle.runtime.cells; the kinds are in the MLmodel's metadata too)."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    outputs = infer_signature(example, predictor.predict(example)).outputs
    kinds = predictor.pipeline.input_kinds()
    specs = [ColSpec("binary" if kinds[c] == "binary" else AnyType(), c) for c in predictor.pipeline.columns]
    return ModelSignature(inputs=Schema(specs), outputs=outputs)


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
    registered, not logged a second time. One run, one version. The run's step-0 metrics (its test metrics,
    logged before this) are linked to the logged model by MLflow, so the model's page shows what it scored."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    done = version_from_run(client, name, run_id)
    if done is not None:
        return done
    # MLflow reads the process-wide tracking URI in two places here (log_model, and the SQL registry store
    # resolving models:/<model_id>, see its TODO): the edge (the flow's first line) must have set it to ours.
    require_tracking_uri(tracking_uri)
    model_id = logged_model_id(client, run_id) or _log_model(client, run_id, bundle_dir, example)
    _link_output(client, run_id, model_id)
    _ensure_registered_model(client, name)
    mv = client.create_model_version(name, f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id)
    return RegisteredVersion(name, str(mv.version), f"models:/{name}/{mv.version}", run_id)


def _link_output(client: Any, run_id: str, model_id: str) -> None:
    """List the model among the run's outputs (the run page links it), once, whichever attempt logged it."""
    from mlflow.entities import LoggedModelOutput

    outputs = client.get_run(run_id).outputs
    if model_id not in {o.model_id for o in (outputs.model_outputs if outputs else [])}:
        client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another run created it meanwhile: fine
            raise


def version_from_run(client: Any, name: str, run_id: str) -> RegisteredVersion | None:
    """The version of `name` registered from run `run_id`, else None (the oldest, should there be two)."""
    versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if not versions:
        return None
    mv = min(versions, key=lambda v: int(v.version))
    return RegisteredVersion(name, str(mv.version), f"models:/{name}/{mv.version}", run_id)


def logged_model_id(client: Any, run_id: str) -> str | None:
    """The id of the model an earlier attempt logged in this run, when it finished (READY)."""
    from mlflow.entities import LoggedModelStatus

    experiment_id = client.get_run(run_id).info.experiment_id
    # status is checked here: the SQL store's filter does not match status = 'READY'
    found = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    ready = [m for m in found if m.name == LOGGED_MODEL_NAME and m.status == LoggedModelStatus.READY]
    return max(ready, key=lambda m: m.creation_timestamp).model_id if ready else None


def _log_model(client: Any, run_id: str, bundle_dir: Path, example: pd.DataFrame) -> str:
    """Log the model to run `run_id` through `client` (no active run): the code it ships and its pip
    requirements are derived from what loading it imports (torchcycle.model_code)."""
    import mlflow

    predictor = load_bundle(bundle_dir)  # proves the bundle loads before anything is logged
    code = model_code()
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # Known noise: integer pixel/label columns are intended.
        warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column.*")
        signature = input_signature(predictor, example)
        # Model.log, not mlflow.pyfunc.log_model: only it takes the run id without an active run, and the MLmodel
        # file must name its run (get_model_info(...).run_id; MLflow tools walk from a model to its run by it)
        mlflow.models.Model.log(
            artifact_path=None,  # positional in MLflow 3, superseded by name
            flavor=mlflow.pyfunc,
            run_id=run_id,
            name=LOGGED_MODEL_NAME,
            model_id=logged.model_id,
            python_model=str(code.modules[ENTRY]),
            artifacts={"bundle": str(bundle_dir)},
            code_paths=[str(stage_code(Path(tmp), code))],
            signature=signature,
            input_example=example,
            pip_requirements=list(code.requirements),
            metadata={"torchcycle_input_kinds": predictor.pipeline.input_kinds()},
        )
    return logged.model_id


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


def lineage_tags(data_digest: str, config_hash: str) -> dict[str, str]:
    """What a version is made from (LINEAGE_TAGS): equal on all three, a retrain would make the same model."""
    return {"data_digest": data_digest, "config_hash": config_hash, "code_version": code_version()}


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
