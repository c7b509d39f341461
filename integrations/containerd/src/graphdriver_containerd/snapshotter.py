"""containerd's snapshot model on a LayerStore.

Every snapshot is a layer of its own (``ctd-<random>``, labelled ``graphdriver.containerd``):

- ``Prepare(key, parent)`` creates a read-write layer on the parent's layer and returns the
  mounts containerd makes itself: the driver's :class:`~graphdriver.MountSpec` (overlay: the
  overlay or bind containerd's own overlayfs snapshotter returns), or else a bind of a mount
  this proxy holds (``LayerStore.get``: vfs and btrfs directories, devmapper's mounted thin
  device, any third-party driver, an overlay chain past one page of options);
- ``View`` is the same, read-only;
- ``Commit(name, key)`` turns the active snapshot's layer into an image layer in place
  (``LayerStore.commit``): nothing is copied;
- ``Remove`` refuses a snapshot with children, then removes its layer;
- ``Cleanup`` finishes removals that failed and removes layers of ours that no key names.

The store is driven by one thread (a LayerStore and its SQLite connection belong to the thread
that opened them; its lock serialises changes anyway); Stat, List, Update and Mounts read the
catalogue only (Mounts of a held snapshot whose store mount a reboot took away mounts it
again), so they are answered while a long Prepare (a vfs copy) runs. Usage walks a layer (CRI
asks every few seconds) on a second store of its own: it takes the store's lock only to take
its references, so a walk holds up no Prepare, Commit or Remove.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from graphdriver import (
    GraphDriverError,
    InvalidLayerId,
    InvalidOption,
    KernelMounts,
    LayerExists,
    LayerInUse,
    LayerNotFound,
    LayerStore,
    MaxDepthExceeded,
    MountEntry,
    NotMounted,
    faults,
    open_store,
    serving,
)
from graphdriver.toolkit import release_reserve_if_full

from .catalog import Catalog, Snapshot, mounts_json
from .filters import Filter, FilterError, snapshot_fields
from .status import OWNER_LABEL, proxy_of

log = logging.getLogger("graphdriver.containerd")

#: containerd's limit on one label's key and value together
MAX_LABEL = 4096
KINDS = ("active", "view", "committed")

T = TypeVar("T")


class SnapshotError(GraphDriverError):
    """An error with the gRPC status code containerd expects (``code`` is its name); a
    GraphDriverError, so that one met while the proxy starts is one line on stderr."""

    code = "UNKNOWN"


class NotFoundError(SnapshotError):
    code = "NOT_FOUND"


class AlreadyExistsError(SnapshotError):
    code = "ALREADY_EXISTS"


class FailedPreconditionError(SnapshotError):
    code = "FAILED_PRECONDITION"


class InvalidArgumentError(SnapshotError):
    code = "INVALID_ARGUMENT"


class ResourceExhaustedError(SnapshotError):
    code = "RESOURCE_EXHAUSTED"


def translate(exc: BaseException) -> SnapshotError:
    """A graphdriver or OS error as the SnapshotError containerd's logic understands."""
    if isinstance(exc, SnapshotError):
        return exc
    if isinstance(exc, LayerNotFound):
        return NotFoundError(str(exc))
    if isinstance(exc, LayerExists):
        return AlreadyExistsError(str(exc))
    if isinstance(exc, LayerInUse):
        return FailedPreconditionError(str(exc))
    if isinstance(exc, InvalidOption | InvalidLayerId):
        return InvalidArgumentError(str(exc))
    if isinstance(exc, MaxDepthExceeded):  # containerd's own: a chain its mounts cannot take
        return FailedPreconditionError(str(exc))
    # an OSError's, or a full database's StoreError (its errno), or the cause's
    if any(getattr(e, "errno", None) in _FULL for e in (exc, exc.__cause__)):
        return ResourceExhaustedError(str(exc))
    return SnapshotError(str(exc) or type(exc).__name__)


_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Info:
    """What Stat, List and Update answer."""

    name: str
    kind: str
    parent: str
    labels: Mapping[str, str]
    created_ns: int
    updated_ns: int


def _info(snap: Snapshot) -> Info:
    return Info(
        name=snap.key,
        kind=snap.kind,
        parent=snap.parent or "",
        labels=dict(snap.labels),
        created_ns=snap.created_ns,
        updated_ns=snap.updated_ns,
    )


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """*labels* checked as containerd checks them, without those of empty value: containerd's
    own store (``boltutil.writeMap``) drops them, so that ``labels.x`` of a filter does not
    match a label set to ""; an Update that sets one to "" removes it."""
    for key, value in labels.items():
        if not key:
            raise InvalidArgumentError("label key must not be empty")
        if len(key.encode()) + len(value.encode()) > MAX_LABEL:
            raise InvalidArgumentError(
                f"label key and value greater than maximum size ({MAX_LABEL} bytes), key: "
                f"{key[:64]!r}"
            )
    return {key: value for key, value in labels.items() if value}


