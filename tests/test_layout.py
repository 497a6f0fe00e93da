"""Architecture rules that can regress silently: layering, no import side effects, no shadowing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
        "import sys, models, models.training\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')]\n"
        "assert not bad, bad",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr


def test_importing_every_module_has_no_side_effects(tmp_path: Path) -> None:
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for pkg in ("models", "tasks", "flows", "torchcycle")
        for p in (ROOT / pkg).rglob("*.py")
        if p.name not in ("__main__.py", "pyfunc_model.py")  # entry points run by design
    )
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


def _imported_packages(path: Path) -> set[str]:
    """Top-level package of every import statement in the file, lazy (in-function) imports included."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_upward_imports_and_no_mlflow_shadowing() -> None:
    assert not (ROOT / "mlflow" / "__init__.py").exists()
    for layer, forbidden in (("models", ("tasks", "flows", "torchcycle")), ("tasks", ("flows", "torchcycle"))):
        for path in (ROOT / layer).rglob("*.py"):
            imported = _imported_packages(path)
            for name in forbidden:
                assert name not in imported, f"{path} imports {name}"
