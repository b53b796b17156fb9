"""The package's folders form one order: each may import only from folders before it.

That keeps every capability readable on its own and makes import cycles impossible; a new import
against the order fails here with the file and line to look at.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "smallmighty"

#: Folders in import order. Top-level modules (errors, io, cache, defaults, metrics) are the core
#: that everything may use; cli.py sits above all and finds the verbs by name.
ORDER = ["data", "models", "compress", "engine", "train", "evaluate", "distill", "serve"]


def _rank(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 2 and parts[1] in ORDER:
        return ORDER.index(parts[1]) + 1
    return len(ORDER) + 1 if parts[-1] == "cli" else 0


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("smallmighty"):
            names = [node.module] if node.module.count(".") >= 2 or node.module == "smallmighty" else \
                [f"{node.module}.{alias.name}" for alias in node.names]
            found += [(node.lineno, name) for name in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("smallmighty.")]
    return found


def test_folders_import_only_earlier_folders() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for line, target in _imports(path):
            if _rank(target) > _rank(module) or (_rank(module) == 0 and _rank(target) > 0):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not wrong, "imports against the folder order " + " < ".join(ORDER) + ":\n" + "\n".join(wrong)


def test_the_order_names_every_folder() -> None:
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert folders == set(ORDER)
