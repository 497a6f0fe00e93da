"""Experiment configuration: YAML validated by pydantic at the CLI edge."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from models import DERIVED_FIELDS, MODELS
from models.training import TrainConfig

SKLEARN_SETS = ("digits", "iris", "wine", "breast_cancer", "diabetes")
SYNTHETIC_SETS = ("line", "xor", "regression", "linear2d", "classification")
TORCHVISION_SETS = ("MNIST", "FashionMNIST")


class ConfigError(ValueError):
    """A bad experiment config: the message names the offending key and what was expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    source: str = Field(description="sklearn:NAME | synthetic:NAME | file:PATH | torchvision:NAME")
    target: str | None = None  # target column; required for file sources
    root: str | None = None  # torchvision: folder holding the IDX files
    download: bool = False  # torchvision: only fetch when explicitly asked
    task: Literal["auto", "classification", "regression"] = "auto"
    test_size: float = Field(0.2, ge=0.0, lt=1.0)  # 0: evaluate on the training rows (toy data)
    val_size: float = Field(0.1, ge=0.0, lt=1.0)  # 0: validate on the training rows
    limit: int | None = Field(None, gt=0)  # keep at most this many rows (quick runs)

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: str) -> str:
        scheme, _, name = v.partition(":")
        allowed = {"sklearn": SKLEARN_SETS, "synthetic": SYNTHETIC_SETS, "torchvision": TORCHVISION_SETS}
        if scheme == "file":
            if not name:
                raise ValueError("file source needs a path: file:data/train.csv")
            return v
        if scheme not in allowed:
            raise ValueError(
                f"unknown source scheme '{scheme}' in '{v}': use sklearn:, synthetic:, file: or torchvision:"
            )
        if name not in allowed[scheme]:
            raise ValueError(f"unknown {scheme} data set '{name}': choose one of {', '.join(allowed[scheme])}")
        return v

    @model_validator(mode="after")
    def _check_combo(self) -> DataConfig:
        if self.source.startswith("file:") and not self.target:
            raise ValueError("data.target is required for a file: source (the name of the target column)")
        if self.source.startswith("torchvision:") and not self.root:
            raise ValueError("data.root is required for a torchvision: source (the folder with the IDX files)")
        if self.test_size + self.val_size >= 1.0:
            raise ValueError("data.test_size + data.val_size must be below 1")
        return self


class FeaturesConfig(_Strict):
    scale: bool = True  # standardise numeric columns (mean 0, std 1) fitted on the train split


