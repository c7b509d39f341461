"""The suite's own reference store: what a layer built the same way must diff to, from the core
alone (a third-party driver's tests have no other driver installed).

:class:`ReferenceDriver` keeps each layer as a full copy of its parent (``toolkit.copy_tree``,
as vfs does) and implements none of the Protocols: its changes and diffs are the core's own walk
of both trees and its tar writer, which every driver's generated diff must match byte for byte.
It is not registered as a driver; :func:`open_reference` opens a store on it directly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .. import Capabilities, CreateOpts, Driver, LayerInfo, LayerStore
from ..plugins import Hooks
from ..toolkit import copy_tree, private_dir, remove_tree, unmount_all_under


class ReferenceDriver(Driver):
    """Layers as plain directories under ``<home>/dir``, children by full copy."""

    name = "suite-reference"
    options = {}
    capabilities = Capabilities()

    def _dir(self, layer: LayerInfo) -> Path:
        return self.home / "dir" / layer.id

    def recover(self, layers: Sequence[LayerInfo]) -> None:
        private_dir(self.home, self.home / "dir")

    def create(self, layer: LayerInfo, parent: LayerInfo | None, opts: CreateOpts) -> None:
        target = self._dir(layer)
        if parent is not None:
            copy_tree(str(self._dir(parent)), str(target))
            return
        target.mkdir(0o755)
        os.chmod(target, 0o755)

    def remove(self, layer: LayerInfo) -> None:
        target = self._dir(layer)
        if target.is_dir() and not target.is_symlink():
            unmount_all_under(target)
        if os.path.lexists(target):
            remove_tree(target)

    def mount(self, layer: LayerInfo, chain: Sequence[LayerInfo]) -> Path:
        return self._dir(layer)

    def unmount(self, layer: LayerInfo) -> None:
        return None


def open_reference(root: Path) -> LayerStore:
    """A store under *root* on :class:`ReferenceDriver`, with no hook plugin (a plugin's diff
    filter must not change the reference)."""
    private_dir(root)
    return LayerStore(root, ReferenceDriver, {}, Hooks())
