"""A corpus of bad inputs against `torchcycle train` (file source) and `torchcycle predict`, plus generated
malformed tables: a clear message and exit code 2, no output file, no new model version, no alias change."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_output, labelled_table, train_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from torchcycle.cli import app
from torchcycle.errors import DataError
from torchcycle.runtime.contract import _clearly_valid, check_frame, infer_contract

NAME = "corpus-model"
pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A registered champion (v1) to score with and to compare the registry against."""
    return train_store(tmp_path_factory.mktemp("corpus"), _config(Path("{train}")))


def _config(path: Path, target: str = "label") -> str:
    return (
        f"name: {NAME}\nexperiment: corpus\ndata: {{source: 'file:{path}', target: {target}}}\n"
        "model: {kind: mlp, hidden: [8]}\ntrain: {epochs: 3, patience: 0}\n"
    )


def _registry_state(uri: str) -> tuple[list[str], str]:
    client = MlflowClient(uri)
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name='{NAME}'"))
    return versions, str(client.get_model_version_by_alias(NAME, "champion").version)


def _write(path: Path, content: pd.DataFrame | bytes | str) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    elif path.suffix == ".parquet":
        content.to_parquet(path, index=False)
    else:
        content.to_csv(path, index=False)
    return path


def _truncated_parquet(path: Path) -> bytes:
    labelled_table(50).to_parquet(path)
    return path.read_bytes()[:-200]


def _every_other(frame: pd.DataFrame, column: str, value: float) -> pd.DataFrame:
    """`value` in every other row of `column` (in every row, the column would be constant: left out, not refused)."""
    return frame.assign(**{column: np.where(np.arange(len(frame)) % 2, value, frame[column])})


def _dup_csv(frame: pd.DataFrame) -> str:
    text = frame.to_csv(index=False)
    header, rest = text.split("\n", 1)
    return header.replace("x2", "x1") + "\n" + rest


# (case, file name, content builder, expected message fragment)
TRAIN_CORPUS: list[tuple[str, str, Callable[[Path], object], str]] = [
    (
        "missing target column",
        "t.csv",
        lambda d: labelled_table().drop(columns=["label"]),
        "target column 'label' not found",
    ),
    ("wrong target dtype", "t.csv", lambda d: labelled_table().assign(label="x"), "at least 2 classes"),
    (
        "no feature to learn from",  # empty and constant columns are left out: nothing is left
        "t.csv",
        lambda d: labelled_table().assign(x1=np.nan, x2=3, color="red"),
        "no feature column a model can learn from: 'x1' (constant: no value at all)",
    ),
    ("+inf in a feature", "t.csv", lambda d: _every_other(labelled_table(), "x1", np.inf), "column 'x1' fails finite"),
    (
        "-inf in a feature",
        "t.parquet",
        lambda d: _every_other(labelled_table(), "x2", -np.inf),
        "column 'x2' fails finite",
    ),
    ("empty file", "t.csv", lambda d: b"", "input file is empty"),
    ("header-only CSV", "t.csv", lambda d: "x1,x2,color,label\n", "has no rows"),
    ("truncated Parquet", "t.parquet", lambda d: _truncated_parquet(d / "full.parquet"), "cannot read"),
    ("non-UTF-8 bytes", "t.csv", lambda d: b"x1,color,label\n1.0,caf\xe9,yes\n2.0,tea,no\n", "not valid UTF-8"),
    ("duplicate column names", "t.csv", lambda d: _dup_csv(labelled_table()), "duplicate column"),
]


@pytest.mark.parametrize(("case", "name", "build", "needle"), TRAIN_CORPUS, ids=[c[0] for c in TRAIN_CORPUS])
def test_train_refuses_bad_data(store: dict, tmp_path: Path, monkeypatch, case, name, build, needle) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    before = _registry_state(store["uri"])
    path = _write(tmp_path / name, build(tmp_path))
    config = tmp_path / "c.yaml"
    config.write_text(_config(path))
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    _assert_refused(result, case, needle)
    assert _registry_state(store["uri"]) == before  # no new version, champion unchanged


def _assert_refused(result, case: str, needle: str) -> None:
    """Exit code 2 and one clear message naming the problem, no traceback."""
    output = cli_output(result)
    assert result.exit_code == 2, f"{case}: {output}"
    assert needle in output, f"{case}: {output}"
    assert "Traceback" not in output


def _features(n: int = 40, seed: int = 5) -> pd.DataFrame:
    return labelled_table(n, seed).drop(columns=["label"]).assign(row_id=np.arange(n))


PREDICT_CORPUS: list[tuple[str, str, Callable[[Path], object], str]] = [
    ("missing column", "in.parquet", lambda d: _features().drop(columns=["x2"]), "missing column(s) 'x2'"),
    ("wrong dtype", "in.parquet", lambda d: _features().assign(x1="high"), "'x1' must be number"),
    ("NaN not allowed", "in.parquet", lambda d: _features().assign(x1=np.nan), "'x1' fails not-null"),
    ("+inf", "in.csv", lambda d: _features().assign(x2=np.inf), "'x2' fails finite"),
    ("-inf", "in.parquet", lambda d: _features().assign(x1=-np.inf), "'x1' fails finite"),
    ("empty file", "in.csv", lambda d: b"", "cannot read"),
    ("header-only CSV", "in.csv", lambda d: "row_id,x1,x2,color\n", "no data rows"),
    ("truncated Parquet", "in.parquet", lambda d: _truncated_parquet(d / "full.parquet"), "cannot read"),
    ("non-UTF-8 bytes", "in.csv", lambda d: b"row_id,x1,x2,color\n0,1.0,2,caf\xe9\n", "cannot read"),
    ("duplicate column names", "in.csv", lambda d: _dup_csv(_features()), "duplicate column name(s) x1"),
    ("text in a number column", "in.csv", lambda d: _features().assign(x1="lots"), "column 'x1' must be number"),
]


