"""Self-describing model bundles: weights in safetensors, config and preprocessing as JSON/skops.

A bundle directory holds:
  model.json            kind, model config, task, target, classes, format version
  weights.safetensors   the torch state dict (no pickle)
  preprocessor.json     input columns/dtypes, image stats (per-channel mean/std for image data), scaling
  column_transformer.skops   fitted scikit-learn ColumnTransformer (tabular data; skops secure format)
  input_schema.json     the training inputs' contract (pandera schema): nullability, categories, ranges
  drift_reference.json  the train split's input (and prediction) profile for drift monitoring; absent in
                        bundles made before it existed

Nothing here unpickles: loading refuses any file it does not expect to read.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from torchcycle.models import build_model
from torchcycle.models.inference import predict as torch_predict
from torchcycle.runtime.cells import coerce_frame, kind_of_dtype, kind_of_dtype_name, text_of_number
from torchcycle.runtime.contract import check_frame, clearly_valid_values, infer_contract
from torchcycle.runtime.contract import from_json as contract_from_json
from torchcycle.runtime.contract import to_json as contract_to_json
from torchcycle.runtime.drift import ReferenceProfile
from torchcycle.runtime.types import DataError, Task

FORMAT_VERSION = 1
# skops refuses every type not listed; scikit-learn estimators are trusted by default,
# a dtype object is the only other thing a fitted ColumnTransformer holds.
_SKOPS_TRUSTED = ["numpy.dtype"]
DRIFT_REFERENCE = "drift_reference.json"
_NOT_META = ("transformer", "contract", "reference")  # saved in files of their own


def _json_ready(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


@dataclass(frozen=True)
class _NumericAffine:
    """A fitted ColumnTransformer of numeric columns only, median-imputed then standardised (or passed through),
    as the same numpy operations in the same order and dtype, so the same numbers: scikit-learn's own transform
    spends most of its time on a scoring batch in input checks and copies (README: Scoring throughput)."""

    fill: np.ndarray  # (F,) the imputer's medians
    mean: np.ndarray | None  # (F,) the scaler's, None when not scaled
    scale: np.ndarray | None

    @classmethod
    def of(cls, transformer: Any, columns: list[str]) -> _NumericAffine | None:
        """None unless `transformer` is exactly that shape (categorical columns, empty features, ...)."""
        from sklearn.impute import SimpleImputer
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import FunctionTransformer, StandardScaler

        parts = [t for t in getattr(transformer, "transformers_", []) if t[0] != "remainder"]
        if len(parts) != 1 or transformer.remainder != "drop" or list(parts[0][2]) != columns:
            return None
        pipe = parts[0][1]
        if not isinstance(pipe, Pipeline) or len(pipe.steps) != 2:
            return None
        imputer, second = pipe.steps[0][1], pipe.steps[1][1]
        if type(imputer) is not SimpleImputer or imputer.add_indicator or not _is_nan(imputer.missing_values):
            return None
        fill = np.asarray(imputer.statistics_)
        if fill.dtype.kind != "f" or not np.isfinite(fill).all() or len(fill) != len(columns):
            return None  # a column empty in training: scikit-learn drops it
        if type(second) is StandardScaler and second.with_mean and second.with_std:
            return cls(fill, np.asarray(second.mean_), np.asarray(second.scale_))
        if type(second) is FunctionTransformer and second.func is None:
            return cls(fill, None, None)
        return None

    def transform(self, x: pd.DataFrame) -> np.ndarray:
        """(N, F) float32, equal to the transformer's."""
        return self.apply(self.values(x))

    @staticmethod
    def values(x: pd.DataFrame) -> np.ndarray:
        """A new float array of `x` in the dtype scikit-learn's input check picks: the columns' common numpy
        dtype when that is a float (float32 with bool or int8 stays float32), else float64; pandas' NA as NaN."""
        dtypes = list(x.dtypes)
        common = np.result_type(*dtypes) if dtypes and all(isinstance(d, np.dtype) for d in dtypes) else None
        dtype = common if common is not None and common.kind == "f" else np.float64
        return x.to_numpy(dtype=dtype, na_value=np.nan, copy=True)

    def apply(self, values: np.ndarray) -> np.ndarray:
        """`values` (from `values`, changed in place) -> (N, F) float32."""
        missing = np.isnan(values)
        if missing.any():
            np.copyto(values, np.broadcast_to(self.fill, values.shape), where=missing)
        if self.mean is not None and self.scale is not None:
            values -= self.mean.astype(values.dtype)  # as StandardScaler.transform does
            values /= self.scale.astype(values.dtype)
        return values.astype(np.float32, copy=False)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and value != value


