"""graphdriver.toolkit: the names driver authors get are the core's own, documented, and the
folder helpers do what drivers rely on."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import stat
from pathlib import Path

import pytest

from graphdriver import toolkit


def test_every_public_name_is_the_cores_own_and_documented() -> None:
    assert sorted(toolkit.SOURCES) == sorted(toolkit.__all__)
    for name in toolkit.__all__:
        assert not name.startswith("_")
        module, attr = toolkit.SOURCES[name]
        value = getattr(toolkit, name)
        assert value is getattr(importlib.import_module(f"graphdriver.{module}"), attr), name
        if callable(value):
            assert inspect.getdoc(value), f"{name} has no docstring"
    with pytest.raises(AttributeError, match="no attribute 'copytree'"):
        toolkit.copytree  # type: ignore[attr-defined]  # noqa: B018


def test_type_checkers_see_the_same_names_as_the_lazy_loader() -> None:
    tree = ast.parse(Path(toolkit.__file__).read_text())
    guarded = next(
        n for n in tree.body if isinstance(n, ast.If) and not isinstance(n.test, ast.UnaryOp)
    )
    seen = {
        alias.asname or alias.name: (str(node.module), alias.name)
        for node in guarded.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert seen == toolkit.SOURCES


def test_private_dir_makes_and_tightens_folders(tmp_path: Path) -> None:
    home = tmp_path / "home"
    loose = tmp_path / "loose"
    loose.mkdir(0o755)
    os.chmod(loose, 0o755)
    toolkit.private_dir(home, home / "layers", loose)
    for folder in (home, home / "layers", loose):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_nearest_existing_is_the_folder_a_new_home_will_live_in(tmp_path: Path) -> None:
    assert toolkit.nearest_existing(tmp_path / "a" / "b" / "c") == tmp_path
    assert toolkit.nearest_existing(tmp_path) == tmp_path