@pytest.mark.parametrize(("case", "name", "build", "needle"), PREDICT_CORPUS, ids=[c[0] for c in PREDICT_CORPUS])
def test_predict_refuses_bad_data(store: dict, tmp_path: Path, monkeypatch, case, name, build, needle) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    before = _registry_state(store["uri"])
    path = _write(tmp_path / name, build(tmp_path))
    out = tmp_path / "out" / "scored.parquet"
    result = CliRunner().invoke(app, ["predict", "-m", NAME, "-i", str(path), "-o", str(out)])
    _assert_refused(result, case, needle)
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))  # not even a partial
    assert _registry_state(store["uri"]) == before


def test_predict_passes_extra_columns_through(store: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    path = _write(tmp_path / "in.parquet", _features().assign(note="kept", batch=7))
    out = tmp_path / "scored.parquet"
    result = CliRunner().invoke(app, ["predict", "-m", NAME, "-i", str(path), "-o", str(out), "--id-col", "row_id"])
    assert result.exit_code == 0, result.output
    scored = pd.read_parquet(out)
    assert scored.columns[:3].tolist() == ["row_id", "note", "batch"] and (scored["note"] == "kept").all()


# ---- generated malformed tables ---------------------------------------------------------------------
_cell = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**6), 10**6),
    st.sampled_from(["red", "green", "blue", "purple", "", "1.5", "é"]),
    st.none(),
    st.booleans(),
)
_columns = st.lists(st.sampled_from(["x1", "x2", "color", "extra", "row_id"]), min_size=0, max_size=5, unique=True)


@st.composite
def malformed_frames(draw) -> pd.DataFrame:
    cols = draw(_columns)
    n = draw(st.integers(0, 6))
    data = {c: draw(st.lists(_cell, min_size=n, max_size=n)) for c in cols}
    frame = pd.DataFrame(data, columns=cols)
    if cols and draw(st.booleans()):  # sometimes a clean numeric column, to reach deeper checks
        frame[cols[0]] = draw(st.lists(st.floats(-5, 5), min_size=n, max_size=n))
    return frame


@pytest.fixture(scope="module")
def pyfunc(store: dict):
    """The registered model, loaded through MLflow."""
    import mlflow

    mlflow.set_tracking_uri(store["uri"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlflow.pyfunc.load_model(f"models:/{NAME}/1")


@pytest.fixture(scope="module")
def predictor(pyfunc):
    return pyfunc.unwrap_python_model().predictor


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=malformed_frames())
def test_generated_tables_only_raise_data_error(predictor, frame: pd.DataFrame) -> None:
    """Validation and prediction on arbitrary tables: a result or a DataError, never anything deeper."""
    try:
        out = predictor.predict(frame)
    except DataError as err:
        assert str(err)
    else:
        assert len(out) == len(frame)


@settings(max_examples=100, deadline=None)
@given(frame=malformed_frames())
def test_fast_path_never_passes_what_pandera_refuses(frame: pd.DataFrame) -> None:
    contract = infer_contract(labelled_table(50).drop(columns=["label", "color"]))
    if _clearly_valid(frame, contract):
        contract.validate(frame, lazy=True)  # raises SchemaErrors if the fast path was wrong
    else:
        with pytest.raises(DataError) if not _pandera_passes(frame, contract) else _nothing():
            check_frame(frame, contract)


def _pandera_passes(frame: pd.DataFrame, contract) -> bool:
    import pandera.errors as pe

    try:
        contract.validate(frame, lazy=True)
    except (pe.SchemaErrors, pe.SchemaError):
        return False
    return True


def _nothing():
    from contextlib import nullcontext

    return nullcontext()


def test_scoring_generated_files_only_fails_cleanly(pyfunc, predictor, tmp_path: Path) -> None:
    """Generated malformed Parquet files through the scoring path: DataError or a complete output."""
    from torchcycle.registry import ResolvedModel
    from torchcycle.tables import expected_columns
    from torchcycle.tasks.score import Scorer

    expected = expected_columns(pyfunc.metadata.get_input_schema())
    scorer = Scorer(predictor.predict, expected, ResolvedModel(NAME, "1", "r"), progress=False)

    @settings(max_examples=40, deadline=None)
    @given(frame=malformed_frames())
    def run(frame: pd.DataFrame) -> None:
        src, out = tmp_path / "gen.parquet", tmp_path / "gen.scored.parquet"
        out.unlink(missing_ok=True)
        try:
            frame.astype({c: str for c in frame.columns if frame[c].dtype == object}).to_parquet(src, index=False)
        except Exception:
            return  # pandas cannot write this frame at all: nothing to score
        try:
            result = scorer.score([src], out)
        except DataError:
            assert not out.exists()
        else:
            assert result.rows == len(frame) == len(pd.read_parquet(out))

    run()
