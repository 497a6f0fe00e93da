"""Orchestration overhead: one `torchcycle train` end to end against the same stages called bare.

    python bench/bench_flow.py [--config configs/digits_mlp.yaml] [--repeats 3]

Everything runs in a temporary folder (its own MLflow store, Prefect home and stage cache), with the stage cache
off (`--no-cache`), so every run trains. In rounds that alternate, so all see the same machine load:

(E2) `torchcycle train --config CONFIG --no-cache`, a fresh process as a user starts it, wall time (it starts
     Prefect's temporary server for the command);
(E3) the same with PREFECT_API_URL naming a running `prefect server start` (nothing to start);
(S)  a fresh process that imports the stages and calls them bare, once: what a script doing the same work costs.
Before the rounds, (E1): the first command in a new folder (the MLflow and Prefect databases are created).

Then one process measures, after its imports (see CHILD):
(F) `training_flow(cfg, cache=False)` with Prefect's API and the MLflow store up: the flow, its tasks, their tracking;
(B) the same stage functions called bare (plain functions, no Prefect), in the flow's order, on the same store;
    alternated with (F); and what the start-up is made of.

Prints the best of --repeats (E, S) and --flow-repeats (F, B) of each, the ratio F/B (goal <= 1.25), the median
of the paired differences F - B, and the fixed start-up E - F.
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
from bench_flow import bare_stages
out = {"imports": time.perf_counter() - t0}
cfg = load_config(sys.argv[1], [])
uri = resolve_tracking_uri()

t = time.perf_counter()
use_tracking_uri(uri)
MlflowClient(uri).search_experiments(max_results=1)
out["store"] = time.perf_counter() - t

from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, temporary_settings
t = time.perf_counter()
server = SubprocessASGIServer()
server.start(timeout=180)
out["server"] = time.perf_counter() - t
with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
    # the first flow run of a process pays for Prefect's client, its event and log workers
    t = time.perf_counter(); training_flow(cfg, cache=False); out["flow_first"] = time.perf_counter() - t
    flows, bares = [], []
    for _ in range(int(sys.argv[3])):  # alternate, so both see the same load
        t = time.perf_counter(); training_flow(cfg, cache=False); flows.append(time.perf_counter() - t)
        t = time.perf_counter(); bare_stages(cfg, uri); bares.append(time.perf_counter() - t)
    out["flow"], out["bare"] = flows, bares
    from prefect.logging.handlers import APILogWorker
    from prefect.events.worker import EventsWorker
    t = time.perf_counter()
    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=30)
    out["drain"] = time.perf_counter() - t
t = time.perf_counter(); server.stop(); out["server_stop"] = time.perf_counter() - t
print(json.dumps(out))
"""


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
            metrics=report.metrics,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "digits_mlp.yaml")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of E2, E3 and S")
    ap.add_argument("--flow-repeats", type=int, default=5, help="pairs of F and B")
    args = ap.parse_args()
    config = args.config.resolve()
    import mlflow
    import prefect
    import torch

    versions = f"torch {torch.__version__}, prefect {prefect.__version__}, mlflow {mlflow.__version__}"
    print(f"{versions}, {os.cpu_count()} cores; {config.name}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-flow-") as tmp:
        work = Path(tmp)
        e1 = run_cli(work, config)
        print(f"(E1) torchcycle train, new folder: {e1:.2f} s", flush=True)
        server, url = start_server(work / "prefect-server")  # bench_tune's: `prefect server start`
        e2, e3, cold = [], [], []
        try:
            for r in range(args.repeats):
                e2.append(run_cli(work, config))
                e3.append(run_cli(work, config, url))
                cold.append(run_script(work, config))
                print(f"  round {r + 1}: E2 {e2[-1]:.2f} s, E3 {e3[-1]:.2f} s, S {cold[-1]:.2f} s", flush=True)
        finally:
            server.terminate()
            server.wait(30)
        p = run_child(work, config, args.flow_repeats)
    f, b = min(p["flow"]), min(p["bare"])
    # each F and the B after it saw about the same load: their differences are the overhead, less noisy
    paired = statistics.median(x - y for x, y in zip(p["flow"], p["bare"], strict=True))
    best2, best3, script = min(e2), min(e3), min(cold)
    print(f"\nF: {', '.join(f'{x:.2f}' for x in p['flow'])}\nB: {', '.join(f'{x:.2f}' for x in p['bare'])}")
    print(f"\n| {config.name}, best of {args.repeats} | seconds | minus F |")
    print("|---|---|---|")
    print(f"| (E1) `torchcycle train`, the first in a new folder | {e1:.2f} | {e1 - f:.2f} |")
    print(f"| (E2) `torchcycle train` (starts Prefect's temporary server) | {best2:.2f} | {best2 - f:.2f} |")
    print(f"| (E3) `torchcycle train`, PREFECT_API_URL names a running server | {best3:.2f} | {best3 - f:.2f} |")
    print(f"| (S) a script calling the same stages bare, fresh process | {script:.2f} | {script - b:.2f} (minus B) |")
    print(f"| (F) the training flow, warm process | {f:.2f} | |")
    print(f"| (B) the same stages bare, warm process | {b:.2f} | |")
    print(f"| **ratio F/B** (best of {args.flow_repeats} each) | **{f / b:.2f}** (goal <= {GOAL}) | |")
    print(f"| F - B, median of the {args.flow_repeats} alternated pairs | {paired:.2f} | |")
    print(f"\nfirst flow run in a process, over F: {p['flow_first'] - f:.2f} s (lazy imports, first model logged)")
    print(f"imports {p['imports']:.2f} s")
    print(f"Prefect's temporary server: start {p['server']:.2f} s, stop {p['server_stop']:.2f} s")
    print(f"MLflow store open {p['store']:.2f} s; log/event drain {p['drain']:.2f} s")
    print(f"E3 - S = {best3 - script:.2f} s: what the orchestration adds to a fresh script, server already running")


if __name__ == "__main__":
    main()
