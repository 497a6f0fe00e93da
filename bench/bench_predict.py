"""Batch-scoring throughput and memory, measured side by side in one run.

    python bench/bench_predict.py [--rows 1000000] [--big-rows 4000000] [--repeats 3]

1. Writes Parquet with ROWS x 20 float features (and BIG_ROWS for the memory check) and trains a
   tabular MLP 20-64-64-2 (model.bins 0: the inputs as they are) on a 50k-row sample through the real training
   flow (temporary MLflow store), and the same MLP with the default input encoding (16 bins per input).
2. (a) pyarrow alone: read the file and write it back (`read_table` + `write_table`, the fastest form).
   (b) torchcycle's scoring path: the model loaded through MLflow (models:/NAME/1), then `Scorer.score`,
       the code `torchcycle predict` runs inside its flow: stream, check schema, predict, write Parquet.
   (a) and (b) alternate, best of --repeats each, so both see the same machine load.
3. Peak RSS of the scoring path on ROWS and on BIG_ROWS, each in a fresh process.

   (b+) the same scoring path counting drift against the model's reference in every batch, as the scoring
       flow does; alternated with (a) and (b).
   (b0) (b) with the features through the fitted scikit-learn ColumnTransformer's own transform, not the
       numpy form of it that scoring uses (the same numbers): what that form saves, alternated too.
   (b16) (b) with the binned MLP (340 inputs): what the default input encoding costs a scoring run.
Prints times, the b/a ratio (goal <= 1.5), the drift cost (b+)/b (goal <= 1.10), rows/s and the RSS ratio
big/small (goal <= 1.1).

    python bench/bench_predict.py --distributed [--files 16] [--rows 1000000] [--workers 2]

4. Distributed: FILES Parquet files of ROWS rows each, scored into a directory (c) in one process
   (`Scorer.score`), and through the scoring flow on a local Dask cluster of (d) 1 worker and (e) WORKERS
   workers (processes, one thread each), the cluster started and the model loaded on every worker
   beforehand (a running cluster's steady state). Prints times, d/e (goal >= 1.6 with 2 workers), the peak
   RSS of each worker while scoring, and checks that every output equals the single-process one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
N_FEATURES = 20
NAME = "bench-mlp"
BINNED = "bench-mlp-binned"


def make_data(path: Path, rows: int, seed: int, chunk: int = 500_000) -> None:
    """Features x ~ N(0, 1) (float64); label = sign of a fixed linear score plus noise. Written in chunks."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    w = np.linspace(-1, 1, N_FEATURES)
    writer = None
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        x = rng.standard_normal((n, N_FEATURES))
        cols = {f"f{i:02d}": x[:, i] for i in range(N_FEATURES)}
        cols["label"] = (x @ w + 0.3 * rng.standard_normal(n) > 0).astype(np.int64)
        table = pa.table(cols)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=131_072)
    writer.close()


def train(work: Path, uri: str) -> None:
    """NAME: the MLP 20-64-64-2 with its inputs as they are (model.bins 0); BINNED: the same with the MLP's default
    input encoding (16 bins on each of the 20 inputs: 340 inputs), what a minimal config trains on this table."""
    import pandas as pd

    from torchcycle.config import config_from_dict
    from torchcycle.flows.training import training_flow

    sample = work / "train.parquet"
    pd.read_parquet(work / "small.parquet").head(50_000).to_parquet(sample)
    for name, bins in ((NAME, 0), (BINNED, "auto")):
        cfg = config_from_dict(
            {
                "name": name,
                "experiment": "bench",
                "data": {"source": f"file:{sample}", "target": "label"},
                "model": {"kind": "mlp", "hidden": [64, 64], "bins": bins},
                "train": {"epochs": 3, "batch_size": 512, "lr": 0.003, "patience": 0},
            }
        )
        summary = training_flow(cfg, tracking_uri=uri)
        print(f"trained {summary.model_uri}: test_accuracy {summary.metrics['test_accuracy']:.4f}", flush=True)


def load_scorer(uri: str, work: Path, drift: bool = False, name: str = NAME):
    """The Scorer `torchcycle predict` runs; `drift`: also counting every batch against the model's drift
    reference, as the scoring flow does (without: the scoring path alone)."""
    from mlflow.tracking import MlflowClient

    from torchcycle.registry import ModelRef, resolve_model
    from torchcycle.tasks.score import load_model_task

    model = resolve_model(MlflowClient(uri), ModelRef.parse(f"{name}/1"))
    loaded = load_model_task.fn(uri, model)  # the task's plain function: same code, no Prefect run
    scorer, counts = loaded.scorer(model, (), 65_536)
    assert counts is not None, "the model carries no drift reference"
    scorer.progress = False
    if not drift:
        scorer.observe = None
    return scorer