def _now_ns() -> int:
    return time.time_ns()


class Snapshotter:
    """containerd's Snapshotter on the store at *root* with *driver* (see the module doc)."""

    def __init__(
        self, root: Path, driver: str | None, options: Mapping[str, str], wait: float | None
    ) -> None:
        self._writer = serving.StoreThread(
            "store", lambda: open_store(root, driver, options, wait=wait)
        )
        self.store: LayerStore = self._writer.store
        try:
            self._reader = serving.StoreThread(
                "usage", lambda: open_store(root, self.store.name, options, wait=wait)
            )
        except BaseException:
            self._writer.close()
            raise
        self.reader: LayerStore = self._reader.store
        try:
            self.catalog = Catalog(root / "containerd" / self.store.name / "snapshots.db")
        except BaseException:
            self._close_stores()
            raise
        self.kernel_mounts = isinstance(self.store.driver, KernelMounts)
        self.home_dev = os.stat(self.store.home).st_dev
        proxy_of(self.store.root)  # its removals and unmounts are containerd's: not refused
        try:
            self.recover()
        except BaseException:
            self.close()
            raise

    def _close_stores(self) -> None:
        self._reader.close()
        self._writer.close()

    def close(self) -> None:
        proxy_of(self.store.root, on=False)
        self.catalog.close()
        self._close_stores()

    def _on_store(
        self, fn: Callable[[], T], owner: serving.StoreThread[LayerStore] | None = None
    ) -> T:
        """Run *fn* on the store's thread (or *owner*'s); errors come back as SnapshotErrors."""
        try:
            return (owner or self._writer).call(fn)
        except SnapshotError:
            raise
        except (GraphDriverError, OSError) as exc:
            log.debug("store error", exc_info=True)
            raise translate(exc) from exc

    # ------------------------------------------------------------------------ lookups

    def _get(self, key: str, what: str = "snapshot") -> Snapshot:
        snap = self.catalog.get(key)
        if snap is None or snap.state == "preparing":
            raise NotFoundError(f"{what} {key!r} does not exist")
        return snap

    def stat(self, key: str) -> Info:
        return _info(self._get(key))

    def walk(self, filters: Sequence[str]) -> Iterator[Info]:
        try:
            match = Filter(filters)
        except FilterError as exc:
            raise InvalidArgumentError(str(exc)) from None
        for snap in self.catalog.all(state=None):
            if snap.state == "preparing":
                continue
            fields = snapshot_fields(snap.key, snap.kind, snap.parent or "", snap.labels)
            if match.match(fields):
                yield _info(snap)

    def mounts(self, key: str) -> list[MountEntry]:
        snap = self._get(key)
        if snap.kind == "committed":
            raise FailedPreconditionError(
                f"snapshot {key!r} is committed: only active and view snapshots have mounts"
            )
        if snap.held and not self._still_mounted(snap):
            return self._hold(snap)  # a reboot or `graphdriver cleanup` took the mount away
        return snap.mounts

    def usage(self, key: str) -> tuple[int, int]:
        snap = self._get(key)
        if snap.kind == "committed" and snap.size is not None and snap.inodes is not None:
            return snap.size, snap.inodes
        return self._on_store(lambda: self.reader.usage(snap.layer), self._reader)

    # ------------------------------------------------------------------------ changes

    def prepare(
        self, key: str, parent: str, labels: Mapping[str, str], readonly: bool = False
    ) -> list[MountEntry]:
        """Prepare (or, *readonly*, View) *key* on the committed snapshot *parent*."""
        if not key:
            raise InvalidArgumentError("snapshot key must not be empty")
        labels = check_labels(labels)
        now = _now_ns()
        snap = Snapshot(
            key=key,
            kind="view" if readonly else "active",
            parent=parent or None,
            layer=f"ctd-{secrets.token_hex(12)}",
            state="preparing",
            created_ns=now,
            updated_ns=now,
            labels=labels,
        )
        with self.catalog.transaction():
            if self.catalog.taken(key):
                raise AlreadyExistsError(f"snapshot {key!r} already exists")
            parent_layer = None
            if parent:
                above = self.catalog.get(parent)
                if above is None or above.state == "preparing":
                    raise NotFoundError(f"parent snapshot {parent!r} does not exist")
                if above.kind != "committed":
                    raise InvalidArgumentError(
                        f"parent {parent!r} is not a committed snapshot (it is {above.kind})"
                    )
                if above.state != "ready":
                    raise FailedPreconditionError(
                        f"parent {parent!r} is still being committed; try again"
                    )
                parent_layer = above.layer
            self.catalog.insert(snap)
        try:
            mounts, held = self._on_store(
                lambda: self._make_layer(snap.layer, parent_layer, readonly)
            )
            faults.point("containerd.prepare.after-layer")
            self.catalog.update(key, state="ready", mounts=mounts_json(mounts), held=int(held))
        except BaseException:
            self._undo_prepare(snap)
            raise
        return mounts

    def _make_layer(
        self, layer: str, parent: str | None, readonly: bool
    ) -> tuple[list[MountEntry], bool]:
        """On the store thread: the layer, and the mounts containerd gets for it."""
        self.store.create(layer, parent, rw=True, labels={OWNER_LABEL: "snapshot"})
        try:
            spec = self.store.mount_spec(layer, readonly=readonly)
            if spec is not None:
                return spec, False
            return _bind(self.store.get(layer), readonly), True
        except BaseException:
            self._drop_layer(layer, held=False)
            raise

    def _hold(self, snap: Snapshot) -> list[MountEntry]:
        """The bind of the store mount a held snapshot needs, mounted again if a reboot or
        `graphdriver cleanup` took it away; the proxy keeps one reference (``get``, and
        ``put`` of the extra one when it had one already)."""

        def run() -> list[MountEntry]:
            count = self._mount_count(snap.layer)
            path = self.store.get(snap.layer)  # mounts again where the mount is gone
            if count:
                self.store.put(snap.layer)  # the reference it had is still counted
            return _bind(path, snap.kind == "view")

        mounts = self._on_store(run)
        if mounts != snap.mounts:
            self.catalog.update(snap.key, mounts=mounts_json(mounts))
        return mounts

    def _still_mounted(self, snap: Snapshot) -> bool:
        """Whether the store mount a held snapshot's bind names is there: always for a driver
        without real mounts (vfs, btrfs: a directory); else the source is on another device
        than the store's home (an overlay, a thin device's filesystem), not the bare dir."""
        if not self.kernel_mounts:
            return True
        try:
            return os.stat(snap.mounts[0].source).st_dev != self.home_dev
        except (OSError, IndexError):
            return False

    def _mount_count(self, layer: str) -> int:
        return int(str(self.store.metadata(layer)["mount_count"]))

    def _undo_prepare(self, snap: Snapshot) -> None:
        try:
            self._on_store(lambda: self._drop_layer(snap.layer, held=True))
        except SnapshotError as exc:
            log.warning(
                "could not remove half-made snapshot %r (layer %s): %s", snap.key, snap.layer, exc
            )
            with self.catalog.transaction():
                self.catalog.add_removal(snap.layer, True)
        self.catalog.delete(snap.key)

    def _drop_layer(self, layer: str, held: bool) -> None:
        """On the store thread: release the mounts this proxy holds on *layer* and remove it;
        a layer already gone is fine."""
        if not self.store.exists(layer):
            return  # gone, or a removal the store itself finishes at its next open
        if held:
            for _ in range(self._mount_count(layer)):
                try:
                    self.store.put(layer)
                except NotMounted:
                    break
        self.store.remove(layer)

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        if not name:
            raise InvalidArgumentError("snapshot name must not be empty")
        labels = check_labels(labels)
        now = _now_ns()
        with self.catalog.transaction():
            # in containerd's own order: the name taken, the key missing, the key not active
            if self.catalog.taken(name):
                raise AlreadyExistsError(f"snapshot {name!r} already exists")
            snap = self._get(key)
            if snap.kind != "active":
                raise FailedPreconditionError(
                    f"snapshot {key!r} is {snap.kind}, not active: only an active snapshot "
                    f"can be committed"
                )
            # the row takes the name now; its active_key keeps the key taken until it is done
            self.catalog.update(
                key,
                key=name,
                kind="committed",
                state="committing",
                labels=labels,
                created_ns=now,
                updated_ns=now,
                active_key=key,
            )
        try:
            faults.point("containerd.commit.recorded")
            self._finish_commit(name, snap.layer, snap.held)
        except BaseException:
            self._undo_commit(name, snap)
            raise

    def _undo_commit(self, name: str, snap: Snapshot) -> None:
        """The store refused the commit: the layer is still the active snapshot's; give
        containerd its key back (``_finish_commit`` took the proxy's mount again)."""
        with self.catalog.transaction():
            self.catalog.update(
                name,
                key=snap.key,
                kind="active",
                state="ready",
                labels=snap.labels,
                created_ns=snap.created_ns,
                updated_ns=snap.updated_ns,
                active_key=None,
            )

    def _finish_commit(self, name: str, layer: str, held: bool) -> None:
        def run() -> tuple[int | None, int | None]:
            released = held and self._mount_count(layer) > 0
            if released:
                self.store.put(layer)
            try:
                self.store.commit(layer)
            except BaseException:
                if released:  # the snapshot stays active: its bind needs the mount again
                    self.store.get(layer)
                raise
            try:
                faults.point("containerd.commit.after-store")
                return self.store.usage(layer)
            except (GraphDriverError, OSError) as exc:  # the commit stands: Usage computes it
                log.warning("usage of committed layer %s: %s; computed when asked", layer, exc)
                return None, None

        size, inodes = self._on_store(run)
        self.catalog.update(
            name, state="ready", held=0, mounts="[]", size=size, inodes=inodes, active_key=None
        )

    def _make_room(self) -> None:
        """Before a removal writes the catalogue: where the disk is full (a container filled
        it), give back the reserve, or the removal that would free the disk cannot be
        recorded (the store's own removal gives it back for its records)."""
        release_reserve_if_full(self.store.root, self.catalog.path.parent)

    def remove(self, key: str) -> None:
        self._make_room()
        with self.catalog.transaction():
            snap = self._get(key)
            if snap.state != "ready":
                raise FailedPreconditionError(
                    f"snapshot {key!r} is still being committed; try again"
                )
            children = self.catalog.children(key)
            if children:
                shown = ", ".join(repr(c) for c in children[:3])
                raise FailedPreconditionError(
                    f"cannot remove snapshot {key!r}: it has children ({shown})"
                )
            self.catalog.add_removal(snap.layer, snap.held)
            self.catalog.delete(key)
        self._finish_removal(snap.layer, snap.held)

    def _finish_removal(self, layer: str, held: bool) -> bool:
        try:
            self._on_store(lambda: self._drop_layer(layer, held))
        except SnapshotError as exc:
            log.warning("removing layer %s failed (%s); Cleanup retries it", layer, exc)
            return False
        self.catalog.drop_removal(layer)
        return True

    def update(self, name: str, labels: Mapping[str, str], paths: Sequence[str]) -> Info:
        labels = check_labels(labels)
        with self.catalog.transaction():
            snap = self._get(name)
            new = dict(snap.labels)
            if not paths:
                new = dict(labels)
            for path in paths:
                if path == "labels":
                    new = dict(labels)
                elif path.startswith("labels."):
                    label = path[len("labels.") :]
                    if label in labels:
                        new[label] = labels[label]
                    else:
                        new.pop(label, None)
                else:
                    raise InvalidArgumentError(
                        f"cannot update {path!r} field on snapshot {name!r}: only labels "
                        f"(labels, labels.<key>) can change"
                    )
            self.catalog.update(name, labels=new, updated_ns=_now_ns())
        return self.stat(name)

    # ------------------------------------------------------------------------ housekeeping

    def cleanup(self) -> None:
        """Finish failed removals; remove layers of ours that no snapshot names."""
        self._make_room()
        for layer, held in self.catalog.removals():
            self._finish_removal(layer, held)

        def orphans() -> list[str]:
            # on the store thread, which makes every layer: a Prepare whose row is not read
            # here has not made its layer yet
            known = self.catalog.layers()
            found = []
            for layer in self.store.layers():
                if layer in known or not layer.startswith("ctd-"):
                    continue
                labels = self.store.metadata(layer).get("labels") or {}
                if isinstance(labels, dict) and OWNER_LABEL in labels:
                    found.append(layer)
            return found

        for layer in self._on_store(orphans):
            log.info("removing layer %s: no snapshot names it", layer)
            self._finish_removal(layer, held=True)

    def recover(self) -> None:
        """Finish or undo what a stopped proxy left (see catalog's module doc), and mount again
        what held snapshots need after a reboot. A snapshot that cannot be put right is
        logged and left as it is: the proxy still starts."""
        for snap in self.catalog.all(state="preparing"):
            log.warning("undoing snapshot %r, left half-prepared by a stopped proxy", snap.key)
            self._undo_prepare(snap)
        for snap in self.catalog.all(state="committing"):
            log.warning("finishing the commit of %r, left by a stopped proxy", snap.key)
            try:
                self._finish_commit(snap.key, snap.layer, snap.held)
            except SnapshotError as exc:
                log.warning("the commit of %r cannot finish (%s): it stays active", snap.key, exc)
                self._undo_commit(snap.key, replace(snap, key=snap.active_key or snap.key))
        for layer, held in self.catalog.removals():
            self._finish_removal(layer, held)
        for snap in self.catalog.all():
            if snap.held and not self._still_mounted(snap):
                try:
                    self._hold(snap)
                except SnapshotError as exc:
                    log.warning("could not mount %r again: %s; Mounts retries", snap.key, exc)


def _bind(path: Path, readonly: bool) -> list[MountEntry]:
    return [MountEntry("bind", str(path), ("ro" if readonly else "rw", "rbind"))]
