"""ingest: every data source, files, directories and globs, and the errors it must name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from stage_data import _table

from torchcycle.config import DataConfig
from torchcycle.errors import DataError
from torchcycle.tasks.ingest import ingest, read_table
from torchcycle.tasks.preprocess import preprocess


# ---- ingest -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "rows", "task"),
    [
        ("sklearn:iris", 150, "classification"),
        ("sklearn:diabetes", 442, "regression"),
        ("synthetic:line", 20, "regression"),
        ("synthetic:xor", 4, "classification"),
        ("synthetic:regression", 100, "regression"),
        ("synthetic:linear2d", 1000, "regression"),
        ("synthetic:classification", 100, "classification"),
    ],
)
def test_ingest_sources(source: str, rows: int, task: str) -> None:
    raw = ingest(DataConfig(source=source))
    assert len(raw.frame) == rows and raw.task == task and raw.target in raw.frame
    assert raw.digest == ingest(DataConfig(source=source)).digest  # deterministic


def test_synthetic_line_is_exact() -> None:
    f = ingest(DataConfig(source="synthetic:line")).frame
    assert np.allclose(f["y"], 2 * f["x"] + 1)


def test_ingest_file_csv_and_parquet(tmp_path: Path) -> None:
    frame = _table()
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.parquet"):
        raw = ingest(DataConfig(source=f"file:{tmp_path / name}", target="y"))
        assert raw.task == "classification" and list(raw.frame.columns) == ["num", "cat", "y"]
    reg = ingest(DataConfig(source=f"file:{tmp_path / 't.csv'}", target="num"))
    assert reg.task == "regression"


def test_ingest_file_errors_name_the_problem(tmp_path: Path) -> None:
    _table().to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match="target column 'label' not found"):
        ingest(DataConfig(source=f"file:{tmp_path / 't.csv'}", target="label"))
    with pytest.raises(DataError, match="not found"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="cannot read"):
        read_table(tmp_path / "bad.parquet")
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(DataError, match="unsupported file type"):
        read_table(tmp_path / "t.json")
    import pyarrow as pa
    import pyarrow.parquet as pq

    dup = pa.table([pa.array([1]), pa.array([2]), pa.array([3])], names=["a", "a", "y"])
    pq.write_table(dup, tmp_path / "dup.parquet")
    with pytest.raises(DataError, match="duplicate column names: a"):
        read_table(tmp_path / "dup.parquet")
    (tmp_path / "dup.csv").write_text("a,a,y\n1,2,3\n")
    with pytest.raises(DataError, match="duplicate column names: a"):
        read_table(tmp_path / "dup.csv")


def test_torchvision_mnist_from_idx_files(mnist_root: Path) -> None:
    raw = ingest(DataConfig(source="torchvision:MNIST", root=str(mnist_root)))
    assert raw.frame.shape == (400, 785) and raw.image_shape == (1, 28, 28)
    assert raw.test_mask.sum() == 100  # the official test split is kept
    splits = preprocess(raw, DataConfig(source="torchvision:MNIST", root=str(mnist_root)), seed=0)
    assert len(splits.test) == 100 and len(splits.train) + len(splits.val) == 300


def test_torchvision_missing_files_is_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="MNIST not found"):
        ingest(DataConfig(source="torchvision:MNIST", root=str(tmp_path)))


def test_file_source_reads_a_directory_or_glob_of_files_in_name_order(tmp_path: Path) -> None:
    frame = pd.DataFrame({"x": np.arange(6.0), "y": [0, 1, 0, 1, 0, 1]})
    folder = tmp_path / "training"
    folder.mkdir()
    frame.iloc[3:].to_csv(folder / "b.csv", index=False)
    frame.iloc[:3].to_parquet(folder / "a.parquet")
    for source in (f"file:{folder}", f"file:{folder}/*"):
        raw = ingest(DataConfig(source=source, target="y"))
        assert raw.frame["x"].tolist() == frame["x"].tolist()  # a.parquet, then b.csv
    one = ingest(DataConfig(source=f"file:{folder}/a.parquet", target="y"))
    assert one.digest != raw.digest  # the digest covers every file
    pd.DataFrame({"x": [1.0], "z": [0]}).to_csv(folder / "c.csv", index=False)
    with pytest.raises(DataError, match=r"c\.csv does not have the columns of .*a\.parquet"):
        ingest(DataConfig(source=f"file:{folder}", target="y"))
    with pytest.raises(DataError, match=r"no \.csv or \.parquet files"):
        ingest(DataConfig(source=f"file:{tmp_path}/none/*.parquet", target="y"))


def test_files_of_one_table_must_agree_on_numbers(tmp_path: Path) -> None:
    pd.DataFrame({"x": [1.0, 2.0], "y": [0, 1]}).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame({"x": ["high", "low"], "y": [1, 0]}).to_parquet(tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"column 'x' holds string in .*b\.parquet but number in .*a\.parquet"):
        ingest(DataConfig(source=f"file:{tmp_path}", target="y"))


def test_a_cell_means_what_pandas_read_csv_says_in_every_column(tmp_path: Path) -> None:
    """Empty cells and pandas' missing-value tokens (NA, None, NULL...) are missing in text and number columns
    alike, so training, scoring and `pandas.read_csv` read one file one way (torchcycle.runtime.cells)."""
    from torchcycle.tasks.ingest import read_table

    path = tmp_path / "na.csv"
    path.write_text("x1,color,label,n\n1.5,NA,NA,NA\n2.5,red,US,3\n3,None,FR,\n4, ,DE,5\n")
    raw = ingest(DataConfig(source=f"file:{path}", target="label"))
    frame = raw.frame
    assert frame["color"].isna().tolist() == [True, False, True, True] and frame["color"].iloc[1] == "red"
    assert frame["label"].isna().tolist() == [True, False, False, False]  # a missing label: the row is dropped
    assert frame["n"].isna().tolist() == [True, False, True, False] and frame["n"].iloc[1] == 3.0
    assert raw.kinds == {"x1": "number", "color": "string", "label": "string", "n": "number"}
    theirs = pd.read_csv(path)
    for col in ("color", "label", "n"):
        assert frame[col].isna().tolist()[:3] == theirs[col].isna().tolist()[:3]
    assert read_table(path)["color"].tolist()[1] == "red"  # as stored: text, missing cells None
