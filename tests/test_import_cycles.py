"""No import circles in the core: the module-level imports of every graphdriver module (read
with ast; ``if TYPE_CHECKING:`` blocks and imports inside functions left out, as they do not
run at import) form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import graphdriver

SRC = Path(graphdriver.__file__).parent
#: modules whose imports the store helper owns (their edges are marked in the failure report)
STORE_OWNED = {
    "graphdriver.store",
    "graphdriver.containers",
    "graphdriver.volumes",
    "graphdriver.volume_local",
    "graphdriver.metadata",
    "graphdriver.recovery",
    "graphdriver.locking",
    "graphdriver.mount_points",
    "graphdriver.check",
    "graphdriver.check_rebuild",
    "graphdriver.store_mounts",
    "graphdriver.store_diff",
    "graphdriver.container_records",
    "graphdriver.container_mounts",
    "graphdriver.volume_records",
    "graphdriver.volume_driver",
    "graphdriver.sqlite",
    "graphdriver.ids",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported."""
    out: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                out.extend(_runtime_imports(node.body))
            out.extend(_runtime_imports(node.orelse))
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                out.extend(_runtime_imports(block))
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            out.extend(_runtime_imports(node.body))
    return out


def _targets(node: ast.Import | ast.ImportFrom, package: str, modules: dict[str, Path]) -> set[str]:
    """The graphdriver modules an import statement names (a name from a package that is not
    one of its modules is the package)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            prefix = ".".join([*base, node.module] if node.module else base)
        else:
            prefix = node.module or ""
        names = [
            f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix
            for alias in node.names
        ]
    out = set()
    for target in names:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target:
            out.add(target)
    return out


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    named: set[str] = set()
    implied: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text()).body):
        for target in _targets(node, package, modules):
            named.add(target)
            # importing a.b.c runs a and a.b first (the importer's own packages already ran)
            parts = target.split(".")
            implied.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return (named | (implied - own)) - {name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_in_the_core() -> None:
    modules = _modules()
    graph = {name: _edges(name, path, modules) for name, path in modules.items()}
    assert graph["graphdriver.store"] >= {"graphdriver.plugins", "graphdriver.metadata"}
    report = []
    for component in _cycles(graph):
        members = set(component)
        for name in component:
            for target in sorted(graph[name] & members):
                owner = " (store helper's module)" if name in STORE_OWNED else ""
                report.append(f"{name} -> {target}{owner}")
    assert report == [], "import cycles:\n" + "\n".join(report)


def test_plugins_do_not_import_the_store() -> None:
    modules = _modules()
    for name in ("graphdriver.plugins", "graphdriver.plugin_manager", "graphdriver.hookspecs"):
        assert "graphdriver.store" not in _edges(name, modules[name], modules), name
