"""The production stack, natively: PostgreSQL-backed MLflow and Prefect servers, deployments run by a worker.

No Docker engine runs here, so the services run the commands docker-compose.yml gives them (read from the
file, with hosts, ports and database URLs swapped for loopback ones) against the machine's PostgreSQL on
127.0.0.1:5432, in throwaway databases.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, os.environ.get("TORCHCYCLE_TEST_PGUSER", "postgres")
MODEL = "prod-test"
POOL = "tc-test"


# ---- docker-compose.yml, structurally ----------------------------------------------------------------
def test_compose_services_healthchecks_and_dependencies() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"postgres", "mlflow", "prefect-server", "worker"}
    for name in ("postgres", "mlflow", "prefect-server"):
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert "/api/health" in " ".join(services["prefect-server"]["healthcheck"]["test"])
    assert services["mlflow"]["build"]["dockerfile"] == "mlflow/Dockerfile"
    assert (ROOT / "mlflow" / "Dockerfile").is_file() and not (ROOT / "mlflow" / "__init__.py").exists()
    for name in ("mlflow", "prefect-server", "worker"):
        for dep, cond in services[name]["depends_on"].items():
            assert cond == {"condition": "service_healthy"}, f"{name} -> {dep}"
    assert set(services["worker"]["depends_on"]) == {"mlflow", "prefect-server"}
    assert "ports" not in services["postgres"], "PostgreSQL must not be published on the host"
    assert "pgdata" in COMPOSE["volumes"] and "mlartifacts" in COMPOSE["volumes"]
    mlflow_cmd = services["mlflow"]["command"]
    assert "--serve-artifacts" in mlflow_cmd and _flag(mlflow_cmd, "--backend-store-uri").startswith("postgresql://")
    db_url = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url.startswith("postgresql+asyncpg://")
    worker = " ".join(services["worker"]["command"])
    assert "torchcycle deploy" in worker and "prefect worker start" in worker and "--type process" in worker


def test_compose_has_no_literal_secrets() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    # every credential is a ${VAR} reference, filled from .env
    for m in re.finditer(r"(?i)(password|secret|token)[\w]*\s*:\s*(\S+)", text):
        assert m.group(2).startswith("${"), f"literal secret: {m.group(0)}"
    for creds in re.findall(r"postgresql\S*://(\S+)@", text):
        # user:password in a database URL: only ${...} references may appear there
        assert re.sub(r"\$\{[^}]*\}", "", creds) in ("", ":"), creds
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    example = (ROOT / ".env.example").read_text()
    assert "POSTGRES_PASSWORD=" in example


def _flag(cmd: list[str], flag: str) -> str:
    return str(cmd[cmd.index(flag) + 1])


def _with_flags(cmd: list[str], values: dict[str, str]) -> list[str]:
    """The compose command with some flag values swapped (hosts, ports, URLs)."""
    out = [str(c) for c in cmd]
    for flag, value in values.items():
        out[out.index(flag) + 1] = value
    return out


# ---- the services, natively on PostgreSQL ------------------------------------------------------------
def _pg_problem() -> str | None:
    try:
        import psycopg

        psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=3).close()
    except Exception as err:
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return None


def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture(scope="module")
def databases() -> Iterator[dict[str, str]]:
    problem = _pg_problem()
    if problem:
        message = f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} as {PG_USER} ({problem}); .ci/run starts it"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run the production path, not skip it
        pytest.skip(message)
    suffix = uuid.uuid4().hex[:8]
    names = {"mlflow": f"tc_mlflow_{suffix}", "prefect": f"tc_prefect_{suffix}"}
    for db in names.values():
        _admin(f"CREATE DATABASE {db}")
    yield names
    for db in names.values():
        _admin(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:3]} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} not healthy after {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(1)


def _env(**extra: str) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # mlflow/prefect/torchcycle scripts of this venv
    env = {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


class Procs:
    def __init__(self, logs: Path) -> None:
        self.logs, self.procs = logs, []

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc, log

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def stack(databases: dict[str, str], tmp_path_factory) -> Iterator[dict]:
    """MLflow server and Prefect server with the compose file's commands, on loopback ports."""
    tmp = tmp_path_factory.mktemp("stack")
    procs = Procs(tmp)
    services = COMPOSE["services"]
    ml_port, pf_port = free_port(), free_port()
    pg = f"{PG_USER}@{PG_HOST}:{PG_PORT}"
    mlflow_cmd = _with_flags(
        services["mlflow"]["command"],
        {
            "--backend-store-uri": f"postgresql://{pg}/{databases['mlflow']}",
            "--artifacts-destination": str(tmp / "mlartifacts"),
            "--host": "127.0.0.1",
            "--port": str(ml_port),
        },
    )
    prefect_cmd = _with_flags(services["prefect-server"]["command"], {"--host": "127.0.0.1", "--port": str(pf_port)})
    prefect_env = _env(
        PREFECT_API_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://{pg}/{databases['prefect']}",
        PREFECT_HOME=str(tmp / "prefect-server-home"),
        PREFECT_UI_ENABLED="false",
    )
    try:
        ml, ml_log = procs.start("mlflow", mlflow_cmd, _env())
        pf, pf_log = procs.start("prefect-server", prefect_cmd, prefect_env)
        _wait_http(f"http://127.0.0.1:{ml_port}/health", ml, ml_log)
        _wait_http(f"http://127.0.0.1:{pf_port}/api/health", pf, pf_log)
        yield {
            "mlflow": f"http://127.0.0.1:{ml_port}",
            "prefect": f"http://127.0.0.1:{pf_port}/api",
            "tmp": tmp,
            "procs": procs,
        }
    finally:
        procs.stop_all()