def _column_transformer(numeric: list[str], categorical: list[str], scale: bool, max_categories: int) -> Any:
    """Numbers (and booleans, date parts): median-imputed, then standardised; text: one-hot over the most frequent
    `max_categories` values, the rest and values never seen in training in one "other" column (when training had
    such a rest; otherwise an unseen value sets no column), missing cells a category of their own."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

    parts = []
    if numeric:
        parts.append(
            (
                "num",
                make_pipeline(SimpleImputer(strategy="median"), StandardScaler() if scale else FunctionTransformer()),
                numeric,
            )
        )
    if categorical:
        encoder = OneHotEncoder(
            handle_unknown="infrequent_if_exist", max_categories=max_categories + 1, sparse_output=False
        )
        parts.append(("cat", encoder, categorical))
    return ColumnTransformer(parts, sparse_threshold=0.0)


DATE_PARTS = ("year", "month", "day", "weekday", "hour")


def date_parts_of(values: pd.Series) -> list[str]:
    """The parts of a canonical datetime column that carry something: year, month, day, weekday, and the hour when
    some value has a time of day."""
    present = values.dropna()
    parts = ["year", "month", "day", "weekday"]
    if len(present) and (present.dt.hour != 0).any():
        parts.append("hour")
    return parts


def date_part_columns(values: pd.Series, parts: list[str]) -> dict[str, pd.Series]:
    """A canonical datetime column as float64 columns named '<column>:<part>' (NaN where the date is missing)."""
    dt = values.dt
    out = {}
    for part in parts:
        raw = dt.weekday if part == "weekday" else getattr(dt, part)
        out[f"{values.name}:{part}"] = raw.astype("float64")
    return out


@dataclass
class FeaturePipeline:
    """Raw rows -> float32 model inputs (N, F). Fitted on the train split only."""

    columns: list[str]
    input_dtypes: dict[str, str]
    task: Task
    classes: list[Any] | None = None  # label values; index = model output index
    image_shape: tuple[int, int, int] | None = None
    scale: bool = True
    pixel_mean: float = 0.0  # image data: one mean/std over all pixels of the train split
    pixel_std: float = 1.0
    image_column: str | None = None  # images: the column of encoded image bytes (the model's only input)
    channel_mean: list[float] | None = None  # images: per channel, in [0, 1] units, fitted on the train split
    channel_std: list[float] | None = None
    target_mean: float = 0.0  # regression: the model learns (y - mean) / std, fitted on train
    target_std: float = 1.0
    # tabular: each input's kind (torchcycle.runtime.cells), how every caller's cells are read; {} in bundles made
    # before kinds existed (then from input_dtypes)
    kinds: dict[str, str] = field(default_factory=dict)
    date_parts: dict[str, list[str]] = field(default_factory=dict)  # datetime input -> the parts it becomes
    max_categories: int = 50  # text inputs: values kept per column; the rest share one "other" feature
    transformer: Any = field(default=None, repr=False)  # sklearn ColumnTransformer (tabular)
    contract: Any = field(default=None, repr=False)  # pandera schema of the training inputs
    reference: ReferenceProfile | None = field(default=None, repr=False)  # drift reference (train split)

    @classmethod
    def fit(
        cls,
        train: pd.DataFrame,
        target: str,
        task: Task,
        classes: list[Any] | None,
        image_shape: tuple[int, int, int] | None,
        scale: bool,
        *,
        kinds: dict[str, str] | None = None,
        columns: list[str] | None = None,
        max_categories: int = 50,
    ) -> FeaturePipeline:
        """Fitted on the train split (canonical columns, torchcycle.runtime.cells). `columns`: the inputs (default:
        every column but the target); `kinds`: theirs (default: from their dtypes)."""
        x = train.drop(columns=[target])
        if columns is not None:
            x = x[columns]
        names = list(map(str, x.columns))
        dtypes = {c: str(x[c].dtype) for c in names}
        pipe = cls(names, dtypes, task, classes, image_shape, scale, max_categories=max_categories)
        if task == "regression":
            # Standardised targets keep one learning rate sensible for y ~ 1 and y ~ 1000 alike.
            y = train[target].to_numpy(dtype=np.float64)
            pipe.target_mean = float(y.mean())
            pipe.target_std = float(y.std()) or 1.0
        if image_shape is not None:
            pipe.contract = infer_contract(x)  # build_features widens it to every split
            pixels = x.to_numpy(dtype=np.float64)
            pipe.pixel_mean = float(pixels.mean())
            pipe.pixel_std = float(pixels.std()) or 1.0
            return pipe
        pipe.kinds = {c: (kinds or {}).get(c) or kind_of_dtype(x[c]) for c in names}
        canon = coerce_frame(x, pipe.kinds)  # type: ignore[arg-type]
        pipe.contract = infer_contract(canon)  # build_features widens it to every split
        pipe.date_parts = {c: date_parts_of(canon[c]) for c, k in pipe.kinds.items() if k == "datetime"}
        derived = pipe._derived(canon)
        categorical = [c for c in names if pipe.kinds[c] == "string"]
        numeric = [c for c in derived.columns if c not in categorical]
        pipe.transformer = _column_transformer(numeric, categorical, scale, max_categories).fit(derived)
        return pipe

    @classmethod
    def fit_images(cls, train_images: np.ndarray, image_column: str, classes: list[Any]) -> FeaturePipeline:
        """The pipeline of image data: uint8 (N, C, H, W) train images -> per-channel mean and std."""
        from torchcycle.runtime.images import channel_stats

        mean, std = channel_stats(train_images)
        shape = tuple(int(n) for n in train_images.shape[1:])
        return cls(
            [image_column],
            {image_column: "bytes"},
            "classification",
            classes,
            shape,  # type: ignore[arg-type]
            image_column=image_column,
            channel_mean=mean,
            channel_std=std,
        )

    def normalise(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) images of this pipeline's shape -> float32 (N, C*H*W) model inputs."""
        from torchcycle.runtime.images import normalise

        return normalise(images, self.channel_mean or [0.0], self.channel_std or [1.0])

    def decode_images(self, frame: pd.DataFrame) -> np.ndarray:
        """The image column's encoded bytes -> uint8 (N, C, H, W); ImageError naming every row that is no image."""
        from torchcycle.runtime.images import ImageError, decode_all

        assert self.image_shape is not None and self.image_column is not None
        c, h, w = self.image_shape
        values = frame[self.image_column].tolist()
        images, bad = decode_all(values, c, (h, w))
        if bad:
            labels = frame.index
            shown = "; ".join(f"row {labels[i]}: {why}" for i, why in bad[:5])
            more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
            raise ImageError(
                f"column '{self.image_column}': {len(bad)} value(s) are not a readable image: {shown}{more}", bad
            )
        return images

    def check_columns(self, frame: pd.DataFrame) -> None:
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise DataError(f"missing input column(s): {', '.join(missing)}")

    def input_kinds(self) -> dict[str, str]:
        """Each input column's kind, as scoring reads it (binary: encoded image bytes)."""
        if self.image_column is not None:
            return {self.image_column: "binary"}
        if self.kinds:
            return dict(self.kinds)
        return {c: kind_of_dtype_name(self.input_dtypes.get(c, "")) for c in self.columns}

    def canonical(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The input columns of `frame` (from any reader or caller) as canonical columns of their kinds, the same
        whatever the caller (torchcycle.runtime.cells); a DataError names every column that is not of its kind."""
        self.check_columns(frame)
        if self.image_column is not None or self.image_shape is not None or not self.kinds:
            return frame
        out = coerce_frame(frame, self.kinds)  # type: ignore[arg-type]
        return self._numbers_as_their_categories(frame, out)

    def _numbers_as_their_categories(self, frame: pd.DataFrame, out: pd.DataFrame) -> pd.DataFrame:
        """A text input given as numbers scores as the training category of that value. pandas.read_csv reads a
        column of codes '007', '012' as 7, 12 when no cell of the rows read has a letter (training's file had
        'A7'), and a JSON client may send 7: each is the category '007', as the text readers give it, not 'other'."""
        fixed = {}
        for col, lookup in self._numeric_categories().items():
            cells = frame[col]
            if pd.api.types.is_bool_dtype(cells.dtype) or not (
                pd.api.types.is_numeric_dtype(cells.dtype) or cells.dtype == object
            ):
                continue
            values = out[col].to_numpy(dtype=object, copy=True)
            changed = False
            for i, cell in enumerate(cells.to_numpy(dtype=object)):
                is_number = isinstance(cell, int | float | np.number) and not isinstance(cell, bool | np.bool_)
                category = lookup.get(float(cell)) if is_number else None
                if category is not None:
                    values[i], changed = category, True
            if changed:
                fixed[col] = pd.Series(values, index=out.index, dtype=out[col].dtype)
        return out.assign(**fixed) if fixed else out

    def _numeric_categories(self) -> dict[str, dict[float, str]]:
        """Per text input: {number: category} for its kept training categories that are numbers written otherwise
        than a number reads back ('007', '1.50', '1e3'); one category per value, and none where the plain form
        ('7') is a category too."""
        cached = self.__dict__.get("_numeric_categories_cache")
        if cached is not None:
            return cached
        found: dict[str, dict[float, str]] = {}
        encoder = None
        if self.transformer is not None and "cat" in getattr(self.transformer, "named_transformers_", {}):
            encoder = self.transformer.named_transformers_["cat"]
        if encoder is not None:
            for col, categories in zip(encoder.feature_names_in_, encoder.categories_, strict=True):
                texts = {c for c in categories if isinstance(c, str)}
                by_value: dict[float, list[str]] = {}
                for c in texts:
                    with contextlib.suppress(ValueError):
                        value = float(c)
                        if np.isfinite(value):
                            by_value.setdefault(value, []).append(c)
                lookup = {
                    v: cs[0]
                    for v, cs in by_value.items()
                    if len(cs) == 1 and cs[0] != text_of_number(v) and text_of_number(v) not in texts
                }
                if lookup:
                    found[str(col)] = lookup
        self.__dict__["_numeric_categories_cache"] = found
        return found

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """(N, F) float32. Extra columns are ignored; missing ones, cells not of their column's kind, and values the
        training data's contract refuses (nulls where training had none, +-inf) raise DataError naming all of them."""
        return self.transform_canonical(self.canonical(frame))

    def transform_canonical(self, frame: pd.DataFrame) -> np.ndarray:
        """`transform` of a frame `canonical` returned. Always C-ordered: the same values laid out otherwise (a
        frame of one pandas block gives Fortran order) take another path through the model's matrix product, and
        come out different in the last bits; scoring, the gate and evaluate must agree exactly."""
        return np.ascontiguousarray(self._transform(frame))

    def _transform(self, frame: pd.DataFrame) -> np.ndarray:
        if self.image_column is not None:
            return self.normalise(self.decode_images(frame))
        # numeric columns only, under a contract: one float array for the contract's check and the features
        affine = self._affine() if self.image_shape is None and self.contract is not None else None
        values = None
        if affine is not None:
            with contextlib.suppress(TypeError, ValueError, OverflowError):  # text, 10**400: pandera names it below
                values = affine.values(frame[self.columns])
        contract = self.contract
        if contract is not None and (values is None or not clearly_valid_values(frame, contract, values, self.columns)):
            check_frame(frame, contract)  # pandera's verdict, and its report of what fails
        if affine is not None and values is not None:
            return affine.apply(values)
        x = frame[self.columns]
        if self.image_shape is not None:
            pixels = x.to_numpy(dtype=np.float32)
            return ((pixels - self.pixel_mean) / self.pixel_std).astype(np.float32)
        return np.asarray(self.transformer.transform(self._derived(x)), dtype=np.float32)

    def _derived(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Canonical inputs -> the transformer's columns: each date as its parts (numbers), the rest as they are."""
        if not self.date_parts:
            return frame
        columns: dict[str, pd.Series] = {}
        for c in frame.columns:
            if c in self.date_parts:
                columns.update(date_part_columns(frame[c], self.date_parts[c]))
            else:
                columns[c] = frame[c]
        return pd.DataFrame(columns, index=frame.index, copy=False)

    def _affine(self) -> _NumericAffine | None:
        cached = self.__dict__.get("_affine_of")
        if cached is None or cached[0] is not self.transformer:
            cached = (self.transformer, _NumericAffine.of(self.transformer, self.columns))
            self.__dict__["_affine_of"] = cached  # not a field: never saved, compared or shown
        return cached[1]

    def encode_target(self, y: pd.Series) -> np.ndarray:
        if self.task == "regression":
            return ((y.to_numpy(dtype=np.float64) - self.target_mean) / self.target_std).astype(np.float32)
        index = {str(c): i for i, c in enumerate(self.classes or [])}
        labels = y.astype(str)
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise DataError(f"target has labels not seen in training: {', '.join(unknown[:5])}")
        return labels.map(index).to_numpy(dtype=np.int64)

    def decode_target(self, values: np.ndarray) -> np.ndarray:
        """Model outputs back to target units (regression); identity for class indices."""
        if self.task == "regression":
            return values.astype(np.float64) * self.target_std + self.target_mean
        return values

    def to_files(self) -> dict[str, bytes]:
        """File name -> content: JSON metadata, the scikit-learn transformer in skops' format, the input schema."""
        import skops.io as sio

        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_META}
        meta["classes"] = [_json_ready(c) for c in self.classes] if self.classes else None
        files = {"preprocessor.json": json.dumps(meta, indent=2).encode()}
        if self.transformer is not None:
            files["column_transformer.skops"] = sio.dumps(self.transformer)
        if self.contract is not None:
            files["input_schema.json"] = contract_to_json(self.contract).encode()
        if self.reference is not None:
            files[DRIFT_REFERENCE] = self.reference.to_json().encode()
        return files

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> FeaturePipeline:
        """The inverse of `to_files`; nothing is unpickled (skops loads only trusted types)."""
        import skops.io as sio

        meta = json.loads(files["preprocessor.json"])
        if meta.get("image_shape") is not None:
            meta["image_shape"] = tuple(meta["image_shape"])
        pipe = cls(**meta)
        if "column_transformer.skops" in files:
            pipe.transformer = sio.loads(files["column_transformer.skops"], trusted=_SKOPS_TRUSTED)
        if "input_schema.json" in files:
            pipe.contract = contract_from_json(files["input_schema.json"].decode())
        if DRIFT_REFERENCE in files:
            pipe.reference = ReferenceProfile.from_json(files[DRIFT_REFERENCE].decode())
        return pipe

    def save(self, directory: Path) -> None:
        for name, content in self.to_files().items():
            (directory / name).write_bytes(content)

    @classmethod
    def load(cls, directory: Path) -> FeaturePipeline:
        names = ("preprocessor.json", "column_transformer.skops", "input_schema.json", DRIFT_REFERENCE)
        return cls.from_files({n: (directory / n).read_bytes() for n in names if (directory / n).exists()})


class Predictor:
    """A loaded bundle: raw frame in, predictions (and class probabilities) out."""

    def __init__(
        self,
        model: torch.nn.Module,
        pipeline: FeaturePipeline,
        device: torch.device | None = None,
    ) -> None:
        self.model = model.eval()
        self.pipeline = pipeline
        self.device = device or torch.device("cpu")

    @property
    def task(self) -> Task:
        return self.pipeline.task

    @property
    def output_columns(self) -> list[str]:
        if self.task == "regression":
            return ["prediction"]
        return ["prediction"] + [f"proba_{c}" for c in self.pipeline.classes or []]

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Raw rows (from any reader or caller; cells read by torchcycle.runtime.cells) -> the output frame."""
        return self.predict_canonical(self.pipeline.canonical(frame))

    def predict_canonical(self, frame: pd.DataFrame) -> pd.DataFrame:
        """`predict` of rows `pipeline.canonical` returned (batch scoring reads them so once, for drift too)."""
        if len(frame) == 0:  # scikit-learn refuses 0 rows; 0 rows in (with valid columns) is 0 rows out
            self.pipeline.check_columns(frame)
            return self._result(torch.empty(0, self._n_outputs()))
        x = self.pipeline.transform_canonical(frame)  # (N, F) float32
        _refuse_non_finite(frame, ~np.isfinite(x).all(axis=1), self.pipeline.columns)
        out = torch_predict(self.model, torch.from_numpy(x), self.device)
        _refuse_non_finite(frame, ~torch.isfinite(out).all(dim=1).numpy(), self.pipeline.columns)
        return self._result(out)

    def _n_outputs(self) -> int:
        return 1 if self.task == "regression" else len(self.pipeline.classes or [])

    def _result(self, out: torch.Tensor) -> pd.DataFrame:
        """Raw outputs (N, C) -> `prediction` (+ `proba_<class>`)."""
        if self.task == "regression":
            return pd.DataFrame({"prediction": self.pipeline.decode_target(out[:, 0].numpy())})
        proba = torch.softmax(out, dim=1).numpy().astype(np.float64)
        dtype = _label_dtype(self.pipeline.classes)
        # typed labels indexed directly: an object array cast to int64 afterwards cost more than the softmax
        classes = np.asarray(self.pipeline.classes, dtype=object if dtype == "object" else dtype)
        labels = classes[proba.argmax(1)] if len(proba) else classes[:0]
        columns: dict[str, Any] = {"prediction": labels if dtype != "object" else pd.Series(labels, dtype=object)}
        columns.update({f"proba_{c}": proba[:, i] for i, c in enumerate(self.pipeline.classes or [])})
        return pd.DataFrame(columns, copy=False)


def _refuse_non_finite(frame: pd.DataFrame, bad: np.ndarray, columns: list[str], examples: int = 3) -> None:
    """Rows whose finite inputs still overflow float32 on the way through the model (1e308, say): refused by
    row and column, never scored to NaN probabilities."""
    if not bad.any():
        return
    rows = frame.loc[bad, [c for c in columns if pd.api.types.is_numeric_dtype(frame[c])]]
    shown = []
    for label, row in rows.head(examples).iterrows():
        values = row.abs().astype("float64")
        col = str(values.idxmax()) if len(values) and values.notna().any() else "?"
        shown.append(f"row {label} ({col}={row.get(col, '?')})" if col != "?" else f"row {label}")
    raise DataError(
        f"{int(bad.sum())} row(s) overflow the model's float32 arithmetic, e.g. {', '.join(shown)}: "
        "values this far outside the training range cannot be scored"
    )


def _label_dtype(classes: list[Any] | None) -> str:
    if classes and all(isinstance(c, bool | np.bool_) for c in classes):
        return "bool"
    if classes and all(isinstance(c, int | np.integer) for c in classes):
        return "int64"
    if classes and all(isinstance(c, float | np.floating) for c in classes):
        return "float64"
    return "object"


def save_bundle(
    directory: Path,
    *,
    kind: str,
    model_config: Any,
    state_dict: dict[str, torch.Tensor],
    pipeline: FeaturePipeline,
    target: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model_config": asdict(model_config),
        "task": pipeline.task,
        "target": target,
        **(extra or {}),
    }
    (directory / "model.json").write_text(json.dumps(meta, indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, directory / "weights.safetensors")
    pipeline.save(directory)
    return directory


_EXPECTED = {
    "model.json",
    "weights.safetensors",
    "preprocessor.json",
    "column_transformer.skops",
    "input_schema.json",
    DRIFT_REFERENCE,
}


def load_bundle(directory: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """Rebuild a model from a bundle directory without unpickling anything."""
    from torchcycle.models import MODELS

    directory = Path(directory)
    if not (directory / "model.json").is_file():
        raise DataError(f"{directory} is not a model bundle (no model.json)")
    unexpected = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in _EXPECTED)
    if unexpected:
        # A planted file (e.g. a pickle) is refused outright, never opened.
        raise DataError(f"refusing to load {directory}: unexpected file(s) {', '.join(unexpected)}")
    meta = json.loads((directory / "model.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"unsupported bundle format {meta.get('format_version')} in {directory}")
    cfg_cls = MODELS[meta["kind"]][0]
    raw_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["model_config"].items()}
    model = build_model(meta["kind"], cfg_cls(**raw_cfg))
    model.load_state_dict(load_file(directory / "weights.safetensors"))
    device = torch.device(device)
    return Predictor(model.to(device), FeaturePipeline.load(directory), device)
