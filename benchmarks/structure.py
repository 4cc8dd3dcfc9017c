"""The package drawn as a house: modules as rooms, imports between them as arrows (module-level
and inside functions alike; `if TYPE_CHECKING:` ones left out), floors as the longest chain of
imports, and the largest rooms.

    python benchmarks/structure.py [PACKAGE_DIR]
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def arrows(found: dict[str, Path]) -> dict[str, set[str]]:
    edges = {name: set() for name in found}
    for name, path in found.items():
        tree = ast.parse(path.read_text())
        typing_only = {  # `if TYPE_CHECKING:` imports are for annotations: no arrow at run time
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target in found and target != name and found[target].name != "__init__.py":
                    edges[name].add(target)
    return edges


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "raysweep")
    found = modules(root)
    edges = arrows(found)

    @cache
    def floor(name: str) -> int:
        return 1 + max((floor(t) for t in edges[name]), default=0)

    lines = {name: len(path.read_text().splitlines()) for name, path in found.items()}
    rooms = [n for n in found if found[n].name != "__init__.py"]
    print(f"rooms (modules): {len(rooms)}, lines: {sum(lines[n] for n in rooms):,}")
    print(f"arrows (imports between rooms): {sum(len(v) for v in edges.values())}")
    print(f"floors (longest import chain): {max(floor(n) for n in rooms)}")
    top = sorted(rooms, key=lambda n: -lines[n])[:5]
    print("largest: " + ", ".join(f"{n} {lines[n]}" for n in top))
    for name in sorted(rooms, key=lambda n: (floor(n), n)):
        print(f"  floor {floor(name):2d}  {lines[name]:4d}  {name}")


if __name__ == "__main__":
    main()
