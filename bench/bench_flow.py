"""Orchestration overhead: one `torchcycle train` end to end against the same stages called bare.

    python bench/bench_flow.py [--config configs/digits_mlp.yaml] [--repeats 3] [--flow-repeats 5] [--flow-only]

Everything runs in a temporary folder (its own MLflow store, Prefect home and stage cache), with the stage cache
off (`--no-cache`), so every run trains. In rounds that alternate, so all see the same machine load:

(E2) `torchcycle train --config CONFIG --no-cache`, a fresh process as a user starts it, wall time (it starts
     Prefect's temporary server for the command);
(E3) the same with PREFECT_API_URL naming a running `prefect server start` (nothing to start);
(S)  a fresh process that imports the stages and calls them bare, once: what a script doing the same work costs.
Before the rounds, (E1): the first command in a new folder (the MLflow and Prefect databases are created).

Then one process measures, after its imports (see CHILD), on Prefect's temporary API as `torchcycle train` starts
it (`torchcycle.local_server.starting_temporary_api`), in alternated rounds:
(F)  `training_flow(cfg, cache=False)`: the flow, its tasks, their tracking;
(Fh) the same with Prefect's default flow-run heartbeats (every 180 s), as a flow run against a running server has
     them: Prefect joins its heartbeat thread, which sleeps in 1 s steps, at the end of every flow run;
(B)  the same stage functions called bare (plain functions, no Prefect), in the flow's order, on the same store;
(0)  an empty flow run, and one of as many no-op task runs as (F) has: what a flow run and its task runs cost by
     themselves (an empty run may end before its heartbeat thread starts, so heartbeats show in Fh - F only);
and the CPU seconds Prefect's server spends on each (F), during and after it (its flow run, task runs, logs).

Prints the best of --repeats (E, S) and --flow-repeats (F, Fh, B) of each, the ratio F/B (goal <= 1.25), the
median of the paired differences F - B, and the fixed start-up E - F.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
GOAL = 1.25

from bench_tune import start_server  # noqa: E402


def _env(work: Path, api_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_"))}
    env.update(
        PREFECT_HOME=str(work / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        TORCHCYCLE_CACHE_DIR=str(work / "cache"),
        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow' / 'mlflow.db'}",
        PYTHONPATH=str(ROOT),
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def run_cli(work: Path, config: Path, api_url: str | None = None) -> float:
    cli = Path(sys.executable).parent / "torchcycle"
    t = time.perf_counter()
    proc = subprocess.run(
        [str(cli), "train", "--config", str(config), "--no-cache"],
        cwd=work,
        env=_env(work, api_url),
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"torchcycle train failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return seconds


COLD_SCRIPT = r"""
import sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[2])
from bench_flow import bare_stages
from torchcycle.config import load_config
from torchcycle.tracking import resolve_tracking_uri, use_tracking_uri
uri = resolve_tracking_uri()
use_tracking_uri(uri)
bare_stages(load_config(sys.argv[1], []), uri)
"""

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from mlflow.tracking import MlflowClient
from torchcycle.config import load_config
from torchcycle.flows.training import training_flow
from torchcycle.tracking import use_tracking_uri, resolve_tracking_uri
sys.path.insert(0, sys.argv[2])
from bench_flow import TASK_RUNS, bare_stages, cpu_seconds, empty_flow, settle
out = {"imports": time.perf_counter() - t0}
cfg = load_config(sys.argv[1], [])
uri = resolve_tracking_uri()

t = time.perf_counter()
use_tracking_uri(uri)
MlflowClient(uri).search_experiments(max_results=1)
out["store"] = time.perf_counter() - t

from prefect.settings import temporary_settings
from torchcycle.local_server import starting_temporary_api
t = time.perf_counter()
with starting_temporary_api() as ready:  # what `torchcycle train` runs its flow on without PREFECT_API_URL
    ready()
    out["server"] = time.perf_counter() - t
    # the first flow run of a process pays for Prefect's client, its event and log workers
    t = time.perf_counter(); training_flow(cfg, cache=False); out["flow_first"] = time.perf_counter() - t
    # Prefect's default heartbeats, as a flow run against a running server has them
    def beating():
        return temporary_settings(updates={"flows.heartbeat_frequency": 180})
    runs = {k: [] for k in ("flow", "flow_hb", "bare", "server_cpu", "empty", "tasks", "tasks_cpu")}
    for _ in range(int(sys.argv[3])):  # alternate, so all see the same load; each on a quiet server
        settle(); c = cpu_seconds()
        t = time.perf_counter(); training_flow(cfg, cache=False); runs["flow"].append(time.perf_counter() - t)
        settle(); runs["server_cpu"].append(cpu_seconds() - c)  # all the server does for (F), also after it
        with beating():
            t = time.perf_counter(); training_flow(cfg, cache=False); runs["flow_hb"].append(time.perf_counter() - t)
        settle()
        t = time.perf_counter(); bare_stages(cfg, uri); runs["bare"].append(time.perf_counter() - t)
        settle()
        t = time.perf_counter(); empty_flow(); runs["empty"].append(time.perf_counter() - t)
        settle(); c = cpu_seconds()
        t = time.perf_counter(); empty_flow(TASK_RUNS); runs["tasks"].append(time.perf_counter() - t)
        settle(); runs["tasks_cpu"].append(cpu_seconds() - c)
    out.update(runs)
    t = time.perf_counter()
out["server_stop"] = time.perf_counter() - t  # with the drain of logs and events
print(json.dumps(out))
"""


