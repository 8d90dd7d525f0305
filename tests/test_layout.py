"""The house's boundaries: only on_determined/ imports Determined and only on_ray/ imports Ray,
utils/ imports no engine and is layered (each of its packages imports only the ones below it),
the package's modules import each other without a cycle, and library modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("utils", "on_determined", "on_ray")
ENGINES = {"determined", "ray"}
# utils/'s packages from the bottom up: each imports only those before it (and itself).
LAYERS = ("base", "experiment", "config", "data", "evaluation", "training", "inference", "check")


def sources() -> list[Path]:
    return [*REPO.glob("*.py"), *(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (functions included), by its full name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from utils.data import gcs` imports the module utils.data.gcs.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize(
    ("engine", "adapter"), [("determined", "on_determined/"), ("ray", "on_ray/")]
)
def test_only_an_engines_adapter_imports_it(engine: str, adapter: str) -> None:
    importers = {
        str(p.relative_to(REPO))
        for p in sources()
        if any(name.split(".")[0] == engine for name in imported_modules(p))
    }
    assert importers, f"the adapter imports {engine}: the test must see it"
    assert all(name.startswith(adapter) for name in importers), importers


def test_utils_imports_no_engine() -> None:
    for path in (REPO / "utils").rglob("*.py"):
        engines = {name.split(".")[0] for name in imported_modules(path)} & ENGINES
        assert not engines, f"{path.relative_to(REPO)} imports {engines}"


def test_utils_is_layered() -> None:
    loose = sorted(p.name for p in (REPO / "utils").glob("*.py") if p.name != "__init__.py")
    assert not loose, f"utils/ holds only its layer packages; put {loose} in one"
    assert {
        p.name for p in (REPO / "utils").iterdir() if p.is_dir() and p.name != "__pycache__"
    } == set(LAYERS)
    upward = []
    for path in (REPO / "utils").rglob("*.py"):
        parts = path.relative_to(REPO).parts
        if len(parts) < 3:
            continue
        own = LAYERS.index(parts[1])
        for name in imported_modules(path):
            layer = name.split(".")[1] if name.startswith("utils.") else None
            if layer in LAYERS and LAYERS.index(layer) > own:
                upward.append(f"{path.relative_to(REPO)} imports {name}")
            assert name.split(".")[0] not in ("on_determined", "on_ray"), f"{path} imports {name}"
    assert not upward, upward


def test_no_import_cycle() -> None:
    modules = {module_name(p): p for p in sources()}
    graph = {
        name: {m for m in imported_modules(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    assert graph["on_determined.trial"] >= {"utils.training.session", "on_determined.callbacks"}
    assert graph["on_ray.worker"] >= {"utils.training.session", "on_ray.chief"}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join([*trail, name])
        state[name] = "open"
        for imported in sorted(graph[name]):
            visit(imported, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])


def test_modules_stay_small() -> None:
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in sources()}
    assert not {name: n for name, n in sizes.items() if n > 300}, "split modules over 300 lines"


def test_tests_mirror_the_packages_and_import_no_other_test() -> None:
    tests = REPO / "tests"
    for path in tests.rglob("test_*.py"):
        others = {
            name
            for name in imported_modules(path)
            if name.split(".")[-1].startswith("test_") or ".test_" in name
        }
        assert not others, f"{path.relative_to(REPO)} imports {others}: share through a helper"
    for path in (tests / "utils").rglob("test_*.py"):
        layer = path.relative_to(tests / "utils").parts[0]
        assert layer in LAYERS and (REPO / "utils" / layer).is_dir(), path
