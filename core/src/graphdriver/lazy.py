"""Import on use: a module imported when one of its names is first read.

The CLI starts in a few tens of milliseconds only if a command imports what it runs and nothing
else; ``graphdriver ls`` must not pay for the archive engine (zstandard, the tar code).
"""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """Stands for the module *name*, importing it when an attribute is first read."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_attribute(package: str, names: dict[str, str], attr: str) -> Any:
    """For a package's module ``__getattr__``: *attr* from the submodule *names* maps it to."""
    module = names.get(attr)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {attr!r}")
    return getattr(importlib.import_module(module, package), attr)