def settle(limit_s: float = 10.0) -> None:
    """Send the queued logs and events, then wait until Prefect's server is idle (under 20 ms of CPU in 250 ms), so
    each measurement starts as a command does, on a quiet server. A flow run created while the server still
    writes the last one's events can be answered 503 "database is locked" (its SQLite), and Prefect's client then
    retries after 2 s."""
    from torchcycle.local_server import drain_logs_and_events

    drain_logs_and_events()
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before = cpu_seconds()
        time.sleep(0.25)
        if cpu_seconds() - before < 0.02:
            return


def cpu_seconds() -> float:
    """CPU seconds used so far by this process's children: Prefect's temporary API server (the only child)."""
    import psutil

    total = 0.0
    for kid in psutil.Process().children(recursive=True):
        try:
            total += sum(kid.cpu_times()[:2])
        except psutil.NoSuchProcess:
            continue
    return total


TASK_RUNS = 14  # in one training_flow of digits_mlp, ingest to finish-mlflow-run (the Prefect UI lists them)


def empty_flow(tasks: int = 0) -> None:
    """A flow run of `tasks` no-op task runs: what a flow run and its task runs cost by themselves."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    @task(name="bench-noop", cache_policy=NO_CACHE, persist_result=False)
    def noop(i: int) -> int:
        return i

    @flow(name="bench-empty")
    def empty() -> None:
        for i in range(tasks):
            noop(i)

    empty()


def bare_stages(cfg, uri: str) -> None:
    """The training flow's stages in the flow's order, as plain functions, no Prefect: what the flow would cost
    with nothing around its stages (same data, same MLflow store and calls; the gate without its Prefect lock)."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from torchcycle.config import check_against_task
    from torchcycle.models.training import resolve_device
    from torchcycle.tasks.evaluate import evaluate
    from torchcycle.tasks.features import build_features
    from torchcycle.tasks.gate import decide_and_record, default_metric
    from torchcycle.tasks.ingest import ingest
    from torchcycle.tasks.preprocess import preprocess
    from torchcycle.tasks.register import input_example, lineage_tags, register_model, write_bundle
    from torchcycle.tasks.train import train
    from torchcycle.tasks.validate import validate
    from torchcycle.tracking import (
        MlflowEpochLogger,
        describe_run_task,
        finish_run_task,
        log_datasets_task,
        log_evaluation_task,
        log_history_task,
        start_run_task,
    )

    raw = ingest(cfg.data)
    validate(raw)
    check_against_task(cfg, raw.task)
    run_id = start_run_task.fn(uri, cfg.experiment, f"{cfg.name}-bare", cfg.flat_params(), {})
    splits = preprocess(raw, cfg.data, cfg.seed)
    prepared = build_features(splits, cfg.features, cfg.drift)
    log_datasets_task.fn(uri, run_id, splits.named(), name=cfg.name, source=cfg.data.source, target=raw.target)
    callback = MlflowEpochLogger(MlflowClient(uri), run_id)
    device = resolve_device(cfg.train.device)
    trained = train(prepared, cfg.model, cfg.train, seed=cfg.seed, device=device, callback=callback)
    log_history_task.fn(uri, run_id, trained.fit.history)
    report = evaluate(trained, prepared)
    log_evaluation_task.fn(uri, run_id, report.metrics, report.figures)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = write_bundle(trained, prepared, raw.target, Path(tmp) / "bundle")
        reg = register_model(
            tracking_uri=uri,
            run_id=run_id,
            name=cfg.name,
            bundle_dir=bundle,
            example=input_example(prepared, raw.target),
            tags=lineage_tags(raw.digest, cfg.config_hash()),
        )
    metric = cfg.gate.metric or default_metric(raw.task)
    client = MlflowClient(uri)
    value = report.metrics[metric]
    decide_and_record(
        client, uri, reg.name, reg.version, metric, value, cfg.gate.margin, prepared.test_frame, raw.target, "bare"
    )
    describe_run_task.fn(uri, run_id, "bare")
    finish_run_task.fn(uri, run_id)


