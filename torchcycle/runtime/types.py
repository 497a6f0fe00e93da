"""What a logged model and every stage share: the task kinds, the data error, the output column names."""

from __future__ import annotations

from typing import Literal

Task = Literal["classification", "regression"]


class DataError(ValueError):
    """Bad input data: the message names the column/file and what is wrong."""


# Columns every scored output has: a training feature or scored input column of one of these names would be
# overwritten (`proba_<class>` too, for classifiers).
PREDICTION_COLUMN = "prediction"
LINEAGE_COLUMNS = ("model_name", "model_version", "model_run_id")
RESERVED_COLUMNS = (PREDICTION_COLUMN, *LINEAGE_COLUMNS)


def is_output_column(name: str) -> bool:
    return name in RESERVED_COLUMNS or name.startswith("proba_")