def _client_env(stack: dict) -> dict[str, str]:
    return _env(
        PREFECT_API_URL=stack["prefect"],
        MLFLOW_TRACKING_URI=stack["mlflow"],
        PREFECT_HOME=str(stack["tmp"] / "client-home"),
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_RUNNER_POLL_FREQUENCY="2",
    )


def _run_deployment(stack: dict, name: str, parameters: dict | None = None, timeout: float = 300) -> dict:
    """Create a flow run of a deployment through the Prefect REST API and wait for a final state."""
    api = stack["prefect"]
    dep = httpx.get(f"{api}/deployments/name/{name}", timeout=30)
    dep.raise_for_status()
    body = {"parameters": parameters or {}}
    run = httpx.post(f"{api}/deployments/{dep.json()['id']}/create_flow_run", json=body, timeout=30)
    run.raise_for_status()
    run_id = run.json()["id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=30).json()["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return {"id": run_id, "state": state}
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} of {name} not finished after {timeout} s")


def _mlflow(stack: dict, path: str, **params) -> dict:
    resp = httpx.get(f"{stack['mlflow']}/api/2.0/mlflow/{path}", params=params, timeout=30)
    resp.raise_for_status()
    return resp.json()


def _score_input(path: Path, n: int, seed: int) -> None:
    from sklearn.datasets import load_wine

    frame = load_wine(as_frame=True).frame.drop(columns=["target"]).sample(n, random_state=seed, replace=True)
    frame.insert(0, "row_id", np.arange(n))
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)


def _retrain_config(tmp: Path) -> Path:
    config = tmp / "retrain.yaml"
    config.write_text(
        f"name: {MODEL}\nexperiment: prod\ndata: {{source: 'sklearn:wine'}}\n"
        "model: {kind: mlp, hidden: [16]}\ntrain: {epochs: 30, patience: 0, lr: 0.01}\n"
    )
    return config


