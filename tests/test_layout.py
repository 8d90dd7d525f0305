"""Determined stays at the edge: only model_def.py and det_support.py import it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EDGE = {"model_def.py", "det_support.py"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_edge_modules_import_determined() -> None:
    sources = [*REPO.glob("*.py"), *(REPO / "utils").glob("*.py")]
    importers = {p.name for p in sources if "determined" in imported_modules(p)}
    assert importers == EDGE