class ModelSpec(_Strict):
    """`kind` plus that model's own settings; the settings are checked against its config class."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str

    @model_validator(mode="after")
    def _check_params(self) -> ModelSpec:
        if self.kind not in MODELS:
            raise ValueError(f"unknown model kind '{self.kind}': choose one of {', '.join(MODELS)}")
        params = dict(self.model_extra or {})
        cfg_cls = MODELS[self.kind][0]
        allowed = {f.name for f in fields(cfg_cls)} - DERIVED_FIELDS
        for key in params:
            if key in DERIVED_FIELDS:
                raise ValueError(f"model.{key} is derived from the data and cannot be set")
            if key not in allowed:
                raise ValueError(
                    f"unknown key model.{key} for model '{self.kind}': allowed keys are {', '.join(sorted(allowed))}"
                )
        # Type-check by validating into the dataclass; errors name the field.
        TypeAdapter(cfg_cls).validate_python(params, strict=False)
        return self

    @property
    def params(self) -> dict[str, Any]:
        cfg = TypeAdapter(MODELS[self.kind][0]).validate_python(dict(self.model_extra or {}))
        return {k: v for k, v in asdict(cfg).items() if k not in DERIVED_FIELDS}


class TrainSection(_Strict):
    """Mirror of models.training.TrainConfig, so YAML keys are checked at the edge."""

    epochs: int = Field(20, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(5, ge=0)
    min_delta: float = Field(0.0, ge=0)
    schedule: Literal["none", "cosine", "onecycle"] = "none"
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = False
    gpu_data_budget: float = Field(0.5, gt=0, le=1)
    num_workers: int = Field(2, ge=0)

    def to_train_config(self) -> TrainConfig:
        return TrainConfig(**self.model_dump())


class GateConfig(_Strict):
    metric: str | None = None  # default: test_accuracy (classification) / test_r2 (regression)
    margin: float = Field(0.0, ge=0)  # minimum improvement over the champion to promote

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        allowed = ("test_accuracy", "test_f1_macro", "test_r2", "test_mse", "test_mae")
        if v is not None and v not in allowed:
            raise ValueError(f"unknown gate metric '{v}': choose one of {', '.join(allowed)}")
        return v


# ---- schedules of the retrain/score deployments ------------------------------------------------------
_INTERVAL = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)?$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SCHEDULE_HELP = "a cron line ('0 2 * * *'), an interval (90, 30s, 15m, 6h, 1d) or 'off'"


@dataclass(frozen=True)
class ScheduleSpec:
    """One deployment schedule: a cron line in a time zone, an interval in seconds, or none."""

    kind: Literal["cron", "interval", "off"]
    value: str = ""  # the cron line, or the interval in seconds
    timezone: str = "UTC"

    def describe(self) -> str:
        if self.kind == "cron":
            return f"cron '{self.value}' {self.timezone}"
        if self.kind == "interval":
            return f"every {float(self.value):g} s"
        return "no schedule"


def check_timezone(name: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone '{name}' (use an IANA name such as UTC or Europe/Berlin)") from None
    return name


def parse_schedule(text: str | bool | int | float, timezone: str = "UTC") -> ScheduleSpec:
    """`text` as written in the config or on the command line; ValueError names what is wrong."""
    if isinstance(text, bool):  # YAML's off/no/false; on/yes/true name no schedule
        if text:
            raise ValueError(f"schedule 'true' is neither {SCHEDULE_HELP}")
        return ScheduleSpec("off")
    raw = str(text).strip()
    if raw.lower() in ("off", "none", "false"):
        return ScheduleSpec("off")
    match = _INTERVAL.match(raw.lower())
    if match:
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]
        if not 0 < seconds <= 366 * 86400:
            raise ValueError(f"schedule interval '{raw}' must be more than 0 s and at most a year")
        return ScheduleSpec("interval", f"{seconds:g}")
    if len(raw.split()) == 5:
        from prefect.client.schemas.schedules import CronSchedule

        check_timezone(timezone)
        try:
            CronSchedule(cron=raw, timezone=timezone)
        except ValueError:
            raise ValueError(f"invalid cron line '{raw}'") from None
        return ScheduleSpec("cron", " ".join(raw.split()), timezone)
    raise ValueError(f"schedule '{raw}' is neither {SCHEDULE_HELP}")


class DeploymentSection(_Strict):
    """Schedules of the `retrain` and `score` deployments. Unset: `torchcycle deploy` keeps the schedule the
    server has (edited in the UI, say), or uses the default for a new deployment. Not part of the config hash."""

    timezone: str = "UTC"  # of cron lines
    # bool first: YAML reads a bare `off` as false, which must not become an interval of 0 s
    retrain: bool | str | int | float | None = None
    score: bool | str | int | float | None = None

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return check_timezone(v)

    @model_validator(mode="after")
    def _schedules(self) -> DeploymentSection:
        for value in (self.retrain, self.score):
            if value is not None:
                parse_schedule(value, self.timezone)
        return self

    def schedule(self, which: Literal["retrain", "score"]) -> ScheduleSpec | None:
        value = getattr(self, which)
        return None if value is None else parse_schedule(value, self.timezone)


class ExperimentConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # registered model name
    experiment: str = "torchcycle"  # MLflow experiment
    seed: int = 0
    data: DataConfig
    features: FeaturesConfig = FeaturesConfig()
    model: ModelSpec
    train: TrainSection = TrainSection()
    gate: GateConfig = GateConfig()
    deployment: DeploymentSection = DeploymentSection()  # when it runs, not what it trains: outside the hash

    def flat_params(self) -> dict[str, str]:
        """The whole resolved config as dotted keys, for MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = json.dumps(value) if isinstance(value, list | tuple) else str(value)

        walk("", self.resolved())
        return out

    def resolved(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", exclude={"deployment"})
        d["model"] = {"kind": self.model.kind, **json.loads(json.dumps(self.model.params))}
        return d

    def config_hash(self) -> str:
        blob = json.dumps(self.resolved(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = d
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings; the value is parsed as YAML (so 3, 0.1, true, [1,2] work)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key.sub=value, got '{item}'")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key.strip()}: cannot parse value '{raw}'") from None
        out.append((key.strip(), value))
    return out


def _format_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    raw = copy.deepcopy(raw)  # never mutate the caller's dict (YAML dates etc. then meet pydantic's checks)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation(err)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config, apply `--set` overrides, validate. Raises ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping of settings, got {type(raw).__name__}")
    return config_from_dict(raw, overrides)
