"""The hardening corpus: what a hostile user gives `torchcycle predict` and `torchcycle train` (outputs, file
names, values, training columns, file-system and unexpected errors), one row per case, plus races.

Every row ends in exit 0 with a correct, readable result, or exit 2/3 (1 for a bug) with exactly one `error:`
line, no traceback, nothing at the output path and the registry unchanged. Config cases live in
test_config_corpus.py, registry ones in test_registry_inputs.py.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import cli_env, labelled_table, prefect_logs_follow_stderr, train_store
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from torchcycle.cli import app
from torchcycle.errors import DataError

NAME = "hard-model"
pytestmark = pytest.mark.usefixtures("prefect_harness")


def _features(n: int = 40, seed: int = 5) -> pd.DataFrame:
    return labelled_table(n, seed).drop(columns=["label"]).assign(row_id=np.arange(n))


def _config(path: Path, name: str = NAME, extra: str = "") -> str:
    return (
        f"name: {name}\nexperiment: hardening\ndata: {{source: 'file:{path}', target: label}}\n"
        f"model: {{kind: mlp, hidden: [8]}}\ntrain: {{epochs: 3, patience: 0}}\n{extra}"
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A registered champion (v1) to score with and to compare the registry against."""
    return train_store(tmp_path_factory.mktemp("hardening"), _config(Path("{train}")))


