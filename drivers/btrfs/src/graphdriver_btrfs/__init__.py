"""btrfs: every layer a subvolume, every child a snapshot of its parent.

    <home>/subvolumes/<id>     the layer (its root is the layer's root; no mount)

A child is a snapshot of its parent's subvolume, so making one takes the same time whatever
the parent holds, and its changes are read from the btrfs generation numbers of what it wrote
since (:mod:`.changes`), so they cost what changed. An image layer that has children is
read-only at the subvolume level (any write fails with EROFS); it becomes writable again when
its last child is gone. ``--size`` is a qgroup limit on what the subvolume references: quota
is turned on when first needed and never turned off by graphdriver, so the filesystem's own
quota settings survive (moby #34593).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from graphdriver import (
    Capabilities,
    CreateOpts,
    Driver,
    DriverUnavailable,
    InvalidOption,
    LayerInfo,
)
from graphdriver.toolkit import fs_name, is_layer_id, nearest_existing, parse_size, private_dir

from . import ioctl
from .changes import snapshot_changes

log = logging.getLogger(__name__)

#: free bytes under which a removal waits for the cleaner to give the blocks back
SHORT_OF_SPACE = 64 << 20


def _btrfsutil() -> Any:
    """Import btrfsutil only when the driver is used, so listing drivers never needs it."""
    try:
        import btrfsutil
    except ImportError as exc:
        raise DriverUnavailable(
            f"the btrfs driver needs the btrfsutil module ({exc}); install graphdriver-btrfs "
            f"after apt-get install libbtrfsutil-dev"
        ) from exc
    return btrfsutil


class BtrfsDriver(Driver):
    """Layers as btrfs subvolumes and snapshots."""

    name = "btrfs"
    options = {
        "btrfs.min_space": "smallest --size accepted for a layer (e.g. 10M); like Docker's",
    }

    @classmethod
    def probe(cls, home: Path, options: Mapping[str, str]) -> None:
        where = nearest_existing(home)
        found = fs_name(where)
        if found != "btrfs":
            raise DriverUnavailable(
                f"the btrfs driver needs its root on btrfs; {where} is on {found}"
            )
        if os.geteuid() != 0:
            raise DriverUnavailable("the btrfs driver needs root (subvolume ioctls)")
        _btrfsutil()

    def __init__(self, home: Path, options: Mapping[str, str]) -> None:
        super().__init__(home, options)
        self.probe(home, options)
        self.bu: Any = _btrfsutil()
        self.min_space = (
            parse_size(options["btrfs.min_space"]) if "btrfs.min_space" in options else 0
        )
        self.capabilities = Capabilities(quota=True, readonly_images=True, needs_root=True)

    def recover(self, layers: Sequence[LayerInfo]) -> None:
        # layer roots are 0755 for the container: only root may walk to them (a hostile
        # layer's setuid file or world-writable device node stays out of other users' reach)
        private_dir(self.home, self.home / "subvolumes")

    def _path(self, layer: LayerInfo | str) -> Path:
        return self.home / "subvolumes" / (layer if isinstance(layer, str) else layer.id)

    def create(self, layer: LayerInfo, parent: LayerInfo | None, opts: CreateOpts) -> None:
        target = self._path(layer)
        if opts.size is not None and opts.size < self.min_space:
            raise InvalidOption(
                f"size {opts.size} is below btrfs.min_space ({self.min_space} bytes)"
            )
        target.parent.mkdir(0o700, exist_ok=True)  # recover() made it; a driver used alone
        if parent is None:
            self.bu.create_subvolume(str(target))
            os.chmod(target, 0o755)
            os.chown(target, 0, 0)
        else:
            source = self._path(parent)
            self.bu.create_snapshot(str(source), str(target))
            if not parent.rw:  # an image layer with a child never changes again
                self.bu.set_subvolume_read_only(str(source), True)
        if opts.size is not None:
            self._limit(target, opts.size)

    def _limit(self, target: Path, size: int) -> None:
        if not ioctl.quota_enabled(self.home):
            log.info("enabling btrfs quota on the filesystem of %s", self.home)
            ioctl.enable_quota(self.home)
        ioctl.limit_qgroup(self.home, self.bu.subvolume_id(str(target)), size)

    def has_storage(self, layer: LayerInfo) -> bool:
        return os.path.lexists(self._path(layer))

    def remove(self, layer: LayerInfo) -> None:
        target = self._path(layer)
        if not target.exists():
            return
        if not self.bu.is_subvolume(str(target)):  # a half-made layer
            target.rmdir()
            return
        ids = [self.bu.subvolume_id(str(target))]
        ids += [info.id for _path, info in self.bu.SubvolumeIterator(str(target), info=True)]
        # nested subvolumes a container made inside its layer go first, deepest first
        self.bu.delete_subvolume(str(target), recursive=True)
        if layer.parent is not None:
            self._release_parent(layer.parent)
        if ioctl.quota_enabled(self.home):
            self._drop_qgroups(ids)
        elif _short_of_space(self.home):
            # the store records the removal next, in a database on this filesystem: on a
            # full disk it needs the subvolumes' blocks back, which btrfs returns only once
            # its cleaner has dropped them (a failed apply's rollback is such a removal);
            # best effort: the subvolumes are gone already
            try:
                if not self._wait_dropped(ids):
                    log.warning("btrfs cleaner still busy with %s after 30 s", ids)
            except OSError as exc:
                log.warning("could not wait for btrfs's cleaner (%s)", exc)

    def _release_parent(self, parent_id: str) -> None:
        """An image layer whose last child went away may be written again."""
        parent = self._path(parent_id)
        children = [
            c
            for c in (self.home / "subvolumes").iterdir()
            if c != parent and self._parent_of(c) == parent
        ]
        if not children and self.bu.get_subvolume_read_only(str(parent)):
            self.bu.set_subvolume_read_only(str(parent), False)

    def _parent_of(self, path: Path) -> Path | None:
        try:
            parent_uuid = self.bu.subvolume_info(str(path)).parent_uuid
        except Exception:  # not a subvolume (half made)
            return None
        for other in (self.home / "subvolumes").iterdir():
            with contextlib.suppress(Exception):
                if self.bu.subvolume_info(str(other)).uuid == parent_uuid:
                    return other
        return None

    def _wait_dropped(self, ids: list[int]) -> bool:
        """Commit, and wait (30 s at most) until btrfs's cleaner has dropped the deleted
        subvolumes *ids*, so that their blocks are free; False if it is still busy."""
        deadline = time.monotonic() + 30
        self.bu.sync(str(self.home))
        while set(ids) & set(self.bu.deleted_subvolumes(str(self.home))):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
            self.bu.sync(str(self.home))
        return True

    def _drop_qgroups(self, ids: list[int]) -> None:
        """Destroy the deleted subvolumes' qgroups once the cleaner has dropped them."""
        if not self._wait_dropped(ids):
            log.warning("btrfs cleaner still busy with %s; their qgroups stay for now", ids)
            return
        present = set(ioctl.qgroups(self.home))
        for qid in ids:
            if qid in present:
                ioctl.destroy_qgroup(self.home, qid)

    def mount(self, layer: LayerInfo, chain: Sequence[LayerInfo]) -> Path:
        target = self._path(layer)
        if not layer.rw:
            read_only = self.bu.get_subvolume_read_only(str(target))
            if read_only != layer.sealed:
                self.bu.set_subvolume_read_only(str(target), layer.sealed)
        return target

    def unmount(self, layer: LayerInfo) -> None:
        return None

    def changes(
        self, layer: LayerInfo, chain: Sequence[LayerInfo]
    ) -> Sequence[tuple[str, int]] | None:
        """NativeDiff: what a snapshot changed, from the btrfs generation numbers (see
        :mod:`.changes`); None (walk both trees) for a layer without a parent."""
        if layer.parent is None:
            return None
        # Change: a (path, kind) pair
        return snapshot_changes(self.bu, self._path(layer), self._path(layer.parent))

    def diff_source(self, layer: LayerInfo) -> Path | None:
        """NativeDiff: the files of a diff are read from the layer's own subvolume."""
        return self._path(layer)

    def stored_layers(self) -> Mapping[str, str | None]:
        """Every ``subvolumes/<id>``; a snapshot holds all its files, so no parent is needed."""
        base = self.home / "subvolumes"
        if not base.is_dir():  # a new home, before recover() made it
            return {}
        return {p.name: None for p in base.iterdir() if is_layer_id(p.name) and p.is_dir()}

    def status(self) -> list[tuple[str, str]]:
        import importlib.metadata  # here only: 40 ms that no other command should pay

        space = ioctl.space_info(self.home)
        data_used, data_total = space["data"]
        meta_used, meta_total = space["metadata"]
        return [
            ("Build Version", f"btrfsutil {importlib.metadata.version('btrfsutil')}"),
            ("Library Version", _library_version()),
            ("Quota Enabled", str(ioctl.quota_enabled(self.home)).lower()),
            ("Data Space Used", str(data_used)),
            ("Data Space Total", str(data_total)),
            ("Metadata Space Used", str(meta_used)),
            ("Metadata Space Total", str(meta_total)),
        ]


def _short_of_space(home: Path) -> bool:
    """Whether the filesystem of *home* has less than :data:`SHORT_OF_SPACE` bytes free."""
    st = os.statvfs(home)
    return st.f_bavail * st.f_frsize < SHORT_OF_SPACE


def _library_version() -> str:
    """libbtrfsutil's version, from the file name of the shared library this process mapped."""
    with open("/proc/self/maps") as f:
        for line in f:
            if "libbtrfsutil.so" in line:
                name = line.split()[-1].rsplit("/", 1)[-1]
                return "libbtrfsutil " + name.partition(".so.")[2]
    return "unknown"