def features_only(src: Path, dst: Path) -> None:
    """Scoring input = the features without the label (what a user would score)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src)
    writer = pq.ParquetWriter(dst, pf.schema_arrow.remove(pf.schema_arrow.get_field_index("label")))
    for batch in pf.iter_batches(batch_size=131_072):
        writer.write_batch(batch.drop_columns(["label"]))
    writer.close()


def time_pyarrow(src: Path, out: Path) -> float:
    import pyarrow.parquet as pq

    t = time.perf_counter()
    pq.write_table(pq.read_table(src), out)
    return time.perf_counter() - t


@contextlib.contextmanager
def sklearn_transform() -> Iterator[None]:
    """Scoring with the fitted ColumnTransformer's own transform instead of its numpy form (FeaturePipeline's
    numeric fast path off): the (b0) row, what the scoring path cost before that form."""
    from torchcycle.runtime.bundle import FeaturePipeline

    fast = FeaturePipeline._affine
    FeaturePipeline._affine = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        FeaturePipeline._affine = fast  # type: ignore[method-assign]


def time_scoring(scorer, src: Path, out: Path) -> float:
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    result = scorer.score([src], out)
    seconds = time.perf_counter() - t
    assert result.rows == _rows(src), "rows out != rows in"
    return seconds


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _rss_mib() -> float:
    """Current resident set size (Linux /proc); falls back to the lifetime peak elsewhere."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(uri: str, work: Path, src: Path) -> None:
    """One fresh process: load the model, score `src`, report seconds and RSS (MiB) sampled while scoring.

    Sampling (every 5 ms) rather than ru_maxrss: loading torch + MLflow peaks higher than scoring
    does, and would hide how scoring's own memory grows with the file."""
    import threading

    scorer = load_scorer(uri, work)
    before = _rss_mib()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds = time_scoring(scorer, src, work / f"child-{src.stem}.parquet")
    done.set()
    sampler.join()
    print(json.dumps({"seconds": seconds, "peak_mib": max(peak[0], _rss_mib()), "before_mib": before}))


def _worker_rss() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _load_on_worker(uri: str, model) -> str:
    from torchcycle.tasks.score import worker_model

    worker_model(uri, model)
    return "loaded"


def time_distributed(uri: str, model, folder: Path, out: Path, workers: int) -> tuple[float, dict[str, float]]:
    """Seconds of the scoring flow on a fresh local cluster of `workers` processes (model preloaded on each),
    and each worker's peak RSS (MiB) sampled every 50 ms while it scores."""
    import logging
    import shutil
    import threading

    from distributed import Client

    from torchcycle.flows.scoring import local_cluster, score_files

    shutil.rmtree(out, ignore_errors=True)
    with (
        local_cluster(  # the settings `predict --workers` runs its workers with
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
        ) as cluster,  # fmt: skip
        Client(cluster) as client,
    ):
        client.run(_load_on_worker, uri, model)
        peaks: dict[str, float] = {}
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                for addr, mib in client.run(_worker_rss).items():
                    peaks[addr] = max(peaks.get(addr, 0.0), mib)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t = time.perf_counter()
        result = score_files(f"{NAME}/1", str(folder), str(out), dask=cluster.scheduler_address, tracking_uri=uri)
        seconds = time.perf_counter() - t
        done.set()
        sampler.join()
    assert result.rows == sum(_rows(p) for p in folder.iterdir()), "rows out != rows in"
    return seconds, peaks


def _same_outputs(a: Path, b: Path) -> bool:
    import pyarrow.parquet as pq

    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        pq.read_table(a / n).equals(pq.read_table(b / n)) for n in names
    )


def distributed(args: argparse.Namespace) -> None:
    from mlflow.tracking import MlflowClient

    from torchcycle.registry import ModelRef, resolve_model

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{work / 'mlflow.db'}"
        os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
        print(f"writing {args.files} files x {args.rows:,} rows x {N_FEATURES} float features ...", flush=True)
        make_data(work / "small.parquet", args.rows, seed=0)
        folder = work / "in"
        folder.mkdir(exist_ok=True)
        for i in range(args.files):
            make_data(work / "tmp.parquet", args.rows, seed=100 + i)
            features_only(work / "tmp.parquet", folder / f"part-{i:03d}.parquet")
        (work / "tmp.parquet").unlink()
        train(work, uri)
        model = resolve_model(MlflowClient(uri), ModelRef.parse(f"{NAME}/1"))

        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=120):
            os.environ["PREFECT_API_URL"] = _harness_url()  # the workers report to the same API
            scorer = load_scorer(uri, work, drift=True)  # the flow counts drift on every path
            t = time.perf_counter()
            single = scorer.score(sorted(folder.iterdir()), work / "out-single")
            tc = time.perf_counter() - t
            td, _peaks1 = time_distributed(uri, model, folder, work / "out-1", 1)
            te, peaks = time_distributed(uri, model, folder, work / "out-n", args.workers)
            same = _same_outputs(work / "out-single", work / "out-n") and _same_outputs(work / "out-1", work / "out-n")

    n = single.rows
    print()
    print(f"{'path':<52}{'seconds':>10}{'rows/s':>14}")
    print(f"{'(c) one process, Scorer.score':<52}{tc:>10.2f}{n / tc:>14,.0f}")
    print(f"{'(d) scoring flow on Dask, 1 worker':<52}{td:>10.2f}{n / td:>14,.0f}")
    print(f"{f'(e) scoring flow on Dask, {args.workers} workers':<52}{te:>10.2f}{n / te:>14,.0f}")
    print(f"ratio d/e = {td / te:.2f}   (goal >= 1.6 with 2 workers);   c/e = {tc / te:.2f}")
    for addr, mib in sorted(peaks.items()):
        print(f"peak RSS of worker {addr}: {mib:.0f} MiB")
    print(f"outputs identical to the single-process ones: {same}")


