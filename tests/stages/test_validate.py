"""validate: every problem with the data, at once."""

from __future__ import annotations

import numpy as np
import pytest
from stage_data import _raw, _table

from torchcycle.errors import DataError
from torchcycle.tasks.validate import validate


# ---- validate -----------------------------------------------------------------------------------
def test_validate_ok_and_errors() -> None:
    validate(_raw(_table()))  # 60 rows, two features, three classes: nothing to refuse
    with pytest.raises(DataError, match="target column 'y' is missing"):
        validate(_raw(_table().drop(columns="y")))
    with pytest.raises(DataError, match="no rows"):
        validate(_raw(_table().iloc[:0]))
    with pytest.raises(DataError, match="no feature columns"):
        validate(_raw(_table()[["y"]]))
    validate(_raw(_table().assign(num=np.nan)))  # an empty column is left out (constant), not refused
    with pytest.raises(DataError, match=r"no feature column a model can learn from: 'num' \(constant: no value"):
        validate(_raw(_table().assign(num=np.nan, cat="red")))
    with pytest.raises(DataError, match=r"column 'num' fails finite \(no \+-inf\) in 30 row\(s\), e\.g\. row 0"):
        validate(_raw(_table().assign(num=[np.inf, 1.0] * 30)))
    with pytest.raises(DataError, match="at least 2 classes"):
        validate(_raw(_table().assign(y="a")))
    # lazy: every problem in one message
    with pytest.raises(DataError, match=r"2 problem\(s\): .*'num' fails finite.*2 classes"):
        validate(_raw(_table().assign(num=[np.inf] + [1.0] * 59, cat=np.nan, y="a")))
    with pytest.raises(DataError, match="must be numeric for regression"):
        validate(_raw(_table(), task="regression"))
