"""The layering, written once: every import (module level or inside a function)
runs down the floors or stays on its own, never up, and the modules import one
another in no circle.

    entry points → services and steps → the saga → sql → base
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.paths import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "orderflow"

# Top floor first.  A module belongs to the floor of its longest matching prefix.
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "entry points",
        (
            "orderflow.app",
            "orderflow.dashboard",
            "orderflow.sandbox",
            "orderflow.outbox_worker.runner",
            "orderflow.outbox_worker.relay",
            "orderflow.outbox_worker.logs",
            "orderflow.migrations",
        ),
    ),
    ("services and steps", ("orderflow.services", "orderflow.outbox_worker")),
    ("the saga", ("orderflow.statemachine",)),
    ("sql", ("orderflow.sql",)),
    ("base", ("orderflow.config", "orderflow.failpoints", "orderflow.metrics", "orderflow")),
)

# The design card's folders, each linked into the one namespace (orderflow/<name>).
FOLDERS = ("app", "statemachine", "outbox_worker", "sql", "alembic", "services", "dashboard",
           "sandbox")  # fmt: skip


def floor_of(module: str) -> int:
    best, floor = -1, -1
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), index
    assert floor >= 0, f"{module} is on no floor: add it to FLOORS"
    return floor


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder, _, files in os.walk(PACKAGE, followlinks=True):
        parts = Path(folder).relative_to(PROJECT_ROOT).parts
        if "versions" in parts or "node_modules" in parts or "__pycache__" in parts:
            continue  # migration revisions are history; they import nothing of ours
        for name in files:
            if name.endswith(".py"):
                dotted = ".".join((*parts, name[:-3]))
                found[dotted.removesuffix(".__init__")] = Path(folder) / name
    return found


def imports_of(module: str, path: Path, known: set[str]) -> Iterator[tuple[int, str]]:
    """Every orderflow module `module` imports, wherever in the file it does."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                yield node.lineno, full if full in known else target


MODULES = modules()


def edges() -> dict[str, set[str]]:
    known = set(MODULES)
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for _, target in imports_of(module, path, known):
            if target in known and target != module:
                graph[module].add(target)
    return graph


def test_every_module_is_on_a_floor() -> None:
    assert len(MODULES) > 50
    for module in MODULES:
        floor_of(module)


def test_no_import_runs_up_a_floor() -> None:
    upward = []
    known = set(MODULES)
    for module, path in MODULES.items():
        for line, target in imports_of(module, path, known):
            if target.startswith("orderflow") and floor_of(target) < floor_of(module):
                upward.append(
                    f"{path.relative_to(PROJECT_ROOT)}:{line}: {module} "
                    f"({FLOORS[floor_of(module)][0]}) imports {target} "
                    f"({FLOORS[floor_of(target)][0]})"
                )
    assert upward == []


def test_no_import_circle() -> None:
    graph = edges()
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_code_imports_only_the_namespace() -> None:
    """A bare `import sql` or `from statemachine import …` would find another
    distribution's package (python-sql, python-statemachine) once installed.
    (`alembic` is the library: our migrations are only `orderflow.migrations`.)"""
    bare = (set(FOLDERS) - {"alembic"}) | {"bench", "tests", "migrations"}
    offenders = []
    for module, path in MODULES.items():
        for line, target in imports_of(module, path, set(MODULES)):
            if target.split(".")[0] in bare:
                offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{line}: {target}")
    assert offenders == []


@pytest.mark.parametrize("folder", FOLDERS)
def test_each_folder_is_linked_into_the_namespace(folder: str) -> None:
    link = PACKAGE / ("migrations" if folder == "alembic" else folder)
    assert link.is_symlink() and link.resolve() == (PROJECT_ROOT / folder).resolve()


def test_no_folder_holds_over_a_quarter_of_the_code() -> None:
    lines: dict[str, int] = {}
    for module, path in MODULES.items():
        top = module.split(".")[1] if "." in module else "orderflow"
        top = top if (PACKAGE / top).is_dir() else "orderflow"
        lines[top] = lines.get(top, 0) + len(path.read_text(encoding="utf-8").splitlines())
    total = sum(lines.values())
    assert {name: n for name, n in lines.items() if n > total / 4} == {}
