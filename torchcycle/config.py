"""Experiment configuration: YAML validated by pydantic at the CLI edge."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import re
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails, PydanticCustomError

from torchcycle.errors import ConfigError
from torchcycle.models import DERIVED_FIELDS, MODELS
from torchcycle.models.training import TrainConfig

SKLEARN_SETS = ("digits", "iris", "wine", "breast_cancer", "diabetes")
SYNTHETIC_SETS = ("line", "xor", "regression", "linear2d", "classification")
TORCHVISION_SETS = ("MNIST", "FashionMNIST")
CLASSIFICATION_METRICS = ("test_accuracy", "test_balanced_accuracy", "test_f1_macro")
REGRESSION_METRICS = ("test_r2", "test_mse", "test_mae")
SEED_MAX = 2**32 - 1  # numpy's seed range is 0..2**32-1
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


@dataclass(frozen=True)
class SourceFacts:
    """What a named source is known to hold before any of it is read (tasks/ingest.py decides the same;
    tests/test_config_corpus.py checks the two agree). None: unknown until ingest."""

    task: Literal["classification", "regression"] | None
    rows: int | None
    image_shape: tuple[int, int, int] | None  # (C, H, W); None: tabular, a CNN cannot use it


_KNOWN_SOURCES: dict[str, SourceFacts] = {
    "sklearn:digits": SourceFacts("classification", 1797, (1, 8, 8)),
    "sklearn:iris": SourceFacts("classification", 150, None),
    "sklearn:wine": SourceFacts("classification", 178, None),
    "sklearn:breast_cancer": SourceFacts("classification", 569, None),
    "sklearn:diabetes": SourceFacts("regression", 442, None),
    "synthetic:line": SourceFacts("regression", 20, None),
    "synthetic:xor": SourceFacts("classification", 4, None),
    "synthetic:regression": SourceFacts("regression", 100, None),
    "synthetic:linear2d": SourceFacts("regression", 1000, None),
    "synthetic:classification": SourceFacts("classification", 100, None),
    # the row count is whatever the local IDX files hold
    "torchvision:MNIST": SourceFacts("classification", None, (1, 28, 28)),
    "torchvision:FashionMNIST": SourceFacts("classification", None, (1, 28, 28)),
}


def source_facts(source: str) -> SourceFacts:
    """Task, rows and image shape of `source` as far as they are known without reading it (file: sources
    are tables of unknown size whose task, unless given, is inferred from the target column; images: sources
    are classification, their shape is the config's, see DataConfig.image_shape)."""
    if source.startswith("images:"):
        return SourceFacts("classification", None, None)
    return _KNOWN_SOURCES.get(source, SourceFacts(None, None, None))


def _problems(title: str, problems: list[tuple[tuple[str | int, ...], str]]) -> ValidationError:
    """Several located problems as one ValidationError; raised inside a validator, pydantic prefixes each
    location with the section's, so every problem is reported under its full dotted key."""
    details = [
        InitErrorDetails(type=PydanticCustomError("config", "{problem}", {"problem": msg}), loc=loc, input=None)
        for loc, msg in problems
    ]
    return ValidationError.from_exception_data(title, details)


class _Strict(BaseModel):
    # allow_inf_nan=False: no float setting may be inf or nan (YAML's .inf/.nan, --set train.lr=.nan)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def split_sizes(rows: int, test_size: float, val_size: float) -> tuple[int, int, int]:
    """(train, val, test) rows as tasks/preprocess.py splits `rows` (sklearn's rounding: held-out parts
    round up). A size of 0 holds nothing out: that part reuses the training rows."""
    n_test = math.ceil(test_size * rows) if test_size else 0
    rest = rows - n_test
    val_frac = val_size / (1 - test_size) if val_size else 0.0
    n_val = math.ceil(val_frac * rest) if val_frac else 0
    return rest - n_val, n_val, n_test


MIN_TRAIN_ROWS = 2


def _splits_work(rows: int, test_size: float, val_size: float) -> bool:
    train, val, test = split_sizes(rows, test_size, val_size)
    return train >= MIN_TRAIN_ROWS and (val >= 1 or not val_size) and (test >= 1 or not test_size)


def min_rows(test_size: float, val_size: float) -> int:
    """The fewest rows that leave >= 2 training rows and >= 1 in each held-out part (monotone in rows,
    so a doubling then a bisection finds it)."""
    hi = MIN_TRAIN_ROWS
    while not _splits_work(hi, test_size, val_size):
        hi *= 2
        if hi > 2**62:  # only where float rounding leaves no training fraction at all
            raise ValueError(f"test_size {test_size:g} and val_size {val_size:g} leave no rows to train on")
    lo = hi // 2  # fails (or is below the minimum)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _splits_work(mid, test_size, val_size) else (mid, hi)
    return hi


def _describe_split(rows: int, test_size: float, val_size: float) -> str:
    train, val, test = split_sizes(rows, test_size, val_size)
    return f"train {train}, validation {val if val_size else '-'}, test {test if test_size else '-'}"


_IMAGE_KEYS = ("image_column", "image_size", "channels", "skip_bad_images")
_Side = Annotated[int, Field(ge=1, le=4096, strict=True)]  # pixels; strict: `true` is no size


class DataConfig(_Strict):
    source: str = Field(description="sklearn:NAME | synthetic:NAME | file:PATH | torchvision:NAME | images:PATH")
    target: str | None = None  # target column; required for file sources and images: tables ('label' for folders)
    # images: sources: a folder of class folders, or a CSV/Parquet table of image paths (or bytes) and labels
    image_column: str = Field("image", min_length=1)  # images: table: the column of paths or image bytes
    # images are resized to cover it (aspect kept) and centre-cropped to it: N or [H, W] pixels
    image_size: tuple[_Side, _Side] = (32, 32)
    channels: Literal[1, 3] = 3  # every image is converted to grey (1) or RGB (3)
    skip_bad_images: bool = False  # images: unreadable images are skipped and counted instead of refused
    root: str | None = None  # torchvision: folder holding the IDX files
    download: bool = False  # torchvision: only fetch when explicitly asked
    task: Literal["auto", "classification", "regression"] = "auto"
    test_size: float = Field(0.2, ge=0.0, lt=1.0)  # 0: evaluate on the training rows (toy data)
    val_size: float = Field(0.1, ge=0.0, lt=1.0)  # 0: validate on the training rows
    limit: int | None = Field(None, gt=0)  # keep at most this many rows (quick runs)
    ignore: list[str] = Field(default_factory=list)  # columns left out of the features by name (IDs, leaks)

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: str) -> str:
        scheme, _, name = v.partition(":")
        allowed = {"sklearn": SKLEARN_SETS, "synthetic": SYNTHETIC_SETS, "torchvision": TORCHVISION_SETS}
        if scheme == "file":
            if not name:
                raise ValueError("file source needs a path: file:data/train.csv")
            return v
        if scheme == "images":
            if not name.strip():
                raise ValueError("images source needs a path: images:data/train (class folders) or a CSV/Parquet")
            return v
        if scheme not in allowed:
            raise ValueError(
                f"unknown source scheme '{scheme}' in '{v}': use sklearn:, synthetic:, file:, torchvision: or images:"
            )
        if name not in allowed[scheme]:
            raise ValueError(f"unknown {scheme} data set '{name}': choose one of {', '.join(allowed[scheme])}")
        return v

    @model_validator(mode="after")
    def _check_combo(self) -> DataConfig:
        if self.source.startswith("file:") and not self.target:
            raise ValueError("data.target is required for a file: source (the name of the target column)")
        if not self.source.startswith("images:"):
            stray = [k for k in _IMAGE_KEYS if k in self.model_fields_set]
            if stray:
                raise _problems(
                    "DataConfig", [((k,), f"applies to images: sources only, not {self.source}") for k in stray]
                )
        if self.ignore:
            problems = []
            if self.source.startswith("images:"):
                problems.append((("ignore",), f"applies to tables only, not {self.source}"))
            if self.target and self.target in self.ignore:
                problems.append((("ignore",), f"names the target column '{self.target}': it cannot be left out"))
            twice = sorted({c for c in self.ignore if self.ignore.count(c) > 1})
            if twice:
                problems.append((("ignore",), f"names {', '.join(map(repr, twice))} more than once"))
            if problems:
                raise _problems("DataConfig", problems)
        if self.source.startswith("images:") and self.task == "regression":
            raise _problems("DataConfig", [(("task",), "images: sources are classification (a label per image)")])
        if self.source.startswith("torchvision:") and not self.root:
            raise ValueError("data.root is required for a torchvision: source (the folder with the IDX files)")
        if self.test_size + self.val_size >= 1.0:
            raise ValueError("data.test_size + data.val_size must be below 1")
        problem = self._rows_problem()
        if problem:
            raise _problems("DataConfig", [problem])
        return self

    @field_validator("image_size", mode="before")
    @classmethod
    def _square(cls, v: Any) -> Any:
        """N means [N, N]; anything but N or [H, W] is one error, not one per reading pydantic tried."""
        shape = "N or [H, W] pixels (whole numbers, 1 to 4096)"
        if isinstance(v, bool) or not isinstance(v, int | list | tuple):
            raise ValueError(f"must be {shape}, got {v!r}")
        if isinstance(v, int):
            if not 1 <= v <= 4096:
                raise ValueError(f"must be {shape}, got {v}")
            return (v, v)
        if len(v) != 2:
            raise ValueError(f"must be {shape}, got {list(v)}")
        return v

    @property
    def size(self) -> tuple[int, int]:
        """image_size as (H, W) pixels."""
        return tuple(self.image_size)  # type: ignore[return-value]

    def image_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of the model's input when known before reading: an images: source's, or a known set's."""
        if self.source.startswith("images:"):
            return (self.channels, *self.size)
        return source_facts(self.source).image_shape

    def known_rows(self) -> int | None:
        """Rows that reach the split when known before reading: the data set's size, capped by `limit`."""
        rows = source_facts(self.source).rows
        if self.limit is None:
            return rows
        return self.limit if rows is None else min(rows, self.limit)

    def _rows_problem(self) -> tuple[tuple[str, ...], str] | None:
        rows = self.known_rows()
        if rows is None or _splits_work(rows, self.test_size, self.val_size):
            return None
        sizes = f"test_size {self.test_size:g} and val_size {self.val_size:g}"
        need = f"at least {MIN_TRAIN_ROWS} training rows and 1 in each held-out part"
        split = _describe_split(rows, self.test_size, self.val_size)
        if self.limit is not None and rows == self.limit:
            smallest = min_rows(self.test_size, self.val_size)
            return ("limit",), (
                f"{self.limit} rows are too few for {sizes} ({split}; {need}): "
                f"the smallest limit that works is {smallest}"
            )
        return ("test_size",), (
            f"{self.source} has only {rows} rows: {sizes} leave {split} ({need}); "
            "lower data.test_size / data.val_size (0 evaluates on the training rows)"
        )


