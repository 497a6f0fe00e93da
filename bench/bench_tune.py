"""Wall time of `torchcycle tune --parallel 2` against `--parallel 1` for the same trials, side by side in one run.

    python bench/bench_tune.py [--config configs/digits_mlp.yaml] [--trials 12]

1. One Prefect server (`prefect server start`, SQLite, its own PREFECT_HOME) for both runs, as a user with a
   running server has: neither run pays for a temporary server.
2. The same command twice, each into its own MLflow store, stage cache and study storage:
   torchcycle tune --config CONFIG --trials N --parallel K, with the random sampler (seeded by the config's
   seed, so both runs draw the same trials in the same order) and no pruning (every trial runs every epoch).
3. The machine's ceiling for these trials: the same fits (each trial's config, plain training, no tracking, no
   Prefect), one after the other in one warm process with torch's default threads (as --parallel 1 trains)
   against split over 2 warm worker processes of one torch thread each (as --parallel 2 trains).
4. The same fits over 2 Dask workers (one thread each), with Dask's default worker settings and with
   torchcycle's (torchcycle/dask_workers.yaml), against the 2 plain processes of step 3.
5. Prints, for K = 1 and 2: the whole command's wall time, the trials' span (first trial start to last trial
   end, from the study), the ratio K=2 / K=1 of both (goal: whole command <= 0.7), the ceiling's ratio, and
   checks that both runs ran the same trials.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GOAL = 0.7


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = _port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env = {k: v for k, v in env.items() if not k.startswith("PREFECT_API")}
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("the Prefect server did not start in 180 s")


def run(config: Path, trials: int, parallel: int, root: Path, api: str) -> dict:
    work = root / f"parallel-{parallel}"
    work.mkdir()
    url = f"sqlite:///{work / 'optuna.db'}"
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "TORCHCYCLE_CACHE_DIR": str(work / "cache"),
        "TORCHCYCLE_OPTUNA_STORAGE": url,
    }
    cmd = [str(BIN / "torchcycle"), "tune", "--config", str(config), "--trials", str(trials)]
    cmd += ["--parallel", str(parallel), "--study", "bench", "--json"]
    cmd += ["--set", "tune.sampler=random", "--set", "tune.pruner=none"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"tune --parallel {parallel} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="bench", storage=url)
    span = max(t.datetime_complete for t in study.trials) - min(t.datetime_start for t in study.trials)
    params = sorted(json.dumps(t.params, sort_keys=True) for t in study.trials)
    return {"seconds": seconds, "span": span.total_seconds(), "params": params, "trials": len(study.trials)}


def _fit_once(job: tuple[str, str]) -> float:
    """One fit of the config at `job[0]` with the trial params `job[1]` (JSON, as the study stores them) on its
    prepared data, no tracking; seconds."""
    from torchcycle.config import load_config, with_params
    from torchcycle.models.training import resolve_device
    from torchcycle.tasks.features import build_features
    from torchcycle.tasks.ingest import ingest
    from torchcycle.tasks.preprocess import preprocess
    from torchcycle.tasks.train import train
    from torchcycle.tasks.tune import config_values

    base = load_config(job[0], ["tune.pruner=none"])
    cfg = with_params(base, config_values(base, json.loads(job[1])))
    prepared = build_features(preprocess(ingest(cfg.data), cfg.data, cfg.seed), cfg.features, cfg.drift)
    start = time.perf_counter()
    train(prepared, cfg.model, cfg.train, seed=cfg.seed, device=resolve_device("cpu"), progress=False)
    return time.perf_counter() - start


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def ceiling(config: Path, params: list[str]) -> tuple[float, float, float]:
    """Seconds for the fits of `params` one after the other in this process (torch's default threads, as
    --parallel 1 trains), and split over 2 worker processes of one torch thread each (as --parallel 2 does): the
    wall time, and the sum of the fits' own times."""
    import multiprocessing as mp

    jobs = [(str(config), p) for p in params]
    _fit_once(jobs[0])  # warm: imports, first allocations
    start = time.perf_counter()
    for job in jobs:
        _fit_once(job)
    alone = time.perf_counter() - start
    with mp.get_context("spawn").Pool(2, initializer=_one_thread) as pool:
        pool.map(_fit_once, jobs[:2])  # warm both workers
        start = time.perf_counter()
        fits = pool.map(_fit_once, jobs, chunksize=1)
        split = time.perf_counter() - start
    return alone, split, sum(fits)


def on_dask(config: Path, params: list[str], ours: bool) -> tuple[float, float]:
    """Seconds for the same fits over a local Dask cluster of 2 worker processes of one thread each, with Dask's
    default worker settings or with torchcycle's (torchcycle/dask_workers.yaml, as --parallel 2 runs them): the
    wall time, and the sum of the fits' own times (Dask assigns the fits to workers ahead, so the wall time also
    shows how evenly)."""
    import logging

    from distributed import Client, LocalCluster

    from torchcycle.flows.scoring import local_cluster

    logging.getLogger("distributed").setLevel(logging.CRITICAL)  # the in-process scheduler's closing chatter
    make = local_cluster if ours else LocalCluster
    jobs = [(str(config), p) for p in params]
    kw = {"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    before = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    try:
        with make(**kw, silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
            client.run(_one_thread)
            client.gather(client.map(_fit_once, jobs[:2], pure=False))  # warm both workers
            start = time.perf_counter()
            fits = client.gather(client.map(_fit_once, jobs, pure=False))
            return time.perf_counter() - start, sum(fits)
    finally:  # a default nanny sets it in this process's environment, which later workers would inherit
        if before is None:
            os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "digits_mlp.yaml")
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        root = Path(tmp)
        server, api = start_server(root / "prefect-home")
        try:
            one = run(args.config.resolve(), args.trials, 1, root, api)
            two = run(args.config.resolve(), args.trials, 2, root, api)
        finally:
            server.terminate()
            server.wait(30)
    alone, split, split_fits = ceiling(args.config.resolve(), one["params"])
    defaults, ours = (on_dask(args.config.resolve(), one["params"], flag) for flag in (False, True))
    same = one["params"] == two["params"]
    print(f"{args.config.name}: {args.trials} trials, random sampler, no pruning; {os.cpu_count()} CPU cores,")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; one Prefect server for both runs")
    print(f"{'':14}{'command s':>11}{'trials span s':>15}")
    for name, r in (("--parallel 1", one), ("--parallel 2", two)):
        print(f"{name:14}{r['seconds']:>11.1f}{r['span']:>15.1f}")
    ratio, span_ratio = two["seconds"] / one["seconds"], two["span"] / one["span"]
    verdict = "met" if ratio <= GOAL else "NOT met"
    print(f"{'ratio 2/1':14}{ratio:>11.2f}{span_ratio:>15.2f}   goal: command <= {GOAL} ({verdict})")
    n = len(one["params"])
    print(f"{'bare fits':14}{'':>11}{alone:>15.1f}   the same {n} trials' fits in one process, no tracking")
    print(
        f"{'  2 processes':14}{'':>11}{split:>15.1f}   one torch thread each: the machine's ceiling {split / alone:.2f}"
    )
    for name, (wall, fits) in (("  Dask", defaults), ("  Dask, ours", ours)):
        print(
            f"{name:14}{'':>11}{wall:>15.1f}   2 Dask workers, {'torchcycle' if 'ours' in name else 'Dask'}'s worker "
            f"settings: each fit {fits / split_fits:.2f}x its time in the 2 processes"
        )
    print(f"same trials in both runs: {'yes' if same else 'NO'} ({one['trials']} and {two['trials']})")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
