"""The store's modules keep to their own: no private name of another object, SQL only in the
modules that own a database's tables, and no import circle through them (read from the
source, as a reviewer would)."""

from __future__ import annotations

import ast
from pathlib import Path

import graphdriver

PACKAGE = Path(graphdriver.__file__).parent

#: the layer store, containers and volumes, and what they are made of
STORE_MODULES = [
    "store",
    "store_mounts",
    "store_diff",
    "containers",
    "container_mounts",
    "container_records",
    "volumes",
    "volume_records",
    "volume_driver",
    "volume_local",
    "metadata",
    "recovery",
    "locking",
    "check",
    "check_rebuild",
    "mount_points",
    "sqlite",
    "ids",
]
# diffs.py and applying.py are not listed: they are the store's own halves (functions of a
# LayerStore, split out to keep store.py readable) and use its private helpers (_call,
# _operation, _boundary, _mount_path, _driver_mount); containers and volumes may not.
#: the modules that own tables (and sqlite.py, which opens them)
SQL_OWNERS = {"sqlite", "metadata", "container_records", "volume_records", "check_rebuild"}


def _tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text())


def test_no_private_names_of_other_objects() -> None:
    found = [
        f"{module}.py:{node.lineno}: {ast.unparse(node)}"
        for module in STORE_MODULES
        for node in ast.walk(_tree(module))
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and ast.unparse(node.value) not in ("self", "cls", "super()")
    ]
    assert found == []


def test_sql_only_where_the_tables_are_owned() -> None:
    found = [
        f"{module}.py:{node.lineno}: {ast.unparse(node)[:80]}"
        for module in STORE_MODULES
        if module not in SQL_OWNERS
        for node in ast.walk(_tree(module))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("execute", "executescript", "executemany")
    ]
    assert found == []


def _imports(module: str) -> set[str]:
    """The package's modules that *module* imports when it runs (not for type checking)."""
    tree = _tree(module)
    typing_only = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for sub in ast.walk(node)
    }
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in typing_only:
            names = [node.module] if node.module else [a.name for a in node.names]
            out |= {n.split(".")[0] for n in names if n}
    return out - {module}


def test_no_import_circle_through_the_store_modules() -> None:
    """(recovery -> applying -> recovery was one: recovery now gets apply-diff's rollback as
    an argument.)"""
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    graph = {m: _imports(m) & modules for m in modules}
    circles = []
    for start in STORE_MODULES:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(" -> ".join([*path, start]))
                elif nxt not in path:
                    stack.append((nxt, [*path, nxt]))
    assert circles == []