class AugmentSection(_Strict):
    """Random changes to every training batch of images (never validation, test or scoring), a fresh draw per
    image and epoch. The defaults change nothing."""

    flip: bool = False  # mirror left-right with probability 1/2
    crop_scale: float = Field(1.0, gt=0, le=1)  # random-resized crop keeping this fraction of the area or more
    jitter: float = Field(0.0, ge=0, lt=1)  # brightness and contrast each scaled by a factor in [1-j, 1+j]

    def active(self) -> bool:
        return self.flip or self.crop_scale < 1 or self.jitter > 0


class FeaturesConfig(_Strict):
    scale: bool = True  # standardise numeric columns (mean 0, std 1) fitted on the train split
    # text columns: the most frequent N values each get a feature; the rest, and values never seen in training,
    # share one "other" feature (memory stays bounded whatever the number of distinct values)
    max_categories: int = Field(50, ge=1, le=10_000)
    augment: AugmentSection = AugmentSection()  # images only


@functools.cache
def _adapter(cfg_cls: type) -> TypeAdapter:
    return TypeAdapter(cfg_cls)


class ModelSpec(_Strict):
    """`kind` plus that model's own settings; the settings are checked against its config class."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str

    @model_validator(mode="after")
    def _check_params(self) -> ModelSpec:
        if self.kind not in MODELS:
            raise _problems(
                "ModelSpec", [(("kind",), f"unknown model kind '{self.kind}': choose one of {', '.join(MODELS)}")]
            )
        params = dict(self.model_extra or {})
        cfg_cls = MODELS[self.kind][0]
        allowed = {f.name for f in fields(cfg_cls)} - DERIVED_FIELDS
        problems: list[tuple[tuple[str | int, ...], str]] = []
        keys = ", ".join(sorted(allowed))
        for key in params:
            if key in DERIVED_FIELDS:
                problems.append(((), f"model.{key} is derived from the data and cannot be set"))
            elif key not in allowed:
                problems.append(((), f"unknown key model.{key} for model '{self.kind}': allowed keys are {keys}"))
        # Types by pydantic (lax: [4, 2] becomes (4, 2)), ranges by the config class's own __post_init__,
        # which names the field on each line of its ValueError.
        try:
            _adapter(cfg_cls).validate_python({k: v for k, v in params.items() if k in allowed}, strict=False)
        except ValidationError as err:
            for e in err.errors():
                if e["loc"] or e["type"] != "value_error":
                    problems.append((e["loc"], e["msg"] + _given(e)))
                    continue
                for line in str(e["ctx"]["error"]).splitlines():
                    field, sep, msg = line.partition(": ")
                    problems.append(((field,), msg) if sep and field in allowed else ((), line))
        if problems:
            raise _problems("ModelSpec", problems)
        return self

    @property
    def params(self) -> dict[str, Any]:
        cfg = _adapter(MODELS[self.kind][0]).validate_python(dict(self.model_extra or {}))
        return {k: v for k, v in asdict(cfg).items() if k not in DERIVED_FIELDS}


# The edge's limits on models.training.TrainConfig's fields. Names, types and defaults are the dataclass's
# own (`_fields_of` below), so a field added there is a config key at once; only its limits are set here.
def _auto_or(least: int) -> Any:
    """int | "auto" with one error message for anything else (not one per member of the union)."""

    def check(v: Any) -> Any:
        if v == "auto":
            return v
        if isinstance(v, str) and v.strip().lstrip("+").isdigit():  # --set train.epochs=5 arrives as text
            v = int(v)
        if isinstance(v, float) and v.is_integer():  # 5.0 is 5, as pydantic's own int fields take it
            v = int(v)
        if isinstance(v, float):  # the type pydantic's int fields use, so a tune space hints "use int"
            raise PydanticCustomError(
                "int_from_float", "must be 'auto' or a whole number >= {least}, got {v}", {"least": least, "v": v}
            )
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"must be 'auto' or a whole number >= {least}, got {v!r}")
        return v

    return Annotated[int | Literal["auto"], BeforeValidator(check)]


_AUTO_OR_POSITIVE = _auto_or(1)
_TRAIN_LIMITS: dict[str, Any] = {
    "epochs": _AUTO_OR_POSITIVE,
    "batch_size": _AUTO_OR_POSITIVE,
    "lr": Field(gt=0),
    "momentum": Field(ge=0, lt=1),  # SGD's velocity decay: 1 or more never forgets, and diverges
    "weight_decay": Field(ge=0),
    "patience": _auto_or(0),
    "min_delta": Field(ge=0),
    "gpu_data_budget": Field(gt=0, le=1),
    "num_workers": Field(ge=0),
}


def _fields_of(dc: type, limits: dict[str, Any], base: type[BaseModel]) -> type[BaseModel]:
    """A pydantic model with the fields of dataclass `dc` (names, types, defaults, order), each with its
    `limits` (a Field of constraints, or the whole type where the field's is a union such as int | "auto"); a
    limit naming no field of `dc` is a bug, refused at import."""
    names = [f.name for f in fields(dc)]
    unknown = sorted(set(limits) - set(names))
    if unknown:
        raise TypeError(f"limits for {', '.join(unknown)}, which {dc.__name__} does not have")
    hints = typing.get_type_hints(dc)
    defs: dict[str, Any] = {}
    for f in fields(dc):
        default = f.default
        if f.default_factory is not MISSING:
            default = Field(default_factory=f.default_factory)
        elif default is MISSING:
            default = ...  # required
        limit = limits.get(f.name)
        if limit is None:
            kind = hints[f.name]
        elif isinstance(limit, FieldInfo):
            kind = Annotated[hints[f.name], limit]
        else:
            kind = limit
        defs[f.name] = (kind, default)
    return create_model(f"{dc.__name__}Fields", __base__=base, __module__=__name__, **defs)


class TrainSection(_fields_of(TrainConfig, _TRAIN_LIMITS, _Strict)):
    """models.training.TrainConfig as a config section: its fields, types and defaults, checked at the edge
    (unknown keys, the limits above, finite floats, device names)."""

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(f"unknown device '{v}': use auto, cpu, cuda, cuda:N (N a GPU index) or mps")
        return v

    def to_train_config(self) -> TrainConfig:
        return TrainConfig(**self.model_dump())


class GateConfig(_Strict):
    metric: str | None = None  # default: test_accuracy (classification) / test_r2 (regression)
    margin: float = Field(0.0, ge=0)  # minimum improvement over the champion to promote

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        allowed = CLASSIFICATION_METRICS + REGRESSION_METRICS
        if v is not None and v not in allowed:
            raise ValueError(f"unknown gate metric '{v}': choose one of {', '.join(allowed)}")
        return v


class DriftConfig(_Strict):
    """Drift monitoring at scoring time. The thresholds travel inside the model bundle's reference profile,
    so a version is judged by the thresholds it was trained with; part of the config hash (it changes the
    bundle)."""

    bins: int = Field(10, ge=2, le=100)  # quantile bins per numeric column (fewer where values repeat)
    warn: float = Field(0.1, gt=0)  # population stability index (PSI) from which a column is "warn"
    threshold: float = Field(0.25, gt=0)  # PSI from which a column has drifted (and an event is emitted)
    min_rows: int = Field(1000, ge=1, le=10**12)  # fewer scored rows: PSI recorded, nothing called drift

    @model_validator(mode="after")
    def _ordered(self) -> DriftConfig:
        if self.warn >= self.threshold:
            raise _problems(
                "DriftConfig",
                [(("warn",), f"must be below drift.threshold ({self.threshold:g}), got {self.warn:g}")],
            )
        return self


# ---- schedules of the retrain/score deployments ------------------------------------------------------
_INTERVAL = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)?$", re.ASCII)  # ASCII: no other scripts' digits
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
        if not 1 <= seconds <= 366 * 86400:  # below a second the scheduler would start runs back to back
            raise ValueError(f"schedule interval '{raw}' must be at least 1 s and at most a year")
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
    tune: bool | str | int | float | None = None  # default off: studies run on demand
    # retrain on drift: at most one retrain per cool-down window; off: no automation; unset: deploy's default
    drift_cooldown: bool | str | int | float | None = None

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return check_timezone(v)

    @field_validator("drift_cooldown")
    @classmethod
    def _cooldown(cls, v: bool | str | int | float | None) -> float | str | None:
        """Normalised: seconds (a float), "off", or None (unset)."""
        if v is None:
            return None
        try:
            spec = parse_schedule(v)
        except ValueError:
            spec = None
        if spec is None or spec.kind == "cron":
            raise ValueError(f"'{v}' is neither a duration of 1 s to a year (90, 30s, 15m, 6h, 1d) nor 'off'")
        return "off" if spec.kind == "off" else float(spec.value)

    @model_validator(mode="after")
    def _schedules(self) -> DeploymentSection:
        problems = []
        for which in ("retrain", "score", "tune"):
            value = getattr(self, which)
            if value is None:
                continue
            try:
                parse_schedule(value, self.timezone)
            except ValueError as err:  # each under its own key: deployment.retrain / .score / .tune
                problems.append(((which,), str(err)))
        if problems:
            raise _problems("DeploymentSection", problems)
        return self

    def schedule(self, which: Literal["retrain", "score", "tune"]) -> ScheduleSpec | None:
        value = getattr(self, which)
        return None if value is None else parse_schedule(value, self.timezone)


# ---- hyper-parameter search (torchcycle tune) ---------------------------------------------------------
# Keys a search may not vary: who the model is, where it is tracked, what decides, when it runs, and what the
# trials are judged on (the data and its split: every trial must be scored on the same validation rows).
_UNTUNABLE = ("name", "experiment", "gate", "deployment", "tune", "model.kind", "seed", "data")
_SECTIONS = ("features", "model", "train", "drift")  # a whole section is no setting to sample
_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")  # 1e-4: YAML 1.1 reads it as text
_SCALARS = (type(None), bool, int, float, str)


def _same_numbers(v: Any) -> Any:
    """`v` with every int and float as a float tagged apart from bools, for telling equal choices apart."""
    if isinstance(v, bool):
        return ["bool", v]
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, list | tuple):
        return [_same_numbers(x) for x in v]
    if isinstance(v, dict):
        return {k: _same_numbers(x) for k, x in v.items()}
    return v


class ParamSpace(_Strict):
    """One key's distribution: exactly one of uniform / log_uniform / int / choice."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)
    uniform: tuple[float, float] | None = None  # [low, high]
    log_uniform: tuple[float, float] | None = None  # [low, high], low > 0, sampled on a log scale
    int_: tuple[int, int] | None = Field(None, alias="int")  # [low, high], both included
    choice: list[Any] | None = Field(None, min_length=1)  # any YAML values: 0.1, adam, [128, 64]
    log: bool = False  # int only: sample on a log scale
    step: float | None = Field(None, gt=0)  # uniform / int only: a grid of this spacing from low

    @field_validator("choice")
    @classmethod
    def _numbers(cls, v: list[Any] | None) -> list[Any] | None:
        """`1e-4` in YAML is text (YAML 1.1 wants 1.0e-4); as a choice it means the number."""
        return None if v is None else [float(c) if isinstance(c, str) and _YAML11_FLOAT.match(c) else c for c in v]

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpace:
        kinds = [k for k in ("uniform", "log_uniform", "int_", "choice") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one of uniform: [low, high], log_uniform: [low, high], "
                "int: [low, high] or choice: [values]"
            )
        kind = kinds[0]
        if kind != "choice":
            low, high = getattr(self, kind)
            if not low < high:
                raise ValueError(f"low must be below high, got [{low:g}, {high:g}]")
            if kind == "log_uniform" and low <= 0:
                raise ValueError(f"log_uniform needs low > 0, got {low:g}")
            if kind == "int_" and self.log and low < 1:
                raise ValueError(f"int with log: true needs low >= 1, got {low}")
        if self.log and kind != "int_":
            raise ValueError("log: true applies to int only (use log_uniform for floats)")
        if self.step is not None and (kind not in ("uniform", "int_") or self.log):
            raise ValueError("step applies to uniform and int without log only")
        if kind == "int_" and self.step is not None and self.step != int(self.step):
            raise ValueError(f"an int step must be a whole number, got {self.step:g}")
        if kind == "choice":
            # 32 and 32.0 are one value to a setting; True and 1 are not (a bool setting takes no number)
            texts = [json.dumps(_same_numbers(v), sort_keys=True) for v in self.choice]
            if len(set(texts)) != len(texts):
                raise ValueError("choice lists a value twice")
        return self

    def extremes(self) -> list[Any]:
        """Values that bound what this distribution can give, each of which must make a valid config: the bounds,
        and for a float range one point between them that is no whole number (an integer setting refuses it)."""
        if self.choice is not None:
            return list(self.choice)
        if self.int_ is not None:
            return list(self.int_)
        low, high = self.uniform or self.log_uniform
        inner = low + 0.37 * (high - low) if self.uniform else (low * (high / low) ** 0.37)
        if inner == int(inner):
            inner = math.nextafter(inner, high)
        return [low, high, inner]

    def describe(self) -> str:
        if self.choice is not None:
            return "choice " + json.dumps(self.choice)
        if self.int_ is not None:
            return (
                f"int [{self.int_[0]}, {self.int_[1]}]"
                + (" log" if self.log else "")
                + (f" step {int(self.step)}" if self.step else "")
            )
        low, high = self.uniform or self.log_uniform
        kind = "uniform" if self.uniform else "log_uniform"
        return f"{kind} [{low:g}, {high:g}]" + (f" step {self.step:g}" if self.step else "")


class TuneSection(_Strict):
    """`torchcycle tune`'s search: the space over dotted config keys, and how Optuna samples and prunes.
    Not part of the config hash: a trial's config is the base with the trial's values set."""

    space: dict[str, ParamSpace] = Field(default_factory=dict)  # "train.lr" -> its distribution
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = Field(5, ge=0, le=10_000)  # trials before TPE models and the median pruner prunes
    warmup_epochs: int = Field(5, ge=0)  # epochs a trial always gets before it can be pruned
    baseline: bool = True  # the first trial is the config's own values (when they lie in the space)
    max_failures: int = Field(3, ge=1, le=10_000)  # failed trials (diverged, out of memory...) before a run stops

    @field_validator("space")
    @classmethod
    def _keys(cls, v: dict[str, ParamSpace]) -> dict[str, ParamSpace]:
        problems = []
        for key in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
                problems.append(((key,), "not a dotted config key such as train.lr"))
            elif any(key == u or key.startswith(u + ".") for u in _UNTUNABLE) or key in _SECTIONS:
                fixed = ", ".join(_UNTUNABLE)
                problems.append(((key,), f"cannot be tuned ({fixed} and whole sections are fixed by the config)"))
        if problems:
            raise _problems("TuneSection", problems)
        return v


class ExperimentConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # registered model name
    experiment: str = Field("torchcycle", min_length=1)  # MLflow experiment
    seed: int = Field(0, ge=0, le=SEED_MAX)
    data: DataConfig
    features: FeaturesConfig = FeaturesConfig()
    model: ModelSpec
    train: TrainSection = TrainSection()
    gate: GateConfig = GateConfig()
    drift: DriftConfig = DriftConfig()
    deployment: DeploymentSection = DeploymentSection()  # when it runs, not what it trains: outside the hash
    tune: TuneSection = TuneSection()  # how `torchcycle tune` searches; outside the hash

    @field_validator("tune", mode="before")
    @classmethod
    def _empty_tune(cls, v: Any) -> Any:
        return {} if v is None else v  # `tune:` with nothing under it

    @model_validator(mode="after")
    def _check_against_data(self) -> ExperimentConfig:
        problems = _data_problems(self) or _space_problems(self)
        if problems:
            raise _problems("ExperimentConfig", problems)
        return self

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
        d = self.model_dump(mode="json", exclude={"deployment", "tune"})
        _drop_image_keys(d)
        d["model"] = {"kind": self.model.kind, **json.loads(json.dumps(self.model.params))}
        return d

    def config_hash(self) -> str:
        blob = json.dumps(self.resolved(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _drop_image_keys(d: dict[str, Any]) -> None:
    """The image settings of a dumped config that reads no images: not its settings (nor in its hash or params)."""
    if not str(d["data"]["source"]).startswith("images:"):
        for key in _IMAGE_KEYS:
            d["data"].pop(key, None)
        if d.get("features", {}).get("augment") == AugmentSection().model_dump(mode="json"):
            d["features"].pop("augment")


def _task_problems(cfg: ExperimentConfig, task: str, basis: str) -> list[tuple[tuple[str, ...], str]]:
    problems = []
    supported = MODELS[cfg.model.kind][2]
    if task not in supported:
        problems.append(
            (("model", "kind"), f"model '{cfg.model.kind}' does {' and '.join(sorted(supported))} only; {basis}")
        )
    metric = cfg.gate.metric
    fitting = CLASSIFICATION_METRICS if task == "classification" else REGRESSION_METRICS
    if metric is not None and metric not in fitting:
        problems.append((("gate", "metric"), f"'{metric}' does not apply to {task}; {basis}: use {', '.join(fitting)}"))
    return problems


def check_against_task(cfg: ExperimentConfig, task: str) -> None:
    """The model kind and gate metric against the data's task: at the edge where the task is known from the
    source or data.task, after ingest where it is inferred from the target column. Raises ConfigError."""
    problems = _task_problems(cfg, task, f"the data is {task}")
    if problems:
        raise ConfigError(_format_problems(problems))


def _data_problems(cfg: ExperimentConfig) -> list[tuple[tuple[str, ...], str]]:
    """What can be checked against the data before reading any of it."""
    data, kind = cfg.data, cfg.model.kind
    facts = source_facts(data.source)
    problems = []
    if data.task != "auto":
        problems += _task_problems(cfg, data.task, f"data.task is {data.task}")
    elif facts.task is not None:
        problems += _task_problems(cfg, facts.task, f"{data.source} is {facts.task}")
    shape = data.image_shape()
    if cfg.features.augment.active() and not data.source.startswith("images:"):
        problems.append((("features", "augment"), f"applies to images: sources only, not {data.source}"))
    if kind == "cnn":
        with_images = ", ".join(src for src, f in _KNOWN_SOURCES.items() if f.image_shape)
        if shape is None:
            problems.append(
                (("model", "kind"), f"model 'cnn' needs images; {data.source} is a table ({with_images}, images:PATH)")
            )
        else:
            # each conv stage halves H and W (max-pool 2); models/cnn.py refuses a map smaller than 1x1
            channels = cfg.model.params["channels"]
            most = min(shape[1:]).bit_length() - 1  # halvings that keep >= 1 pixel: floor(log2)
            if len(channels) > most:
                problems.append(
                    (
                        ("model", "channels"),
                        f"{len(channels)} conv stages halve the {shape} images of {data.source} "
                        f"below one pixel: use at most {most}",
                    )
                )
    rows = data.known_rows()
    if kind == "knn" and rows is not None:
        k, train = cfg.model.params["k"], split_sizes(rows, data.test_size, data.val_size)[0]
        if k > train:
            problems.append(
                (("model", "k"), f"k={k} needs at least {k} training rows; the {rows} rows leave {train} to train on")
            )
    return problems


def _raw_of(cfg: ExperimentConfig) -> dict[str, Any]:
    """`cfg` as the dict it validates from (tune: left out), model settings resolved."""
    raw = cfg.model_dump(mode="json", exclude={"tune"}, by_alias=True)
    _drop_image_keys(raw)
    raw["model"] = {"kind": cfg.model.kind, **json.loads(json.dumps(cfg.model.params))}
    return raw


def with_params(cfg: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """`cfg` with the dotted keys of `params` set (a trial's config); its tune: section is kept."""
    raw = _raw_of(cfg)
    for key, value in params.items():
        _set_dotted(raw, key, value)
    raw["tune"] = cfg.tune.model_dump(by_alias=True)
    return ExperimentConfig.model_validate(raw)


def _space_problems(cfg: ExperimentConfig) -> list[tuple[tuple[str, ...], str]]:
    """Every bound of every distribution must make a valid config: a key that is no setting, or a range
    a setting refuses, is found here, before a trial runs."""
    problems: list[tuple[tuple[str, ...], str]] = []
    for key, space in cfg.tune.space.items():
        for value in space.extremes():
            raw = _raw_of(cfg)
            try:
                _set_dotted(raw, key, value)
                ExperimentConfig.model_validate(raw)
            except ConfigError as err:  # a key below a setting that is no section (seed.x)
                problems.append((("tune", "space", key), str(err).removeprefix("--set ")))
                break
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                msg = (
                    "is not a config setting"
                    if first["type"] == "extra_forbidden"
                    else (f"{json.dumps(value)} is refused: {where}: {first['msg'].removeprefix('Value error, ')}")
                )
                if where and where != key and first["type"] == "extra_forbidden":
                    msg = f"is not a config setting ({where} is unknown)"
                if first["type"] == "int_from_float":
                    msg += f" (a whole-number setting: use int: [{space.extremes()[0]:g}, {space.extremes()[1]:g}])"
                problems.append((("tune", "space", key), msg))
                break
    return problems


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = d
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is not a section")
        node = nxt
    node[keys[-1]] = value


# ---- YAML with limits ------------------------------------------------------------------------------
MAX_CONFIG_BYTES = 1 << 20
# Scalars, lists and mappings once every alias is expanded. A config has a few dozen; a "billion laughs"
# (anchors of lists of aliases of anchors ...) composes to a few nodes that expand to 10**9.
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 32  # nesting, aliases expanded; a config nests 3 deep


class YamlLimit(ValueError):
    """YAML refused for its size or shape, before anything is built from it."""


# libyaml's parser where the wheel has it: the pure-Python one takes seconds for a 1 MiB file
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_events(text: str) -> None:
    """One streaming pass over the parser's events, nothing built: nesting and node count within budget.
    The parser reads only as far as it has to, so `[[[[...` of any length is refused after 33 brackets."""
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise YamlLimit(f"nests deeper than {MAX_YAML_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        if isinstance(event, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_YAML_NODES:
                raise YamlLimit(f"holds more than {MAX_YAML_NODES} values")


def _expanded_size(root: yaml.Node) -> int:
    """Nodes in the tree `root` stands for, every alias expanded; memoised per node, so a graph of a few
    nodes that stands for 10**9 is measured in microseconds. YamlLimit past the budgets or on a cycle."""
    done: dict[int, tuple[int, int]] = {}  # id(collection node) -> (expanded size, nesting levels)
    active: set[int] = set()  # the collections on the current path: meeting one again is a cycle
    too_deep = f"nests deeper than {MAX_YAML_DEPTH} levels once aliases are expanded"

    def measure(node: yaml.Node, outer: int) -> tuple[int, int]:  # outer: collections around `node`
        if not isinstance(node, yaml.CollectionNode):
            return 1, 0
        key = id(node)
        if key in active:
            raise YamlLimit("has an alias inside its own anchor (a recursive structure)")
        if key in done:  # an alias to a measured node: its size counts again, its depth here
            if outer + done[key][1] > MAX_YAML_DEPTH:
                raise YamlLimit(too_deep)
            return done[key]
        if outer + 1 > MAX_YAML_DEPTH:
            raise YamlLimit(too_deep)
        active.add(key)
        children = [x for pair in node.value for x in pair] if isinstance(node, yaml.MappingNode) else node.value
        total, levels = 1, 1
        for child in children:
            size, depth = measure(child, outer + 1)
            total, levels = total + size, max(levels, depth + 1)
            if total > MAX_YAML_NODES:
                raise YamlLimit(f"expands to more than {MAX_YAML_NODES} values through its aliases")
        active.discard(key)
        done[key] = (total, levels)
        return done[key]

    return measure(root, 0)[0]


def load_yaml(text: str) -> Any:
    """yaml.safe_load with limits on size, nesting and alias expansion. YamlLimit when refused for those,
    yaml.YAMLError (or ValueError: an integer too long to convert) when not YAML.

    SafeLoader shares an aliased node rather than copying it, so an alias bomb's blow-up would come later,
    in deepcopy or validation: its expanded size is measured on the composed node graph, before any Python
    object is built from it."""
    if len(text) > MAX_CONFIG_BYTES:
        raise YamlLimit(f"is larger than {MAX_CONFIG_BYTES} bytes")
    _check_events(text)
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings; the value is parsed as YAML (so 3, 0.1, true, [1,2] work)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key.sub=value, got '{item}'")
        try:
            value = load_yaml(raw)
        except YamlLimit as err:
            raise ConfigError(f"--set {key.strip()}: the value {err}") from None
        except (yaml.YAMLError, ValueError):
            shown = raw if len(raw) <= 80 else raw[:77] + "..."
            raise ConfigError(f"--set {key.strip()}: cannot parse value '{shown}'") from None
        out.append((key.strip(), value))
    return out


# ---- messages ----------------------------------------------------------------------------------------
_NO_GIVEN = {"config", "value_error", "assertion_error", "extra_forbidden", "missing"}


def _given(e: Any) -> str:
    """' (got X)' for pydantic's own messages, which do not say what they were given."""
    value = e.get("input")
    if e["type"] in _NO_GIVEN or not isinstance(value, bool | int | float | str):
        return ""
    text = repr(value)
    return f" (got {text})" if len(text) <= 60 else ""


def _format_problems(problems: list[tuple[tuple[str | int, ...], str]]) -> str:
    lines = []
    for loc, msg in problems:
        where = ".".join(str(p) for p in loc) or "config"
        for line in msg.splitlines():
            # a message that names its key already ("data.target is required ...") stands alone
            lines.append(f"  {line}" if line.startswith(f"{where}.") else f"  {where}: {line}")
    return "invalid config:\n" + "\n".join(lines)


def _format_validation(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        msg = "unknown key" if e["type"] == "extra_forbidden" else msg + _given(e)
        problems.append((e["loc"], msg))
    return _format_problems(problems)


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
    with p.open("rb") as f:
        blob = f.read(MAX_CONFIG_BYTES + 1)  # never more than the limit, whatever the file's size
    if len(blob) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {p} is larger than {MAX_CONFIG_BYTES} bytes: not an experiment config")
    try:
        raw = load_yaml(blob.decode("utf-8"))
    except YamlLimit as err:
        raise ConfigError(f"config file {p} {err}: not an experiment config") from None
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping of settings, got {type(raw).__name__}")
    return config_from_dict(raw, overrides)
