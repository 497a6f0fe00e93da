"""The production stack as users run it: docker-compose.yml's services, natively, by their service names.

No Docker engine runs here, so each service runs the command and environment docker-compose.yml gives it,
rendered with a .env as a user writes one. Every process runs in its own mount namespace whose /etc/hosts
maps the service names (mlflow, prefect-server, postgres) to 127.0.0.1, so the URLs in the compose file are
used as written; only ports (free loopback ones), database names (throwaway ones) and paths are swapped.
Nothing is triggered by hand: the Prefect server's scheduler creates every flow run.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
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

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
PG_USER = os.environ.get("TORCHCYCLE_TEST_PGUSER", "postgres")
MODEL = "prod-test"
POOL = "tc-test"
SECRETS = {
    "POSTGRES_USER": PG_USER,  # trust auth on loopback: the password is carried but not checked
    "POSTGRES_PASSWORD": "pg-secret-for-tests",
    "MLFLOW_TRACKING_USERNAME": "admin",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-secret-for-tests",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-secret-for-tests",
    "PREFECT_API_AUTH_STRING": "admin:prefect-secret-for-tests",
}
SERVICE_NAMES = (
    "mlflow",
    "prefect-server",
    "postgres",
    "dask-scheduler",
    "not-allowed",
)  # the last: a host MLflow must refuse


# ---- docker compose's variable interpolation, for .env files -------------------------------------------
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


class MissingVariable(ValueError):
    pass


def render(text: str, env: dict[str, str]) -> str:
    """${VAR}, ${VAR:-default}, ${VAR:?error} and $$ as docker compose reads them."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op and op.startswith(":") and not value:
            value = None
        if value is None and op and op.endswith("?"):
            raise MissingVariable(f"{name}: {arg}")
        if value is None and op and op.endswith("-"):
            return arg
        return value or ""

    return _VAR.sub(sub, text)


def dotenv(path: Path) -> dict[str, str]:
    from dotenv import dotenv_values

    return {k: v or "" for k, v in dotenv_values(path).items()}


def compose(env: dict[str, str]) -> dict:
    return yaml.safe_load(render(COMPOSE_TEXT, env))


def user_env() -> dict[str, str]:
    return {**dotenv(ROOT / ".env.example"), **SECRETS}


# ---- docker-compose.yml, structurally --------------------------------------------------------------------
def test_env_example_fails_until_every_secret_is_set() -> None:
    example = dotenv(ROOT / ".env.example")
    with pytest.raises(MissingVariable):
        compose(example)
    for name in (
        "POSTGRES_PASSWORD",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "PREFECT_API_AUTH_STRING",
    ):
        assert example[name] == "", f"{name} has a value in .env.example"
        with pytest.raises(MissingVariable, match=name):
            compose({**user_env(), name: ""})
    assert compose(user_env())["services"]  # all set: it renders


def test_compose_is_closed_by_default() -> None:
    services = compose(user_env())["services"]
    assert set(services) == {"postgres", "mlflow", "prefect-server", "worker", "dask-scheduler", "dask-worker"}
    for name, svc in services.items():
        assert svc["healthcheck"]["test"], f"{name} has no healthcheck"
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
    for name in ("postgres", "worker", "dask-scheduler", "dask-worker"):  # reached by service name only
        assert "ports" not in services[name], f"{name} is published"
    assert compose({**user_env(), "BIND_ADDRESS": "0.0.0.0"})["services"]["mlflow"]["ports"][0].startswith("0.0.0.0:")
    for name in ("mlflow", "prefect-server", "worker", "dask-worker"):
        for dep, cond in services[name]["depends_on"].items():
            assert cond == {"condition": "service_healthy"}, f"{name} -> {dep}"
    mlflow_cmd = services["mlflow"]["command"]
    assert mlflow_cmd[mlflow_cmd.index("--app-name") + 1] == "basic-auth"
    assert "mlflow:*" in mlflow_cmd[mlflow_cmd.index("--allowed-hosts") + 1].split(",")
    # no secret on any command line (ps, docker inspect): each one appears only as an environment value
    for name, svc in services.items():
        command = " ".join(svc.get("command") or [])
        for secret in SECRETS.values():
            if secret != PG_USER:
                assert secret not in command, f"a secret is on {name}'s command line"
    for dockerfile in ("Dockerfile", "mlflow/Dockerfile"):
        text = (ROOT / dockerfile).read_text()
        assert re.search(r"^USER (?!root)\w+", text, re.M), f"{dockerfile} runs as root"
        assert "-c " in text and "constraints.txt" in text, f"{dockerfile} ignores the pinned set"
    assert not (ROOT / "mlflow" / "__init__.py").exists()
    assert ".env" in (ROOT / ".gitignore").read_text().split()


# ---- the services, natively, by name ------------------------------------------------------------------------
def _psql(sql: str) -> None:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=5432, user=PG_USER, dbname="postgres", autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture(scope="module")
def databases() -> Iterator[dict[str, str]]:
    try:
        _psql("SELECT 1")
    except Exception as err:
        message = f"PostgreSQL not reachable at 127.0.0.1:5432 as {PG_USER} ({type(err).__name__}); .ci/run starts it"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run the production path, not skip it
        pytest.skip(message)
    suffix = uuid.uuid4().hex[:8]
    names = {"mlflow": f"tc_mlflow_{suffix}", "prefect": f"tc_prefect_{suffix}", "optuna": f"tc_optuna_{suffix}"}
    for db in names.values():
        _psql(f"CREATE DATABASE {db}")
    yield names
    for db in names.values():
        _psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


