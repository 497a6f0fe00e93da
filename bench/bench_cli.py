"""Latency a user feels at the registry commands, measured side by side in one run.

    python bench/bench_cli.py [--repeats 5]

1. A temporary embedded (SQLite) MLflow store with one registered model, `bench-model` v1 (alias champion),
   made through MlflowClient from a dummy source: listing reads registry metadata only, never a model.
2. Each a fresh process, as a user starts it, in rounds that alternate so all see the same machine load:
   (a) python -c "import mlflow"   the floor: listing needs MLflow's client, whatever else it skips
   (b) torchcycle models
   (c) torchcycle models bench-model
   One warm-up round first (not counted), then the best of --repeats rounds each.
3. Prints seconds (best and median) and the ratios b/a (goal <= 1.5) and c/a.

Prefect is kept off the network: PREFECT_HOME is a temporary folder, PREFECT_API_* are unset and
PREFECT_SERVER_ANALYTICS_ENABLED=false. tests/cli/test_cli_speed.py runs the same measurement (fewer rounds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAME = "bench-model"
GOAL = 1.5  # torchcycle models / import mlflow

_FILL = """
import sys
from mlflow.tracking import MlflowClient

uri, name, source = sys.argv[1:]
client = MlflowClient(uri)
client.create_registered_model(name)
version = client.create_model_version(name, source).version
client.set_registered_model_alias(name, "champion", version)
"""


def make_store(root: Path, name: str = NAME) -> str:
    """A SQLite store under `root` holding `name` v1 (champion); returns its tracking URI. Filled in a
    process of its own, so the caller imports no MLflow."""
    store = root / "mlflow"
    store.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    source = (store / "dummy-model").as_uri()  # never read: listing shows metadata only
    subprocess.run(
        [sys.executable, "-c", _FILL, uri, name, source], check=True, capture_output=True, env=env_for(uri, root)
    )
    return uri


def env_for(uri: str, root: Path) -> dict[str, str]:
    """The environment every measured process gets: this store, and a Prefect that reaches no server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        MLFLOW_TRACKING_URI=uri,
        PREFECT_HOME=str(root / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env


def torchcycle_cmd() -> list[str]:
    """`torchcycle` as a user types it: the console script beside this interpreter, else `python -m`."""
    script = Path(sys.executable).parent / "torchcycle"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torchcycle"]


def commands(name: str = NAME, with_name: bool = True) -> dict[str, list[str]]:
    cmds = {
        "import mlflow": [sys.executable, "-c", "import mlflow"],
        "torchcycle models": [*torchcycle_cmd(), "models"],
    }
    if with_name:
        cmds[f"torchcycle models {name}"] = [*torchcycle_cmd(), "models", name]
    return cmds


def run_once(cmd: list[str], env: dict[str, str], cwd: Path, expect: str | None) -> float:
    """Wall seconds of one fresh process; it must succeed (and print `expect` when given)."""
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or (expect is not None and expect not in done.stdout):
        raise RuntimeError(f"{cmd} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


def measure(
    cmds: dict[str, list[str]],
    env: dict[str, str],
    cwd: Path,
    repeats: int,
    expect: str | None = None,
    warm_up: bool = True,
) -> dict[str, list[float]]:
    """Seconds of every counted run of each command: a warm-up round (page cache, .pyc files), then
    `repeats` rounds in which the commands alternate, so that a burst of load elsewhere hits all alike."""
    if warm_up:
        for label, cmd in cmds.items():
            run_once(cmd, env, cwd, None if label == "import mlflow" else expect)
    times: dict[str, list[float]] = {label: [] for label in cmds}
    for _ in range(repeats):
        for label, cmd in cmds.items():
            times[label].append(run_once(cmd, env, cwd, None if label == "import mlflow" else expect))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="Counted rounds (best of these is reported).")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="torchcycle-bench-cli-") as tmp:
        root = Path(tmp)
        uri = make_store(root)
        env = env_for(uri, root)
        cmds = commands()
        times = measure(cmds, env, root, args.repeats, expect=NAME)

    print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"best and median of {args.repeats} alternating rounds, each a fresh process:")
    for label, runs in times.items():
        print(f"  {label:<32} best {min(runs):6.2f} s   median {statistics.median(runs):6.2f} s")
    a, b, c = times
    for name, other in (("b/a", b), ("c/a", c)):
        best = min(times[other]) / min(times[a])
        median = statistics.median(times[other]) / statistics.median(times[a])
        goal = f"   (goal <= {GOAL})" if other == b else ""
        print(f"ratio {name} ({other} / {a}): best {best:.2f}, median {median:.2f}{goal}")


if __name__ == "__main__":
    main()
