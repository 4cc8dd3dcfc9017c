"""The package's shape: three wings, each importing only downward (core <- sweep <- report), and a
trial core that needs neither Ray, Optuna nor MLflow (a machine with a GPU and no Ray runs it)."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import raysweep

PACKAGE = Path(raysweep.__file__).parent
WINGS = ("core", "sweep", "report")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_each_wing_imports_only_the_wings_below_it():
    upward = []
    for rank, wing in enumerate(WINGS):
        for path in sorted((PACKAGE / wing).rglob("*.py")):
            for name in _imports(path):
                parts = name.split(".")
                if parts[0] == "raysweep" and len(parts) > 1 and parts[1] in WINGS:
                    if WINGS.index(parts[1]) > rank:
                        upward.append(f"{path.relative_to(PACKAGE)} imports {name}")
                elif parts[0] == "raysweep" and len(parts) > 1:
                    upward.append(f"{path.relative_to(PACKAGE)} imports the entry point {name}")
    assert not upward, upward


def test_the_core_imports_no_ray_optuna_or_mlflow():
    modules = [m.name for m in pkgutil.walk_packages([str(PACKAGE / "core")], "raysweep.core.")]
    probe = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'optuna', 'mlflow', 'implicit'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    assert len(modules) >= 15  # every module of the core was imported
