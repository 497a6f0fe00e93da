"""Retry policy for I/O tasks: retry transient failures, never bad input."""

from __future__ import annotations

from typing import Any

from tasks.types import DataError

# Bad input stays bad on the next try: retrying only delays the clear error.
NOT_TRANSIENT: tuple[type[BaseException], ...] = (DataError, FileNotFoundError, PermissionError, KeyError, TypeError)

IO_RETRY_DELAYS = [2, 5, 15]  # seconds
RETRY_DELAYS_ENV = "TORCHCYCLE_IO_RETRY_DELAYS"  # e.g. "1,1,1": shorter waits in tests, longer on flaky links


def retry_delays() -> list[float]:
    import os

    raw = os.environ.get(RETRY_DELAYS_ENV)
    return [float(v) for v in raw.split(",")] if raw else list(IO_RETRY_DELAYS)


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: False for input errors, True for everything else."""
    try:
        state.result()
    except NOT_TRANSIENT:
        return False
    except Exception:
        return True
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
