"""Ingest: load a data set named by `data.source` into a RawData."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task

from torchcycle.config import DataConfig
from torchcycle.errors import DataError
from torchcycle.retry import io_task_options
from torchcycle.runtime.cells import Kind, as_labels, canonical_table, infer_kind, read_kinds
from torchcycle.runtime.images import IMAGE_SUFFIXES, is_image_name
from torchcycle.runtime.types import Task
from torchcycle.tables import find_inputs, frame_digest, read_csv_text, walk_files


@dataclass(frozen=True)
class RawData:
    """A loaded data set: feature columns plus the target column in one frame."""

    frame: pd.DataFrame
    target: str
    task: Task
    source: str
    digest: str  # sha256 of the frame's content, for lineage tags
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) when columns are pixels, or of `images`
    test_mask: np.ndarray | None = None  # rows of a predefined test split (torchvision)
    # images: sources: the frame holds each image's file bytes and label; `images` the same images decoded,
    # uint8 (N, C, H, W), row for row; `paths` where each was read; `skipped` "path: reason" of those left out
    images: np.ndarray | None = None
    paths: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()  # files in an image folder that are no image (by extension), not read
    # each column's kind (torchcycle.runtime.cells): how scoring reads it; the frame holds canonical columns
    kinds: dict[str, Kind] = field(default_factory=dict)
    left_out: tuple[str, ...] = ()  # columns of the source left out by data.ignore

    @property
    def feature_columns(self) -> list[str]:
        return [c for c in self.frame.columns if c != self.target]


_SKLEARN_TASKS: dict[str, Task] = {
    "digits": "classification",
    "iris": "classification",
    "wine": "classification",
    "breast_cancer": "classification",
    "diabetes": "regression",
}


def _sklearn(name: str) -> tuple[pd.DataFrame, Task, tuple[int, int, int] | None]:
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")(as_frame=True)
    frame = bunch.frame.copy()
    # digits' 64 columns are an 8x8 grey image: keep the shape so a CNN can use it.
    shape = (1, 8, 8) if name == "digits" else None
    return frame, _SKLEARN_TASKS[name], shape


def _synthetic(name: str) -> tuple[pd.DataFrame, Task]:
    """The seed systems of the classic curriculum, generated deterministically."""
    if name == "line":  # y = 2x + 1, exact
        x = np.arange(0.0, 10.0, 0.5)
        return pd.DataFrame({"x": x, "y": 2 * x + 1}), "regression"
    if name == "xor":  # the four XOR points
        return pd.DataFrame({"x1": [0.0, 0, 1, 1], "x2": [0.0, 1, 0, 1], "y": [0, 1, 1, 0]}), "classification"
    if name == "regression":
        from sklearn.datasets import make_regression

        x, y = make_regression(n_samples=100, n_features=1, noise=10, bias=14.5, random_state=3)
        return pd.DataFrame({"x": x[:, 0], "y": y}), "regression"
    if name == "linear2d":  # y = X w + b + noise, w = [2, -3.4], b = 4.2, noise sd 0.01
        rng = np.random.default_rng(0)
        x = rng.normal(0, 1, size=(1000, 2))
        y = x @ np.array([2.0, -3.4]) + 4.2 + rng.normal(0, 0.01, size=1000)
        return pd.DataFrame({"x1": x[:, 0], "x2": x[:, 1], "y": y}), "regression"
    if name == "classification":
        from sklearn.datasets import make_classification

        x, y = make_classification(n_samples=100, n_features=10, n_informative=5, random_state=0)
        frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(10)])
        frame["y"] = y
        return frame, "classification"
    raise DataError(f"unknown synthetic data set '{name}'")


def _header(path: Path, suffix: str) -> list[str]:
    """Column names as stored: pandas would rename CSV duplicates ('a.1') and fail on Parquet ones."""
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    import csv

    with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: a byte-order mark is no part of a name
        return next(csv.reader(fh), [])


def _check_unique(names: list[str], path: Path) -> None:
    seen: set[str] = set()
    dups = sorted({n for n in names if n in seen or seen.add(n)})
    if dups:
        raise DataError(f"{path} has duplicate column names: {', '.join(dups)}")


def read_table(path: Path, allow_bytes: bool = False) -> pd.DataFrame:
    """A CSV or Parquet file as it is stored (CSV: every column text, missing cells None); any failure becomes a
    DataError naming the file. `allow_bytes`: cells of bytes are kept (a table of images), not refused.
    `read_tables` turns the text into numbers, booleans and dates (torchcycle.runtime.cells)."""
    if not path.exists():
        raise DataError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            _check_unique(_header(path, suffix), path)
            frame = pd.read_parquet(path)
        elif suffix in (".csv", ".txt"):
            _check_unique(_header(path, suffix), path)
            frame = read_csv_text(path)
        else:
            raise DataError(f"unsupported file type '{suffix}' for {path}: use .csv or .parquet")
    except DataError:
        raise
    except UnicodeDecodeError as err:
        raise DataError(f"input file {path} is not valid UTF-8 text: {err.reason} at byte {err.start}") from None
    except Exception as err:  # pyarrow/parser errors: corrupt or truncated files
        raise DataError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    _refuse_nested(frame, path, allow_bytes)
    return frame


def _refuse_nested(frame: pd.DataFrame, path: Path, allow_bytes: bool = False) -> None:
    """Parquet can hold lists, maps and structs in a cell; a table of features cannot."""
    kinds = (list, dict, tuple, np.ndarray) + (() if allow_bytes else (bytes,))
    for col in frame.columns:
        if frame[col].dtype == object:
            odd = next((v for v in frame[col] if isinstance(v, kinds)), None)
            if odd is not None:
                raise DataError(
                    f"{path}: column '{col}' holds {type(odd).__name__} values: "
                    "cells must be numbers, booleans, text or dates"
                )


def read_tables(paths: list[Path], allow_bytes: bool = False) -> pd.DataFrame:
    """Several files of one table (data that accumulates: `data/training/*.parquet`), in name order, every file
    with the same columns, each of one kind in all files that hold a value in it; as stored (see `read_table`)."""
    frames = [read_table(p, allow_bytes) for p in paths]
    if len(frames) == 1:
        return frames[0]
    first = list(frames[0].columns)
    for path, frame in zip(paths[1:], frames[1:], strict=True):
        if list(frame.columns) != first:
            raise DataError(
                f"{path} does not have the columns of {paths[0]}: "
                f"expected {', '.join(map(str, first))}; got {', '.join(map(str, frame.columns))}"
            )
    if not allow_bytes:
        for col in first:  # numbers in one file and text in another: two tables under one name, not one
            kinds = [(infer_kind(f[col]), p) for f, p in zip(frames, paths, strict=True) if f[col].notna().any()]
            odd = next(((k, p) for k, p in kinds if k != kinds[0][0]), None)
            if odd is not None:
                raise DataError(f"column '{col}' holds {odd[0]} in {odd[1]} but {kinds[0][0]} in {kinds[0][1]}")
    # one column's cells from several files: as text where files store it differently, read as one below
    mixed = [c for c in first if len({str(f[c].dtype) for f in frames}) > 1]
    if mixed:
        frames = [f.astype({c: object for c in mixed}) for f in frames]
    return pd.concat(frames, ignore_index=True)


MAX_INFERRED_CLASSES = 20  # whole-number targets with at most this many values are classes


def _infer_task(y: pd.Series) -> Task:
    if isinstance(y.dtype, pd.CategoricalDtype) or y.dtype == bool or not pd.api.types.is_numeric_dtype(y):
        return "classification"
    present = y.dropna()
    # integers, or floats only because some labels are missing (pandas reads a 0/1 label with holes as 0.0/1.0):
    # classes when few
    holes = len(present) < len(y) and bool(np.all(np.mod(present.to_numpy(dtype=np.float64), 1) == 0))
    if (pd.api.types.is_integer_dtype(y) or holes) and present.nunique() <= MAX_INFERRED_CLASSES:
        return "classification"
    return "regression"


def _torchvision(name: str, root: str, download: bool) -> tuple[pd.DataFrame, np.ndarray]:
    """Official train + test splits as one frame of flattened pixels plus a test-row mask."""
    from torchvision import datasets

    cls = getattr(datasets, name)
    try:
        parts = [cls(root=root, train=train, download=download) for train in (True, False)]
    except RuntimeError as err:  # torchvision raises RuntimeError("Dataset not found ...")
        raise DataError(
            f"{name} not found under {root}: put the IDX files in {root}/{name}/raw "
            f"(or set data.download: true where the network allows). ({err})"
        ) from None
    images = np.concatenate([p.data.numpy() for p in parts])  # (N, 28, 28) uint8
    labels = np.concatenate([p.targets.numpy() for p in parts])
    n, h, w = images.shape
    frame = pd.DataFrame(images.reshape(n, h * w), columns=[f"pixel_{i}" for i in range(h * w)])
    frame["label"] = labels
    test_mask = np.zeros(n, dtype=bool)
    test_mask[len(parts[0].targets) :] = True
    return frame, test_mask


# ---- images: sources ---------------------------------------------------------------------------------
FOLDER_TARGET = "label"  # the label column of an image folder (data.target renames it)


def _folder_items(root: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """ImageFolder's layout: root/<class>/**/<image>. (path, class) pairs in name order, and the files that are
    no image (by extension; hidden ones and files beside the class folders included), which are not read."""
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    ignored = sorted(str(f) for f in root.iterdir() if not f.is_dir())
    if not classes:
        raise DataError(f"image folder {root} has no class folders: put each class's images in {root}/<class>/")
    items: list[tuple[Path, str]] = []
    empty = []
    for folder in classes:
        files, broken = walk_files(folder)
        images = [f for f in files if is_image_name(f.name)]
        ignored += [str(f) for f in files if not is_image_name(f.name)]
        ignored += [str(f) if f.exists() else f"{f} (a link to nothing)" for f in broken]
        if not images:
            empty.append(f"{folder} ({len(files)} other file(s))" if files else str(folder))
        items += [(f, folder.name) for f in images]
    if empty:
        raise DataError(
            f"image folder {root}: {len(empty)} class folder(s) hold no images ({', '.join(IMAGE_SUFFIXES)}): "
            + "; ".join(empty[:5])
            + ": add images or remove the folder"
        )
    return items, ignored


def _table_items(path: Path, column: str, target: str) -> list[tuple[Path | bytes, Any]]:
    """A table of image paths (relative to the table's folder) or image bytes, and labels."""
    frame = read_tables(find_inputs(str(path)), allow_bytes=True)
    missing = [c for c in (column, target) if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: column(s) {', '.join(map(repr, missing))} not found (data.image_column / data.target); "
            f"columns are: {', '.join(map(str, frame.columns))}"
        )
    items: list[tuple[Path | bytes, Any]] = []
    holes = []
    for row, (value, label) in enumerate(zip(frame[column], as_labels(frame[target]), strict=True)):
        if isinstance(value, bytes | bytearray):
            items.append((bytes(value), label))
        elif isinstance(value, str) and value.strip():
            p = Path(value)
            items.append((p if p.is_absolute() else path.parent / p, label))
        else:
            holes.append(row)
    if holes:
        raise DataError(
            f"{path}: column '{column}' has {len(holes)} row(s) with neither a path nor image bytes "
            f"(rows {', '.join(map(str, holes[:5]))}{' ...' if len(holes) > 5 else ''})"
        )
    return items


def _read_images(cfg: DataConfig) -> RawData:
    """Every image of an images: source read, hashed (file contents) and decoded to cfg.size, or one error naming
    the images that cannot be read (data.skip_bad_images: skipped and counted instead)."""
    import hashlib

    from torchcycle.runtime.images import decode

    root = Path(cfg.source.partition(":")[2])
    if not root.exists():
        raise DataError(f"image source not found: {root}")
    if root.is_dir():
        target = cfg.target or FOLDER_TARGET
        items, ignored = _folder_items(root)
    else:
        if not cfg.target:
            raise DataError(f"{root}: a table of images needs data.target, the name of its label column")
        target = cfg.target
        items, ignored = _table_items(root, cfg.image_column, target), []  # type: ignore[assignment]
    if not items:
        raise DataError(f"image source {root} holds no images")
    digest = hashlib.sha256(f"{cfg.image_column}\0{target}\0".encode())
    blobs, labels, paths, images, bad = [], [], [], [], []
    for i, (where, label) in enumerate(_progress(items, "images")):
        name = str(where) if isinstance(where, Path) else f"{root} row {i}"
        try:
            data = where.read_bytes() if isinstance(where, Path) else where
        except OSError as err:
            bad.append(f"{name}: {err.strerror or err}")
            continue
        try:
            img = decode(data, cfg.channels, cfg.size)
        except DataError as err:
            bad.append(f"{name}: {err}")
            continue
        # the contents, not the names: a re-exported folder of the same images is the same data
        digest.update(hashlib.sha256(data).digest() + str(label).encode() + b"\0")
        blobs.append(data)
        labels.append(label)
        paths.append(name)
        images.append(img.numpy())
    if bad and not cfg.skip_bad_images:
        raise DataError(
            f"images:{root}: {len(bad)} of {len(items)} image(s) cannot be read: "
            + "; ".join(bad[:5])
            + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
            + ". Fix or remove them, or set data.skip_bad_images: true to train without them"
        )
    if not images:
        raise DataError(f"images:{root}: none of the {len(items)} image(s) can be read: " + "; ".join(bad[:3]))
    frame = pd.DataFrame({cfg.image_column: pd.Series(blobs, dtype=object), target: labels})
    return RawData(
        frame=frame,
        target=target,
        task="classification",
        source=cfg.source,
        digest=digest.hexdigest(),
        image_shape=(cfg.channels, *cfg.size),
        images=np.stack(images),
        paths=tuple(paths),
        skipped=tuple(bad),
        ignored=tuple(ignored),
    )


def _progress(items: list[Any], unit: str) -> Any:
    """A bar on a terminal (reading a big folder takes a while); a plain iteration elsewhere (ingest_task logs
    the count and time when done)."""
    import sys

    from tqdm.auto import tqdm

    isatty = getattr(sys.stderr, "isatty", None)
    return tqdm(items, unit=unit, desc="ingest", leave=False, disable=not (isatty and isatty()))


def _limited(raw: RawData, limit: int | None) -> RawData:
    if limit is None or len(raw.frame) <= limit:
        return raw
    keep = np.sort(np.random.default_rng(0).permutation(len(raw.frame))[:limit])
    frame = raw.frame.iloc[keep].reset_index(drop=True)
    return replace(
        raw,
        frame=frame,
        images=raw.images[keep] if raw.images is not None else None,
        paths=tuple(raw.paths[i] for i in keep) if raw.paths else (),
    )


def ingest(cfg: DataConfig) -> RawData:
    """Load the configured source. Pure apart from reading files."""
    scheme, _, name = cfg.source.partition(":")
    image_shape = None
    test_mask = None
    kinds: dict[str, Kind] | None = None
    if scheme == "sklearn":
        frame, task_, image_shape = _sklearn(name)
        target = "target"
    elif scheme == "synthetic":
        frame, task_ = _synthetic(name)
        target = "y"
    elif scheme == "file":
        frame = read_tables(find_inputs(name))
        target = cfg.target or ""
        if target not in frame.columns:
            raise DataError(
                f"target column '{target}' not found in {name}; columns are: {', '.join(map(str, frame.columns))}"
            )
        frame = _without(frame, cfg.ignore, name, target)
        frame, kinds = canonical_table(frame, keep_whole=(target,))
        task_ = _infer_task(frame[target])
    elif scheme == "images":
        return _limited(_read_images(cfg), cfg.limit)
    elif scheme == "torchvision":
        frame, test_mask = _torchvision(name, cfg.root or ".", cfg.download)
        target, task_, image_shape = "label", "classification", (1, 28, 28)
    else:
        raise DataError(f"unknown source '{cfg.source}'")
    if cfg.task != "auto":
        task_ = cfg.task
    if cfg.limit is not None and len(frame) > cfg.limit:
        keep = np.random.default_rng(0).permutation(len(frame))[: cfg.limit]
        keep.sort()
        frame = frame.iloc[keep].reset_index(drop=True)
        test_mask = test_mask[keep] if test_mask is not None else None
    if kinds is None:  # typed frames (data sets of a package): their dtypes say it
        frame = _without(frame, cfg.ignore, cfg.source, target)
        kinds = read_kinds(frame)
    return RawData(
        frame=frame,
        target=target,
        task=task_,
        source=cfg.source,
        digest=frame_digest(frame),
        image_shape=image_shape,
        test_mask=test_mask,
        kinds=kinds,
        left_out=tuple(cfg.ignore),
    )


def _without(frame: pd.DataFrame, ignore: list[str], source: str, target: str) -> pd.DataFrame:
    """`frame` less the columns of data.ignore; one error naming those it does not have."""
    if not ignore:
        return frame
    if target in ignore:
        raise DataError(f"data.ignore names the target column '{target}': it cannot be left out")
    absent = [c for c in ignore if c not in frame.columns]
    if absent:
        raise DataError(
            f"data.ignore names column(s) {', '.join(map(repr, absent))} that {source} does not have; "
            f"columns are: {', '.join(map(str, frame.columns))}"
        )
    return frame.drop(columns=ignore)


@task(name="ingest", **io_task_options())
def ingest_task(cfg: DataConfig) -> RawData:
    import time

    from prefect import get_run_logger

    start = time.perf_counter()
    raw = ingest(cfg)
    if raw.images is not None:
        get_run_logger().info(
            "read %d images as %s uint8 in %.1f s", len(raw.images), raw.image_shape, time.perf_counter() - start
        )
    if raw.skipped or raw.ignored:  # said, not silent
        logger = get_run_logger()
        if raw.skipped:
            logger.warning(
                "skipped %d unreadable image(s) (data.skip_bad_images), e.g. %s", len(raw.skipped), raw.skipped[0]
            )
        if raw.ignored:
            logger.warning("ignored %d file(s) that are no image, e.g. %s", len(raw.ignored), raw.ignored[0])
    return raw