def test_deployments_on_a_worker_train_register_and_score(stack: dict) -> None:
    tmp = stack["tmp"]
    config = _retrain_config(tmp)
    incoming, scored = tmp / "incoming", tmp / "scored"
    env = _client_env(stack)

    # the worker service's command: deploy, then a process worker on the pool
    deploy_cmd = ["torchcycle", "deploy", "--pool", POOL, "--source", str(ROOT), "--config", str(config)]
    deploy_cmd += ["--model", MODEL, "--score-input", str(incoming), "--score-output", str(scored)]
    done = subprocess.run(deploy_cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deployed retrain/retrain" in done.stdout and "deployed score/score" in done.stdout
    deps = httpx.post(f"{stack['prefect']}/deployments/filter", json={}, timeout=30).json()
    by_name = {d["name"]: d for d in deps}
    assert by_name["retrain"]["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert by_name["score"]["schedules"][0]["schedule"]["cron"] == "0 * * * *"
    assert by_name["retrain"]["work_pool_name"] == POOL and "training" in by_name["retrain"]["tags"]

    worker_cmd = ["prefect", "worker", "start", "--pool", POOL, "--type", "process"]
    worker, log = stack["procs"].start("worker", worker_cmd, env)
    try:
        retrain = _run_deployment(stack, "retrain/retrain")
        assert retrain["state"]["type"] == "COMPLETED", log.read_text()[-5000:]

        # the run, its metrics and the new version with its alias, through MLflow's REST API
        alias = _mlflow(stack, "registered-models/alias", name=MODEL, alias="champion")["model_version"]
        assert alias["version"] == "1"
        run = _mlflow(stack, "runs/get", run_id=alias["run_id"])["run"]
        assert run["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics["test_accuracy"] >= 0.9
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["torchcycle.config_hash"]

        _score_input(incoming / "batch1.parquet", 40, seed=0)
        first = _run_deployment(stack, "score/score")
        assert first["state"]["type"] == "COMPLETED", log.read_text()[-5000:]
        out = scored / f"batch1.{MODEL}-v1.parquet"
        frame = pd.read_parquet(out)
        assert len(frame) == 40 and frame["row_id"].tolist() == list(range(40))
        assert set(frame["model_version"].astype(str)) == {"1"} and set(frame["model_name"].astype(str)) == {MODEL}
        assert set(frame["model_run_id"].astype(str)) == {alias["run_id"]}

        # the hourly re-run skips what this version already scored and scores only the new file
        _score_input(incoming / "batch2.parquet", 25, seed=1)
        mtime = out.stat().st_mtime_ns
        second = _run_deployment(stack, "score/score")
        assert second["state"]["type"] == "COMPLETED", log.read_text()[-5000:]
        assert out.stat().st_mtime_ns == mtime
        assert len(pd.read_parquet(scored / f"batch2.{MODEL}-v1.parquet")) == 25
        exp = _mlflow(stack, "experiments/get-by-name", experiment_name="scoring")["experiment"]
        runs = httpx.post(
            f"{stack['mlflow']}/api/2.0/mlflow/runs/search",
            json={"experiment_ids": [exp["experiment_id"]], "order_by": ["attributes.start_time DESC"]},
            timeout=30,
        ).json()["runs"]
        latest = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
        assert latest["files_skipped"] == 1 and latest["files_scored"] == 1 and latest["rows"] == 25
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def test_serve_runs_the_deployments_in_process(stack: dict) -> None:
    """`torchcycle serve`: the same deployments, no work pool, runs in the serving process."""
    tmp = stack["tmp"]
    incoming, scored = tmp / "serve-in", tmp / "serve-out"
    _score_input(incoming / "a.parquet", 10, seed=2)
    env = _client_env(stack)
    # A served deployment runs its flow from this process's code; drop the pool-based ones of the same
    # names (they point at flow storage for a worker) so what runs below is only what serve registered.
    for dep in httpx.post(f"{stack['prefect']}/deployments/filter", json={}, timeout=30).json():
        httpx.delete(f"{stack['prefect']}/deployments/{dep['id']}", timeout=30).raise_for_status()
    cmd = ["torchcycle", "serve", "--config", str(_retrain_config(tmp)), "--model", MODEL]
    cmd += ["--score-input", str(incoming), "--score-output", str(scored)]
    server, log = stack["procs"].start("serve", cmd, env)
    try:
        deadline = time.monotonic() + 120
        while True:  # serve (re)registers the deployments with this process's parameters
            dep = httpx.get(f"{stack['prefect']}/deployments/name/score/score", timeout=30)
            if dep.status_code == 200 and dep.json()["parameters"].get("input") == str(incoming):
                assert dep.json()["work_pool_name"] is None
                break
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(1)
        has_champion = httpx.get(
            f"{stack['mlflow']}/api/2.0/mlflow/registered-models/alias", params={"name": MODEL, "alias": "champion"}
        )
        if has_champion.status_code != 200:  # this test run alone: train one first, served as well
            assert _run_deployment(stack, "retrain/retrain")["state"]["type"] == "COMPLETED", log.read_text()[-5000:]
        result = _run_deployment(stack, "score/score")
        assert result["state"]["type"] == "COMPLETED", log.read_text()[-5000:]
        assert len(pd.read_parquet(next(scored.glob("a.*.parquet")))) == 10
    finally:
        server.terminate()
        server.wait(timeout=30)
