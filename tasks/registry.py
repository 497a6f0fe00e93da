"""Model-version lifecycle over the MLflow registry: list, promote by hand, roll back.

Plain functions taking an MlflowClient; the CLI is their only caller, so errors are RegistryError
(a clear message, exit code 2) and nothing changes when a name or version does not exist.
"""

from __future__ import annotations

import getpass
import time
from dataclasses import dataclass

from mlflow.exceptions import MlflowException

from tasks.promote import CHAMPION
from tasks.retry import is_not_found
from tasks.types import DataError


class RegistryError(DataError):
    """Unknown model or version, or nothing to roll back to."""


@dataclass(frozen=True)
class VersionRow:
    version: str
    aliases: tuple[str, ...]
    status: str  # the gate's validation_status tag, or "manual"/"-" when it never ran
    metric: str
    value: str
    created: str
    run_id: str


def _registered(client, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if not is_not_found(err):
            raise
        raise RegistryError(f"no registered model named '{name}'") from None


def _version(client, name: str, version: str):
    _registered(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if not is_not_found(err):
            raise
        raise RegistryError(f"model '{name}' has no version {version}") from None


def list_models(client) -> list[str]:
    return sorted(rm.name for rm in client.search_registered_models())


def list_versions(client, name: str) -> list[VersionRow]:
    rm = _registered(client, name)
    aliases: dict[str, list[str]] = {}
    for alias, version in (rm.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in client.search_model_versions(f"name='{name}'"):
        tags = mv.tags or {}
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mv.creation_timestamp / 1000))
        rows.append(
            VersionRow(
                str(mv.version),
                tuple(sorted(aliases.get(str(mv.version), []))),
                tags.get("validation_status", "-"),
                tags.get("gate_metric", "-"),
                tags.get("gate_challenger_value", "-"),
                created,
                mv.run_id or "-",
            )
        )
    return sorted(rows, key=lambda r: int(r.version), reverse=True)


def promote(client, name: str, version: str, alias: str = CHAMPION) -> str | None:
    """Point `alias` at `version` by hand; returns the version it pointed to before."""
    _version(client, name, version)
    previous = _alias_target(client, name, alias)
    if alias == CHAMPION and previous and previous != str(version):
        append_champion_history(client, name, previous)
    client.set_model_version_tag(name, str(version), f"promoted_{alias}_by", getpass.getuser())
    client.set_model_version_tag(name, str(version), f"promoted_{alias}_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
    if alias == CHAMPION:
        client.set_model_version_tag(name, str(version), "validation_status", "manual")
    client.set_registered_model_alias(name, alias, str(version))
    return previous


def rollback(client, name: str) -> tuple[str, str]:
    """Move `champion` back to the previous champion; returns (from_version, to_version)."""
    rm = _registered(client, name)
    history = [v for v in (rm.tags or {}).get("champion_history", "").split(",") if v]
    current = _alias_target(client, name, CHAMPION)
    if not history:
        raise RegistryError(f"model '{name}' has no previous champion to roll back to")
    target = history[-1]
    _version(client, name, target)
    client.set_registered_model_tag(name, "champion_history", ",".join(history[:-1]))
    client.set_model_version_tag(name, target, "rolled_back_from", current or "")
    if current:
        client.set_model_version_tag(name, current, "rolled_back_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
    client.set_registered_model_alias(name, CHAMPION, target)
    return current or "", target


def _alias_target(client, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if not is_not_found(err):
            raise
        return None


def append_champion_history(client, name: str, version: str) -> None:
    rm = client.get_registered_model(name)
    history = [v for v in (rm.tags or {}).get("champion_history", "").split(",") if v]
    client.set_registered_model_tag(name, "champion_history", ",".join([*history, version]))
