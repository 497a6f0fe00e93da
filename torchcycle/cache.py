"""Resume instead of redo: Prefect's task cache for the training flow's stages, stored without pickle.

A stage's cache key is the hash of (stage name, experiment config, data digest, torchcycle's own source code,
DDP world size). Results are persisted through Prefect's result store with `SafeSerializer`: a zip of JSON
plus Parquet (frames), `.npy` without pickle (arrays), safetensors (tensors) and skops (the fitted
scikit-learn transformer). Decoding builds only dataclasses from torchcycle's own modules. Before Prefect
reads a stored record, the key function refuses one written by any other serializer (Prefect would decode
it with the serializer the file names, pickle included), so a planted payload is never executed.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import importlib
import io
import json
import os
import zipfile
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.serializers import Serializer

from torchcycle.errors import DataError

ENV_DIR = "TORCHCYCLE_CACHE_DIR"
DEFAULT_DIR = "cache"  # relative to the working directory, like checkpoints/ and mlflow/
SERIALIZER_TYPE = "torchcycle-safe"
# dataclasses the decoder may build
_ALLOWED_MODULES = ("torchcycle.tasks.", "torchcycle.models.", "torchcycle.runtime.")
# a change to any module of these packages is a change to the stages' code (and to what they are handed)
_CODE_PACKAGES = ("torchcycle", "torchcycle.runtime", "torchcycle.models", "torchcycle.tasks", "torchcycle.flows")
# ... except the edge: the CLI's help text or the local server's start-up make no other model
_EDGE = ("__main__.py", "cli.py", "ddp.py", "local_server.py", "idx.py", "image_demo.py")


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


@cache
def code_version() -> str:
    """sha256 over the code that makes a model (models/, tasks/, flows/, the runtime and the plumbing the stages
    use; not the CLI), read once per process.

    Found where Python imports them from, so a wheel install and an editable checkout hash the same files."""
    import importlib.util

    h = hashlib.sha256()
    for package in _CODE_PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in spec.submodule_search_locations or ():
            for path in sorted(
                p for p in Path(folder).glob("*.py") if not (package == "torchcycle" and p.name in _EDGE)
            ):
                h.update(f"{package}.{path.name}".encode())
                h.update(path.read_bytes())
    return h.hexdigest()


def stage_keys(config_hash: str, data_digest: str, world_size: int, enabled: bool = True):
    """stage name -> its cache key (None: not cached), for one run of the training flow."""
    return lambda stage: stage_key(stage, config_hash, data_digest, world_size) if enabled else None


def stage_key(stage: str, config_hash: str, data_digest: str, world_size: int = 1) -> str:
    parts = (stage, config_hash, data_digest, code_version(), str(world_size))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


# ---- the serializer: typed objects <-> a zip of JSON and non-executable binary formats ----


class _Encoder:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def blob(self, data: bytes) -> str:
        name = f"b{len(self.blobs)}"
        self.blobs[name] = data
        return name

    def encode(self, obj: Any) -> Any:
        if obj is None or isinstance(obj, bool | int | float | str):
            return obj
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, bytes):
            return {"$": "bytes", "blob": self.blob(obj)}
        if isinstance(obj, tuple):
            return {"$": "tuple", "items": [self.encode(v) for v in obj]}
        if isinstance(obj, list):
            return [self.encode(v) for v in obj]
        if isinstance(obj, dict):
            if not all(isinstance(k, str) for k in obj):
                raise TypeError("only dicts with str keys can be cached")
            return {"$": "dict", "items": {k: self.encode(v) for k, v in obj.items()}}
        if isinstance(obj, pd.DataFrame):
            buf = io.BytesIO()
            obj.to_parquet(buf, index=True)
            return {"$": "frame", "blob": self.blob(buf.getvalue())}
        if isinstance(obj, np.ndarray):
            buf = io.BytesIO()
            np.save(buf, obj, allow_pickle=False)  # object arrays raise here: they would need pickle
            return {"$": "ndarray", "blob": self.blob(buf.getvalue())}
        if isinstance(obj, torch.Tensor):
            from safetensors.torch import save

            return {"$": "tensor", "blob": self.blob(save({"t": obj.detach().cpu().contiguous()}))}
        from torchcycle.runtime.bundle import FeaturePipeline

        if isinstance(obj, FeaturePipeline):
            return {"$": "pipeline", "files": {k: self.blob(v) for k, v in obj.to_files().items()}}
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            cls = type(obj)
            return {
                "$": "dataclass",
                "cls": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: self.encode(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init},
            }
        raise TypeError(f"cannot cache a {type(obj).__name__}")


class _Decoder:
    def __init__(self, blobs: zipfile.ZipFile) -> None:
        self.zf = blobs

    def blob(self, name: str) -> bytes:
        return self.zf.read(f"blobs/{name}")

    def decode(self, node: Any) -> Any:
        if isinstance(node, list):
            return [self.decode(v) for v in node]
        if not isinstance(node, dict):
            return node
        kind = node["$"]
        if kind == "bytes":
            return self.blob(node["blob"])
        if kind == "tuple":
            return tuple(self.decode(v) for v in node["items"])
        if kind == "dict":
            return {k: self.decode(v) for k, v in node["items"].items()}
        if kind == "frame":
            return pd.read_parquet(io.BytesIO(self.blob(node["blob"])))
        if kind == "ndarray":
            return np.load(io.BytesIO(self.blob(node["blob"])), allow_pickle=False)
        if kind == "tensor":
            from safetensors.torch import load

            return load(self.blob(node["blob"]))["t"]
        if kind == "pipeline":
            from torchcycle.runtime.bundle import FeaturePipeline

            return FeaturePipeline.from_files({k: self.blob(v) for k, v in node["files"].items()})
        if kind == "dataclass":
            cls = _allowed_class(node["cls"])
            return cls(**{k: self.decode(v) for k, v in node["fields"].items()})
        raise DataError(f"unknown node type {kind!r} in a cached result")


def _allowed_class(qualified: str) -> type:
    module, _, name = qualified.partition(":")
    if not module.startswith(_ALLOWED_MODULES) or "." in name:
        raise DataError(f"refusing to build {qualified} from a cached result: not a torchcycle type")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise DataError(f"refusing to build {qualified} from a cached result: not a torchcycle dataclass")
    return cls


class SafeSerializer(Serializer):
    """Prefect result serializer for torchcycle's stage outputs that never pickles."""

    type: Literal["torchcycle-safe"] = SERIALIZER_TYPE

    def dumps(self, obj: Any) -> bytes:
        enc = _Encoder()
        tree = enc.encode(obj)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("tree.json", json.dumps(tree))
            for name, data in enc.blobs.items():
                zf.writestr(f"blobs/{name}", data)
        return base64.b64encode(buf.getvalue())  # Prefect stores the record as JSON: text only

    def loads(self, blob: bytes) -> Any:
        try:
            with zipfile.ZipFile(io.BytesIO(base64.b64decode(blob, validate=True))) as zf:
                return _Decoder(zf).decode(json.loads(zf.read("tree.json")))
        except DataError:  # a refusal (foreign class, unknown node) already says what is wrong
            raise
        except (zipfile.BadZipFile, KeyError, ValueError, binascii.Error) as exc:
            raise DataError(f"cached result is corrupt ({exc}): delete {cache_dir()} or run with --no-cache") from None


