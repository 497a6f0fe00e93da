"""torchcycle's local Dask clusters (`tune --parallel K`, `predict --workers K`) run their workers with
torchcycle/dask_workers.yaml, on top of the user's own Dask config; Dask's defaults are what they replace."""

from __future__ import annotations

import logging
import os
from typing import Any

import dask
from distributed import Client, LocalCluster

from torchcycle import dask_preload
from torchcycle.flows.scoring import local_cluster, worker_settings

ONE_WORKER = {
    "n_workers": 1,
    "threads_per_worker": 1,
    "processes": True,
    "dashboard_address": None,
    "silence_logs": logging.CRITICAL,
}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _on_the_worker(client: Client, fn: Any, *args: Any) -> Any:
    (value,) = client.run(fn, *args).values()
    return value


def _seen(make: Any, keys: list[str], wait_s: float) -> tuple[dict[str, Any], str | None, bool]:
    with make(**ONE_WORKER) as cluster, Client(cluster) as client:
        preloaded = _on_the_worker(client, dask_preload.wait, wait_s)
        trim = _on_the_worker(client, os.environ.get, "MALLOC_TRIM_THRESHOLD_")
        config = {key: _on_the_worker(client, dask.config.get, key) for key in keys}
    return config, trim, preloaded


def test_local_workers_run_with_torchcycle_settings_not_dasks_defaults() -> None:
    wanted = {k: v for k, v in _flat(worker_settings()).items() if "pre-spawn-environ" not in k}
    assert wanted["distributed.worker.profile.enabled"] is False and wanted["distributed.admin.tick.interval"] == "1s"

    config, trim, preloaded = _seen(local_cluster, list(wanted), 120)
    assert config == wanted
    assert trim is None  # the nanny no longer sets it (Dask's default: 65536, malloc's adaptive mmap off)
    assert preloaded  # torchcycle.dask_preload imported torch & co. on its thread

    before = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    try:  # a plain cluster: what the settings change. Its nanny sets the variable in this process's own environ
        config, trim, preloaded = _seen(LocalCluster, list(wanted), 1)
    finally:  # ... which every process started later would inherit
        if before is None:
            os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
        else:
            os.environ["MALLOC_TRIM_THRESHOLD_"] = before
    assert all(config[k] != wanted[k] for k in wanted)
    assert trim == "65536" and not preloaded
    assert dask.config.get("distributed.worker.profile.enabled") is True  # this process's own config untouched
    assert set(dask_preload.MODULES) >= {"torch", "optuna", "torchcycle.tasks.tune", "torchcycle.tasks.score"}
