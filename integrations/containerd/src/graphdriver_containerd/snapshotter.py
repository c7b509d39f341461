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
catalogue only, so they are answered while a long Prepare (a vfs copy) runs.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from graphdriver import (
    GraphDriverError,
    InvalidLayerId,
    InvalidOption,
    LayerExists,
    LayerInUse,
    LayerNotFound,
    LayerStore,
    MountEntry,
    NotMounted,
    faults,
    open_store,
)

from .catalog import Catalog, Snapshot, mounts_json
from .filters import Filter, FilterError, snapshot_fields

log = logging.getLogger("graphdriver.containerd")

#: the label on every layer this proxy made (``graphdriver ls``/``inspect`` show it)
OWNER_LABEL = "graphdriver.containerd"
#: containerd's limit on one label's key and value together
MAX_LABEL = 4096
KINDS = ("active", "view", "committed")

T = TypeVar("T")


class SnapshotError(Exception):
    """An error with the gRPC status code containerd expects (``code`` is its name)."""

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


def _translate(exc: BaseException) -> SnapshotError:
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
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhaustedError(str(exc))
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhaustedError(str(exc))
    return SnapshotError(str(exc) or type(exc).__name__)


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
    for key, value in labels.items():
        if not key:
            raise InvalidArgumentError("label key must not be empty")
        if len(key.encode()) + len(value.encode()) > MAX_LABEL:
            raise InvalidArgumentError(
                f"label key and value greater than maximum size ({MAX_LABEL} bytes), key: "
                f"{key[:64]!r}"
            )
    return dict(labels)


def _now_ns() -> int:
    return time.time_ns()


class Snapshotter:
    """containerd's Snapshotter on the store at *root* with *driver* (see the module doc)."""

    def __init__(
        self, root: Path, driver: str | None, options: Mapping[str, str], wait: float | None
    ) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store")
        try:
            self.store: LayerStore = self._pool.submit(
                open_store, root, driver, options, wait=wait
            ).result()
        except BaseException:
            self._pool.shutdown()
            raise
        try:
            self.catalog = Catalog(root / "containerd" / self.store.name / "snapshots.db")
        except BaseException:
            self._pool.submit(self.store.close).result()
            self._pool.shutdown()
            raise
        self.recover()

    def close(self) -> None:
        self.catalog.close()
        self._pool.submit(self.store.close).result()
        self._pool.shutdown()

    def _on_store(self, fn: Callable[[], T]) -> T:
        """Run *fn* on the store's thread; its errors come back as SnapshotErrors."""
        try:
            return self._pool.submit(fn).result()
        except SnapshotError:
            raise
        except (GraphDriverError, OSError) as exc:
            log.debug("store error", exc_info=True)
            raise _translate(exc) from exc

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
        return snap.mounts

    def usage(self, key: str) -> tuple[int, int]:
        snap = self._get(key)
        if snap.kind == "committed" and snap.size is not None and snap.inodes is not None:
            return snap.size, snap.inodes
        return self._on_store(lambda: self.store.usage(snap.layer))

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
            if self.catalog.get(key) is not None:
                raise AlreadyExistsError(f"snapshot {key!r} already exists")
            parent_layer = None
            if parent:
                above = self.catalog.get(parent)
                if above is None or above.state == "preparing":
                    raise NotFoundError(f"parent snapshot {parent!r} does not exist")
                if above.kind != "committed" or above.state != "ready":
                    raise InvalidArgumentError(
                        f"parent {parent!r} is not a committed snapshot (it is {above.kind})"
                    )
                parent_layer = above.layer
            self.catalog.insert(snap)
        try:
            mounts, held = self._on_store(
                lambda: self._make_layer(snap.layer, parent_layer, readonly)
            )
            faults.point("containerd.prepare.after-layer")
        except BaseException:
            self._undo_prepare(snap)
            raise
        self.catalog.update(key, state="ready", mounts=mounts_json(mounts), held=int(held))
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
            path = self.store.get(layer)
            return [MountEntry("bind", str(path), ("ro" if readonly else "rw", "rbind"))], True
        except BaseException:
            self._drop_layer(layer, held=False)
            raise

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
            count = int(str(self.store.metadata(layer)["mount_count"]))
            for _ in range(count):
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
            if self.catalog.get(name) is not None:
                raise AlreadyExistsError(f"snapshot {name!r} already exists")
            snap = self._get(key)
            if snap.kind != "active" or snap.state != "ready":
                raise FailedPreconditionError(
                    f"snapshot {key!r} is {snap.kind}, not active: only an active snapshot "
                    f"can be committed"
                )
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
            # the layer is still the active snapshot's: give containerd its key back
            self.catalog.update(
                name,
                key=key,
                kind="active",
                state="ready",
                labels=snap.labels,
                created_ns=snap.created_ns,
                updated_ns=snap.updated_ns,
                active_key=None,
            )
            raise

    def _finish_commit(self, name: str, layer: str, held: bool) -> None:
        def run() -> tuple[int, int]:
            if held and int(str(self.store.metadata(layer)["mount_count"])):
                self.store.put(layer)
            self.store.commit(layer)
            faults.point("containerd.commit.after-store")
            return self.store.usage(layer)

        size, inodes = self._on_store(run)
        self.catalog.update(
            name, state="ready", held=0, mounts="[]", size=size, inodes=inodes, active_key=None
        )

    def remove(self, key: str) -> None:
        with self.catalog.transaction():
            snap = self._get(key)
            if snap.state != "ready":
                raise FailedPreconditionError(f"snapshot {key!r} is being {snap.state}")
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
        for layer, held in self.catalog.removals():
            self._finish_removal(layer, held)
        known = self.catalog.layers()

        def orphans() -> list[str]:
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
        """Finish or undo what a killed proxy left (see catalog's module doc)."""
        for snap in self.catalog.all(state="preparing"):
            log.warning("undoing snapshot %r, left half-prepared by a stopped proxy", snap.key)
            self._undo_prepare(snap)
        for snap in self.catalog.all(state="committing"):
            log.warning("finishing the commit of %r, left by a stopped proxy", snap.key)
            self._finish_commit(snap.key, snap.layer, snap.held)
        for layer, held in self.catalog.removals():
            self._finish_removal(layer, held)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for snap in self.catalog.all():
            out[snap.kind] += 1
        return out
