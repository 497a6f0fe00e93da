"""A real Prefect server for one command's lifetime (`torchcycle serve` with no PREFECT_API_URL).

Prefect's own fallback, a temporary in-process API, runs no scheduler service: schedules served against it
never fire. This starts `prefect server start` (its scheduler included) on loopback, points this process
and its children at it, and stops it when the command ends, also when the command is killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

START_TIMEOUT_S = 180.0  # a cold start on a busy 2-core machine takes 20-60 s (migrations, imports)


def _die_with_parent() -> None:
    """preexec_fn: the server gets SIGTERM when this process dies, even by SIGKILL (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def local_prefect_server(port: int, log_path: Path | None = None) -> Iterator[str]:
    """Start the server on 127.0.0.1:`port`, yield its API URL (also set as PREFECT_API_URL), stop it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    taken = PortTaken(
        f"port {port} is in use: if a Prefect server runs there, set PREFECT_API_URL=http://127.0.0.1:{port}/api "
        "to use it; else choose another --port"
    )
    # Two serves started together both see a free port before either server listens: a lock per port decides.
    lock = open(Path(tempfile.gettempdir()) / f"torchcycle-prefect-{port}.lock", "w")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise taken from None
    if _port_in_use(port):
        lock.close()
        raise taken
    url = f"http://127.0.0.1:{port}/api"
    log_path = log_path or Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")) / "serve-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    # Deployment concurrency slots are leases; kept in memory (the default) they die with the server, and a
    # slot held at a restart stays taken for good. On disk, the server's repossessor frees it on expiry.
    env.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect.server.concurrency.lease_storage.filesystem")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent, start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is not None or not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the local Prefect server did not start; its log: {log_path}")
            time.sleep(0.5)
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url  # flow-run subprocesses inherit it
        try:
            with temporary_settings(updates={PREFECT_API_URL: url}):
                yield url
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous
    finally:
        _stop_group(proc)
        lock.close()


class PortTaken(RuntimeError):
    """The port of the local server is taken (by another server, or another serve starting one)."""


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the CLI and its uvicorn child); SIGKILL after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def starting_temporary_api() -> Iterator[Callable[[], str]]:
    """Start Prefect's temporary API (what a flow without PREFECT_API_URL uses) in a background thread and yield
    `ready`, to call before the first flow run: it waits for the API and names it in this process's environment,
    so the worker processes of a local Dask cluster report to this one (without it each would start a temporary
    API of its own, seconds each, and its task runs would land there).

    The server process takes about 7 s to start on 2 cores, most of it its own imports; started before the
    command imports torch and MLflow (about 9 s), the two overlap instead of adding up."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
    server = SubprocessASGIServer()
    failed: list[BaseException] = []

    def start() -> None:
        try:
            server.start(timeout=timeout)
        except BaseException as err:  # handed to the main thread by ready()
            failed.append(err)

    thread = threading.Thread(target=start, name="prefect-temporary-api", daemon=True)
    thread.start()
    previous = os.environ.get("PREFECT_API_URL")
    settings = contextlib.ExitStack()

    def ready() -> str:
        thread.join()
        if failed:
            raise failed[0]
        if os.environ.get("PREFECT_API_URL") == server.api_url:  # called before
            return server.api_url
        os.environ["PREFECT_API_URL"] = server.api_url  # the workers are spawned from this environment
        settings.enter_context(temporary_settings(updates={PREFECT_API_URL: server.api_url, **no_heartbeats()}))
        return server.api_url

    try:
        yield ready
    finally:
        thread.join()
        settings.close()
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        if server.running:
            drain_logs_and_events()  # queued for the server before it stops
            server.stop()


def no_heartbeats() -> dict[str, None]:
    """Settings that turn off flow-run heartbeats, unless the user set their frequency.

    On a long-lived server, an automation can use heartbeats to mark a silent run as crashed. A temporary API
    stops with the command that started it, so nothing can watch them there. They still cost time: Prefect's
    heartbeat thread sleeps in 1 s steps and every (sync) flow run, subflows included, joins it at its end
    (0-1 s a run, `bench/bench_flow.py`)."""
    from prefect.settings import get_current_settings

    if "heartbeat_frequency" in get_current_settings().flows.model_fields_set:  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY
        return {}
    return {"flows.heartbeat_frequency": None}


@contextlib.contextmanager
def no_heartbeats_on_a_temporary_api() -> Iterator[None]:
    """For flows left to Prefect's own temporary API (no PREFECT_API_URL; the command did not start one with
    `starting_temporary_api`): no heartbeats either, for the same reason (see `no_heartbeats`)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    with temporary_settings(updates=no_heartbeats()):
        yield


def drain_logs_and_events() -> None:
    """Send the logs and events this process still has queued for its Prefect API. Queued for a server that is
    gone, they would be retried at exit for over a minute and end in 'Error logging to API'."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            service.drain_all(timeout=10)
