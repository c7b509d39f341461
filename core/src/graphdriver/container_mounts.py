"""Mounting a container: its root filesystem with every volume and bind in place.

``mount`` takes the layer reference and records the mount in one transaction, then binds every
volume at its path *inside* the root filesystem (resolved by the kernel with the root as ``/``,
so no symlink in the image can send a mount to the host), filling an empty managed volume with
the image's content at that path the first time, and records each bind once it is in place.
``unmount`` marks the binds gone first, then undoes them, deepest first, so that a crash on the
way is finished by :mod:`.containers`' recovery at the next open.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import faults, reserve
from .driver import KernelMounts
from .errors import InvalidMountSpec, NotMounted, from_oserror
from .linux import bind
from .linux.copy import copy_tree
from .linux.mount import MNT_DETACH, mounts_under, unmount
from .mount_points import MountPoint

if TYPE_CHECKING:
    from .container_records import ContainerRecords
    from .metadata import Metadata
    from .store import LayerStore
    from .volumes import VolumeStore

log = logging.getLogger(__name__)


class ContainerMounts:
    """Container mount and umount; mixed into :class:`~graphdriver.containers.ContainerStore`."""

    store: LayerStore
    meta: Metadata
    records: ContainerRecords

    if TYPE_CHECKING:

        @property
        def volumes(self) -> VolumeStore: ...

        def _key(self, name: str) -> str: ...

        def _row(self, name: str, *, any_state: bool = False) -> dict[str, Any]: ...

    def _check_bind(self, spec: str, source: str, fd: int | None = None) -> None:
        """Refuse a bind source that is the store's root, is inside it or contains it, compared
        by identity on the opened source (on *fd* when given: the one that is bound)."""
        try:
            src = os.open(source, os.O_PATH | os.O_CLOEXEC) if fd is None else fd
        except FileNotFoundError:
            raise InvalidMountSpec(
                f"invalid volume spec {spec!r}: bind source {source} does not exist"
            ) from None
        try:
            how = bind.reaches_root(src, str(self.store.root))
        finally:
            if fd is None:
                os.close(src)
        if how is not None:
            raise InvalidMountSpec(
                f"invalid volume spec {spec!r}: {source} {how} the graphdriver root "
                f"{self.store.root}; a container must not reach the store's own files"
            )

    def mount(self, name: str) -> Path:
        """Mount the root filesystem and bind every volume into it; return the root.
        Counted: each mount needs its umount."""
        with self.store.locked(), self.volumes.locked():
            row = self._row(name)
            mounts: list[MountPoint] = row["mounts"]
            if row["mount_count"] and all(mp.bound for mp in mounts):
                self.records.update(name, mount_count=row["mount_count"] + 1)
                return Path(row["root"])
            if row["mount_count"]:  # a umount that failed half-way: finish it first
                self._teardown(name, row)
            for mp in mounts:
                mp.bound, mp.target = False, None
            # the layer reference and its record commit together: never one without the other
            # (the layer's mount is marked before, for the open after a crash to find it)
            if isinstance(self.store.driver, KernelMounts):
                self.store.mark_mounting(row["layer"])
            with self.meta.transaction():
                root = self.store.get(row["layer"])
                faults.point("containers.mount.after-get")
                self.records.update(name, mount_count=1, root=str(root), mounts=mounts)
            faults.point("containers.mount.after-layer")
            try:
                for path in mounts_under(root):
                    if path != os.path.realpath(root):
                        log.warning("unmounting %s in container %s: no mount records it",
                                    path, name)  # fmt: skip
                        unmount(path, retries=20)
                for mp in mounts:
                    self._bind_one(name, str(root), mp)
                    faults.point("containers.mount.after-bind")
                    self.records.update(name, mounts=mounts)
            except BaseException:
                try:
                    self._teardown(name, self._row(name))
                except Exception:  # the error that got us here is the one to report
                    log.exception("undoing the mount of container %s failed", name)
                raise
            return root

    def _volume_source(self, name: str, mp: MountPoint) -> str:
        if mp.type == "bind":
            if not os.path.exists(mp.source):
                raise InvalidMountSpec(
                    f"bind source {mp.source} of container {name!r} no longer exists"
                )
            return mp.source  # checked again, race-free, on the fd that is bound
        if self.volumes.find(mp.source) is None:  # removed with volume rm -f
            log.warning("volume %s of container %s was removed; making it again", mp.source, name)
            self.volumes.create(mp.source, anonymous=mp.anonymous)
        path = self.volumes.mount(mp.source, self._key(name))
        faults.point("containers.mount.after-volume")
        return str(path)

    def _bind_one(self, name: str, root: str, mp: MountPoint) -> None:
        self._not_the_root(name, root, mp.destination)
        source = self._volume_source(name, mp)
        try:
            if mp.type == "volume" and mp.copy and not mp.copied:
                self._copy_image_content(root, mp.destination, source)
                mp.copied = True
            src = os.open(source, os.O_PATH | os.O_CLOEXEC)
            try:
                if mp.type == "bind":  # what the path names now, not at create
                    self._check_bind(f"{mp.source}:{mp.destination}", mp.source, src)
                kind = "dir" if stat.S_ISDIR(os.fstat(src).st_mode) else "file"
                fd = bind.open_in_root(root, mp.destination, create=kind)
                assert fd is not None
                try:
                    there = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
                    if there != kind:  # (the kernel's EINVAL would say nothing of why)
                        raise InvalidMountSpec(
                            f"cannot mount {mp.source} at {mp.destination} in container "
                            f"{name!r}: it is a {_KIND[kind]}, and the image has a "
                            f"{_KIND[there]} there"
                        )
                    mp.target = bind.fd_path(fd)
                    bind.bind(src, fd, readonly=not mp.rw)
                    mp.bound = True
                finally:
                    os.close(fd)
            finally:
                os.close(src)
        except OSError as exc:
            raise from_oserror(exc, f"mount {mp.source} at {mp.destination} in {name}") from exc

    @staticmethod
    def _not_the_root(name: str, root: str, destination: str) -> None:
        """Refuse a destination that resolves to the container's root itself (a symlink in the
        image, ``-> /``, ``-> .`` or ``-> ../..``, or one a container wrote into a volume that a
        nested volume's path goes through), as Docker refuses ``/``: bound there, the volume
        would hide the whole root filesystem, and take a copy of it at its first mount."""
        fd = bind.open_in_root(root, destination)
        if fd is None:
            return
        try:
            here, top = os.fstat(fd), os.stat(root)
        finally:
            os.close(fd)
        if (here.st_dev, here.st_ino) == (top.st_dev, top.st_ino):
            raise InvalidMountSpec(
                f"volume {destination} of container {name!r} resolves to the container's root "
                "(through a symlink); a volume cannot be mounted at '/'"
            )

    @staticmethod
    def _copy_image_content(root: str, destination: str, volume_dir: str) -> None:
        """Docker's copy-up: an empty volume gets what the image has at its path."""
        fd = bind.open_in_root(root, destination)
        if fd is None:
            return
        try:
            real = bind.fd_path(fd)
            if not os.path.isdir(real) or os.listdir(volume_dir):
                return
            try:
                copy_tree(real, volume_dir, into=True)
            except BaseException:
                # the volume was empty: leave it so, or the next mount would not copy again
                for entry in os.scandir(volume_dir):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
                raise
        finally:
            os.close(fd)

    def _teardown(self, name: str, row: dict[str, Any]) -> None:
        """Undo a container mount, whatever part of it is in place: the binds (deepest first),
        the volumes' mounts, the layer reference. The binds are marked gone first, so a crash
        on the way is finished at the next open. Used by umount, a failed mount, rm -f,
        cleanup and recovery."""
        mounts: list[MountPoint] = row["mounts"]
        if any(mp.bound for mp in mounts):
            for mp in mounts:
                mp.bound = False
            self.records.update(name, mounts=mounts)
            faults.point("containers.umount.after-mark")
        try:
            if row["root"]:
                base = os.path.realpath(row["root"])
                for path in mounts_under(base):
                    if path != base:
                        _unbind(path, name)
            faults.point("containers.umount.after-unbind")
        except OSError as exc:
            raise from_oserror(exc, f"unmount container {name}") from exc
        for mp in mounts:
            if mp.type == "volume":
                self.volumes.unmount(mp.source, self._key(name))
        faults.point("containers.umount.after-volumes")
        layer = self.meta.get(row["layer"])
        with self.meta.transaction():  # the reference goes with its record, as it came
            if layer is not None and layer.state == "ready" and layer.mount_count:
                self.store.put(row["layer"], container=True)
            faults.point("containers.umount.after-put")
            self.records.update(name, mount_count=0, root=None, mounts=mounts)

    def unmount(self, name: str) -> None:
        """Release one mount of the container; the last one unbinds the volumes (deepest
        first) and unmounts the root filesystem. On a full disk the store's reserve is
        given back first, to record it."""
        with self.store.locked(), self.volumes.locked():
            row = self._row(name)
            if not row["mount_count"]:
                raise NotMounted(f"container {name!r} is not mounted")
            reserve.release_if_full(self.store.root, self.store.home)
            if row["mount_count"] > 1 and all(mp.bound for mp in row["mounts"]):
                self.records.update(name, mount_count=row["mount_count"] - 1)
                return
            self._teardown(name, row)


_KIND = {"dir": "directory", "file": "file"}


def _unbind(path: str, name: str) -> None:
    """Unmount a bind of container *name*; one still busy after a few tries (a shell whose
    working directory is in it) is detached lazily, as Docker detaches a container's mounts,
    and the umount goes on: the process keeps what it had open, and the container comes
    apart whole rather than half."""
    try:
        unmount(path, retries=20)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        log.warning("%s in container %s is busy; detaching it lazily", path, name)
        unmount(path, MNT_DETACH)