def _registry(uri: str) -> list[tuple[str, str, tuple[str, ...], tuple[tuple[str, str], ...]]]:
    """Every version of every model: (name, version, aliases, tags)."""
    client = MlflowClient(uri)
    return sorted(
        (mv.name, str(mv.version), tuple(sorted(mv.aliases)), tuple(sorted(mv.tags.items())))
        for mv in client.search_model_versions()
    )


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# ---- the corpus -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """`setup(d)` writes the case's files under d and returns the CLI arguments. `check(d)`: what must exist
    afterwards. For exit != 0 the registry is unchanged and, unless `check` says otherwise, nothing exists
    under d/out*."""

    id: str
    setup: Callable[[Path], list[str]]
    code: int
    needle: str
    check: Callable[[Path], None] | None = None


def _predict(inp: Path | str, out: Path | str, *extra: str) -> list[str]:
    return ["predict", "-m", NAME, "-i", str(inp), "-o", str(out), *extra]


def _parquet(path: Path, frame: pd.DataFrame | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (_features() if frame is None else frame).to_parquet(path, index=False)
    return path


def _csv(path: Path, frame: pd.DataFrame | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (_features() if frame is None else frame).to_csv(path, index=False)
    return path


def _write_bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path.parent


def _ids_csv(d: Path) -> Path:
    path = _csv(d / "ids.csv", _features().drop(columns=["row_id"]))
    lines = path.read_text().splitlines()
    rows = [f"rid,zip,{lines[0]}"] + [f"{i:05d},0{2134 + i},{line}" for i, line in enumerate(lines[1:])]
    rows[2] = "12345678901234567891," + rows[2].split(",", 1)[1]
    path.write_text("\n".join(rows) + "\n")
    return path


def _ids_kept(d: Path) -> None:
    scored = pd.read_parquet(d / "out.parquet")
    assert scored["rid"].tolist()[:3] == ["00000", "12345678901234567891", "00002"]
    assert scored["zip"].iloc[0] == "02134"


def _dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _file(path: Path) -> Path:
    path.write_text("not a directory")
    return path


def _rows(path: Path, n: int) -> None:
    scored = pd.read_parquet(path)
    assert len(scored) == n and scored.columns.is_unique and scored["prediction"].notna().all()


def _late_text_csv(d: Path, first: str) -> Path:
    """A pass-through column `note` holding `first` for 100,000 rows (past pyarrow's first block), then text."""
    path = _csv(d / "big.csv", _features(100_000, 1).assign(note=first))
    with path.open("a") as fh:
        fh.write("1.5,3,red,100000,late text\n")
    return path


def _late_text_kept(d: Path) -> None:
    scored = pd.read_parquet(d / "out.parquet", columns=["row_id", "note"])
    assert len(scored) == 100_001 and scored["note"].iloc[-1] == "late text"


def _input_unchanged(d: Path) -> None:
    pd.testing.assert_frame_equal(pd.read_parquet(d / "in.parquet"), _features())


def _glob_inputs(d: Path) -> list[str]:
    _parquet(d / "day1" / "a.parquet")
    _parquet(d / "day2" / "a.parquet")
    return _predict(f"{d}/day*/a.parquet", d / "out")


PREDICT_CASES = [
    Case(
        "output is the input",
        lambda d: _predict(_parquet(d / "in.parquet"), d / "in.parquet"),
        2,
        "is the input file",
    ),
    Case(
        "output inside the input directory",
        lambda d: _predict(_parquet(d / "in" / "a.parquet").parent, d / "in" / "scored.parquet"),
        2,
        "lies inside the input directory",
    ),
    Case(
        "output directory is the input directory",
        lambda d: _predict(_parquet(d / "in" / "a.parquet").parent, d / "in"),
        2,
        "lies inside the input directory",
    ),
    Case(
        "output matches the input glob",
        lambda d: _predict(f"{_parquet(d / 'in' / 'a.parquet').parent}/*.parquet", d / "in" / "all.parquet"),
        2,
        "matches the input pattern",
    ),
    Case(
        "output .parquet is a directory",
        lambda d: _predict(_parquet(d / "in.parquet"), _dir(d / "out.parquet")),
        2,
        "is a directory",
    ),
    Case(
        "output directory is a file",
        lambda d: _predict(_parquet(d / "in.parquet"), _file(d / "outdir")),
        2,
        "is a file",
    ),
    Case(
        "output under a file",
        lambda d: _predict(_parquet(d / "in.parquet"), _file(d / "outfile") / "x.parquet"),
        2,
        "is a file, not a directory",
    ),
    Case(
        "output where the OS says no",
        lambda d: _predict(_parquet(d / "in.parquet"), "/sys/torchcycle-hardening.parquet"),
        2,
        "cannot write /sys/torchcycle-hardening.parquet: Permission denied",
    ),
    Case(
        "a.csv and a.parquet in directory mode",
        lambda d: _predict(_csv(_parquet(d / "in" / "a.parquet").parent / "a.csv").parent, d / "out"),
        0,
        "scored 80 rows from 2 file(s)",
        lambda d: (
            _rows(d / "out" / f"a.csv.{NAME}-v1.parquet", 40),
            _rows(d / "out" / f"a.parquet.{NAME}-v1.parquet", 40),
        ),
    ),
    Case(
        "input column named like a probability",
        lambda d: _predict(_parquet(d / "in.parquet", _features().assign(proba_yes=0.5)), d / "out.parquet"),
        2,
        "proba_yes would be overwritten by the output",
    ),
    Case(
        "input column named prediction",
        lambda d: _predict(_csv(d / "in.csv", _features().assign(prediction=1)), d / "out.parquet"),
        2,
        "prediction would be overwritten by the output",
    ),
    Case(
        "the same --id-col twice",
        lambda d: _predict(_parquet(d / "in.parquet"), d / "out.parquet", "--id-col", "row_id", "--id-col", "row_id"),
        0,
        "scored 40 rows",
        lambda d: _rows(d / "out.parquet", 40),
    ),
    Case(
        "--id-col that is not there",
        lambda d: _predict(_parquet(d / "in.parquet"), d / "out.parquet", "--id-col", "nope"),
        2,
        "id column(s) not found: nope",
    ),
    Case(
        "pass-through column empty for 100,000 rows, then text",
        lambda d: _predict(_late_text_csv(d, ""), d / "out.parquet"),
        0,
        "scored 100001 rows",
        _late_text_kept,
    ),
    Case(
        "pass-through column of numbers, then text",
        lambda d: _predict(_late_text_csv(d, "7"), d / "out.parquet"),
        0,
        "scored 100001 rows",
        _late_text_kept,
    ),
    Case(
        "a hidden file named on purpose",
        lambda d: _predict(_csv(d / ".x.csv"), d / "out.parquet"),
        0,
        "scored 40 rows",
        lambda d: _rows(d / "out.parquet", 40),
    ),
    Case(
        "a version beyond 64 bits",
        lambda d: ["predict", "-m", f"{NAME}/{2**64}", "-i", str(_parquet(d / "in.parquet")), "-o", str(d / "out")],
        2,
        "is too large: versions go up to",
    ),
    Case(
        "version 0",
        lambda d: ["predict", "-m", f"{NAME}/0", "-i", str(_parquet(d / "in.parquet")), "-o", str(d / "out")],
        2,
        "versions are numbered from 1",
    ),
    Case(
        "a reserved alias",
        lambda d: ["predict", "-m", f"{NAME}@latest", "-i", str(_parquet(d / "in.parquet")), "-o", str(d / "out")],
        2,
        "is reserved by MLflow",
    ),
    Case(
        "a version that does not exist",
        lambda d: ["predict", "-m", f"{NAME}/99", "-i", str(_parquet(d / "in.parquet")), "-o", str(d / "out")],
        2,
        f"no model version for '{NAME}/99'",
    ),
    Case(
        "bool where a number was trained",
        lambda d: _predict(_parquet(d / "in.parquet", _features().assign(x1=True)), d / "out.parquet"),
        2,
        "'x1' must be number, found bool",
    ),
    Case(
        "1e308 in a number column",
        lambda d: _predict(_parquet(d / "in.parquet", _features().assign(x1=1e308)), d / "out.parquet"),
        2,
        "overflow the model's float32 arithmetic, e.g. row 0 (x1=1e+308)",
    ),
    Case(
        "-1e300 deep in a CSV",
        lambda d: _predict(
            _csv(d / "in.csv", _features(5000).assign(x2=lambda f: f.x2.where(f.row_id != 4321, -1e300))),
            d / "out.parquet",
        ),
        2,
        "row 4321",
    ),
    Case(
        "two inputs mapping to one output name",
        _glob_inputs,
        2,
        "would both be written to",
    ),
    Case(
        "--batch-rows 0",
        lambda d: _predict(_parquet(d / "in.parquet"), d / "out.parquet", "--batch-rows", "0"),
        2,
        "Invalid value for '--batch-rows'",
    ),
    Case(
        "a glob that matches nothing",
        lambda d: _predict(f"{d}/*.parquet", d / "out.parquet"),
        2,
        "no .csv or .parquet files",
    ),
    Case(
        "one corrupt file among good ones, directory output",
        lambda d: _predict(
            _write_bytes(_parquet(d / "in" / "a.parquet").parent / "b.parquet", b"PAR1 torn"), d / "out"
        ),
        2,
        "1 of 2 file(s) refused (1 scored, their outputs are written): cannot read",
        lambda d: _rows(d / "out" / f"a.parquet.{NAME}-v1.parquet", 40),
    ),
    Case(
        "an empty --output (an unset shell variable)",
        lambda d: _predict(_parquet(d / "in.parquet"), ""),
        2,
        "--output is empty",
    ),
    Case(
        "an empty --input",
        lambda d: _predict("", d / "out.parquet"),
        2,
        "--input is empty",
    ),
    Case(
        "a 240-character output name",
        lambda d: _predict(_parquet(d / "in.parquet"), d / "out" / ("x" * 232 + ".parquet")),
        0,
        "scored 40 rows",
        lambda d: _rows(d / "out" / ("x" * 232 + ".parquet"), 40),
    ),
    Case(
        "CSV IDs with leading zeros and 20 digits",
        lambda d: _predict(_ids_csv(d), d / "out.parquet", "--id-col", "rid"),
        0,
        "scored 40 rows",
        _ids_kept,
    ),
    Case(
        "output in directories that do not exist yet",
        lambda d: _predict(_parquet(d / "in.parquet"), d / "out" / "a" / "b" / "scored.parquet"),
        0,
        "scored 40 rows",
        lambda d: _rows(d / "out" / "a" / "b" / "scored.parquet", 40),
    ),
]


def _train(d: Path, frame: pd.DataFrame, name: str = "t.parquet", model: str = NAME) -> list[str]:
    path = _parquet(d / name, frame) if name.endswith(".parquet") else _csv(d / name, frame)
    (d / "c.yaml").write_text(_config(path, model))
    return ["train", "--config", str(d / "c.yaml")]


TRAIN_CASES = [
    Case(
        "a datetime feature: its parts are features",
        lambda d: _train(
            d,
            labelled_table().assign(when=pd.Timestamp("2026-01-01") + pd.to_timedelta(np.arange(300), unit="D")),
            model="hard-dates",  # a model of its own: the shared champion keeps its columns for the other cases
        ),
        0,
        "gate ",
    ),
    Case(
        "a duration feature",
        lambda d: _train(d, labelled_table().assign(took=pd.Timedelta("1h"))),
        2,
        "column 'took' holds durations",
    ),
    Case(
        "a feature named prediction",
        lambda d: _train(d, labelled_table().assign(prediction=1.0)),
        2,
        "'prediction' clash with the output's own columns",
    ),
    Case(
        "a feature named model_version",
        lambda d: _train(d, labelled_table().assign(model_version="3"), "t.csv"),
        2,
        "'model_version' clash with the output's own columns",
    ),
    Case(
        "a feature named like a probability",
        lambda d: _train(d, labelled_table().assign(proba_yes=0.1)),
        2,
        "'proba_yes' clash with the output's own columns",
    ),
    Case(
        "a list-valued feature",
        lambda d: _train(d, labelled_table().assign(tags=[[1, 2]] * 300)),
        2,
        "column 'tags' holds",
    ),
    Case(
        "the checkpoint directory is a file",
        lambda d: _file(d / "ckpt") and _train(d, labelled_table()),
        2,
        "is a file, not a directory",
    ),
]

CORPUS = PREDICT_CASES + TRAIN_CASES


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_corpus(store: dict, tmp_path: Path, monkeypatch, case: Case) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setenv("TORCHCYCLE_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    args = case.setup(tmp_path)
    before = _registry(store["uri"])
    prefect_logs_follow_stderr()
    result = CliRunner().invoke(app, args)
    output = result.output
    assert result.exit_code == case.code, f"{case.id}: {output}"
    assert case.needle in output, f"{case.id}: {output}"
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if case.code == 0:
        assert _error_lines(output) == [], output
        if case.check is not None:
            case.check(tmp_path)
    else:
        assert len(_error_lines(output)) == 1, output
        if case.check is not None:  # what must exist all the same (the good files of a directory)
            case.check(tmp_path)
        else:
            left = [p for p in tmp_path.glob("out*") if p.is_file() or any(p.rglob("*.parquet"))]
            assert left == [] or case.id.startswith("output "), left  # refusals about the output leave it as is
        assert not list(tmp_path.rglob("*.partial")), "a temp file was left behind"
        assert _registry(store["uri"]) == before, "the registry changed"
    if case.id == "output is the input":
        _input_unchanged(tmp_path)


# ---- errors by kind --------------------------------------------------------------------------------
def test_a_bug_is_one_error_line_exit_1_and_debug_shows_the_traceback(store, tmp_path, monkeypatch) -> None:
    import torchcycle.tasks.validate

    def broken(*args, **kwargs):
        raise RuntimeError("something of ours broke")

    monkeypatch.setattr(torchcycle.tasks.validate, "value_problems", broken)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    args = _train(tmp_path, labelled_table())
    before = _registry(store["uri"])
    prefect_logs_follow_stderr()
    plain = CliRunner().invoke(app, args)
    output = plain.output
    assert plain.exit_code == 1, output
    assert _error_lines(output) == ["error: unexpected RuntimeError: something of ours broke (--debug shows where)"]
    assert "Traceback" not in output
    debug = CliRunner().invoke(app, ["--debug", *args])
    assert debug.exit_code == 1 and "Traceback" in debug.output and "something of ours broke" in debug.output
    assert _registry(store["uri"]) == before


def test_a_tracking_store_the_os_refuses_is_exit_2(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////sys/torchcycle-hardening/mlflow.db")
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 2, result.output
    [line] = _error_lines(result.output)
    assert line.startswith("error: cannot use /sys/torchcycle-hardening: "), line  # EACCES or EPERM


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) to mount read-only")
def test_an_output_on_a_read_only_file_system_is_one_error_line(store: dict, tmp_path: Path) -> None:
    """The real thing: the output directory bind-mounted read-only in a private mount namespace."""
    src, out = _parquet(tmp_path / "in.parquet"), tmp_path / "ro"
    out.mkdir()
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unshare --mount is not permitted here (needs root or user namespaces)")
    predict = [sys.executable, "-m", "torchcycle", "predict", "-m", NAME, "-i", str(src), "-o", str(out / "s.parquet")]
    script = f"mount --bind {out} {out} && mount -o remount,bind,ro {out} && exec {shlex.join(predict)}"
    env = cli_env(MLFLOW_TRACKING_URI=store["uri"], TORCHCYCLE_IO_RETRY_DELAYS="1,1,1")
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert _error_lines(done.stderr) == [f"error: cannot write {out / 's.parquet'}: Read-only file system"]
    assert "Traceback" not in done.stderr and "Retry" not in done.stderr  # never retried
    assert list(out.iterdir()) == []


def test_errors_are_classified_by_kind() -> None:
    """Which failures are retried, and which exit code each ends in."""
    import errno

    from torchcycle.cli import _classify
    from torchcycle.retry import file_system_refusal, is_lock_timeout

    assert _classify(DataError("bad")) == ("bad", 2)
    assert _classify(OSError(errno.EROFS, "Read-only file system", "/data/out.parquet")) == (
        "cannot use /data/out.parquet: Read-only file system",
        2,
    )
    assert file_system_refusal(OSError(errno.ENOSPC, "No space left on device"))
    assert not file_system_refusal(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))  # a network error
    locked = RuntimeError("(sqlite3.OperationalError) database is locked")
    assert is_lock_timeout(locked) and _classify(locked)[1] == 3
    assert _classify(RuntimeError("a bug")) is None


def _retry_decision(exc: BaseException) -> bool:
    from torchcycle.retry import is_transient

    class State:
        def result(self):
            raise exc

    return is_transient(None, None, State())


def test_file_system_refusals_are_not_retried_but_network_errors_are() -> None:
    import errno

    assert not _retry_decision(OSError(errno.EROFS, "Read-only file system"))
    assert not _retry_decision(IsADirectoryError(errno.EISDIR, "Is a directory"))
    assert _retry_decision(ConnectionResetError(errno.ECONNRESET, "reset"))
    assert _retry_decision(RuntimeError("database is locked"))


# ---- resource cases ----------------------------------------------------------------------------------
def test_many_classes_evaluate_in_bounded_memory() -> None:
    """10,000 classes: the metrics are computed, the confusion matrix (10,000 x 10,000) is not drawn."""
    from types import SimpleNamespace

    import torch

    from torchcycle.models.training import FitResult
    from torchcycle.tasks.evaluate import evaluate

    classes, rows = 10_000, 20_000
    model = torch.nn.Linear(4, classes)
    trained = SimpleNamespace(build=lambda: model, fit=FitResult(history=[{"train_loss": 1.0, "val_loss": 1.0}]))
    rng = np.random.default_rng(0)
    pipeline = SimpleNamespace(task="classification", classes=list(range(classes)), image_column=None)
    prepared = SimpleNamespace(
        x_test=rng.normal(size=(rows, 4)).astype(np.float32),
        y_test=rng.integers(0, classes, rows),
        pipeline=pipeline,
        model_inputs=lambda x: x,  # float features: what Prepared.model_inputs gives them back as
    )
    tracemalloc.start()
    report = evaluate(trained, prepared)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "confusion_matrix.png" not in report.figures and "test_accuracy" in report.metrics
    # the logits alone are 20,000 x 10,000 float32 = 800 MB; everything else stays small
    assert peak < 1.2e9, f"peak {peak / 1e9:.2f} GB"


def test_a_target_with_hundreds_of_labels_trains_and_registers(store: dict, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'many.db'}")
    rng = np.random.default_rng(1)
    n = 3000
    frame = pd.DataFrame({"x1": rng.normal(size=n), "label": [f"c{i % 600}" for i in range(n)]})
    path = _csv(tmp_path / "many.csv", frame)
    (tmp_path / "c.yaml").write_text(_config(path, name="many", extra=""))
    result = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "c.yaml"), "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    run_id = MlflowClient(f"sqlite:///{tmp_path / 'many.db'}").get_model_version("many", "1").run_id
    artifacts = {a.path for a in MlflowClient(f"sqlite:///{tmp_path / 'many.db'}").list_artifacts(run_id, "plots")}
    assert artifacts and not any("confusion" in a for a in artifacts), artifacts


