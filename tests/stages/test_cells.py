"""One meaning of a cell (torchcycle.runtime.cells): what a CSV cell is, for training and every scoring path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from torchcycle.errors import DataError
from torchcycle.runtime.cells import NULL_TOKENS, canonical_table, coerce, infer_kind
from torchcycle.tables import read_csv_text


def test_missing_tokens_are_pandas_own() -> None:
    from pandas._libs.parsers import STR_NA_VALUES

    assert set(STR_NA_VALUES) == NULL_TOKENS


@pytest.mark.parametrize(
    ("cells", "kind"),
    [
        (["1", " 2", "3.5", "", "NA", "1e3", "-inf"], "number"),
        (["007", "8", "9"], "number"),  # leading zeros: a number, as pandas.read_csv reads it
        (["True", "FALSE", "true", None, "NULL"], "bool"),
        (["1", "0", "1"], "number"),  # 0/1 is numbers (pandas: int64), not booleans
        (["2024-03-01", "2024-03-02 14:30", "2024-03-03T01:02:03Z", ""], "datetime"),
        (["03/04/2024", "2024-03-02"], "string"),  # day/month order is a guess: text, not a date
        (["red", "1", ""], "string"),
        (["", "NA", None], "number"),  # nothing at all: left out as constant later
    ],
)
def test_a_column_kind_comes_from_every_cell(cells: list, kind: str) -> None:
    assert infer_kind(pd.Series(cells, dtype="string")) == kind
    assert infer_kind(pd.Series(cells, dtype=object)) == kind


def test_the_same_cells_read_alike_from_text_pandas_or_json() -> None:
    """The numbers a CSV holds, as text (the readers), as pandas.read_csv's floats and ints, or as JSON values
    (mlflow models serve), are one canonical column; so are booleans, dates and text with holes."""
    text = pd.Series(["1", " 2", None, "NA"], dtype="string")
    typed = pd.Series([1, 2, np.nan, np.nan])
    json_like = pd.Series([1, 2.0, None, "NA"], dtype=object)
    for values in (text, typed, json_like):
        out = coerce(values, "number")
        assert out.dtype == np.float64 and out.tolist()[:2] == [1.0, 2.0] and out.isna().tolist()[2:] == [True] * 2
    flags = [pd.Series(["True", "false", ""]), pd.Series([True, False, None], dtype=object), pd.Series([1, 0, None])]
    for values in flags:
        assert coerce(values, "bool").tolist()[:2] == [1.0, 0.0] and np.isnan(coerce(values, "bool").iloc[2])
    dates = [pd.Series(["2024-03-01", "2024-03-01T12:00:00+02:00"]), pd.to_datetime(pd.Series(["2024-03-01"] * 2))]
    assert coerce(dates[0], "datetime").tolist()[1] == pd.Timestamp("2024-03-01 10:00")  # UTC, naive
    assert coerce(dates[1], "datetime").dtype == "datetime64[ns]"
    words = coerce(pd.Series([" red ", "", None, 3, 2.0, 2.5], dtype=object), "string")
    assert words.tolist()[:1] == ["red"] and words.isna().tolist()[1:3] == [True, True]
    assert words.tolist()[3:] == ["3", "2", "2.5"]  # a whole float is the text pandas read it from


def test_a_cell_not_of_its_kind_is_named_by_column_row_and_value() -> None:
    with pytest.raises(DataError, match=r"column 'x' must be number: 2 row\(s\) are not, e\.g\. row 1, 3: found 'a'"):
        coerce(pd.Series(["1", "a", "3", "b"], name="x"), "number")
    with pytest.raises(DataError, match=r"column 'd' must be a date .*row 0: found '2024-02-30'"):
        coerce(pd.Series(["2024-02-30"], name="d"), "datetime")
    with pytest.raises(DataError, match=r"column 'f' must be bool .*found 'maybe'"):
        coerce(pd.Series(["true", "maybe"], name="f"), "bool")
    with pytest.raises(DataError, match=r"column 'n' must be number, found booleans"):
        coerce(pd.Series([True, False], name="n"), "number")


def test_a_csv_is_read_as_pandas_reads_it_bom_and_quotes_included(tmp_path: Path) -> None:
    body = 'id,name,score,flag,when\n1,"Smith, J",007,TRUE,2024-01-02\n2,"",NA,false,\n3,"NA",4.5,,2024-01-03\n'
    path = tmp_path / "t.csv"
    path.write_bytes("\ufeff".encode() + body.encode())  # a spreadsheet's byte-order mark
    frame, kinds = canonical_table(read_csv_text(path), keep_whole=("id",))
    assert list(frame.columns) == ["id", "name", "score", "flag", "when"]
    assert kinds == {"id": "number", "name": "string", "score": "number", "flag": "bool", "when": "datetime"}
    theirs = pd.read_csv(io.BytesIO(path.read_bytes()))
    assert list(theirs.columns) == list(frame.columns)
    assert frame["id"].dtype == np.int64 and frame["id"].tolist() == theirs["id"].tolist()
    assert frame["name"].isna().tolist() == theirs["name"].isna().tolist() == [False, True, True]
    assert frame["score"].isna().tolist() == theirs["score"].isna().tolist()
    assert frame["score"].iloc[0] == theirs["score"].iloc[0] == 7.0
    assert frame["when"].tolist()[1] is pd.NaT and frame["flag"].tolist()[:2] == [1.0, 0.0]
