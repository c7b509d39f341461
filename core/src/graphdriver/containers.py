"""Containers: a read-write layer on an image, plus the volumes bound into it.

A container is recorded in its layer store's metadata (table ``containers``) with the mount
points worked out at create, in Docker's order: ``--volumes-from`` first, then ``-v`` specs
(which override them), then the volumes the image declares (where nothing else is mounted).
Managed volumes live in the root's :class:`~graphdriver.volumes.VolumeStore`, which counts the
containers that reference each one.

``container mount`` mounts the layer, then binds every volume at its path *inside* the root
filesystem (resolved by the kernel with the root as ``/``, so no symlink in the image can send a
mount to the host), filling an empty managed volume with the image's content at that path the
first time. ``container umount`` undoes it, deepest mount first.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import faults
from .errors import (
    AlreadyExists,
    ContainerNotFound,
    GraphDriverError,
    InUse,
    InvalidMountSpec,
    NotMounted,
    from_oserror,
)
from .linux import bind
from .linux.copy import copy_tree
from .linux.mount import mounts_under, unmount
from .store import LayerStore, validate_id
from .volumes import DEFAULT_VOLUME_DRIVER, VolumeStore, anonymous_name

log = logging.getLogger(__name__)

CONTAINER_LABEL = "graphdriver.container"
_MODES = ("ro", "rw", "nocopy")


@dataclass
class MountPoint:
    """One volume or bind of a container."""

    destination: str
    #: "volume" (managed, by name) or "bind" (a host path)
    type: str
    #: the volume's name, or the host path of a bind
    source: str
    rw: bool = True
    #: "cli", "image" or "volumes-from:<container>"
    origin: str = "cli"
    anonymous: bool = False
    #: fill an empty volume with the image's content at the destination on first mount
    copy: bool = True
    copied: bool = False


def parse_spec(spec: str) -> MountPoint:
    """``NAME:/path[:MODE]``, ``/host/dir:/path[:MODE]`` or ``/path``; MODE is a comma list
    of ``ro``, ``rw``, ``nocopy``."""
    parts = spec.split(":")

    def bad(why: str) -> InvalidMountSpec:
        return InvalidMountSpec(f"invalid volume spec {spec!r}: {why}")

    if len(parts) > 3 or not all(parts):
        raise bad("use NAME:/path[:ro], /host/path:/path[:ro] or /path")
    modes: list[str] = []
    if len(parts) == 3:
        modes = parts[2].split(",")
        unknown = [m for m in modes if m not in _MODES]
        if unknown or ("ro" in modes and "rw" in modes):
            raise bad(f"mode {parts[2]!r} is not a comma list of {', '.join(_MODES)}")
    if len(parts) == 2 and set(parts[1].split(",")) <= set(_MODES):
        raise bad("a volume without a source takes no mode; use /path, or NAME:/path:MODE")
    try:
        destination = bind.container_path(parts[-1] if len(parts) < 3 else parts[1])
    except ValueError as exc:
        raise bad(f"the path inside the container {exc}") from None
    rw = "ro" not in modes
    copy = "nocopy" not in modes
    if len(parts) == 1:
        return MountPoint(destination, "volume", "", rw, anonymous=True, copy=copy)
    source = parts[0]
    if source.startswith("/"):
        if "nocopy" in modes:
            raise bad("nocopy is for volumes, not for binds")
        return MountPoint(destination, "bind", os.path.normpath(source), rw, copy=False)
    if source.startswith("."):
        raise bad("a bind source must be an absolute host path")
    try:
        validate_id(source, "volume name")
    except GraphDriverError as exc:
        raise bad(str(exc)) from None
    return MountPoint(destination, "volume", source, rw, copy=copy)


def _depth_order(mounts: Sequence[MountPoint]) -> list[MountPoint]:
    return sorted(mounts, key=lambda m: (m.destination.count("/"), m.destination))


class ContainerStore:
    """Containers of one layer store, with the root's volumes."""

    def __init__(self, store: LayerStore) -> None:
        self.store = store
        self.meta = store.meta
        self._volumes: VolumeStore | None = None
        with self.store._locked():
            self._recover()

    @property
    def volumes(self) -> VolumeStore:
        if self._volumes is None:
            self._volumes = VolumeStore(self.store.root)
        return self._volumes

    def close(self) -> None:
        if self._volumes is not None:
            self._volumes.close()

    def _key(self, name: str) -> str:
        return f"{self.store.name}:{name}"

    # ------------------------------------------------------------------------------- records

    def _row(self, name: str, *, any_state: bool = False) -> dict[str, Any]:
        validate_id(name, "container name")
        row = self.meta.db.execute("SELECT * FROM containers WHERE name=?", (name,)).fetchone()
        if row is None or (row["state"] != "ready" and not any_state):
            raise ContainerNotFound(f"container {name!r} does not exist")
        out = dict(row)
        out["mounts"] = [MountPoint(**m) for m in json.loads(row["mounts"])]
        return out

    def _update(self, name: str, **fields: Any) -> None:
        if "mounts" in fields:
            fields["mounts"] = json.dumps([asdict(m) for m in fields["mounts"]])
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.meta.transaction():
            self.meta.db.execute(
                f"UPDATE containers SET {cols} WHERE name=?",  # noqa: S608
                [*fields.values(), name],
            )

    def names(self) -> list[str]:
        rows = self.meta.db.execute(
            "SELECT name FROM containers WHERE state='ready' ORDER BY created, name"
        )
        return [r[0] for r in rows]

    def inspect(self, name: str) -> dict[str, Any]:
        row = self._row(name)
        mounts = []
        for mp in row["mounts"]:
            item: dict[str, Any] = {
                "Type": mp.type,
                "Destination": mp.destination,
                "RW": mp.rw,
                "Origin": mp.origin,
            }
            if mp.type == "volume":
                rec = self.volumes.find(mp.source)
                item["Name"] = mp.source
                item["Anonymous"] = mp.anonymous
                item["Driver"] = rec.driver if rec else None
                item["Source"] = (
                    str(self.volumes.driver(rec.driver).path(rec.name, rec.options))
                    if rec
                    else None
                )
            else:
                item["Source"] = mp.source
            mounts.append(item)
        return {
            "Name": row["name"],
            "Image": row["image"],
            "Layer": row["layer"],
            "Driver": self.store.name,
            "Created": datetime.datetime.fromtimestamp(row["created"], datetime.UTC).isoformat(),
            "Mounted": bool(row["mount_count"]),
            "MountCount": row["mount_count"],
            "Root": row["root"],
            "Mounts": mounts,
        }

    # ------------------------------------------------------------------------------- create

    def _plan(
        self,
        name: str,
        image: str,
        specs: Sequence[str],
        volumes_from: Sequence[str],
    ) -> list[MountPoint]:
        """The container's mount points, in Docker's precedence."""
        planned: dict[str, MountPoint] = {}
        for item in volumes_from:
            other, _, mode = item.partition(":")
            if mode not in ("", "ro", "rw"):
                raise InvalidMountSpec(f"invalid --volumes-from {item!r}: the mode is ro or rw")
            if other == name:
                raise InvalidMountSpec(f"container {name!r} cannot take volumes from itself")
            for mp in self._row(other)["mounts"]:
                planned[mp.destination] = MountPoint(
                    mp.destination,
                    mp.type,
                    mp.source,
                    mp.rw if not mode else mode == "rw",
                    origin=f"volumes-from:{other}",
                    anonymous=mp.anonymous,
                    copy=False,
                )
        given: set[str] = set()
        for spec in specs:
            mp = parse_spec(spec)
            if mp.destination in given:
                raise InvalidMountSpec(f"duplicate mount point {mp.destination} in {spec!r}")
            given.add(mp.destination)
            if mp.type == "bind":
                self._check_bind(spec, mp.source)
            planned[mp.destination] = mp
        layers = [self.store._ready(image, "image"), *self.meta.chain(image)]
        for path in sorted({p for rec in layers for p in rec.volumes}):
            if path not in planned:
                planned[path] = MountPoint(path, "volume", "", origin="image", anonymous=True)
        for mp in planned.values():
            if mp.type == "volume" and not mp.source:
                mp.source = anonymous_name()
        return _depth_order(list(planned.values()))

    def _check_bind(self, spec: str, source: str) -> None:
        if not os.path.exists(source):
            raise InvalidMountSpec(
                f"invalid volume spec {spec!r}: bind source {source} does not exist"
            )
        real = os.path.realpath(source)
        root = os.path.realpath(self.store.root)
        if real == root or real.startswith(root.rstrip("/") + "/"):
            raise InvalidMountSpec(
                f"invalid volume spec {spec!r}: {source} is inside the graphdriver root "
                f"{root}; a container must not reach the store's own files"
            )

    def create(
        self,
        name: str,
        image: str,
        specs: Sequence[str] = (),
        volumes_from: Sequence[str] = (),
        *,
        volume_driver: str = DEFAULT_VOLUME_DRIVER,
    ) -> dict[str, Any]:
        """Make the container's read-write layer on *image* and record its mounts; named
        volumes that do not exist yet are created with *volume_driver*."""
        validate_id(name, "container name")
        with self.store._locked(), self.volumes.locked():
            exists = self.meta.db.execute(
                "SELECT 1 FROM containers WHERE name=?", (name,)
            ).fetchone()
            if exists:
                raise AlreadyExists(f"container {name!r} already exists")
            mounts = self._plan(name, image, specs, volumes_from)
            self.volumes.driver(volume_driver)  # an unknown driver fails before anything is made
            layer = anonymous_name()
            with self.meta.transaction():
                self.meta.db.execute(
                    "INSERT INTO containers (name, layer, image, state, created, mounts) "
                    "VALUES (?, ?, ?, 'creating', ?, ?)",
                    (name, layer, image, time.time(), json.dumps([asdict(m) for m in mounts])),
                )
            try:
                self.store.create(layer, image, rw=True, labels={CONTAINER_LABEL: name})
                for mp in mounts:
                    if mp.type != "volume":
                        continue
                    have = self.volumes.find(mp.source)
                    if have is None:
                        self.volumes.create(
                            mp.source,
                            volume_driver if mp.origin == "cli" else DEFAULT_VOLUME_DRIVER,
                            anonymous=mp.anonymous,
                        )
                    self.volumes.add_ref(mp.source, self._key(name))
                faults.point("containers.create.after-volumes")
            except BaseException:
                self._undo(name, layer, mounts, remove_anonymous=True)
                raise
            self._update(name, state="ready")
        return self.inspect(name)

    def _undo(
        self, name: str, layer: str, mounts: Sequence[MountPoint], *, remove_anonymous: bool
    ) -> None:
        """Remove the container's layer, references and (if asked) its anonymous volumes that
        nothing else uses; then its record. Used by rm, a failed create and recovery."""
        if self.store.exists(layer):
            self.store.remove(layer)
        self.volumes.drop_refs(self._key(name))
        if remove_anonymous:
            for mp in mounts:
                if mp.type != "volume" or not mp.anonymous or self.volumes.find(mp.source) is None:
                    continue
                users = self.volumes.users(mp.source)
                if users:
                    log.warning(
                        "kept anonymous volume %s: container(s) %s still use it",
                        mp.source,
                        ", ".join(u.split(":", 1)[1] for u in users),
                    )
                    continue
                self.volumes.remove(mp.source)
        with self.meta.transaction():
            self.meta.db.execute("DELETE FROM containers WHERE name=?", (name,))

    def _recover(self) -> None:
        """Finish what a killed process left half-done; forget mounts that are gone."""
        for name in self.names():
            row = self._row(name)
            layer = self.meta.get(row["layer"])
            if row["mount_count"] and layer is not None and not layer.mount_count:
                log.warning("container %s was counted as mounted but is not", name)
                with self.volumes.locked():
                    self._unbind(row["root"], row["mounts"])
                self._update(name, mount_count=0, root=None)
        rows = self.meta.db.execute("SELECT name FROM containers WHERE state!='ready'").fetchall()
        for (name,) in rows:
            row = self._row(name, any_state=True)
            log.warning("finishing container %s left %s by a process that died", name, row["state"])
            with self.volumes.locked():
                self._undo(
                    name,
                    row["layer"],
                    row["mounts"],
                    remove_anonymous=row["state"] == "creating" or bool(row["remove_volumes"]),
                )

    # ------------------------------------------------------------------------------- remove

    def remove(self, name: str, *, volumes: bool = False, force: bool = False) -> None:
        """Delete the container's read-write layer; its volumes stay, except with *volumes*
        its anonymous ones that no other container uses. A mounted container needs *force*."""
        with self.store._locked(), self.volumes.locked():
            row = self._row(name)
            if row["mount_count"]:
                if not force:
                    raise InUse(f"container {name!r} is mounted; umount it first, or use -f")
                while self._row(name)["mount_count"]:
                    self.unmount(name)
            self._update(name, state="removing", remove_volumes=int(volumes))
            self._undo(name, row["layer"], row["mounts"], remove_anonymous=volumes)

    # ------------------------------------------------------------------------------- mounts

    def mount(self, name: str) -> Path:
        """Mount the root filesystem and bind every volume into it; return the root.
        Counted: each mount needs its umount."""
        with self.store._locked(), self.volumes.locked():
            row = self._row(name)
            if row["mount_count"]:
                self._update(name, mount_count=row["mount_count"] + 1)
                return Path(row["root"])
            root = self.store.get(row["layer"])
            mounts: list[MountPoint] = row["mounts"]
            done: list[MountPoint] = []
            try:
                for mp in mounts:
                    self._bind_one(name, str(root), mp)
                    done.append(mp)
            except BaseException:
                self._unbind(str(root), done)
                self.store.put(row["layer"])
                raise
            self._update(name, mount_count=1, root=str(root), mounts=mounts)
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
        self.volumes.add_ref(mp.source, self._key(name))  # volume rm -f dropped it
        return str(self.volumes.mount(mp.source))

    def _bind_one(self, name: str, root: str, mp: MountPoint) -> None:
        source = self._volume_source(name, mp)
        try:
            doing = f"mount {mp.source} at {mp.destination} in container {name}"
            try:
                if mp.type == "volume" and mp.copy and not mp.copied:
                    self._copy_image_content(root, mp.destination, source)
                    mp.copied = True
                src = os.open(source, os.O_PATH | os.O_CLOEXEC)
                try:
                    if mp.type == "bind":  # what the path names now, not at create
                        self._check_bind(f"{mp.source}:{mp.destination}", bind.fd_path(src))
                    kind = "dir" if stat.S_ISDIR(os.fstat(src).st_mode) else "file"
                    fd = bind.open_in_root(root, mp.destination, create=kind)
                    assert fd is not None
                    try:
                        bind.bind(src, fd, readonly=not mp.rw)
                    finally:
                        os.close(fd)
                finally:
                    os.close(src)
            except OSError as exc:
                raise from_oserror(exc, doing) from exc
        except BaseException:
            if mp.type == "volume":
                self.volumes.unmount(mp.source)
            raise

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

    def _unbind(self, root: str, mounts: Sequence[MountPoint]) -> None:
        base = os.path.realpath(root)
        for mp_path in mounts_under(base):
            if mp_path != base:
                unmount(mp_path, retries=20)
        for mp in mounts:
            if mp.type == "volume":
                self.volumes.unmount(mp.source)

    def unmount(self, name: str) -> None:
        """Release one mount of the container; the last one unbinds the volumes (deepest
        first) and unmounts the root filesystem."""
        with self.store._locked(), self.volumes.locked():
            row = self._row(name)
            if not row["mount_count"]:
                raise NotMounted(f"container {name!r} is not mounted")
            if row["mount_count"] == 1:
                try:
                    self._unbind(row["root"], row["mounts"])
                except OSError as exc:
                    raise from_oserror(exc, f"unmount container {name}") from exc
                self.store.put(row["layer"])
            self._update(
                name,
                mount_count=row["mount_count"] - 1,
                root=row["root"] if row["mount_count"] > 1 else None,
            )

    def cleanup(self) -> None:
        """Unmount every container (whoever mounted it), then the store's layers."""
        with self.store._locked():
            for name in self.names():
                row = self._row(name)
                if row["mount_count"]:
                    self._unbind(row["root"], [])
                    self._update(name, mount_count=0, root=None)
                    with contextlib.suppress(GraphDriverError):
                        self.store.put(row["layer"])
            if (self.store.root / "volumes" / ".metadata.db").exists():
                self.volumes.cleanup()
            self.store.cleanup()
