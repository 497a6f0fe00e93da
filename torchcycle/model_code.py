"""What a logged model ships and needs, derived from what loading it imports.

Starting at the models-from-code entry point (`torchcycle/runtime/pyfunc.py`), every import statement is
followed through torchcycle's own modules, lazy (in-function) imports included. The torchcycle modules met
are the code the model carries (under the `torchcycle` name, so a user's own `models/` or `tasks/` never
meets it); the other packages met are its pip requirements, pinned to the versions installed here (the
tested set in constraints.txt). Nothing is listed by hand, so a new import in the runtime is a new requirement.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import shutil
import sys
from dataclasses import dataclass
from functools import cache
from importlib.metadata import distributions, packages_distributions, version
from pathlib import Path

from packaging.version import Version

ENTRY = "torchcycle.runtime.pyfunc"  # MLflow runs this file to rebuild the model


@dataclass(frozen=True)
class ModelCode:
    modules: dict[str, Path]  # torchcycle module name -> its source file
    requirements: tuple[str, ...]  # "dist==version", sorted


def _imported_names(path: Path) -> set[str]:
    """Every name an import statement in `path` may refer to as a module (`from a import b` gives a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module != "__future__":
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _find(name: str) -> Path | None:
    """The source file of module `name`, or None when `name` is not a module (a class, a function)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


_MODULE_SUFFIXES = tuple(importlib.machinery.all_suffixes())


@cache
def _providers() -> dict[str, list[str]]:
    """Import name -> the installed distributions whose RECORD lists `name/...` or `name.py`, read once per
    process. What `packages_distributions()` answers, in a tenth of the time: that one makes a path object
    of every installed file (about 0.7 s here, where model_code asked it 8 times, 8 s)."""
    providers: dict[str, list[str]] = {}
    for dist in distributions():
        tops = set()
        for line in (dist.read_text("RECORD") or "").splitlines():
            path = line.split(",", 1)[0]
            top, sep, _ = path.partition("/")
            if sep:  # a package folder
                tops.add(top)
            elif top.endswith(_MODULE_SUFFIXES):  # a top-level module: x.py, _x.cpython-311-....so
                tops.add(top.split(".", 1)[0])
        for top in tops:
            providers.setdefault(top, []).append(dist.metadata["Name"])
    return providers


def _distribution(top: str) -> str:
    dists = _providers().get(top) or packages_distributions().get(top)  # the latter: installed without a RECORD
    if not dists:
        raise RuntimeError(f"the model runtime imports '{top}', which no installed distribution provides")
    # mlflow's import name is provided by mlflow, mlflow-skinny and mlflow-tracing: take the one named alike
    return next((d for d in dists if d.lower().replace("_", "-") == top.replace("_", "-")), dists[0])


@cache
def model_code(entry: str = ENTRY) -> ModelCode:
    """The torchcycle modules `entry` imports, transitively, and the pinned distributions behind the rest."""
    todo, ours, theirs = [entry], {}, set()
    while todo:
        name = todo.pop()
        if name in ours:
            continue
        path = _find(name)
        if path is None:
            continue
        ours[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages ship too
        for imported in _imported_names(path):
            top = imported.split(".")[0]
            if top == "torchcycle":
                todo.append(imported)
            elif top not in sys.stdlib_module_names:
                theirs.add(top)
    # public versions: a local build's '+cu130' is not on the index a user installs from
    requirements = sorted({f"{d}=={Version(version(d)).public}" for d in map(_distribution, theirs)})
    return ModelCode(ours, tuple(requirements))


def stage_code(directory: Path, code: ModelCode | None = None) -> Path:
    """Copy the model's modules to `directory/torchcycle/...` (package layout kept); returns that folder,
    which MLflow ships as the model's code path."""
    code = code or model_code()
    root = directory / "torchcycle"
    for name, source in code.modules.items():
        parts = name.split(".")[1:]
        package = source.name == "__init__.py"
        target = root.joinpath(*parts, "__init__.py") if package else root.joinpath(*parts[:-1], source.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return root
