"""Architecture rules that can regress silently: layering, no import side effects, no shadowing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    # HOME is elsewhere: libraries may keep caches there; the working directory must stay untouched.
    home = cwd.parent / f"{cwd.name}-home"
    home.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(home)},
    )


def test_models_import_nothing_of_prefect_or_mlflow(tmp_path: Path) -> None:
    proc = _python(
        "import sys, torchcycle.models, torchcycle.models.training\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')]\n"
        "assert not bad, bad",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr


# folder -> the package Python imports it as
PACKAGES = {
    "torchcycle": "torchcycle",
    "models": "torchcycle.models",
    "tasks": "torchcycle.tasks",
    "flows": "torchcycle.flows",
}


def _modules() -> dict[str, Path]:
    """Every module of the package, by its import name."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def test_importing_every_module_has_no_side_effects(tmp_path: Path) -> None:
    # entry points run by design: `python -m torchcycle` and the file MLflow runs to rebuild a model
    modules = sorted(m for m in _modules() if m not in ("torchcycle.__main__", "torchcycle.runtime.pyfunc"))
    code = (
        "import importlib, mlflow\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "import os\n"
        "assert not os.environ.get('MLFLOW_TRACKING_URI'), 'tracking URI set on import'\n"
        "assert not mlflow.tracking._tracking_service.utils.is_tracking_uri_set(), 'tracking URI set'\n"
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "importing created files in the working directory"


def _imports(path: Path) -> set[str]:
    """Every module name an import statement in the file names, lazy (in-function) imports included;
    `from a import b` names a, and a.b when that is a module of ours."""
    import ast

    ours = _modules()
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in ours)
    return names


def _ours(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] == "torchcycle"}


# Entry points and the edge: the only modules that may import flows and tasks from the torchcycle package.
EDGE = {"torchcycle.cli", "torchcycle.ddp", "torchcycle.__main__"}


def test_layers_import_only_downward() -> None:
    """models <- runtime <- infrastructure (torchcycle.*) <- tasks <- flows <- the CLI."""
    assert not (ROOT / "mlflow" / "__init__.py").exists()
    for name, path in _modules().items():
        imported = _ours(_imports(path))
        if name.startswith("torchcycle.models"):
            allowed = ("torchcycle.models",)
        elif name.startswith("torchcycle.runtime"):  # ships inside every logged model: nothing else may come along
            allowed = ("torchcycle.runtime", "torchcycle.models")
        elif name.startswith("torchcycle.tasks"):
            allowed = ("torchcycle",)
            assert not any(m.startswith(("torchcycle.flows", *EDGE)) for m in imported), (name, imported)
        elif name.startswith("torchcycle.flows"):
            allowed = ("torchcycle",)
            assert not any(m.startswith(tuple(EDGE)) for m in imported), (name, imported)
        elif name in EDGE or name == "torchcycle":
            continue
        else:  # infrastructure shared by the stages: never a stage, a flow or the edge
            allowed = ("torchcycle",)
            above = ("torchcycle.tasks", "torchcycle.flows", *EDGE)
            assert not any(m.startswith(above) for m in imported), (name, imported)
        upward = [m for m in imported if not any(m == a or m.startswith(a + ".") for a in allowed)]
        assert not upward, f"{name} imports {upward}"


def test_no_import_cycles() -> None:
    """Among our modules, lazy imports included: a cycle means two modules that are really one, or a
    misplaced function (the gate and manual promotion used to import each other)."""
    modules = _modules()
    graph = {name: {m for m in _ours(_imports(path)) if m in modules and m != name} for name, path in modules.items()}
    # Importing a.b.c runs the package a.b's __init__ first; that edge is Python's, not a design choice.
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(node) :], node]))
        if node in done:
            return
        for dep in sorted(graph[node]):
            visit(dep, [*stack, node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])


def test_flows_only_wire() -> None:
    """No function in flows/ over 60 lines: a flow is a page of wiring."""
    import ast

    for path in (ROOT / "flows").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.name}:{node.name} is {length} lines"


def test_one_installed_name() -> None:
    """The installed distribution provides one import name, torchcycle: no top-level models/tasks/flows."""
    from importlib.metadata import packages_distributions

    provided = {top for top, dists in packages_distributions().items() if "torchcycle" in dists}
    assert provided == {"torchcycle"}, provided
    import torchcycle.models
    import torchcycle.tasks

    assert Path(torchcycle.models.__file__).parent == ROOT / "models"
    assert Path(torchcycle.tasks.__file__).parent == ROOT / "tasks"


def _readme_layout() -> set[str]:
    """The .py files the README's Layout section names, as paths (indentation: 2 spaces per folder level)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    named, folders = set(), []
    for line in block.splitlines():
        stripped = line.lstrip()
        if not stripped:
            continue
        depth = (len(line) - len(stripped)) // 2
        token = stripped.split()[0]
        folders = folders[:depth]
        if token.endswith("/"):
            folders.append(token.rstrip("/"))
        elif token.endswith(".py"):
            named.add("/".join([*folders, token]))
    return named


def test_readme_layout_matches_the_tree() -> None:
    tree = {str(p.relative_to(ROOT)) for f in PACKAGES for p in (ROOT / f).rglob("*.py") if p.name != "__init__.py"}
    named = _readme_layout()
    assert named == tree, (
        f"README names but tree lacks: {sorted(named - tree)}; tree has, README lacks: {sorted(tree - named)}"
    )


def test_the_wheel_installs_one_package(tmp_path: Path) -> None:
    """What `pip install` of a release puts into site-packages: torchcycle/ (with models, tasks, flows and the
    runtime inside it) and its dist-info, nothing else."""
    import zipfile

    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("torchcycle-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"torchcycle", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for module in ("models/cnn.py", "tasks/gate.py", "flows/training.py", "runtime/pyfunc.py", "cli.py"):
        assert f"torchcycle/{module}" in names, module
    assert "torchcycle/dask_workers.yaml" in names  # the Dask workers' settings, read at run time