def _check_record(content: bytes, path: str) -> bytes:
    """Refuse a stored record unless SafeSerializer wrote it: Prefect would decode it with whatever
    serializer the file names, pickle included."""
    try:
        named = json.loads(content)["metadata"]["serializer"]["type"]
    except (ValueError, KeyError, TypeError):
        named = None
    if named != SERIALIZER_TYPE:
        raise DataError(
            f"refusing cached result {path}: written by serializer {named!r}, not {SERIALIZER_TYPE!r} "
            f"(it could run code when loaded); delete it or run with --no-cache"
        )
    return content


def cached(task: Any, key: str | None) -> Any:
    """`task` with its result persisted under `key` in `cache_dir()` (Prefect cache); uncached when key is None."""
    if key is None:
        return task.with_options(cache_policy=NO_CACHE, persist_result=False)
    storage = cache_dir().resolve()

    def checked_key(_ctx: Any, _params: dict[str, Any]) -> str:
        record = storage / key  # where Prefect's result store reads the record for this key
        if record.is_file():
            _check_record(record.read_bytes(), str(record))
        return key

    return task.with_options(
        cache_policy=CacheKeyFnPolicy(cache_key_fn=checked_key),
        persist_result=True,
        result_serializer=SafeSerializer(),
        result_storage=storage,
    )


def store_cached(key: str, obj: Any) -> None:
    """Persist `obj` as the record `cached(task, key)` would write, so a later run of that stage with this key
    takes it from the cache (a tuning trial's model for the winner's training run)."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    storage = cache_dir().resolve()
    storage.mkdir(parents=True, exist_ok=True)
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(storage)), serializer=SafeSerializer())
    store.write(obj, key=key)
