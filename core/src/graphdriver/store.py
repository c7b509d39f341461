"""LayerStore: what users of graphdriver call.

The store validates input, keeps the layer catalogue (:mod:`.metadata`), serialises state
transitions across processes with an fcntl lock (:mod:`.locking`), counts mounts, calls hooks, and
asks the driver to move bytes. Every mutation is recorded as in flight (``creating``,
``applying``, ``removing``) under a per-layer lock before the driver is called, so that
:mod:`.recovery` can tell a live operation from one a killed process left behind. Long work (a
diff stream, an extraction) runs without the store lock.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from . import faults, recovery, reserve
from .driver import CreateOpts, Driver
from .errors import (
    GraphDriverError,
    InvalidMountSpec,
    InvalidOption,
    LayerExists,
    LayerInUse,
    LayerNotFound,
    MaxDepthExceeded,
    StoreError,
    call_os,
    from_oserror,
)
from .ids import container_path, private_dir, validate_id
from .locking import FileLock, LayerLocks
from .metadata import LayerRecord, Metadata
from .plugins import Hooks, choose_driver, hooks, load_driver
from .recovery import layer_info as _info
from .sqlite import check_hint
from .sqlite_readonly import is_frozen
from .store_diff import LayerDiffs
from .store_mounts import LayerMounts

__all__ = ["LayerStore", "open_store", "private_dir", "validate_id"]

log = logging.getLogger(__name__)

_DOING = {"creating": "created", "applying": "filled by apply-diff", "removing": "removed"}


class LayerStore(LayerMounts, LayerDiffs):
    """A stack of copy-on-write layers kept by one driver under ``<root>/<driver>``.

    The layer lifecycle is here; mounts are :class:`~graphdriver.store_mounts.LayerMounts`,
    diffs and apply-diff :class:`~graphdriver.store_diff.LayerDiffs`.
    """

    def __init__(
        self,
        root: Path,
        driver_cls: type[Driver],
        options: Mapping[str, str],
        plugin_hooks: Hooks,
        *,
        wait: float | None = None,
    ) -> None:
        self.root = root
        self.home = root / driver_cls.name
        self.hooks = plugin_hooks
        self.name = driver_cls.name
        #: seconds any call waits for a lock of the store (the volumes' too); None: for ever
        self.wait = wait
        private_dir(self.home)
        self._lock = FileLock(self.home / "lock", wait)
        try:
            self.layer_locks = LayerLocks(self.home)
            self.meta = Metadata(self.home / "metadata.db")
        except BaseException:
            self._lock.close()
            raise
        try:
            # drivers may change shared state when they start (and recover): under the lock
            with self.locked("open the store"):
                recorded = self.meta.get_meta("driver")
                if recorded is not None and recorded != self.name:
                    raise StoreError(
                        f"{self.home} belongs to driver {recorded!r}, not {self.name!r}"
                    )
                self.driver = driver_cls(self.home, options)
                if recorded is None:
                    self._first_open()
                frozen = is_frozen(self.meta.db)  # (read as it was on a full disk: stale)
                if not frozen:
                    records = self._recover_driver()
            if not frozen:
                # the apply engine is imported only when a half-applied layer needs it
                recovery.recover(self, _reset_applied, records)
        except BaseException:
            if self.meta.created:
                # a refused first open (the driver cannot run here...) leaves no database, or
                # the next open would take this root for the refused driver's store
                self.meta.discard()
            else:
                self.meta.close()
            self._lock.close()
            raise

    def _recover_driver(self) -> list[LayerRecord]:
        """The records an open looks at, read under the lock, once the driver has recovered
        (the database read as it was on a full disk is never recovered from: it may be stale,
        and the command that opened it only reads)."""
        records = self.meta.unsettled()
        known = recovery.KnownLayers(self.meta)
        try:
            call_os(self.driver.recover, known, doing=f"recover driver {self.name}")
        finally:
            known.done()
        return records

    def _first_open(self) -> None:
        """Claim a new database for this driver, unless the driver already holds layers: then
        the database was lost (from before ``metadata.db.present`` existed), and making it
        anew would orphan them."""
        stored = self.driver.stored_layers()
        if stored:
            shown = ", ".join(sorted(stored)[:3]) + (" ..." if len(stored) > 3 else "")
            raise StoreError(
                f"metadata database {self.meta.path} is new but {self.home} holds "
                f"{len(stored)} layer(s) ({shown}): the layers' records are lost, so the store "
                f"is not opened; run `{check_hint(self.meta.path)}` (--repair rebuilds them)"
            )
        with self.meta.transaction():
            self.meta.set_meta("driver", self.name)
            self.meta.set_meta(recovery.MARKED, "1")  # no mount yet: every one will be marked

    # ------------------------------------------------------------------------ locking, recovery

    def locked(self, doing: str = "change the store") -> contextlib.AbstractContextManager[None]:
        """Hold the store's exclusive lock for a with-block (re-entrant within this object, and
        across threads of it); *doing* is what a process waiting for it is told. Every state
        transition of a layer, and of what is recorded with the layers (containers), runs
        under it; a caller may hold it around several calls to make them one step."""
        return self._lock.held(doing)

    #: the name this had before it was public (kept for callers that use it)
    _call = staticmethod(call_os)

    def close(self) -> None:
        """Close the metadata and lock; mounts stay (another process may ``put`` them)."""
        self.driver.close()
        self.meta.close()
        self._lock.close()

    def __enter__(self) -> LayerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------- lookups

    def ready(self, layer_id: str, what: str = "layer") -> LayerRecord:
        """The record of a layer that exists and is not in flight; LayerNotFound, or LayerInUse
        while a command creates, fills or removes it (*what* names it in the message)."""
        validate_id(layer_id, f"{what} id")
        rec = self.meta.get(layer_id)
        if rec is None or rec.state == "removing":
            raise LayerNotFound(f"{what} {layer_id!r} does not exist")
        if rec.state != "ready":
            failed = self.meta.meta_items(recovery.FAILED).get(layer_id)
            if failed is not None:
                raise LayerInUse(
                    f"{what} {layer_id!r} was left {rec.state} by a command that died and "
                    f"could not be recovered ({failed}); see `graphdriver status`"
                )
            raise LayerInUse(
                f"{what} {layer_id!r} is being {_DOING[rec.state]} by another command; "
                f"try again when it is done"
            )
        return rec

    def exists(self, layer_id: str) -> bool:
        try:
            self.ready(layer_id)
        except GraphDriverError:
            return False
        return True

    def layers(self) -> list[str]:
        """Ids of every layer, oldest first."""
        return [r.id for r in self.meta.all() if r.state == "ready"]

    def metadata(self, layer_id: str) -> dict[str, object]:
        """What the store knows about a layer (``graphdriver inspect``)."""
        rec = self.ready(layer_id)
        chain = self.meta.chain(layer_id)
        return {
            "id": rec.id,
            "parent": rec.parent,
            "rw": rec.rw,
            "driver": self.name,
            "created": datetime.datetime.fromtimestamp(rec.created, datetime.UTC).isoformat(),
            "depth": len(chain) + 1,
            "chain": [r.id for r in chain],
            "children": self.meta.children(rec.id),
            "size_limit": rec.size_limit,
            "mount_count": rec.mount_count,
            "mount_path": rec.mount_path,
            "diff_id": rec.diff_id,
            # apply-diff kept what `diff` needs to give back the applied tar byte for byte
            "exact_diff_record": self.meta.tar_split_size(rec.id),
            "unpacked_size": rec.unpacked_size,
            "labels": rec.labels,
            "volumes": rec.volumes,
        }

    def status(self) -> list[tuple[str, str]]:
        """Key/value pairs like the storage section of ``docker info``; a layer that a dead
        command left half-done and recovery could not fix is listed as "Recovery Failed"."""
        recs = [r for r in self.meta.all() if r.state == "ready"]
        return [
            ("Storage Driver", self.name),
            ("Root Dir", str(self.home)),
            ("Layers", str(len(recs))),
            ("Mounted Layers", str(sum(1 for r in recs if r.mount_count))),
            ("Reproduces Exact Diffs", "true" if self.reproduces_exact_diffs else "false"),
            *self.driver.status(),
            *self.hooks.status(self),
            *recovery.failures(self),
        ]

    # ---------------------------------------------------------------------------- lifecycle

    def create(
        self,
        layer_id: str,
        parent: str | None = None,
        opts: CreateOpts | None = None,
        *,
        rw: bool = False,
        labels: Mapping[str, str] | None = None,
        volumes: Sequence[str] = (),
    ) -> None:
        """Create a read-only (image) layer, or a read-write one with ``rw=True``.

        *volumes* are paths the layer declares as volumes (a Dockerfile's ``VOLUME``): a
        container made on it, or on a layer above it, gets a volume at each.
        """
        opts = opts or CreateOpts()
        declared = self._check_create(layer_id, parent, opts, volumes)
        reserve.keep(self.root, self.home)  # (a server opens once: made again here)
        with self.locked(f"create layer {layer_id}"):
            self._free_id(layer_id)
            parent_rec = self._check_parent(layer_id, parent)
            rec = LayerRecord(
                id=layer_id,
                parent=parent,
                state="creating",
                rw=rw,
                size_limit=opts.size,
                mount_label=opts.mount_label,
                created=time.time(),
                labels=dict(labels or {}),
                volumes=declared,
            )
            self._make(rec, parent_rec, opts)
        self.hooks.layer_created(self, rec)

    def _check_create(
        self, layer_id: str, parent: str | None, opts: CreateOpts, volumes: Sequence[str]
    ) -> list[str]:
        """Refuse bad arguments before anything is locked; return the declared volume paths."""
        validate_id(layer_id)
        declared = []
        for path in volumes:
            try:
                declared.append(container_path(path))
            except ValueError as exc:
                raise InvalidMountSpec(
                    f"invalid volume path for layer {layer_id!r}: {exc}"
                ) from None
        if parent is not None:
            validate_id(parent, "parent id")
        if opts.size is not None:
            caps = self.driver.capabilities
            if not caps.quota:
                why = caps.why_not.get("quota", "the driver has no quota support")
                raise InvalidOption(
                    f"driver {self.name!r} cannot limit a layer's size here ({why}); "
                    f"drop --size or use another driver"
                )
            if opts.size <= 0:
                raise InvalidOption(f"size must be positive, not {opts.size}")
        return sorted(set(declared))

    def _check_parent(self, layer_id: str, parent: str | None) -> LayerRecord | None:
        """The parent's record if a layer may be made on it (store lock held)."""
        if parent is None:
            return None
        parent_rec = self.ready(parent, "parent")
        if parent_rec.mount_count:
            raise LayerInUse(
                f"parent {parent!r} is mounted, so its files can still change; unmount it "
                f"before creating a layer on top"
            )
        depth = len(self.meta.chain(parent)) + 2
        if depth > self.driver.capabilities.max_depth:
            raise MaxDepthExceeded(
                f"layer {layer_id!r} would be {depth} layers deep; driver {self.name!r} "
                f"mounts at most {self.driver.capabilities.max_depth}"
            )
        return parent_rec

    def _make(self, rec: LayerRecord, parent_rec: LayerRecord | None, opts: CreateOpts) -> None:
        """Record *rec* as ``creating``, have the driver make it, mark it ready; a failure
        removes what was made (store lock held)."""
        if call_os(self.driver.has_storage, _info(rec), doing=f"create layer {rec.id}"):
            raise LayerExists(
                f"layer {rec.id!r} has storage without a record, left as it is; "
                f"`graphdriver check` lists it"
            )
        with self._operation(rec.id):
            with self.meta.transaction():
                self.meta.insert(rec)
            try:
                faults.point("store.create.recorded")
                call_os(
                    self.driver.create,
                    _info(rec),
                    _info(parent_rec) if parent_rec else None,
                    opts,
                    doing=f"create layer {rec.id}",
                )
                faults.point("store.create.after-driver")
                rec.state = "ready"
                rec.boundary_ns = self._boundary()
                with self.meta.transaction():
                    self.meta.update(rec.id, state="ready", boundary_ns=rec.boundary_ns)
            except BaseException as exc:
                if getattr(exc, "errno", None) != errno.EEXIST:
                    recovery.discard(self, rec)
                    raise
                with self.meta.transaction():  # the storage was there: not this create's
                    self.meta.delete(rec.id)
                raise LayerExists(
                    f"layer {rec.id!r} has storage without a record, left as it is ({exc}); "
                    f"`graphdriver check` lists it"
                ) from exc

    def _free_id(self, layer_id: str) -> None:
        """Refuse an id in use; finish first the removal of a layer a failed ``rm`` left."""
        rec = self.meta.get(layer_id)
        if rec is None:
            return
        if rec.state == "removing" and not self.layer_locks.busy(layer_id):
            if recovery.finish_removal(self, rec):
                return
            reason = self.meta.meta_items(recovery.FAILED).get(layer_id, "")
            raise LayerExists(
                f"layer {layer_id!r} is still being removed: {reason}; "
                f"free what holds it, then try again"
            )
        raise LayerExists(f"layer {layer_id!r} already exists")

    @contextlib.contextmanager
    def _operation(self, layer_id: str) -> Iterator[None]:
        """Hold the layer's lock for an in-flight operation (the store lock is held); then
        release it, its file deleted with a layer whose record is gone and kept with one that
        is there (:class:`~.locking.LayerLocks`; an apply ends without the store lock, but
        its layer stays)."""
        fd = self.layer_locks.exclusive(layer_id)
        if fd is None:
            raise LayerInUse(
                f"layer {layer_id!r} is being read or changed by another command (a diff "
                f"streaming it?); try again when it is done"
            )
        try:
            yield
        finally:
            try:
                gone = self.meta.get(layer_id) is None
            except Exception:  # (the error being raised is the one told; the file may stay)
                gone = False
            self.layer_locks.release(fd, layer_id if gone else None)

    def create_rw(
        self, layer_id: str, parent: str | None = None, opts: CreateOpts | None = None
    ) -> None:
        """Create a read-write (container) layer; ``opts.size`` limits it where there is quota."""
        self.create(layer_id, parent, opts, rw=True)

    def _boundary(self) -> int:
        """A ctime from the filesystem clock: anything changed after this has a later ctime."""
        marker = self.home / ".boundary"
        marker.touch()
        os.utime(marker)
        return marker.stat().st_ctime_ns

    def remove(self, layer_id: str) -> None:
        """Delete a layer; refused while it is mounted or has children.

        The layer disappears from the store first (state ``removing``); if the driver then
        fails (EBUSY), the removal is finished at the next open or on reuse of the id.
        On a full disk the store's reserve is given back before it records anything
        (:mod:`.reserve`).
        """
        with self.locked(f"remove layer {layer_id}"):
            rec = self.ready(layer_id)
            if rec.mount_count:
                n = f"{rec.mount_count} reference(s)"
                raise LayerInUse(f"layer {layer_id!r} is mounted ({n}); unmount it first")
            children = self.meta.children(layer_id)
            if children:
                shown = ", ".join(children[:5]) + (" ..." if len(children) > 5 else "")
                raise LayerInUse(f"layer {layer_id!r} has children ({shown}); remove them first")
            owner = self.meta.containers.owner_of(layer_id)
            if owner is not None:
                raise LayerInUse(
                    f"layer {layer_id!r} is the read-write layer of container {owner!r}; "
                    f"use `graphdriver container rm {owner}`"
                )
            self.hooks.releasing(self, "remove", layer_id)
            reserve.release_if_full(self.root, self.home)
            with self._operation(layer_id):
                with self.meta.transaction():
                    self.meta.update(layer_id, state="removing")
                if not recovery.finish_removal(self, rec):
                    reason = self.meta.meta_items(recovery.FAILED).get(layer_id, "")
                    raise StoreError(
                        f"layer {layer_id!r} is removed from the store, but deleting its files "
                        f"failed ({reason}); that is retried at the next open"
                    )
        self.hooks.layer_removed(self, layer_id)

    def commit(self, layer_id: str) -> None:
        """Make a read-write layer a read-only (image) layer in place, copying nothing: what it
        holds becomes what children see (containerd's Commit). Refused while mounted; a layer
        that is already read-only is left as it is, so a retried commit succeeds."""
        with self.locked(f"commit layer {layer_id}"):
            rec = self.ready(layer_id)
            if not rec.rw:
                return
            if rec.mount_count:
                raise LayerInUse(
                    f"layer {layer_id!r} is mounted ({rec.mount_count} reference(s)); "
                    f"unmount it before committing it"
                )
            owner = self.meta.containers.owner_of(layer_id)
            if owner is not None:
                raise LayerInUse(
                    f"layer {layer_id!r} is the read-write layer of container {owner!r}"
                )
            with self.meta.transaction():
                self.meta.update(layer_id, rw=0)


def _reset_applied(store: LayerStore, rec: LayerRecord) -> None:
    from . import applying

    applying.reset(store, rec)


def open_store(
    root: str | os.PathLike[str],
    driver: str | None = None,
    options: Mapping[str, str] | None = None,
    *,
    wait: float | None = None,
) -> LayerStore:
    """Open (creating it if needed) the store under *root*, with *driver* or the default one.

    *wait* bounds, in seconds, how long any call waits for the store lock (None: for ever).
    """
    if not os.fspath(root):  # "" would be the working directory, which private_dir chmods
        raise InvalidOption("the store's root must name a directory, not be empty")
    root_path = Path(root).absolute()
    try:
        private_dir(root_path)
    except OSError as exc:
        raise from_oserror(exc, f"create root {root_path}") from exc
    plugin_hooks = hooks()
    name = driver or choose_driver(root_path)
    driver_cls = load_driver(name)
    options = dict(options or {})
    known = {**driver_cls.options, **plugin_hooks.driver_options(name)}
    unknown = sorted(set(options) - set(known))
    if unknown:
        listing = ", ".join(sorted(known)) or "none"
        raise InvalidOption(
            f"driver {name!r} has no option {unknown[0]!r} (its options: {listing})"
        )
    try:
        store = LayerStore(root_path, driver_cls, options, plugin_hooks, wait=wait)
    except OSError as exc:
        raise from_oserror(exc, f"open store at {root_path}") from exc
    reserve.keep(root_path, store.home)
    return store
