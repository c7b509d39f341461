"""Containers: a read-write layer on an image, plus the volumes bound into it.

A container is recorded in its layer store's metadata (table ``containers``) with the mount
points worked out at create, in Docker's order: ``--volumes-from`` first, then ``-v`` specs
(which override them), then the volumes the image declares (where nothing else is mounted).
Managed volumes live in the root's :class:`~graphdriver.volumes.VolumeStore`, which counts the
containers that reference each one.

The rows belong to :mod:`.container_records`; mounting (``container mount``/``umount``) is
:mod:`.container_mounts`. Opening the store reconciles both ways: a recorded mount that is
incomplete or whose mounts are gone is undone and its references released; mounts in a
container's layer that no mount records are unmounted. So a killed command never leaves a
reference behind and a mount never stacks.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from functools import partial
from typing import Any

from . import faults, recovery, reserve
from .container_mounts import ContainerMounts
from .errors import (
    AlreadyExists,
    ContainerNotFound,
    GraphDriverError,
    InUse,
    InvalidMountSpec,
    InvalidOption,
    LayerInUse,
)
from .linux.mount import mountinfo, unmount
from .mount_points import MountPoint, depth_order, parse_spec
from .sqlite_readonly import is_frozen
from .store import LayerStore, validate_id
from .volumes import DEFAULT_VOLUME_DRIVER, VolumeStore, anonymous_name

log = logging.getLogger(__name__)

CONTAINER_LABEL = "graphdriver.container"


def _mountpoints() -> set[str]:
    return {e.mountpoint for e in mountinfo()}


class ContainerStore(ContainerMounts):
    """Containers of one layer store, with the root's volumes."""

    def __init__(self, store: LayerStore) -> None:
        self.store = store
        self.meta = store.meta
        #: the container rows, kept with the layers in the store's database
        self.records = store.meta.containers
        self._volumes: VolumeStore | None = None
        #: what recovery at this open could not fix, for ``status``
        self.recovery_failures: list[tuple[str, str]] = []
        # (looked at without the lock, then done under it; never from a database read as it
        # was on a full disk, which may be stale: sqlite_readonly)
        if not is_frozen(self.meta.db) and self._needs_recovery():
            with self.store.locked():
                self._recover()

    def opened_volumes(self) -> VolumeStore | None:
        """The root's volumes if a command of this store opened them, else None."""
        return self._volumes

    @property
    def volumes(self) -> VolumeStore:
        if self._volumes is None:
            self._volumes = VolumeStore(self.store.root, wait=self.store.wait)
        return self._volumes

    def close(self) -> None:
        if self._volumes is not None:
            self._volumes.close()

    def _key(self, name: str) -> str:
        return f"{self.store.name}:{name}"

    # ------------------------------------------------------------------------------- records

    def _row(self, name: str, *, any_state: bool = False) -> dict[str, Any]:
        validate_id(name, "container name")
        row = self.records.get(name)
        if row is None or (row["state"] != "ready" and not any_state):
            raise ContainerNotFound(f"container {name!r} does not exist")
        return row

    def _rows(self) -> list[dict[str, Any]]:
        return self.records.all()

    def _update(self, name: str, **fields: Any) -> None:
        self.records.update(name, **fields)

    def names(self) -> list[str]:
        """Names of the containers, oldest first."""
        return self.records.names()

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
        layers = [self.store.ready(image, "image"), *self.meta.chain(image)]
        for path in sorted({p for rec in layers for p in rec.volumes}):
            if path not in planned:
                planned[path] = MountPoint(path, "volume", "", origin="image", anonymous=True)
        for mp in planned.values():
            if mp.type == "volume" and not mp.source:
                mp.source = anonymous_name()
        return depth_order(list(planned.values()))

    def _check_creatable(self, image: str, mounts: Sequence[MountPoint], driver: str) -> None:
        """What would refuse the create half-way, refused before anything is recorded."""
        rec = self.store.ready(image, "image")
        if rec.rw:  # a container's own layer: it changes under this one whenever it is mounted
            owner = self.records.owner_of(image)
            whose = f"the read-write layer of container {owner!r}" if owner else "read-write"
            raise InvalidOption(
                f"image {image!r} is {whose}; a container's image must be an image layer"
            )
        if rec.mount_count:
            raise LayerInUse(
                f"image {image!r} is mounted, so its files can still change; unmount it before "
                f"creating a container on it"
            )
        for mp in mounts:
            if mp.type == "volume" and self.volumes.find(mp.source) is None:
                self.volumes.existing(mp.source, driver)

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
        with self.store.locked(), self.volumes.locked():
            if self.records.get(name) is not None:
                raise AlreadyExists(f"container {name!r} already exists")
            mounts = self._plan(name, image, specs, volumes_from)
            self.volumes.driver(volume_driver)  # an unknown driver fails before anything is made
            self._check_creatable(image, mounts, volume_driver)
            layer = anonymous_name()
            self.records.insert(name, layer, image, mounts)
            faults.point("containers.create.after-record")
            try:
                self.store.create(layer, image, rw=True, labels={CONTAINER_LABEL: name})
                faults.point("containers.create.after-layer")
                for mp in mounts:
                    if mp.type != "volume":
                        continue
                    if self.volumes.find(mp.source) is None:
                        self.volumes.create(
                            mp.source,
                            volume_driver if mp.origin == "cli" else DEFAULT_VOLUME_DRIVER,
                            anonymous=mp.anonymous,
                        )
                    self.volumes.add_ref(mp.source, self._key(name))
                faults.point("containers.create.after-volumes")
            except BaseException:
                try:
                    self._undo(name, layer, mounts, remove_anonymous=True)
                except Exception:  # the error that got us here is the one to report
                    log.exception("rolling back container %s failed; retried at next open", name)
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
        faults.point("containers.rm.after-layer")
        self.volumes.drop_refs(self._key(name))
        faults.point("containers.rm.after-refs")
        if remove_anonymous:
            for mp in mounts:
                if mp.type == "volume" and mp.anonymous:
                    self._remove_anonymous(mp.source)
        self.records.delete(name)

    def _remove_anonymous(self, volume: str) -> None:
        """Remove an anonymous volume nothing else uses; keep it, with a warning, otherwise."""
        rec = self.volumes.find(volume)
        if rec is None:
            return
        users = [u.split(":", 1)[1] for u in self.volumes.users(volume)]
        if users or rec.mount_count:
            log.warning("kept anonymous volume %s: container(s) %s still use it", volume,
                        ", ".join(users) or "?")  # fmt: skip
            return
        try:
            self.volumes.remove(volume)
        except GraphDriverError as exc:
            log.warning("kept anonymous volume %s: %s", volume, exc)

    # ----------------------------------------------------------------------------- recovery

    def _stale(self, row: dict[str, Any], mounted: set[str]) -> list[str]:
        """Mounts inside the layer of a container that no container mount records (deepest
        first): what a process that died between binding and recording left."""
        if row["mount_count"]:
            return []
        home = os.path.realpath(self.store.home) + "/"
        layer = self.meta.get(row["layer"])
        own = os.path.realpath(layer.mount_path) if layer and layer.mount_path else None
        found = [
            m
            for m in mounted
            if m.startswith(home) and row["layer"] in m[len(home) :].split("/") and m != own
        ]
        return sorted(found, key=lambda p: (p.count("/"), p), reverse=True)

    def _intact(self, row: dict[str, Any], mounted: set[str]) -> bool:
        """Whether a recorded mount is complete: its layer reference and every bind in place."""
        layer = self.meta.get(row["layer"])
        if layer is None or not layer.mount_count:
            return False
        return all(mp.bound and mp.target in mounted for mp in row["mounts"])

    def _needs_recovery(self) -> bool:
        mounted = _mountpoints()
        return any(
            row["state"] != "ready"
            or (row["mount_count"] and not self._intact(row, mounted))
            or self._stale(row, mounted)
            for row in self._rows()
        )

    def _recover(self) -> None:
        """Finish what a killed process left half-done and match container mounts to the
        mount table (store lock held). A container that fails to recover is logged and
        retried at the next open; it never stops commands on the others."""
        mounted = _mountpoints()
        self.recovery_failures = recovery.each(
            "container",
            self._rows(),
            lambda row: str(row["name"]),
            partial(self._recover_one, mounted),
        )

    def _recover_one(self, mounted: set[str], row: dict[str, Any]) -> None:
        name = row["name"]
        if row["state"] != "ready":
            log.warning("finishing container %s left %s by a process that died",
                        name, row["state"])  # fmt: skip
            with self.volumes.locked():
                self._undo(
                    name,
                    row["layer"],
                    row["mounts"],
                    remove_anonymous=row["state"] == "creating" or bool(row["remove_volumes"]),
                )
        elif row["mount_count"] and not self._intact(row, mounted):
            log.warning("container %s was left partly mounted; unmounting it", name)
            with self.volumes.locked():
                self._teardown(name, row)
        else:
            for path in self._stale(row, mounted):
                log.warning("unmounting %s in container %s: no mount records it", path, name)
                unmount(path, retries=20)

    # ------------------------------------------------------------------------------- remove

    def _check_removable(self, name: str, row: dict[str, Any], force: bool) -> None:
        if row["mount_count"] and not force:
            raise InUse(f"container {name!r} is mounted; umount it first, or use -f")
        layer = self.meta.get(row["layer"])
        if layer is None:
            return
        others = layer.mount_count - (1 if row["mount_count"] else 0)
        if others > 0:
            raise InUse(
                f"the read-write layer {layer.id} of container {name!r} is mounted outside the "
                f"container ({others} reference(s)); `graphdriver umount {layer.id}` first"
            )
        children = self.meta.children(layer.id)
        if children:
            raise InUse(
                f"layer(s) {', '.join(children[:5])} are made on the read-write layer of "
                f"container {name!r}; remove them first"
            )

    def remove(self, name: str, *, volumes: bool = False, force: bool = False) -> None:
        """Delete the container's read-write layer; its volumes stay, except with *volumes*
        its anonymous ones that no other container uses. A mounted container needs *force*.
        Everything that can refuse is checked before anything changes."""
        with self.store.locked(), self.volumes.locked():
            row = self._row(name)
            self._check_removable(name, row, force)
            reserve.release_if_full(self.store.root, self.store.home)  # on a full disk
            if row["mount_count"]:
                self._teardown(name, row)
            self._update(name, state="removing", remove_volumes=int(volumes))
            faults.point("containers.rm.after-mark")
            try:
                self._undo(name, row["layer"], row["mounts"], remove_anonymous=volumes)
            except BaseException:
                if self.store.exists(row["layer"]):  # nothing was removed: the container stays
                    self._update(name, state="ready", remove_volumes=0)
                raise

    def cleanup(self) -> None:
        """Unmount every container (whoever mounted it), then the store's layers."""
        failed: BaseException | None = None
        kept: set[str] = set()  # containers still mounted: their volumes stay theirs
        with self.store.locked():
            for row in self._rows():
                if row["state"] == "ready" and row["mount_count"]:
                    try:
                        self._teardown(row["name"], row)
                    except (GraphDriverError, OSError) as exc:
                        log.warning("container %s: %s", row["name"], exc)
                        failed = failed or exc
                        kept.add(self._key(row["name"]))
            if (self.store.root / "volumes" / ".metadata.db").exists():
                self.volumes.cleanup(self._key(""), kept)
            self.store.cleanup()
        if failed is not None:
            raise failed
