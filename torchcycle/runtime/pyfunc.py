"""MLflow models-from-code entry point: MLflow runs this file to rebuild the model.

Nothing is unpickled: the bundle's weights are safetensors, its preprocessing JSON + skops.
"""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model


class TorchcyclePyfunc(mlflow.pyfunc.PythonModel):
    """Raw input rows -> `prediction` (+ `proba_<class>` columns for classifiers)."""

    def load_context(self, context) -> None:
        from torchcycle.runtime.bundle import load_bundle

        self.predictor = load_bundle(context.artifacts["bundle"])

    # A DataFrame hint: MLflow validates input against the logged signature, not the hint.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from torchcycle.runtime.types import DataError

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        try:
            return self.predictor.predict(frame)
        except DataError as err:  # the contract refused the input: the server answers 400 with this message
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None


set_model(TorchcyclePyfunc())
