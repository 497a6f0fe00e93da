"""Model-version lifecycle over the MLflow registry: list, promote by hand, roll back.

Plain functions taking an MlflowClient; the CLI is their only caller, so errors are RegistryError
(a clear message, exit code 2) and nothing changes when a name, version or alias is refused or does
not exist: every input is checked before the first write.
"""

from __future__ import annotations

import getpass
import posixpath
import re
import time
from dataclasses import dataclass
from typing import Any

from torchcycle.errors import DataError
from torchcycle.retry import is_not_found

CHAMPION = "champion"
CHALLENGER = "challenger"


class RegistryError(DataError):
    """Unknown model or version, or nothing to roll back to."""


# MLflow's own rules (mlflow/utils/validation.py: _validate_model_name, _validate_model_alias_name and
# _validate_model_alias_name_reserved), checked here first so that a refused input writes nothing and
# reads as one clear line instead of the server's exception after half the writes.
MAX_ALIAS_LENGTH = 255
MAX_VERSION = 2**63 - 1  # versions are signed 64-bit integers in MLflow's stores


def check_name(name: str) -> str:
    """A registered model name MLflow accepts: not empty, no '/' or ':', no path that resolves elsewhere."""
    if not name or not name.strip():
        raise RegistryError("model name is empty")
    if "/" in name or ":" in name:
        raise RegistryError(f"model name {name!r} cannot contain '/' or ':'")
    normal = posixpath.normpath(name)
    if normal != name or normal == "." or normal.startswith(".."):
        raise RegistryError(f"model name {name!r} is not allowed: MLflow would read it as the path {normal!r}")
    return name


def check_alias(alias: str) -> str:
    """An alias MLflow lets us set: 1-255 letters, digits, '_' or '-'; not 'latest' nor 'v<digits>'."""
    if not alias:
        raise RegistryError("alias is empty: give a name such as champion or staging")
    if not re.fullmatch(r"[\w-]+", alias):
        raise RegistryError(f"alias {alias!r} may only contain letters, digits, underscores (_) and dashes (-)")
    if len(alias) > MAX_ALIAS_LENGTH:
        raise RegistryError(f"alias {alias[:20] + '...'!r} is {len(alias)} characters long; at most {MAX_ALIAS_LENGTH}")
    if alias.lower() == "latest":
        raise RegistryError(f"alias {alias!r} is reserved by MLflow: @latest always means the newest version")
    if re.fullmatch(r"[vV]\d+", alias):
        raise RegistryError(f"alias {alias!r} is reserved by MLflow: @v<number> means that version")
    return alias


def check_version(version: str) -> str:
    """A version number as MLflow stores it: a whole number from 1 to 2**63-1. Surrounding spaces, a
    leading '+' and leading zeros are dropped (' +07' is '7'); anything else is refused by name."""
    text = str(version).strip()
    match = re.fullmatch(r"([+-]?)0*([0-9]+)", text)
    if match is None:
        raise RegistryError(f"version {version!r} is not a whole number: give the version's number, e.g. 3")
    sign, digits = match.groups()
    if sign == "-" or digits == "0":
        raise RegistryError(f"version {text} does not exist: versions are numbered from 1")
    # the length first: int() of thousands of digits is refused by Python itself
    if len(digits) > len(str(MAX_VERSION)) or int(digits) > MAX_VERSION:
        shown = text if len(text) <= 30 else f"{text[:30]}..."
        raise RegistryError(f"version {shown} is too large: versions go up to {MAX_VERSION}")
    return digits


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
    from mlflow.exceptions import MlflowException  # here, not on import: ModelRef.parse needs no MLflow

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if not is_not_found(err):
            raise
        raise RegistryError(f"no registered model named '{name}'") from None


def _version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

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
    rm = _registered(client, check_name(name))
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
    name, alias, version = check_name(name), check_alias(alias), check_version(version)
    _version(client, name, version)
    previous = alias_target(client, name, alias)
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
    rm = _registered(client, check_name(name))
    history = champion_history(rm)
    current = alias_target(client, name, CHAMPION)
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


def alias_target(client, name: str, alias: str) -> str | None:
    """The version `alias` points at, None when it is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if not is_not_found(err):
            raise
        return None


def champion_history(rm) -> list[str]:
    """Earlier champions of a registered model, oldest first (the `champion_history` tag)."""
    return [v for v in (rm.tags or {}).get("champion_history", "").split(",") if v]


def append_champion_history(client, name: str, version: str) -> None:
    """Push `version` onto the champion history, unless it is already the last entry: a retried
    promotion whose first attempt got this far appends nothing (and the same version twice in a row
    would only make one rollback change nothing)."""
    history = champion_history(client.get_registered_model(name))
    if history and history[-1] == str(version):
        return
    client.set_registered_model_tag(name, "champion_history", ",".join([*history, str(version)]))


# ---- model references: NAME, NAME@alias, NAME/version -----------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """`NAME` (= NAME@champion), `NAME@alias` or `NAME/version`."""

    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, ref: str, default_alias: str = "champion") -> ModelRef:
        m = re.fullmatch(r"(?:models:/)?([^@/\s]+)(?:@([\w-]+)|/(\d+))?", ref.strip())
        if not m:
            raise DataError(f"bad model reference '{ref}': use NAME, NAME@alias or NAME/version")
        name, alias, version = m.groups()
        try:  # MLflow's rules for versions (1 .. 2**63-1) and aliases (not 'latest', not 'v3')
            version = check_version(version) if version is not None else None
            alias = check_alias(alias) if alias is not None else None
        except DataError as err:
            raise DataError(f"bad model reference '{ref}': {err}") from None
        return cls(name, alias or (None if version else default_alias), version)

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.version}"


@dataclass(frozen=True)
class ResolvedModel:
    """A reference pinned to one registry version, so lineage names exactly what scored."""

    name: str
    version: str
    run_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def resolve_model(client: Any, ref: ModelRef) -> ResolvedModel:
    from mlflow.exceptions import MlflowException

    try:
        mv = (
            client.get_model_version_by_alias(ref.name, ref.alias)
            if ref.alias
            else client.get_model_version(ref.name, ref.version)
        )
    except MlflowException as err:
        if is_not_found(err):
            raise DataError(f"no model version for '{ref}' in the registry") from None
        raise  # server trouble: transient, the task retries
    return ResolvedModel(mv.name, str(mv.version), mv.run_id or "")
