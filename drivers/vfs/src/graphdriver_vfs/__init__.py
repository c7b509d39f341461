"""vfs: the reference driver. A layer is a directory holding a full copy of its parent.

It runs on any filesystem and needs no kernel feature. File data is copied with FICLONE where
the filesystem shares extents (btrfs, xfs with reflink) and copy_file_range elsewhere, so the
copy stays in the kernel. Owners, modes, times, xattrs, hardlinks, symlinks, devices and fifos
are kept exactly.

Read it as the example for a driver of your own: it imports only ``graphdriver`` (the contract)
and ``graphdriver.toolkit`` (the helpers), implements the four operations every driver has
(create, remove, mount, unmount), prepares its home in ``recover`` (under the store's lock),
and lists what it holds in ``stored_layers`` for ``graphdriver check``. The core does the rest:
ids, parents, states, reference counts, locks, crash recovery, diffs and tar extraction.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from graphdriver import Capabilities, CreateOpts, Driver, LayerInfo
from graphdriver.toolkit import (
    copy_tree,
    is_layer_id,
    private_dir,
    remove_tree,
    unmount_all_under,
)

log = logging.getLogger(__name__)


def _present(root: Path) -> Path:
    """*root* if it is a directory: a layer whose files are gone is no root to hand out."""
    if not root.is_dir():
        raise FileNotFoundError(errno.ENOENT, "the layer's directory is missing", str(root))
    return root


class VfsDriver(Driver):
    """Every layer a plain directory under ``<home>/dir/<id>`` (``dir`` is 0700), children by
    full copy."""

    name = "vfs"  # the entry point's name in graphdriver.drivers
    options = {}  # none: each option is "name": "help", shown by `graphdriver drivers`
    capabilities = Capabilities(quota=False)  # abilities beyond these: the Protocols it implements

    def _dir(self, layer: LayerInfo) -> Path:
        return self.home / "dir" / layer.id

    def recover(self, layers: Sequence[LayerInfo]) -> None:
        # layer roots are 0755 for the container: only root may walk to them (a hostile
        # layer's setuid file or world-writable device node stays out of other users' reach)
        private_dir(self.home, self.home / "dir")

    def create(self, layer: LayerInfo, parent: LayerInfo | None, opts: CreateOpts) -> None:
        target = self._dir(layer)
        target.parent.mkdir(0o700, exist_ok=True)  # recover() made it; a driver used alone
        if parent is not None:
            copy_tree(str(self._dir(parent)), str(target))
            return
        target.mkdir(0o755)
        os.chmod(target, 0o755)  # whatever the umask: an empty layer is 0755, owner 0:0
        if os.geteuid() == 0:
            os.chown(target, 0, 0)

    def has_storage(self, layer: LayerInfo) -> bool:
        return os.path.lexists(self._dir(layer))

    def remove(self, layer: LayerInfo) -> None:
        target = self._dir(layer)
        if not target.is_symlink() and target.is_dir():  # (a symlink is removed, not followed)
            for where in unmount_all_under(target):  # never delete another filesystem's files
                log.warning("unmounted %s, mounted inside layer %s, to remove it", where, layer.id)
        if target.exists() or target.is_symlink():
            remove_tree(target)

    def mount(self, layer: LayerInfo, chain: Sequence[LayerInfo]) -> Path:
        """The layer's directory is its root: nothing to mount (the core counts references)."""
        return _present(self._dir(layer))

    def unmount(self, layer: LayerInfo) -> None:
        return None

    def status(self) -> list[tuple[str, str]]:
        return [("Copy", "reflink (FICLONE) where possible, else copy_file_range")]

    def stored_layers(self) -> Mapping[str, str | None]:
        """Every ``dir/<id>`` directory; a full copy depends on no parent."""
        try:
            entries = list(os.scandir(self.home / "dir"))
        except FileNotFoundError:
            return {}
        return {
            e.name: None for e in entries if is_layer_id(e.name) and e.is_dir(follow_symlinks=False)
        }