# ---- races -------------------------------------------------------------------------------------------
def test_two_scorings_into_one_output_both_succeed_with_a_whole_file(store: dict, tmp_path: Path) -> None:
    """Each writer has its own temp file; the last to finish wins; the file is whole either way."""
    n = 120_000  # 6 batches each: the two writers overlap
    src = _parquet(tmp_path / "in.parquet", _features(n, 3))
    out = tmp_path / "out.parquet"
    env = cli_env(MLFLOW_TRACKING_URI=store["uri"])
    cmd = [sys.executable, "-m", "torchcycle", "predict", "-m", NAME, "-i", str(src), "-o", str(out), "--json"]
    cmd += ["--batch-rows", "20000"]
    procs = [
        subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=400) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        assert json.loads(stdout.strip().splitlines()[-1])["rows"] == n
    _rows(out, n)
    assert not list(tmp_path.glob(".*partial"))


def test_two_trainings_of_one_config_at_once_both_register(tmp_path: Path) -> None:
    """They share a checkpoint path: each writes through its own temp file, neither dies renaming the other's."""
    uri = f"sqlite:///{tmp_path / 'race.db'}"
    path = _csv(tmp_path / "t.csv", labelled_table(2000))
    (tmp_path / "c.yaml").write_text(_config(path, name="race").replace("epochs: 3", "epochs: 15"))
    env = cli_env(MLFLOW_TRACKING_URI=uri, TORCHCYCLE_CHECKPOINT_DIR=str(tmp_path / "ckpt"))
    cmd = [sys.executable, "-m", "torchcycle", "train", "--config", str(tmp_path / "c.yaml"), "--no-cache"]
    procs = [
        subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=400) for p in procs]
    for proc, (_, stderr) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
    client = MlflowClient(uri)
    assert sorted(str(mv.version) for mv in client.search_model_versions("name='race'")) == ["1", "2"]
    assert str(client.get_model_version_by_alias("race", "champion").version) in ("1", "2")
    assert not list((tmp_path / "ckpt").glob("*"))  # both finished: no checkpoint or temp file left


