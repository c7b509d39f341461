"""Import on use: a module imported when one of its names is first read.

The CLI starts in a few tens of milliseconds only if a command imports what it runs and nothing
else; ``graphdriver ls`` must not pay for the archive engine (zstandard, the tar code).
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: importing the package must not import typing
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any


class LazyModule:
    """Stands for the module *name*, importing it when an attribute is first read."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_attribute(namespace: dict[str, Any], names: dict[str, str], attr: str) -> Any:
    """For a package's module ``__getattr__`` (*namespace* is its ``globals()``): *attr* from
    the submodule *names* maps it to, kept in the package once found, so that ``__getattr__``
    runs once per name, not on every read (a loop over a diff's changes read
    ``archive.ChangeKind`` once per change). As with an import in the package's
    ``__init__``, a later patch or reload of the submodule does not show through the
    package's name."""
    package = namespace["__name__"]
    module = names.get(attr)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {attr!r}")
    value = getattr(importlib.import_module(module, package), attr)
    namespace[attr] = value
    return value
