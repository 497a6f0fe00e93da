"""Wall time of `torchcycle tune --parallel 2` against `--parallel 1` for the same trials, side by side in one run.

    python bench/bench_tune.py [--config configs/digits_mlp.yaml] [--trials 12]

1. One Prefect server (`prefect server start`, SQLite, its own PREFECT_HOME) for both runs, as a user with a
   running server has: neither run pays for a temporary server.
2. The same command twice, each into its own MLflow store, stage cache and study storage:
   torchcycle tune --config CONFIG --trials N --parallel K, with the random sampler (seeded by the config's
   seed, so both runs draw the same trials in the same order) and no pruning (every trial runs every epoch).
3. Prints, for K = 1 and 2: the whole command's wall time, the trials' span (first trial start to last trial
   end, from the study), the ratio K=2 / K=1 of both (goal: whole command <= 0.7), and checks that both runs
   ran the same trials.
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
    same = one["params"] == two["params"]
    print(f"{args.config.name}: {args.trials} trials, random sampler, no pruning; {os.cpu_count()} CPU cores,")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; one Prefect server for both runs")
    print(f"{'':14}{'command s':>11}{'trials span s':>15}")
    for name, r in (("--parallel 1", one), ("--parallel 2", two)):
        print(f"{name:14}{r['seconds']:>11.1f}{r['span']:>15.1f}")
    ratio, span_ratio = two["seconds"] / one["seconds"], two["span"] / one["span"]
    verdict = "met" if ratio <= GOAL else "NOT met"
    print(f"{'ratio 2/1':14}{ratio:>11.2f}{span_ratio:>15.2f}   goal: command <= {GOAL} ({verdict})")
    print(f"same trials in both runs: {'yes' if same else 'NO'} ({one['trials']} and {two['trials']})")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
