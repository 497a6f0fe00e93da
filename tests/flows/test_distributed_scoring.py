"""Distributed batch scoring on real Dask processes: a `dask scheduler` and two `dask worker`s on loopback,
reached through prefect-dask's DaskTaskRunner, compared row for row with single-process scoring."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli_env, free_port, register_classifier, scoring_table

from torchcycle.errors import DataError
from torchcycle.flows.scoring import score_files
from torchcycle.registry import ResolvedModel
from torchcycle.tasks.score import (
    FileResult,
    UnitResult,
    WorkUnit,
    commit_outputs,
    plan_units,
    row_group_spans,
)

NAME = "dask-test"
BIN = Path(sys.executable).parent


def _rows(n: int, seed: int) -> pd.DataFrame:
    frame = scoring_table(n, seed).drop(columns=["label"])
    frame.insert(0, "row_id", np.arange(seed * 10_000_000, seed * 10_000_000 + n))
    return frame


def _parquet(frame: pd.DataFrame, path: Path, row_group_size: int) -> Path:
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=row_group_size)
    return path


# ---- plain functions ------------------------------------------------------------------------------
def test_row_groups_are_packed_into_units_of_whole_read_packs_in_order() -> None:
    # read packs of <= 20 rows: (0,1) (2,3) (4); units of <= 40 rows made of whole packs
    assert row_group_spans([10, 10, 10, 10, 5], 40, 20) == [((0, 1, 2, 3), 0), ((4,), 40)]
    assert row_group_spans([10, 10, 10, 10, 5], 20, 20) == [((0, 1), 0), ((2, 3), 20), ((4,), 40)]
    # a unit never splits a pack: packs of 30 (3 groups) cannot fit units of 20
    assert row_group_spans([10, 10, 10, 10, 10, 10], 20, 30) == [((0, 1, 2), 0), ((3, 4, 5), 30)]
    assert row_group_spans([50, 10], 20, 20) == [((0,), 0), ((1,), 50)]  # larger than a unit: its own unit
    assert row_group_spans([0, 0, 30, 0], 20, 10) == [((0, 1, 2, 3), 0)]  # empty groups join a neighbour
    assert row_group_spans([], 20, 20) == []


def test_small_row_groups_are_read_in_full_batches(tmp_path: Path) -> None:
    """A file of many small row groups (a streaming writer's) is read in batches of --batch-rows, not a batch
    per group; a unit of whole packs reads exactly the batches the whole file does."""
    from torchcycle.tables import open_batches

    path = _parquet(_rows(1000, 1), tmp_path / "tiny-groups.parquet", 10)  # 100 groups of 10 rows
    with open_batches(path, {}, 300) as (_, batches, total):
        whole = [b.num_rows for b in batches]
    assert total == 1000 and whole == [300, 300, 300, 100]
    spans = row_group_spans([10] * 100, 600, 300)
    parts = []
    for groups, _ in spans:
        with open_batches(path, {}, 300, groups) as (_, batches, _total):
            parts += [b.num_rows for b in batches]
    assert parts == whole


def test_plan_units_splits_only_big_parquet_files(tmp_path: Path) -> None:
    big = _parquet(_rows(100, 1), tmp_path / "big.parquet", 25)
    small = _parquet(_rows(30, 2), tmp_path / "small.parquet", 10)
    text = tmp_path / "c.csv"
    _rows(100, 3).to_csv(text, index=False)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    out = tmp_path / "out.parquet"
    units = plan_units([(big, out), (small, out), (text, out), (broken, out)], unit_rows=50, batch_rows=25)
    assert all(Path(u.input).is_absolute() and Path(u.target).is_absolute() for u in units)  # for other hosts
    assert [(Path(u.input).name, u.row_groups, u.first_row) for u in units] == [
        ("big.parquet", (0, 1), 0),
        ("big.parquet", (2, 3), 50),
        ("small.parquet", None, 0),  # fits in one unit: scored whole
        ("c.csv", None, 0),  # CSV has no cheap split points
        ("broken.parquet", None, 0),  # its unit fails with the reader's error, naming the file
    ]
    assert [u.index for u in units] == list(range(5))


def _fake_result(unit: WorkUnit, tmp: Path, rows: int) -> UnitResult:
    part = tmp / f"{unit.index}.parquet"
    pq.write_table(pa.table({"row": np.arange(unit.first_row, unit.first_row + rows)}), part)
    return UnitResult(unit, str(part), rows, "digest" if unit.first_row == 0 else "")


def test_commit_outputs_all_or_nothing_for_a_file_per_file_for_a_directory(tmp_path: Path) -> None:
    model = ResolvedModel("m", "1", "run")
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    # one output file: a refused unit leaves nothing at the output path
    out = tmp_path / "all.parquet"
    units = [WorkUnit(str(a), str(out), 0, (0,), 0), WorkUnit(str(a), str(out), 1, (1,), 5)]
    outcomes = [(units[0], _fake_result(units[0], tmp_path, 5)), (units[1], DataError("a.parquet: bad value"))]
    with pytest.raises(DataError, match="bad value"):
        commit_outputs(model, [a], outcomes, [], out, 1.0)
    assert not out.exists()
    # the same units all good: the parts are merged in order (rows out == rows in)
    outcomes = [(units[1], _fake_result(units[1], tmp_path, 4)), (units[0], _fake_result(units[0], tmp_path, 5))]
    result = commit_outputs(model, [a], outcomes, [], out, 1.0)
    assert pq.read_table(out)["row"].to_pylist() == list(range(9))
    assert result.files == (FileResult(str(a), str(out), 9, "digest"),)
    # a directory: the good file is committed, the refused one named
    outdir = tmp_path / "out"
    ua, ub = WorkUnit(str(a), str(outdir / "a.out.parquet"), 0), WorkUnit(str(b), str(outdir / "b.out.parquet"), 1)
    with pytest.raises(DataError, match=r"1 of 2 file\(s\) refused \(1 scored.*b\.parquet: no data"):
        commit_outputs(model, [a, b], [(ua, _fake_result(ua, tmp_path, 3)), (ub, DataError("b.parquet: no data"))],
                       [], outdir, 1.0)  # fmt: skip
    assert pq.read_table(outdir / "a.out.parquet").num_rows == 3 and not (outdir / "b.out.parquet").exists()
    # anything but bad data (a lost worker, a full disk) commits nothing
    uc = WorkUnit(str(b), str(outdir / "c.out.parquet"), 1)
    with pytest.raises(OSError, match="gone"):
        commit_outputs(
            model, [a, b], [(uc, OSError("worker gone")), (ua, _fake_result(ua, tmp_path, 3))], [], outdir, 1
        )
    assert not (outdir / "c.out.parquet").exists()


# ---- a real cluster -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registered(tmp_path_factory, prefect_harness) -> dict:
    root = tmp_path_factory.mktemp("dask")
    return {"uri": register_classifier(root, NAME, epochs=5), "root": root}


class Cluster:
    """`dask scheduler` + `dask worker` processes, each in its own process group (a kill takes all of it)."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env, self.port = root, env, free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(
            [str(BIN / "dask"), *args], stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    def workers(self) -> int:
        from distributed import Client

        with Client(self.address, timeout=10) as client:
            return len(client.scheduler_info(n_workers=-1)["workers"])

    def kill(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(registered: dict, tmp_path_factory) -> Iterator[Cluster]:
    """A scheduler and two single-threaded workers on loopback; the workers load the model through MLflow and
    report their task runs to this session's Prefect server, as workers of a real cluster do."""
    root = tmp_path_factory.mktemp("cluster")
    env = cli_env(MLFLOW_TRACKING_URI=registered["uri"], MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    c = Cluster(root, env)
    c.start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", str(c.port), "--no-dashboard"])
    for i in (1, 2):
        c.start(f"worker{i}", ["worker", c.address, "--nthreads", "1", "--no-dashboard", "--name", f"w{i}"])
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if c.workers() == 2:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (root / "worker1.log").read_text()[-2000:]
            time.sleep(1)
        yield c
    finally:
        c.stop()


def _inputs(root: Path) -> Path:
    """Many files (Parquet and CSV) and one large Parquet file that is split by row groups."""
    folder = root / "in"
    folder.mkdir()
    for i in range(5):
        frame = _rows(700 + 50 * i, seed=i + 1)
        if i % 2:
            frame.to_csv(folder / f"day{i}.csv", index=False)
        else:
            _parquet(frame, folder / f"day{i}.parquet", 256)
    _parquet(_rows(40_000, seed=9), folder / "big.parquet", 4_000)  # 10 row groups -> 4 units of 12k rows
    return folder


def _same(a: Path, b: Path) -> None:
    left, right = pd.read_parquet(a), pd.read_parquet(b)
    # lineage columns: same values (the run id is the model's, not the scoring run's)
    pd.testing.assert_frame_equal(left, right, check_exact=True)


@pytest.mark.usefixtures("prefect_harness")
def test_dask_scoring_matches_single_process_row_for_row(registered: dict, cluster: Cluster, tmp_path: Path) -> None:
    uri = registered["uri"]
    folder = _inputs(tmp_path)
    single_batch = 8_000  # read packs of 2 row groups: the big file's units are 12,000-row-bounded runs of them
    single = score_files(NAME, str(folder), str(tmp_path / "single"), tracking_uri=uri, id_cols=["row_id"],
                         batch_rows=single_batch)  # fmt: skip
    spread = score_files(
        NAME, str(folder), str(tmp_path / "dask"), dask=cluster.address, tracking_uri=uri, id_cols=["row_id"],
        unit_rows=12_000, batch_rows=single_batch,
    )  # fmt: skip
    assert spread.rows == single.rows == 40_000 + sum(700 + 50 * i for i in range(5))
    assert [Path(f.input).name for f in spread.files] == [Path(f.input).name for f in single.files]
    assert [f.digest for f in spread.files] == [f.digest for f in single.files]
    # drift counted on the workers, unit by unit, adds up to exactly the single pass's counts
    assert spread.drift_counts is not None and spread.drift_counts == single.drift_counts
    assert spread.drift.psi == single.drift.psi and spread.drift.status == "ok"
    for f in single.files:
        _same(Path(f.output), tmp_path / "dask" / Path(f.output).name)
    assert len([f for f in spread.files if Path(f.input).name == "big.parquet"]) == 1
    big = pd.read_parquet(tmp_path / "dask" / f"big.parquet.{NAME}-v1.parquet")
    assert big["row_id"].tolist() == list(range(90_000_000, 90_040_000))  # input order across the units
    assert not [p for p in (tmp_path / "dask").iterdir() if p.name.startswith(".")]  # no parts left behind

    # one .parquet output for all Parquet inputs (CSV ids are text: another schema): parts merged in input order
    parquets = str(folder / "*.parquet")
    one = score_files(
        NAME, parquets, str(tmp_path / "all.parquet"), dask=cluster.address, tracking_uri=uri,
        id_cols=["row_id"], unit_rows=12_000, batch_rows=single_batch,
    )  # fmt: skip
    whole = score_files(NAME, parquets, str(tmp_path / "whole.parquet"), tracking_uri=uri, id_cols=["row_id"],
                        batch_rows=single_batch)  # fmt: skip
    assert one.rows == whole.rows
    _same(tmp_path / "all.parquet", tmp_path / "whole.parquet")

    # idempotent per model version: a second run scores nothing new
    again = score_files(NAME, str(folder), str(tmp_path / "dask"), dask=cluster.address, tracking_uri=uri)
    assert again.rows == 0 and all(f.skipped for f in again.files)


@pytest.mark.usefixtures("prefect_harness")
def test_a_refused_file_does_not_hold_up_the_others_on_dask(registered: dict, cluster: Cluster, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _parquet(_rows(500, 1), folder / "good.parquet", 100)
    bad = _rows(500, 2)
    bad["x1"] = "high"  # text where a number was trained (text of numbers would be read as the numbers)
    _parquet(bad, folder / "bad.parquet", 100)
    with pytest.raises(DataError, match=r"1 of 2 file\(s\) refused.*bad\.parquet"):
        score_files(NAME, str(folder), str(tmp_path / "out"), dask=cluster.address, tracking_uri=registered["uri"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"good.parquet.{NAME}-v1.parquet"]


@pytest.mark.usefixtures("prefect_harness")
def test_a_worker_killed_mid_run_completes_or_leaves_nothing(
    registered: dict, cluster: Cluster, tmp_path: Path
) -> None:
    uri = registered["uri"]
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(8):
        _parquet(_rows(60_000, seed=20 + i), folder / f"f{i}.parquet", 10_000)
    out = tmp_path / "out.parquet"
    outcome: dict = {}

    def score() -> None:
        try:
            outcome["result"] = score_files(NAME, str(folder), str(out), dask=cluster.address, tracking_uri=uri,
                                            unit_rows=20_000)  # fmt: skip
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=score)
    thread.start()
    deadline = time.monotonic() + 180
    while not list(tmp_path.glob(".out.parquet.*.partial/*.parquet")):  # the first part is written: mid-run
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.05)
    cluster.kill("worker2")
    thread.join(300)
    assert not thread.is_alive()
    print("killed worker:", "completed" if "result" in outcome else f"failed: {outcome['error']!r}"[:300])
    if "result" in outcome:  # Dask reran the lost units on the other worker
        whole = score_files(NAME, str(folder), str(tmp_path / "whole.parquet"), tracking_uri=uri)
        assert outcome["result"].rows == whole.rows == 8 * 60_000
        _same(out, tmp_path / "whole.parquet")
    else:
        assert not out.exists(), outcome["error"]
    assert not list(tmp_path.glob(".out.parquet*")), "no parts or temp files left behind"


# ---- the command line -----------------------------------------------------------------------------
def test_cli_workers_scores_like_a_single_process(registered: dict, tmp_path: Path) -> None:
    """`torchcycle predict --workers 2` as a user runs it: its own local cluster and temporary Prefect API."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        _parquet(_rows(3000, seed=i), folder / f"f{i}.parquet", 1000)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(MLFLOW_TRACKING_URI=registered["uri"], PREFECT_HOME=str(tmp_path / "prefect"))
    cmd = [str(BIN / "torchcycle"), "predict", "-m", NAME, "-i", str(folder), "--json"]
    spread = subprocess.run([*cmd, "-o", str(tmp_path / "two"), "--workers", "2", "--unit-rows", "2000"],
                            env=env, capture_output=True, text=True, timeout=400)  # fmt: skip
    assert spread.returncode == 0, spread.stderr[-3000:]
    assert json.loads(spread.stdout.strip().splitlines()[-1])["rows"] == 9000
    assert "Traceback" not in spread.stderr and "Error logging to API" not in spread.stderr
    single = subprocess.run([*cmd, "-o", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=400)
    assert single.returncode == 0, single.stderr[-3000:]
    for f in sorted((tmp_path / "one").iterdir()):
        _same(f, tmp_path / "two" / f.name)


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["--workers", "2", "--dask", "tcp://127.0.0.1:8786"], 2, "give one of them"),
        (["--dask", "not an address"], 2, "is not a Dask scheduler address"),
        (["--dask", "tcp://127.0.0.1:99999"], 2, "is not a Dask scheduler address"),
        (["--workers", "-1"], 2, "--workers"),
        (["--dask", "tcp://127.0.0.1:{free}"], 3, "does not answer"),
    ],
)
def test_cli_dask_options_refused_in_one_line(registered: dict, tmp_path: Path, args, code, fragment) -> None:
    src = _parquet(_rows(10, 1), tmp_path / "in.parquet", 10)
    args = [a.replace("{free}", str(free_port())) for a in args]
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"]}
    cmd = [str(BIN / "torchcycle"), "predict", "-m", NAME, "-i", str(src), "-o", str(tmp_path / "out.parquet"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out.parquet").exists()
    shutil.rmtree(tmp_path / "in.parquet", ignore_errors=True)


def test_a_dask_address_that_never_speaks_dask_is_exit_3_for_predict(registered: dict, tmp_path: Path) -> None:
    """An address that takes the connection and never speaks Dask: distributed's Client would wait for ever;
    `predict --dask` gives one error line, exit 3, in bounded time, and writes nothing."""
    import socket

    from torchcycle.flows.scoring import DASK_CONNECT_TIMEOUT_S

    src = _parquet(_rows(10, 1), tmp_path / "in.parquet", 10)
    env = cli_env(MLFLOW_TRACKING_URI=registered["uri"])
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        out = tmp_path / "out.parquet"
        cmd = [str(BIN / "torchcycle"), "predict", "-m", NAME, "-i", str(src), "-o", str(out), "--dask", address]
        start = time.monotonic()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - start
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and f"{address} does not answer" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not out.exists()
    assert seconds < 2 * DASK_CONNECT_TIMEOUT_S + 90, seconds  # the wait, plus the command's start-up


def test_the_score_deployment_carries_the_dask_scheduler(tmp_path: Path) -> None:
    from torchcycle.flows.deployments import default_specs

    (plain,) = [s for s in default_specs() if s.name == "score"]
    (spread,) = [s for s in default_specs(score_dask="tcp://dask-scheduler:8786") if s.name == "score"]
    assert "dask" not in plain.parameters  # no scheduler: scored in the worker's process, as before
    assert spread.parameters["dask"] == "tcp://dask-scheduler:8786"
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "TORCHCYCLE_DASK_ADDRESS": "no such thing"}
    proc = subprocess.run([str(BIN / "torchcycle"), "deploy"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is not a Dask scheduler address" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.usefixtures("prefect_harness")
def test_a_scheduler_without_workers_stops_the_run_instead_of_waiting(
    registered: dict, tmp_path: Path, monkeypatch
) -> None:
    import torchcycle.flows.scoring as scoring
    from torchcycle.cli import _classify
    from torchcycle.errors import ServiceDown

    monkeypatch.setattr(scoring, "WORKER_WAIT_S", 3)
    lonely = Cluster(tmp_path, cli_env())
    lonely.start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", str(lonely.port), "--no-dashboard"])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert lonely.workers() == 0
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        src = _parquet(_rows(50, 1), tmp_path / "in.parquet", 10)
        with pytest.raises(ServiceDown, match="no Dask worker joined") as err:
            score_files(NAME, str(src), str(tmp_path / "out.parquet"), dask=lonely.address,
                        tracking_uri=registered["uri"])  # fmt: skip
        assert not (tmp_path / "out.parquet").exists()
        message, code = _classify(err.value)
        assert code == 3 and "no Dask worker joined" in message
    finally:
        lonely.stop()


@pytest.mark.usefixtures("prefect_harness")
def test_tuning_trials_run_on_the_dask_workers(cluster: Cluster, tmp_path: Path) -> None:
    """`torchcycle tune --dask`: each trial a task run on a worker process, the study and runs shared."""
    import optuna
    from mlflow.tracking import MlflowClient

    from torchcycle.config import config_from_dict
    from torchcycle.flows.tuning import tune_study

    cfg = config_from_dict(
        {
            "name": "dask-tune",
            "experiment": "tests",
            "data": {"source": "sklearn:digits"},
            "model": {"kind": "mlp", "hidden": [16]},
            "train": {"epochs": 4, "patience": 0, "lr": 0.01},
            "tune": {"space": {"train.lr": {"log_uniform": [1e-3, 3e-2]}}, "pruner": "none"},
        }
    )
    uri, url = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    s = tune_study(cfg, 3, parallel=2, dask=cluster.address, tracking_uri=uri, storage=url, study="on-dask")
    assert s.counts == {"COMPLETE": 3} and s.winner is not None and s.winner.model_version == "1"
    assert len(optuna.load_study(study_name="on-dask", storage=url).trials) == 3
    client = MlflowClient(uri)
    parent = client.get_run(s.parent_run_id)
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{s.parent_run_id}'")
    pids = {k.data.tags["torchcycle.trial_process"].rsplit(":", 1)[1] for k in kids}
    assert len(kids) == 3 and str(os.getpid()) not in pids  # trained in the workers' processes
    assert pids <= {str(p.pid) for p in cluster.procs.values()} | _children_pids(cluster)


def _children_pids(cluster: Cluster) -> set[str]:
    """The worker processes `dask worker` started under its nanny."""
    out = subprocess.run(["ps", "-eo", "pid,pgid"], capture_output=True, text=True).stdout.split()[2:]
    groups = {str(p.pid) for p in cluster.procs.values()}
    return {pid for pid, pgid in zip(out[::2], out[1::2], strict=True) if pgid in groups}