def _python(work: Path, script: str, *args: str) -> str:
    """`python -c SCRIPT ARGS` in `work` with the bench's environment; its stdout (exits with its stderr on failure)."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=work, env=_env(work), capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"a measurement failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


def run_script(work: Path, config: Path) -> float:
    t = time.perf_counter()
    _python(work, COLD_SCRIPT, str(config), str(ROOT / "bench"))
    return time.perf_counter() - t


def run_child(work: Path, config: Path, repeats: int) -> dict:
    out = _python(work, CHILD, str(config), str(ROOT / "bench"), str(repeats))
    return json.loads(out.strip().splitlines()[-1])


def run_commands(work: Path, config: Path, repeats: int) -> tuple[float, float, float, float]:
    """E1 once, then `repeats` alternated rounds of E2, E3 and S: (E1, best E2, best E3, best S)."""
    e1 = run_cli(work, config)
    print(f"(E1) torchcycle train, new folder: {e1:.2f} s", flush=True)
    server, url = start_server(work / "prefect-server")  # bench_tune's: `prefect server start`
    e2, e3, cold = [], [], []
    try:
        for r in range(repeats):
            e2.append(run_cli(work, config))
            e3.append(run_cli(work, config, url))
            cold.append(run_script(work, config))
            print(f"  round {r + 1}: E2 {e2[-1]:.2f} s, E3 {e3[-1]:.2f} s, S {cold[-1]:.2f} s", flush=True)
    finally:
        server.terminate()
        server.wait(30)
    return e1, min(e2), min(e3), min(cold)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "digits_mlp.yaml")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of E2, E3 and S")
    ap.add_argument("--flow-repeats", type=int, default=5, help="rounds of F, Fh and B")
    ap.add_argument("--flow-only", action="store_true", help="only the warm-process rows (F, Fh, B), not E and S")
    args = ap.parse_args()
    config = args.config.resolve()
    import mlflow
    import prefect
    import torch

    versions = f"torch {torch.__version__}, prefect {prefect.__version__}, mlflow {mlflow.__version__}"
    print(f"{versions}, {os.cpu_count()} cores; {config.name}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-flow-") as tmp:
        work = Path(tmp)
        commands = None if args.flow_only else run_commands(work, config, args.repeats)
        p = run_child(work, config, args.flow_repeats)
    f, fh, b = min(p["flow"]), min(p["flow_hb"]), min(p["bare"])
    # each F and the B of its round saw about the same load: their differences are the overhead, less noisy
    paired = statistics.median(x - y for x, y in zip(p["flow"], p["bare"], strict=True))
    paired_hb = statistics.median(x - y for x, y in zip(p["flow_hb"], p["bare"], strict=True))
    n = args.flow_repeats
    for key, label in (("flow", "F"), ("flow_hb", "Fh"), ("bare", "B")):
        print(f"{label}: {', '.join(f'{x:.2f}' for x in p[key])}")
    print(f"\n| {config.name}, best of {args.repeats} (E, S) and of {n} (F, Fh, B) | seconds | minus F |")
    print("|---|---|---|")
    if commands:
        e1, best2, best3, script = commands
        print(f"| (E1) `torchcycle train`, the first in a new folder | {e1:.2f} | {e1 - f:.2f} |")
        print(f"| (E2) `torchcycle train` (starts Prefect's temporary server) | {best2:.2f} | {best2 - f:.2f} |")
        e3_row = "(E3) `torchcycle train`, PREFECT_API_URL names a running server"
        print(f"| {e3_row} | {best3:.2f} | {best3 - fh:.2f} (minus Fh) |")
        s_row = "(S) a script calling the same stages bare, fresh process"
        print(f"| {s_row} | {script:.2f} | {script - b:.2f} (minus B) |")
    print(f"| (F) the training flow, warm process, temporary API | {f:.2f} | |")
    print(f"| (Fh) the same with Prefect's default heartbeats | {fh:.2f} | |")
    print(f"| (B) the same stages bare, warm process | {b:.2f} | |")
    print(f"| **ratio F/B** | **{f / b:.2f}** (goal <= {GOAL}) | |")
    print(f"| ratio Fh/B | {fh / b:.2f} | |")
    print(f"| F - B, median of the {n} alternated pairs | {paired:.2f} | |")
    print(f"| Fh - B, median of the {n} alternated pairs | {paired_hb:.2f} | |")
    print(f"\nan empty flow run (median of {n}): {statistics.median(p['empty']):.2f} s")
    tasks, tasks_cpu = statistics.median(p["tasks"]), statistics.median(p["tasks_cpu"])
    print(f"a flow run of {TASK_RUNS} no-op task runs: {tasks:.2f} s, and {tasks_cpu:.2f} s of the server's CPU")
    server_cpu = statistics.median(p["server_cpu"])
    print(f"Prefect's server CPU for each (F), during and after it (median): {server_cpu:.2f} s")
    print(f"first flow run in a process, over F: {p['flow_first'] - f:.2f} s (lazy imports, first model logged)")
    print(f"imports {p['imports']:.2f} s")
    print(f"Prefect's temporary server: start {p['server']:.2f} s, stop {p['server_stop']:.2f} s (drain included)")
    print(f"MLflow store open {p['store']:.2f} s")
    if commands:
        e3_s = commands[2] - commands[3]
        print(f"E3 - S = {e3_s:.2f} s: a command against a running server, over a fresh script doing the same")


if __name__ == "__main__":
    main()
