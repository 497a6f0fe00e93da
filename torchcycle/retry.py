"""Retry policy for I/O tasks: retry transient failures, never bad input."""

from __future__ import annotations

import errno
import re
from typing import Any

from torchcycle.errors import DataError

# Bad input stays bad on the next try: retrying only delays the clear error.
NOT_TRANSIENT: tuple[type[BaseException], ...] = (DataError, FileNotFoundError, PermissionError, KeyError, TypeError)

# A file system saying no (read-only, not a directory, no space, no permission): the next try meets the same.
PERMANENT_ERRNOS = frozenset(
    {
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ENOENT,
        errno.EEXIST,
        errno.ENAMETOOLONG,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EFBIG,
        errno.ELOOP,
        errno.EINVAL,
    }
)

IO_RETRY_DELAYS = [2, 5, 15]  # seconds
RETRY_DELAYS_ENV = "TORCHCYCLE_IO_RETRY_DELAYS"  # e.g. "1,1,1": shorter waits in tests, longer on flaky links


def retry_delays() -> list[float]:
    import os

    raw = os.environ.get(RETRY_DELAYS_ENV)
    return [float(v) for v in raw.split(",")] if raw else list(IO_RETRY_DELAYS)


def http_status(err: BaseException) -> int | None:
    """The HTTP status of a server's answer carried by an MLflow or Prefect (httpx) error, else None."""
    response = getattr(err, "response", None)  # httpx.HTTPStatusError, PrefectHTTPStatusError
    if response is not None and isinstance(getattr(response, "status_code", None), int):
        return int(response.status_code)
    get_status = getattr(err, "get_http_status_code", None)  # MlflowException / RestException
    if callable(get_status):
        try:
            return int(get_status())
        except Exception:
            return None
    return None


def is_not_found(err: BaseException) -> bool:
    """MLflow's registry said "no such model, version or alias"; a refusal or a fault is something else."""
    return getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def server_refusal(err: BaseException) -> str | None:
    """The server's own message when it refused the request (a 4xx but 408/429): a retry gets the
    same answer, so callers report it at once. None for anything else (connection errors, 5xx)."""
    status = http_status(err)
    if status is None or not 400 <= status < 500 or status in (408, 429):
        return None
    response = getattr(err, "response", None)
    text = str(getattr(response, "text", "") or "") if response is not None else str(getattr(err, "message", err))
    # MLflow wraps a non-JSON answer as "API request to ... failed with error code 403 != 200. Response body: '...'"
    body = re.search(r"Response body: '(.*)'", text, re.S)
    text = body.group(1) if body else text
    first = next((line.strip() for line in text.splitlines() if line.strip()), "") or type(err).__name__
    return f"{status}: {first[:300]}"


def file_system_refusal(err: BaseException) -> bool:
    """An OSError from the local file system that a retry cannot fix (not a network error: those are
    OSErrors too, with other errnos or none)."""
    return isinstance(err, OSError) and err.errno in PERMANENT_ERRNOS


def is_lock_timeout(err: BaseException) -> bool:
    """SQLite's 'database is locked' (another process holds the embedded store): transient."""
    return "database is locked" in str(err)


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: False for input errors, file-system refusals and server refusals."""
    try:
        state.result()
    except NOT_TRANSIENT:
        return False
    except Exception as err:
        return server_refusal(err) is None and not file_system_refusal(err)
    return True


def io_task_options(**extra: Any) -> dict[str, Any]:
    """Options shared by every task that touches files, the network or the registry."""
    from prefect.cache_policies import NO_CACHE

    delays = retry_delays()
    return {
        "retries": len(delays),
        "retry_delay_seconds": delays,
        "retry_condition_fn": is_transient,
        "cache_policy": NO_CACHE,
        **extra,
    }