FRESH_STORE = """
import sys
from mlflow import MlflowClient
from torchcycle.tracking import use_tracking_uri
use_tracking_uri(sys.argv[1])  # what every flow's first line does
MlflowClient(sys.argv[1]).create_experiment(sys.argv[2])
"""


def test_commands_starting_on_one_fresh_store_at_once_all_find_it_whole(tmp_path: Path) -> None:
    """Each would run MLflow's migrations on the empty database; unserialised, a loser found a half-made schema
    ('table _alembic_tmp_tags already exists') on every retry."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    procs = [
        subprocess.Popen([sys.executable, "-c", FRESH_STORE, uri, f"e{i}"], stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    for proc in procs:
        assert proc.wait(300) == 0, proc.stderr.read()[-3000:]
    assert {"e0", "e1", "e2", "e3"} <= {e.name for e in MlflowClient(uri).search_experiments()}


# ---- properties --------------------------------------------------------------------------------------
_NAMES = st.sampled_from(["x1", "row_id", "note", "prediction", "proba_yes", "model_name", "model_run_id", "extra"])


@settings(max_examples=60, deadline=None)
@given(passthrough=st.lists(_NAMES, max_size=5))
def test_a_scored_batch_has_unique_column_names_or_is_refused(passthrough: list[str]) -> None:
    from torchcycle.registry import ResolvedModel
    from torchcycle.tasks.score import score_batch

    columns = dict.fromkeys(["x1", *passthrough])
    batch = pa.RecordBatch.from_pydict({c: [1.0, 2.0] for c in columns})

    def predict(frame: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"prediction": ["no", "yes"], "proba_yes": [0.1, 0.9]})

    columns_in = [c for c in dict.fromkeys(passthrough) if c != "x1"]  # an input file's names are unique
    try:
        out = score_batch(batch, predict, {"x1": "number"}, columns_in, ResolvedModel("m", "1", "r"))
    except DataError as err:
        assert "would be overwritten by the output" in str(err)
        assert {"prediction", "proba_yes", "model_name", "model_run_id"} & set(passthrough)
    else:
        assert len(set(out.schema.names)) == len(out.schema.names)