@pytest.fixture(scope="module")
def hosts_file(tmp_path_factory) -> Path:
    """/etc/hosts plus the service names, for the mount namespace every process below runs in."""
    path = tmp_path_factory.mktemp("hosts") / "hosts"
    path.write_text(Path("/etc/hosts").read_text() + f"\n127.0.0.1 {' '.join(SERVICE_NAMES)}\n")
    probe = _in_namespace(path, [sys.executable, "-c", "import socket; socket.gethostbyname('prefect-server')"])
    done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        message = f"cannot give processes their own /etc/hosts (unshare -m): {done.stderr.strip()[-300:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _in_namespace(hosts: Path, cmd: list[str]) -> list[str]:
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(hosts), *cmd]


class Stack:
    """The compose services' processes; logs in `tmp`."""

    def __init__(self, tmp: Path, hosts: Path, env: dict[str, str]) -> None:
        self.tmp, self.hosts, self.env, self.procs = tmp, hosts, env, {}
        self.services = compose(env)["services"]
        self.ports = {"mlflow": free_port(), "prefect-server": free_port(), "worker": free_port(), "dask": free_port()}

    def proc_env(self, service: str, **extra: str) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)  # mlflow/prefect/torchcycle scripts of this venv
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
        env.update({k: str(v) for k, v in (self.services[service].get("environment") or {}).items()})
        env.update(PREFECT_HOME=str(self.tmp / f"{service}-home"), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
        env.update(self.urls())
        env.update(extra)
        return env

    def urls(self) -> dict[str, str]:
        """The compose file's service URLs with this run's ports."""
        return {
            "PREFECT_API_URL": f"http://prefect-server:{self.ports['prefect-server']}/api",
            "MLFLOW_TRACKING_URI": f"http://mlflow:{self.ports['mlflow']}",
            "TORCHCYCLE_DASK_ADDRESS": f"tcp://dask-scheduler:{self.ports['dask']}",
        }

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(_in_namespace(self.hosts, cmd), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def run(self, cmd: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(
            _in_namespace(self.hosts, cmd), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def _swap(cmd: list[str], values: dict[str, str]) -> list[str]:
    out = [str(c) for c in cmd]
    for flag, value in values.items():
        out[out.index(flag) + 1] = value
    return out


def _wait(what: str, check, timeout: float, logs=lambda: "", procs: dict | None = None) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        dead = [name for name, proc in (procs or {}).items() if proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            if dead:
                raise AssertionError(f"{what}: {', '.join(dead)} exited\n{logs()}")
            raise AssertionError(f"{what}: not within {timeout} s\n{logs()}")
        time.sleep(1)


@pytest.fixture(scope="module")
def stack(databases: dict[str, str], hosts_file: Path, tmp_path_factory) -> Iterator[Stack]:
    """MLflow and Prefect servers with the compose file's commands and environment."""
    tmp = tmp_path_factory.mktemp("stack")
    st = Stack(tmp, hosts_file, user_env())
    ml, pf = st.services["mlflow"], st.services["prefect-server"]
    auth_ini = tmp / "basic_auth.ini"  # the shipped file, with its SQLite user store moved off /mlauth
    auth_ini.write_text((ROOT / "mlflow" / "basic_auth.ini").read_text().replace("/mlauth/", f"{tmp}/"))
    ml_env = st.proc_env(
        "mlflow",
        MLFLOW_BACKEND_STORE_URI=ml["environment"]["MLFLOW_BACKEND_STORE_URI"].replace(
            "/mlflow", f"/{databases['mlflow']}"
        ),
        MLFLOW_AUTH_CONFIG_PATH=str(auth_ini),
    )
    ml_cmd = _swap(ml["command"], {"--artifacts-destination": str(tmp / "mlartifacts"), "--host": "127.0.0.1"})
    pf_env = st.proc_env(
        "prefect-server",
        PREFECT_API_DATABASE_CONNECTION_URL=pf["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].replace(
            "/prefect", f"/{databases['prefect']}"
        ),
        PREFECT_UI_ENABLED="false",
        # The scheduler's pass runs every 60 s by default; 5 s keeps the suite short (it still fires by itself).
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
    )
    pf_cmd = _swap(pf["command"], {"--host": "127.0.0.1"})
    try:
        st.start("mlflow", _swap(ml_cmd, {"--port": str(st.ports["mlflow"])}), ml_env)
        st.start("prefect-server", _swap(pf_cmd, {"--port": str(st.ports["prefect-server"])}), pf_env)
        for service in ("mlflow", "prefect-server"):  # the compose healthchecks, by name and credentials
            check = [str(c) for c in st.services[service]["healthcheck"]["test"][1:]]
            check = [_local_path(c) for c in check]
            check[-1] = check[-1].replace(f"{service}:{5000 if service == 'mlflow' else 4200}", _host(st, service))
            env = ml_env if service == "mlflow" else pf_env
            _wait(
                f"{service} healthcheck",
                lambda check=check, env=env: st.run(check, env, timeout=30).returncode == 0,
                240,
                lambda service=service: st.log(service),
                st.procs,
            )
        _start_dask(st)
        yield st
    finally:
        st.stop_all()


def _start_dask(st: Stack) -> None:
    """The compose file's dask-scheduler and dask-worker (2 processes), by service name, until both compose
    healthchecks pass: the worker's scheduled scoring runs its units there (TORCHCYCLE_DASK_ADDRESS)."""
    port = str(st.ports["dask"])
    sched, work = st.services["dask-scheduler"], st.services["dask-worker"]
    st.start(
        "dask-scheduler",
        _swap(sched["command"], {"--host": "127.0.0.1", "--port": port}),
        st.proc_env("dask-scheduler"),
    )
    worker_cmd = [c.replace("dask-scheduler:8786", f"dask-scheduler:{port}") for c in work["command"]]
    worker_env = st.proc_env("dask-worker", HOSTNAME="dask-worker-1", DASK_WORKER_MEMORY="2GiB")
    assert worker_env["DASK_CONFIG"].startswith("/app/torchcycle/"), "the image's path of torchcycle's Dask settings"
    worker_env["DASK_CONFIG"] = worker_env["DASK_CONFIG"].replace("/app/", f"{ROOT}/", 1)
    # a container starts without it; this process may have it from a Dask nanny it ran (nannies set it in their
    # own process's environment before spawning a worker)
    worker_env.pop("MALLOC_TRIM_THRESHOLD_", None)
    st.start("dask-worker", worker_cmd, worker_env)
    for service, env in (("dask-scheduler", worker_env), ("dask-worker", worker_env)):
        test = st.services[service]["healthcheck"]["test"]
        check = ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else [str(c) for c in test[1:]]
        check = [_local_path(c).replace("dask-scheduler:8786", f"dask-scheduler:{port}") for c in check]
        check = [c.replace("/app/docker/", f"{ROOT}/docker/") for c in check]
        _wait(f"{service} healthcheck", lambda check=check, env=env: st.run(check, env, timeout=30).returncode == 0,
              180, lambda service=service: st.log(service), st.procs)  # fmt: skip


def _local_path(arg: str) -> str:
    """Paths inside the images -> this checkout (the healthcheck script)."""
    for image_path in ("/etc/mlflow/healthcheck.py", "/app/docker/healthcheck.py"):
        if arg == image_path:
            return str(ROOT / "docker" / "healthcheck.py")
    return sys.executable if arg == "python" else arg


def _host(st: Stack, service: str) -> str:
    return f"{service}:{st.ports[service]}"


def _login(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _mlflow(st: Stack, path: str, **params) -> httpx.Response:
    """An MLflow REST call as the worker makes it: Host mlflow:PORT, the admin login from .env."""
    return httpx.get(
        f"http://127.0.0.1:{st.ports['mlflow']}/api/2.0/mlflow/{path}",
        params=params,
        headers={
            "Host": _host(st, "mlflow"),
            **_login(SECRETS["MLFLOW_TRACKING_USERNAME"], SECRETS["MLFLOW_TRACKING_PASSWORD"]),
        },
        timeout=30,
    )


def _prefect(st: Stack, method: str, path: str, **kwargs) -> httpx.Response:
    user, _, password = SECRETS["PREFECT_API_AUTH_STRING"].partition(":")
    url = f"http://127.0.0.1:{st.ports['prefect-server']}/api{path}"
    return httpx.request(method, url, headers=_login(user, password), timeout=30, **kwargs)


def test_compose_dask_workers_run_with_torchcycle_settings(stack: Stack) -> None:
    """The dask-worker service's processes load torchcycle/dask_workers.yaml (DASK_CONFIG): the profiler off, no
    MALLOC_TRIM_THRESHOLD_ from the nanny, torch imported by the preload; asked through the scheduler's name."""
    probe = (
        "import json, sys; from distributed import Client\n"
        "with Client(sys.argv[1], timeout=30) as c:\n"
        "    c.run(__import__('torchcycle.dask_preload').dask_preload.wait, 120)\n"
        "    print(json.dumps({'profile': c.run(__import__('dask').config.get, 'distributed.worker.profile.enabled'),\n"
        "        'trim': c.run(__import__('os').environ.get, 'MALLOC_TRIM_THRESHOLD_'),\n"
        "        'torch': c.run(__import__('torchcycle.dask_preload').dask_preload.wait, 0)}))\n"
    )
    env = stack.proc_env("dask-worker")
    env.pop("DASK_CONFIG")  # this client's own settings do not matter
    done = stack.run([sys.executable, "-c", probe, f"tcp://dask-scheduler:{stack.ports['dask']}"], env, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(seen["profile"]) == 2  # both worker processes of the service answered
    assert set(seen["profile"].values()) == {False}
    assert set(seen["trim"].values()) == {None}
    assert all(imported for imported in seen["torch"].values())


def test_mlflow_answers_its_service_name_and_only_with_credentials(stack: Stack) -> None:
    base = f"http://127.0.0.1:{stack.ports['mlflow']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _mlflow(stack, "experiments/search", max_results=1).status_code == 200
    assert httpx.get(base, headers={"Host": _host(stack, "mlflow")}, timeout=30).status_code == 401
    wrong = _login("admin", "wrong")
    assert httpx.get(base, headers={"Host": _host(stack, "mlflow"), **wrong}, timeout=30).status_code == 401
    refused = httpx.get(base, headers={"Host": f"not-allowed:{stack.ports['mlflow']}"}, timeout=30)
    assert refused.status_code == 403 and "Host" in refused.text
    # Prefect: the auth string or 401; /api/health stays open for probes
    assert _prefect(stack, "GET", "/admin/version").status_code == 200
    no_auth = httpx.get(f"http://127.0.0.1:{stack.ports['prefect-server']}/api/admin/version", timeout=30)
    assert no_auth.status_code == 401


@pytest.mark.parametrize(
    ("uri_host", "password", "fragment"),
    [
        ("not-allowed", SECRETS["MLFLOW_TRACKING_PASSWORD"], "refused the request (403: Invalid Host header"),
        ("mlflow", "wrong-password", "refused the request (401"),
    ],
)
def test_cli_refused_by_mlflow_says_so_in_one_line(stack: Stack, uri_host: str, password: str, fragment: str) -> None:
    env = stack.proc_env(
        "worker", MLFLOW_TRACKING_URI=f"http://{uri_host}:{stack.ports['mlflow']}", MLFLOW_TRACKING_PASSWORD=password
    )
    for cmd in (["torchcycle", "models"], ["torchcycle", "promote", MODEL, "1"]):
        done = stack.run(cmd, env, timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], done.stderr
        assert "Traceback" not in done.stdout + done.stderr


def test_cli_with_the_credentials_trains_registers_and_scores(stack: Stack) -> None:
    """The README's "point the CLI at the stack": .env's login, the service URLs."""
    env = stack.proc_env("worker")
    name = f"{MODEL}-cli"
    train = ["torchcycle", "train", "--config", str(ROOT / "configs" / "wine_mlp.yaml"), "--json"]
    train += ["--set", f"name={name}", "--set", "train.epochs=5"]
    trained = stack.run(train, env)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert summary["model_version"] == "1"
    champion = _mlflow(stack, "registered-models/alias", name=name, alias="champion").json()["model_version"]
    assert champion["version"] == "1" and champion["run_id"] == summary["run_id"]
    src, out = stack.tmp / "cli-in.parquet", stack.tmp / "cli-out.parquet"
    _wine(25, seed=4, with_target=False).to_parquet(src)
    scored = stack.run(["torchcycle", "predict", "--model", name, "--input", str(src), "--output", str(out)], env)
    assert scored.returncode == 0, scored.stdout[-2000:] + scored.stderr[-2000:]
    frame = pd.read_parquet(out)
    assert len(frame) == 25 and set(frame["model_version"].astype(str)) == {"1"}


def test_tune_keeps_its_study_in_the_compose_postgres_and_tracks_on_the_server(
    stack: Stack, databases: dict[str, str]
) -> None:
    """`torchcycle tune` with the worker's environment: the study in PostgreSQL by the compose URL (service name
    `postgres`, .env's user), the parent and trial runs and the winner on the MLflow server, by name."""
    import optuna

    storage = stack.services["worker"]["environment"]["TORCHCYCLE_OPTUNA_STORAGE"]
    assert "@postgres:5432/optuna" in storage
    env = stack.proc_env("worker", TORCHCYCLE_OPTUNA_STORAGE=storage.replace("/optuna", f"/{databases['optuna']}"))
    env.pop("TORCHCYCLE_DASK_ADDRESS")  # trials in this process: the Dask workers are the scoring tests'
    name = f"{MODEL}-tune"
    config = stack.tmp / "tune.yaml"
    config.write_text(
        (ROOT / "configs" / "wine_mlp.yaml").read_text()
        + "tune:\n  space:\n    train.lr: {log_uniform: [1.0e-3, 3.0e-2]}\n  startup_trials: 1\n"
    )
    cmd = ["torchcycle", "tune", "--config", str(config), "--trials", "3", "--study", "prod", "--json"]
    cmd += ["--set", f"name={name}", "--set", "train.epochs=5"]
    done = stack.run(cmd, env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["registered"] and out["model_version"] == "1" and sum(out["trials"].values()) == 3
    local = storage.replace("@postgres:", "@127.0.0.1:").replace("/optuna", f"/{databases['optuna']}")
    study = optuna.load_study(study_name="prod", storage=local)
    assert len(study.trials) == 3 and study.user_attrs["torchcycle.parent_run_id"] == out["run_id"]
    exp_id = _mlflow(stack, "runs/get", run_id=out["run_id"]).json()["run"]["info"]["experiment_id"]
    kids = _search_runs(stack, exp_id, f"tags.mlflow.parentRunId = '{out['run_id']}'")
    assert len(kids) == 3
    champion = _mlflow(stack, "registered-models/alias", name=name, alias="champion").json()["model_version"]
    tags = {t["key"]: t["value"] for t in champion["tags"]}
    assert tags["torchcycle.study"] == "prod" and tags["torchcycle.trial"] == str(out["best_trial"])


def _wine(n: int, seed: int, with_target: bool = True) -> pd.DataFrame:
    from sklearn.datasets import load_wine

    frame = load_wine(as_frame=True).frame.sample(n, random_state=seed, replace=True).reset_index(drop=True)
    return frame if with_target else frame.drop(columns=["target"]).assign(row_id=np.arange(n))


def _flow_runs(st: Stack, deployment: str) -> list[dict]:
    resp = _prefect(st, "GET", f"/deployments/name/{deployment}")
    if resp.status_code == 404:  # not deployed yet
        return []
    dep = resp.json()
    body = {"deployments": {"id": {"any_": [dep["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"}
    return _prefect(st, "POST", "/flow_runs/filter", json=body).json()


def _cancel_open_runs(st: Stack, deployment: str) -> None:
    """Earlier tests share the `retrain/retrain` deployment: a run of theirs still open (its worker stopped
    mid-run) holds the deployment's one concurrency slot, and a new run would be cancelled (CANCEL_NEW).
    Cancelling it releases the slot, as a user cancelling a stuck run in the UI does."""
    for run in _flow_runs(st, deployment):
        if run["state_type"] in ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"):
            body = {"state": {"type": "CANCELLED", "name": "Cancelled"}, "force": True}
            _prefect(st, "POST", f"/flow_runs/{run['id']}/set_state", json=body).raise_for_status()


def _logs(st: Stack, run_ids: list[str]) -> str:
    body = {"logs": {"flow_run_id": {"any_": run_ids}}, "limit": 200}
    return "\n".join(entry["message"] for entry in _prefect(st, "POST", "/logs/filter", json=body).json())


def _scoring_runs(st: Stack) -> int:
    """MLflow runs in the scoring experiment that scored with MODEL."""
    exp = _mlflow(st, "experiments/get-by-name", experiment_name="scoring")
    if exp.status_code != 200:
        return 0
    return len(_search_runs(st, exp.json()["experiment"]["experiment_id"], f"params.model_name = '{MODEL}'"))


def _search_runs(st: Stack, experiment_id: str, filter_string: str) -> list[dict]:
    """MLflow's runs/search as the worker calls it: Host mlflow:PORT, the admin login from .env."""
    auth = _login(SECRETS["MLFLOW_TRACKING_USERNAME"], SECRETS["MLFLOW_TRACKING_PASSWORD"])
    resp = httpx.post(
        f"http://127.0.0.1:{st.ports['mlflow']}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment_id], "filter": filter_string},
        headers={"Host": _host(st, "mlflow"), **auth},
        timeout=30,
    )
    return resp.json().get("runs", [])


def _versions(st: Stack) -> list[dict]:
    resp = _mlflow(st, "model-versions/search", filter=f"name='{MODEL}'")
    return resp.json().get("model_versions", []) if resp.status_code == 200 else []


def _completed_after(st: Stack, deployment: str, since: float, text: str | None = None) -> list[dict]:
    """Completed flow runs of `deployment` that started after `since` (epoch s), whose logs say `text`."""
    done = [
        r
        for r in _flow_runs(st, deployment)
        if r["state_type"] == "COMPLETED" and pd.Timestamp(r["start_time"]).timestamp() > since
    ]
    return [r for r in done if text is None or text in _logs(st, [r["id"]])]


def test_schedules_fire_by_themselves_on_a_worker(stack: Stack) -> None:
    """The worker service's own command; every run below is created by the server's scheduler."""
    tmp = stack.tmp
    training, incoming, scored = tmp / "training", tmp / "incoming", tmp / "scored"
    training.mkdir()
    _wine(150, seed=0).to_parquet(training / "day1.parquet")
    config = tmp / "retrain.yaml"
    config.write_text(
        f"name: {MODEL}\nexperiment: prod\ndata: {{source: 'file:{training}/*.parquet', target: target}}\n"
        "model: {kind: mlp, hidden: [16]}\ntrain: {epochs: 30, patience: 0, lr: 0.01}\n"
        "deployment: {retrain: 5s, score: 5s}\n"
    )
    worker = stack.services["worker"]
    script = worker["command"][-1]
    for old, new in (
        ("--pool torchcycle", f"--pool {POOL}"),
        ("--source /app", f"--source {ROOT}"),
        ("--score-input data/incoming --score-output data/scored", f"--score-input {incoming} --score-output {scored}"),
    ):
        assert old in script, f"the worker command no longer has '{old}'"
        script = script.replace(old, new)
    env = stack.proc_env(
        "worker",
        TORCHCYCLE_CONFIG=str(config),
        TORCHCYCLE_MODEL=MODEL,
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_WORKER_WEBSERVER_PORT=str(stack.ports["worker"]),
    )
    started = time.time()
    stack.start("worker", [*worker["command"][:-1], script], env)
    logs = lambda: stack.log("worker")  # noqa: E731

    # a fresh stack's first scheduled score: no champion, no incoming/ -> completes green, says why
    _wait(
        "an idle score run",
        lambda: _completed_after(stack, "score/score", started, "nothing to score"),
        180,
        logs,
        stack.procs,
    )
    assert _scoring_runs(stack) == 0  # nothing to do writes no MLflow run
    # the first scheduled retrain registers v1, which becomes champion
    _wait("version 1", lambda: len(_versions(stack)) == 1, 240, logs, stack.procs)
    v1_at = time.time()
    # later retrains on unchanged data register nothing
    _wait(
        "an unchanged retrain",
        lambda: _completed_after(stack, "retrain/retrain", v1_at, "nothing new"),
        120,
        logs,
        stack.procs,
    )
    assert len(_versions(stack)) == 1
    # a new file lands in the training glob: the next retrain registers v2 and the gate decides
    _wine(60, seed=1).to_parquet(training / "day2.parquet")
    v2 = _wait("version 2", lambda: [v for v in _versions(stack) if v["version"] == "2"], 240, logs, stack.procs)[0]
    _wait(
        "the gate's decision on v2",
        lambda: any(
            t["key"] == "validation_status"
            for t in _mlflow(stack, "model-versions/get", name=MODEL, version="2")
            .json()["model_version"]
            .get("tags", [])
        ),
        120,
        logs,
    )
    assert v2["tags"] and {t["key"] for t in v2["tags"]} >= {"data_digest", "config_hash", "code_version"}
    # a file to score lands in incoming/: the next scheduled score writes it, with the champion's lineage
    incoming.mkdir()
    _wine(40, seed=2, with_target=False).to_parquet(incoming / "batch1.parquet")
    out = _wait("the scored file", lambda: sorted(scored.glob("batch1.*.parquet")), 180, logs, stack.procs)[0]
    frame = pd.read_parquet(out)
    assert len(frame) == 40 and frame["row_id"].tolist() == list(range(40))
    assert set(frame["model_name"].astype(str)) == {MODEL}
    # many scheduled score runs by now, one file to score: one MLflow run (the rest said why they were idle)
    # its drift record and MLflow run come after the file: on a loaded 2-core machine that took over 60 s
    _wait("the scoring run to finish", lambda: _completed_after(stack, "score/score", v1_at, "scored "), 240)
    assert _scoring_runs(stack) == 1

    runs = _flow_runs(stack, "retrain/retrain") + _flow_runs(stack, "score/score")
    assert runs and all(r["auto_scheduled"] for r in runs), "a flow run was not created by the scheduler"
    for name in ("retrain/retrain", "score/score"):
        dep = _prefect(stack, "GET", f"/deployments/name/{name}").json()
        assert dep["global_concurrency_limit"]["limit"] == 1  # an overrunning run is not doubled up
        assert dep["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
        assert dep["schedules"][0]["schedule"]["interval"] == 5.0
        # due every 5 s, a retrain runs longer than that: still never two at once (the ones due meanwhile
        # end CANCELLED without running)
        spans = sorted(
            (pd.Timestamp(r["start_time"]), pd.Timestamp(r["end_time"]))
            for r in _flow_runs(stack, name)
            if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")
        )
        assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans)), spans
    # every server service (scheduler, late runs, cancellation, concurrency leases...) ran its passes cleanly:
    # with SQLAlchemy 2.1 the scheduler logged "Can't evaluate bulk DML statement" on each one
    server_log = (stack.tmp / "prefect-server.log").read_text(errors="replace")
    assert "Traceback" not in server_log and "| ERROR" not in server_log, server_log[-4000:]
    # the worker's compose healthcheck
    check = [_local_path(str(c)) for c in worker["healthcheck"]["test"][1:]]
    check[-1] = check[-1].replace(":8080", f":{stack.ports['worker']}")
    assert stack.run(check, env, timeout=30).returncode == 0, logs()
    stack.stop("worker")


def test_redeploy_applies_what_was_given_and_says_what_changed(stack: Stack) -> None:
    env = stack.proc_env("worker")
    base = ["torchcycle", "deploy", "--pool", f"{POOL}-redeploy", "--source", str(ROOT), "--model", MODEL]
    config = stack.tmp / "plain.yaml"  # no deployment: section
    config.write_text(f"name: {MODEL}\ndata: {{source: 'sklearn:wine'}}\nmodel: {{kind: mlp}}\n")
    base += [
        "--config",
        str(config),
        "--score-input",
        str(stack.tmp / "in2"),
        "--score-output",
        str(stack.tmp / "out2"),
    ]

    start = stack.run([*base, "--retrain-schedule", "1h", "--score-schedule", "30m"], env)
    assert start.returncode == 0, start.stdout + start.stderr
    first = stack.run([*base, "--retrain-schedule", "0 3 * * *", "--timezone", "Europe/Berlin"], env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "retrain: schedule every 3600 s -> cron '0 3 * * *' Europe/Berlin" in first.stdout, first.stdout[-600:]
    assert "score: schedule kept as on the server (every 1800 s)" in first.stdout  # given nowhere: left alone
    again = stack.run(base, env)  # nothing given: the server's schedules stay exactly as they are
    assert again.returncode == 0, again.stdout + again.stderr
    assert "retrain: schedule kept as on the server (cron '0 3 * * *' Europe/Berlin)" in again.stdout
    retrain = _prefect(stack, "GET", "/deployments/name/retrain/retrain").json()
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"]) for s in retrain["schedules"]] == [
        ("0 3 * * *", "Europe/Berlin")
    ]
    off = stack.run([*base, "--score-schedule", "off"], env)
    assert "score: schedule every 1800 s -> no schedule" in off.stdout, off.stdout + off.stderr
    assert _prefect(stack, "GET", "/deployments/name/score/score").json()["schedules"] == []
    bad = stack.run([*base, "--score-schedule", "every tuesday"], env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: schedule 'every tuesday' is neither")
    wrong = stack.proc_env("worker", PREFECT_API_AUTH_STRING="admin:wrong")
    refused = stack.run(base, wrong)
    assert refused.returncode == 2 and "the Prefect server refused the request (401" in refused.stderr
    assert "Traceback" not in refused.stderr


# The scoring flow's drift event, sent as it sends it: emit_event from its own process, at PREFECT_API_URL.
def _drift_events(st: Stack, name: str) -> list[dict]:
    """The drift events of model `name` that the server has stored."""
    body = {
        "filter": {
            "event": {"name": ["torchcycle.drift.detected"]},
            "resource": {"labels": {"torchcycle.model.name": [name]}},
        }
    }
    return _prefect(st, "POST", "/events/filter", json=body).json()["events"]


def test_drift_events_start_one_retrain_per_cooldown_through_the_automation(stack: Stack) -> None:
    """`torchcycle deploy` makes the automation retrain-on-drift-NAME; drift events of NAME's scoring start the
    retrain deployment through it, on the worker, once per cool-down window. Nothing triggers it by hand."""
    name, pool = f"{MODEL}-drift", f"{POOL}-drift"
    tmp = stack.tmp / "drift"
    (tmp / "training").mkdir(parents=True)
    _wine(150, seed=0).to_parquet(tmp / "training" / "day1.parquet")
    config = tmp / "drift.yaml"  # a model of its own: the first retrain has something new to register
    config.write_text(
        f"name: {name}\nexperiment: prod-drift\ndata: {{source: 'file:{tmp}/training/*.parquet', target: target}}\n"
        "model: {kind: mlp, hidden: [16]}\ntrain: {epochs: 5, patience: 0, lr: 0.01}\n"
        # longer than this test takes on a loaded 2-core machine (a CI run took over 60 s from the first drift event
        # to the second, and the window had closed): the second event must fall inside it
        "deployment: {drift_cooldown: 10m}\n"
    )
    deploy = ["torchcycle", "deploy", "--pool", pool, "--source", str(ROOT), "--config", str(config), "--model", name]
    deploy += ["--score-input", str(tmp / "in"), "--score-output", str(tmp / "out")]
    deploy += ["--retrain-schedule", "off", "--score-schedule", "off"]  # every run below is the automation's
    env = stack.proc_env("worker", PREFECT_WORKER_QUERY_SECONDS="1")
    done = stack.run(deploy, env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    _cancel_open_runs(stack, "retrain/retrain")  # schedules are off now: nothing of earlier tests starts again
    assert f"deployed retrain-on-drift-{name}: automation created, cool-down 600 s" in done.stdout, done.stdout
    since = pd.Timestamp.now(tz="UTC")
    body = {"automations": {"name": {"any_": [f"retrain-on-drift-{name}"]}}}
    (automation,) = _prefect(stack, "POST", "/automations/filter", json=body).json()
    dep = _prefect(stack, "GET", "/deployments/name/retrain/retrain").json()
    assert automation["trigger"]["expect"] == ["torchcycle.drift.detected"]
    assert automation["trigger"]["match"] == {"torchcycle.model.name": name}
    assert automation["trigger"]["within"] == 600.0 and automation["trigger"]["threshold"] == 1
    assert [(a["type"], a["deployment_id"]) for a in automation["actions"]] == [("run-deployment", dep["id"])]
    assert dep["schedules"] == []
    stack.start("drift-worker", ["prefect", "worker", "start", "--pool", pool, "--type", "process"], env)
    logs = lambda: stack.log("drift-worker") + stack.log("prefect-server")  # noqa: E731

    def runs() -> list[dict]:
        return [r for r in _flow_runs(stack, "retrain/retrain") if pd.Timestamp(r["created"]) > since]

    # the champion the scoring uses, trained from the CLI as a user does (v1); then new training data lands
    trained = stack.run(["torchcycle", "train", "--config", str(config), "--json"], env)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    _wine(150, seed=1).to_parquet(tmp / "training" / "day2.parquet")
    (tmp / "in").mkdir()
    sd = _wine(150, seed=0).drop(columns=["target"]).std()

    def score_shifted(file: str, seed: int) -> None:
        """`torchcycle predict` of a day whose inputs moved by one standard deviation: the scoring flow itself
        emits torchcycle.drift.detected (nothing is emitted by hand)."""
        shifted = _wine(1200, seed=seed, with_target=False)  # >= drift.min_rows: judged
        shifted[sd.index] = shifted[sd.index] + sd
        shifted.to_parquet(tmp / "in" / file)
        cmd = [
            "torchcycle",
            "predict",
            "-m",
            name,
            "-i",
            str(tmp / "in" / file),
            "-o",
            str(tmp / f"{file}.out.parquet"),
        ]
        done = stack.run(cmd, env)
        assert done.returncode == 0 and "drift  drift:" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]

    score_shifted("a.parquet", 5)
    (run,) = _wait("the automation's retrain run", runs, 60, logs, stack.procs)
    # made by the automation, not by the scheduler or by hand
    assert run["created_by"] == {"id": automation["id"], "type": "AUTOMATION", "display_value": automation["name"]}
    assert run["auto_scheduled"] is False and run["idempotency_key"].startswith(f"automation {automation['id']}")
    # the worker deploys again on its restart: the automation, and its open window, stay as they are
    again = stack.run(deploy, env)
    assert f"deployed retrain-on-drift-{name}: automation unchanged, cool-down 600 s" in again.stdout, again.stdout
    assert [a["id"] for a in _prefect(stack, "POST", "/automations/filter", json=body).json()] == [automation["id"]]
    # one more drifted file, still inside the window
    score_shifted("b.parquet", 6)
    _wait("the server to store both drift events", lambda: len(_drift_events(stack, name)) == 2, 60, logs)
    (event,) = _drift_events(stack, name)[:1]
    assert event["resource"]["torchcycle.model.version"] == "1" and event["payload"]["max_psi"] >= 0.25
    finished = _wait(
        "the retrain to complete",
        lambda: [r for r in runs() if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")],
        240,
        logs,
        stack.procs,
    )
    assert finished[0]["state_type"] == "COMPLETED", _logs(stack, [run["id"]])
    time.sleep(3)  # the triggers service has had the third event for seconds by now
    assert [r["id"] for r in runs()] == [run["id"]], "a drift event inside the cool-down started another retrain"
    # the retrain trained and registered the config's model (a fresh name: something new to register)
    versions = _mlflow(stack, "model-versions/search", filter=f"name='{name}'").json().get("model_versions", [])
    assert sorted(v["version"] for v in versions) == ["1", "2"], _logs(stack, [run["id"]])  # v2: the retrain's
    stack.stop("drift-worker")
    server_log = (stack.tmp / "prefect-server.log").read_text(errors="replace")  # triggers and actions ran cleanly
    assert "Traceback" not in server_log and "| ERROR" not in server_log, server_log[-4000:]


def test_serve_without_a_server_starts_one_whose_scheduler_fires(stack: Stack) -> None:
    """`torchcycle serve` with no PREFECT_API_URL; MLflow as in production. SIGTERM stops both."""
    tmp = stack.tmp
    incoming, scored = tmp / "serve-in", tmp / "serve-out"
    incoming.mkdir()
    _wine(10, seed=3, with_target=False).to_parquet(incoming / "a.parquet")
    config = tmp / "serve.yaml"
    config.write_text(
        f"name: {MODEL}-serve\nexperiment: prod\ndata: {{source: 'sklearn:wine'}}\n"
        "model: {kind: mlp, hidden: [16]}\ntrain: {epochs: 20, patience: 0, lr: 0.01}\n"
    )
    port = free_port()
    env = stack.proc_env(
        "worker", PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5", PREFECT_RUNNER_POLL_FREQUENCY="2"
    )
    env.pop("PREFECT_API_URL")
    cmd = ["torchcycle", "serve", "--config", str(config), "--model", f"{MODEL}-serve", "--port", str(port)]
    cmd += [
        "--score-input",
        str(incoming),
        "--score-output",
        str(scored),
        "--retrain-schedule",
        "5s",
        "--score-schedule",
        "5s",
    ]
    serve = stack.start("serve", cmd, env, cwd=ROOT)
    logs = lambda: stack.log("serve")  # noqa: E731
    _wait("scheduled retrain + score", lambda: sorted(scored.glob("a.*.parquet")), 300, logs, stack.procs)
    assert len(pd.read_parquet(next(scored.glob("a.*.parquet")))) == 10
    api = f"http://127.0.0.1:{port}/api"
    runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=30).json()
    assert {r["auto_scheduled"] for r in runs if r["deployment_id"]} == {True}
    # serve keeps the same drift automation as deploy, on the served retrain deployment
    said = (tmp / "serve.log").read_text(errors="replace")
    assert f"serving retrain-on-drift-{MODEL}-serve: automation created, cool-down 86400 s" in said, said[:3000]
    (automation,) = httpx.post(f"{api}/automations/filter", json={}, timeout=30).json()
    retrain = httpx.get(f"{api}/deployments/name/retrain/retrain", timeout=30).json()
    assert [a["deployment_id"] for a in automation["actions"]] == [retrain["id"]]
    serve.send_signal(signal.SIGTERM)
    serve.wait(timeout=60)
    stack.procs.pop("serve")
    _wait("the local Prefect server to stop", lambda: not _answers(api), 30, logs)


def test_a_killed_serve_takes_its_prefect_server_with_it(tmp_path: Path) -> None:
    """SIGKILL leaves no handler to run: the kernel's parent-death signal stops the server."""
    port = free_port()
    code = (
        "import sys, time\n"
        "from torchcycle.local_server import local_prefect_server\n"
        f"with local_prefect_server({port}):\n"
        "    print('up', flush=True); time.sleep(600)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    holder = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "up"
        api = f"http://127.0.0.1:{port}/api"
        assert _answers(api)
        # a second serve on the same port: refused at once, as bad input (not "server down")
        second = subprocess.run(
            [str(Path(sys.executable).parent / "torchcycle"), "serve", "--port", str(port)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2 and f"error: port {port} is in use" in second.stderr, second.stderr
        holder.kill()
        holder.wait(timeout=10)
        _wait("the orphaned Prefect server to stop", lambda: not _answers(api), 60)
    finally:
        if holder.poll() is None:
            holder.kill()


def _answers(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("port", ["0", "70000", "-1"])
def test_serve_refuses_ports_out_of_range(port: str) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "torchcycle"), "serve", "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr and "--port" in done.stderr, done.stderr


def test_unshare_is_available_to_ci() -> None:
    assert shutil.which("unshare"), "util-linux's unshare runs the stack's processes by service name"