def _harness_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--big-rows", type=int, default=4_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp dir)")
    ap.add_argument("--distributed", action="store_true", help="the Dask rows (4. above) instead")
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--child", nargs=3, metavar=("URI", "WORK", "SRC"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    if args.distributed:
        distributed(args)
        return
    if args.child:
        uri, work, src = args.child
        child(uri, Path(work), Path(src))
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{work / 'mlflow.db'}"
        print(f"writing {args.rows:,} and {args.big_rows:,} rows x {N_FEATURES} float features ...", flush=True)
        make_data(work / "small.parquet", args.rows, seed=0)
        make_data(work / "big.parquet", args.big_rows, seed=1)
        features_only(work / "small.parquet", work / "small_x.parquet")
        features_only(work / "big.parquet", work / "big_x.parquet")
        os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
        train(work, uri)

        scorer, drifting = load_scorer(uri, work), load_scorer(uri, work, drift=True)
        binned = load_scorer(uri, work, name=BINNED)
        src = work / "small_x.parquet"
        time_scoring(scorer, src, work / "warm.parquet")  # warm-up: page cache, allocator, torch threads
        time_scoring(drifting, src, work / "warm.parquet")
        time_scoring(binned, src, work / "warm.parquet")
        a, b, c, b0, b16 = [], [], [], [], []
        for _ in range(args.repeats):
            a.append(time_pyarrow(src, work / "copy.parquet"))
            b.append(time_scoring(scorer, src, work / "scored.parquet"))
            c.append(time_scoring(drifting, src, work / "scored.parquet"))
            with sklearn_transform():
                b0.append(time_scoring(scorer, src, work / "scored.parquet"))
            b16.append(time_scoring(binned, src, work / "scored.parquet"))
        ta, tb, tc, tb0, tb16 = min(a), min(b), min(c), min(b0), min(b16)

        rss = {}
        for label, path in (("small", src), ("big", work / "big_x.parquet")):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", uri, str(work), str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
            rss[label] = json.loads(proc.stdout.strip().splitlines()[-1])

    n = args.rows
    print()
    print(f"{'path':<44}{'seconds':>10}{'rows/s':>14}")
    print(f"{'(a) pyarrow read_table + write_table':<44}{ta:>10.3f}{n / ta:>14,.0f}")
    print(f"{'(b) torchcycle scoring (stream+check+predict)':<44}{tb:>10.3f}{n / tb:>14,.0f}")
    print(f"{'(b+) the same, counting drift per batch':<44}{tc:>10.3f}{n / tc:>14,.0f}")
    print(f"{'(b0) (b) with scikit-learn transforming':<44}{tb0:>10.3f}{n / tb0:>14,.0f}")
    print(f"{'(b16) (b), the MLP with 16 bins per input':<44}{tb16:>10.3f}{n / tb16:>14,.0f}")
    print(f"ratio b/a = {tb / ta:.2f}   (goal <= 1.5; best of {args.repeats}, alternated)")
    print(f"drift cost (b+)/b = {tc / tb:.3f}   (goal <= 1.10)")
    print(f"ratio b0/a = {tb0 / ta:.2f}   (the features through scikit-learn's ColumnTransformer, as before)")
    print(f"ratio b16/a = {tb16 / ta:.2f}   (the default input encoding of a table's MLP: 340 inputs, not 20)")
    print()
    for label, rows in (("small", args.rows), ("big", args.big_rows)):
        r = rss[label]
        print(
            f"peak RSS while scoring {rows:>10,} rows: {r['peak_mib']:6.0f} MiB"
            f"  (model loaded: {r['before_mib']:.0f} MiB, growth {r['peak_mib'] - r['before_mib']:.0f} MiB)"
        )
    print(f"ratio big/small = {rss['big']['peak_mib'] / rss['small']['peak_mib']:.2f}   (goal <= 1.1)")


if __name__ == "__main__":
    main()
