"""The built-in drivers use only what a third-party driver can rely on: ``graphdriver`` (the
contract), ``graphdriver.toolkit``, ``graphdriver.testing``, the standard library and the
dependencies their own pyproject.toml declares. Read from their source with ast, every import
(in functions too)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

import graphdriver
import graphdriver.testing
import graphdriver.toolkit

REPO = Path(__file__).resolve().parents[1]
DRIVERS = sorted(p for p in (REPO / "drivers").iterdir() if (p / "pyproject.toml").exists())
#: the public modules of the core, and the names each offers
PUBLIC = {
    "graphdriver": set(graphdriver.__all__),
    "graphdriver.toolkit": set(graphdriver.toolkit.__all__),
    "graphdriver.testing": set(graphdriver.testing.__all__),
}


def declared_modules(pyproject: Path) -> set[str]:
    """The import names of the project's dependencies (a distribution named like its module)."""
    deps = tomllib.loads(pyproject.read_text())["project"].get("dependencies", [])
    names = {re.split(r"[\s<>=!~;\[]", dep, maxsplit=1)[0] for dep in deps}
    return {name.replace("-", "_") for name in names} - {"graphdriver"}


def import_problems(source: Path, package: str, allowed: set[str], root: Path = REPO) -> list[str]:
    """One line per import in *source* that is neither stdlib, the package itself, a declared
    dependency nor a public name of the core."""
    problems = []
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            imported = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported = [(node.module, alias.name) for alias in node.names]
        else:
            continue  # a relative import stays inside the driver's own package
        for module, name in imported:
            top = module.partition(".")[0]
            if top in sys.stdlib_module_names or top == package or top in allowed:
                continue
            where = f"{source.relative_to(root)}:{node.lineno}"
            if module not in PUBLIC:
                problems.append(f"{where}: {module} is not graphdriver's public API")
            elif name is not None and name not in PUBLIC[module]:
                problems.append(f"{where}: {module}.{name} is not in its __all__")
    return problems


@pytest.mark.parametrize("driver", DRIVERS, ids=[p.name for p in DRIVERS])
def test_driver_imports_only_the_public_api(driver: Path) -> None:
    sources = sorted((driver / "src").rglob("*.py"))
    assert sources, f"no sources under {driver}/src"
    package = sources[0].relative_to(driver / "src").parts[0]
    allowed = declared_modules(driver / "pyproject.toml")
    problems = [p for src in sources for p in import_problems(src, package, allowed)]
    assert problems == []


def test_the_check_catches_an_internal_import(tmp_path: Path) -> None:
    source = tmp_path / "driver.py"
    source.write_text(
        "import os\n"
        "from graphdriver import Driver, faults\n"
        "from graphdriver.toolkit import copy_tree\n"
        "from graphdriver.linux.copy import copy_tree as again\n"
        "def later():\n"
        "    import graphdriver.metadata\n"
    )
    found = import_problems(source, "mydriver", set(), root=tmp_path)
    assert sorted(found) == [
        "driver.py:2: graphdriver.faults is not in its __all__",
        "driver.py:4: graphdriver.linux.copy is not graphdriver's public API",
        "driver.py:6: graphdriver.metadata is not graphdriver's public API",
    ]
