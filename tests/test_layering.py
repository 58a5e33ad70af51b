"""The import layering of docs/architecture.md, read from the source (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ballot", "serving", "pipelines")
GROUND_FLOOR = {"ballot.errors", "ballot.config", "ballot.knobs", "ballot.storage", "ballot.fairness", "ballot.masks"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The project modules ``path`` imports, at any depth of its syntax tree."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.add(full if full in MODULES else node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name in MODULES}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _cycle_from(start: str) -> list[str] | None:
    """An import path from ``start`` back to itself, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in GRAPH[node]:
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_the_walker_sees_the_modules_and_their_imports() -> None:
    assert {"ballot.config", "ballot.cli", "serving.app", "pipelines.common"} <= set(MODULES)
    assert "ballot.errors" in GRAPH["ballot.config"] and "ballot.config" in GRAPH["ballot.cli"]


@pytest.mark.parametrize("module", sorted(GROUND_FLOOR))
def test_the_ground_floor_imports_only_the_ground_floor(module: str) -> None:
    assert GRAPH[module] <= GROUND_FLOOR, f"{module} imports {sorted(GRAPH[module] - GROUND_FLOOR)}"


def test_serving_imports_no_training_code() -> None:
    for module in (m for m in MODULES if m.startswith("serving")):
        assert all(dep.startswith("serving") for dep in GRAPH[module]), f"{module} imports {sorted(GRAPH[module])}"


def test_the_library_never_imports_the_pipeline_stages() -> None:
    for module in (m for m in MODULES if m.startswith("ballot")):
        assert not any(dep.startswith("pipelines") for dep in GRAPH[module]), f"{module} imports a stage"


def test_no_import_cycle() -> None:
    cycles = [cycle for module in sorted(MODULES) if (cycle := _cycle_from(module))]
    assert not cycles, " -> ".join(cycles[0])
