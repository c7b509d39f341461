"""Issue #16's size limits, checked on the source the project ships: no module of the core or of
a built-in driver over 500 lines, no function (or method, or nested function) over 60.

Limits that are read by a test stay limits: a module that grows past them is split when it
grows, not in a clean-up issue a year later."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "core" / "src", *sorted((ROOT / "drivers").glob("*/src"))]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(p for src in SOURCES for p in src.rglob("*.py"))


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_the_sources_are_found() -> None:
    modules = _modules()
    names = {p.name for p in modules}
    assert "store.py" in names and "driver.py" in names
    assert {p.parts[-4] for p in modules if p.parts[-4] != "core"} >= {
        "overlay",
        "btrfs",
        "devmapper",
        "vfs",
    }


def test_no_module_over_500_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them): {long}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_over_60_lines(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    long = {
        f"{fn.name} (line {fn.lineno})": length
        for fn in _functions(tree)
        if fn.end_lineno is not None
        and (length := fn.end_lineno - fn.lineno + 1) > MAX_FUNCTION_LINES
    }
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
