"""Recovery of a layer store at open: finish or roll back what dead processes left half-done.

A record in flight (``creating``, ``applying``, ``removing``) may belong to a live process (an
apply-diff extracts without the store lock), so it is touched only when its layer lock can be
taken (:class:`~graphdriver.locking.LayerLocks`): then its process is gone. A half-made layer
is removed, a half-applied one is emptied again (never deleted: the user created it), a
half-removed one is removed. Opening looks without the store lock and takes it only when there
is something to recover. What fails to recover is logged, kept in the ``meta`` table under
``recovery-failed:<id>``, listed by ``status`` and retried at the next open; it never stops
commands on other layers.

Mount counts are matched to the kernel's mounts at open, but only for the layers that can
disagree: those counted as mounted (the mount may have vanished: a reboot, an admin's umount)
and those marked as being mounted (``get`` commits a ``mounting:<id>`` row before the driver
mounts and drops it with the count, so a process killed in between leaves the mark). An open
then costs what is mounted, not what is stored (an overlay store of 500 layers stat'ed each
layer's ``merged`` on every command). A store from before the marks is checked layer by layer
once, and the ``mounts-marked`` row says it was.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar, overload

from . import faults
from .driver import KernelMounts, LayerInfo
from .errors import GraphDriverError, call_os
from .metadata import IN_FLIGHT, LayerRecord, Metadata
from .sqlite_readonly import is_frozen

if TYPE_CHECKING:
    from .store import LayerStore

log = logging.getLogger(__name__)

T = TypeVar("T")

#: prefix of the ``meta`` keys that hold why a layer could not be recovered
FAILED = "recovery-failed:"
#: prefix of the ``meta`` keys that mark a layer whose kernel mount is being made
MOUNTING = "mounting:"
#: the ``meta`` key that says every mount since was marked (its absence: check every layer)
MARKED = "mounts-marked"


def layer_info(rec: LayerRecord, *, sealed: bool = False) -> LayerInfo:
    """What the driver is told about the layer of *rec*."""
    return LayerInfo(
        id=rec.id,
        parent=rec.parent,
        rw=rec.rw,
        size=rec.size_limit,
        mount_label=rec.mount_label,
        sealed=sealed,
    )


_info = layer_info


class KnownLayers(Sequence[LayerInfo]):
    """Every layer the store knows, as ``Driver.recover`` is given them: read from the
    records when the driver first looks (no built-in driver does), so that an open does not
    read every record."""

    def __init__(self, meta: Metadata) -> None:
        self._meta: Metadata | None = meta
        self._infos: list[LayerInfo] | None = None

    def _read(self) -> list[LayerInfo]:
        if self._infos is None:
            if self._meta is None:
                raise RuntimeError("the layers Driver.recover was given are read during the call")
            self._infos = [layer_info(rec) for rec in self._meta.all()]
        return self._infos

    def done(self) -> None:
        """The call is over: what was read stays, nothing more is read (outside the lock)."""
        self._meta = None

    def __len__(self) -> int:
        return len(self._read())

    @overload
    def __getitem__(self, index: int) -> LayerInfo: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[LayerInfo]: ...
    def __getitem__(self, index: int | slice) -> LayerInfo | Sequence[LayerInfo]:
        return self._read()[index]


#: what empties a half-applied layer again (:func:`graphdriver.applying.reset`)
Reset = Callable[["LayerStore", LayerRecord], None]


def recover(store: LayerStore, reset: Reset, records: Sequence[LayerRecord]) -> None:
    """Look for what a dead process left in *records* (the store's unsettled ones,
    ``Metadata.unsettled``, as the open read them under its lock); recover it under the
    lock, reading every record there. A half-applied layer is emptied with *reset*
    (apply-diff's own rollback)."""
    if not any(r.state in IN_FLIGHT for r in records) and not _mounts_disagree(store, records):
        return
    with store.locked("recover the store"):
        unsettled = set()
        marks = store.meta.meta_items(MOUNTING).keys()
        for rec in reversed(store.meta.all()):
            if rec.state in IN_FLIGHT:
                _roll(store, rec, reset)
            elif not _reconcile_mount(store, rec, marked=rec.id in marks):
                unsettled.add(rec.id)
        if isinstance(store.driver, KernelMounts):
            _settle_marks(store, unsettled)


def _mounts_disagree(store: LayerStore, records: Sequence[LayerRecord]) -> bool:
    """Whether a mount count may be wrong: a counted layer's mount is gone, a mark is left,
    or the store is older than the marks. Read without the lock (a live ``get``'s mark sends
    the caller to the lock, where it is gone)."""
    driver = store.driver
    if not isinstance(driver, KernelMounts):
        return False
    if store.meta.get_meta(MARKED) is None or store.meta.meta_items(MOUNTING):
        return True
    return any(rec.mount_count and driver.is_mounted(_info(rec)) is False for rec in records)


def _settle_marks(store: LayerStore, unsettled: set[str]) -> None:
    """Drop the marks of the layers now matched to the kernel; mark *unsettled* (an uncounted
    mount a live diff reads, or one that would not unmount), which the next open looks at
    again; note that every layer was checked. A store that cannot be written (a full disk)
    is looked at again next time."""
    marks = store.meta.meta_items(MOUNTING).keys()
    if marks == unsettled and store.meta.get_meta(MARKED) is not None:
        return  # (a live diff's mark: no write on each open while it reads)
    try:
        with store.meta.transaction():
            for layer_id in marks - unsettled:
                store.meta.delete_meta(MOUNTING + layer_id)
            for layer_id in unsettled - marks:
                store.meta.set_meta(MOUNTING + layer_id, "")
            store.meta.set_meta(MARKED, "1")
    except GraphDriverError as exc:
        log.debug("mount marks not settled: %s", exc)


def _roll(store: LayerStore, rec: LayerRecord, reset: Reset) -> None:
    """Finish or roll back one in-flight record, if its process is gone."""
    fd = store.layer_locks.exclusive(rec.id)
    if fd is None:
        return  # a live process works on it
    try:
        if rec.state == "removing":  # also after a removal the driver could not finish
            log.warning("finishing the removal of layer %s", rec.id)
        else:
            log.warning(
                "layer %s was left %s by a command that died; %s",
                rec.id,
                rec.state,
                "removing it" if rec.state == "creating" else "emptying it",
            )
        if rec.state == "applying":
            reset(store, rec)
        elif rec.state == "creating":
            with contextlib.suppress(GraphDriverError, OSError):
                store.driver.unmount(_info(rec))
            discard(store, rec)
        else:
            finish_removal(store, rec)
    finally:
        try:
            gone = store.meta.get(rec.id) is None
        except GraphDriverError:  # (what failed above is what is said)
            gone = False
        store.layer_locks.release(fd, rec.id if gone else None)


def _reconcile_mount(store: LayerStore, rec: LayerRecord, *, marked: bool = False) -> bool:
    """Match a layer's mount count to its kernel mount; False when an uncounted mount stays
    (a live reader's, or one that would not unmount, retried at the next open).

    A layer counted but not mounted, or *marked* but neither counted nor mounted, gets the
    driver's ``unmount`` all the same (not mounted is not an error): its process died inside
    the driver's mount or unmount, which may have left part of it (devmapper's thin device
    active, pinning its snapshot). That is tried once: a failure is logged, not retried."""
    driver = store.driver
    if not isinstance(driver, KernelMounts):
        return True
    info = _info(rec)
    mounted = driver.is_mounted(info)
    if mounted is None:
        return True
    if rec.mount_count and not mounted:
        log.warning(
            "layer %s was counted as mounted %d times but is not mounted", rec.id, rec.mount_count
        )
        try:
            with store.meta.transaction():
                store.meta.update(rec.id, mount_count=0, mount_path=None)
        except GraphDriverError as exc:  # a full disk: reads go on, the next open retries
            log.warning("%s; retried at the next open", exc)
            return False
        _undo_mount(store, info)
    elif not rec.mount_count and (mounted or marked):
        if store.layer_locks.busy(rec.id):
            return False  # a live diff's: it unmounts when it is done
        if not mounted:
            _undo_mount(store, info)
            return True
        log.warning("unmounting layer %s, left mounted by a process that died", rec.id)
        try:
            call_os(store.driver.unmount, info, doing=f"unmount layer {rec.id}")
        except GraphDriverError as exc:
            log.warning("%s; retried at the next open", exc)
            return False
    return True


def _undo_mount(store: LayerStore, info: LayerInfo) -> None:
    """The driver's ``unmount`` of a layer not mounted: what a dead process's mount began or
    its unmount left undone; once, a failure logged."""
    log.info("undoing what a dead process left of the mount of layer %s", info.id)
    try:
        call_os(store.driver.unmount, info, doing=f"unmount layer {info.id}")
    except GraphDriverError as exc:
        log.warning("%s; left as it is", exc)


def discard(store: LayerStore, rec: LayerRecord) -> None:
    """Remove a half-made layer from the driver and the metadata, keeping the first error
    (a failure is recorded and retried at the next open)."""
    try:
        store.driver.remove(_info(rec))
    except Exception as exc:  # the error that got us here is the one to report
        log.warning("cleaning up half-made layer %s failed (%s); retried at next open", rec.id, exc)
        log.debug("cleanup failure", exc_info=True)
        record_failure(store, rec.id, exc)
        return
    with store.meta.transaction():
        store.meta.delete(rec.id)


def finish_removal(store: LayerStore, rec: LayerRecord) -> bool:
    """Delete a ``removing`` layer's storage, then its record; False (logged, kept for the
    next open) if the driver fails."""
    try:
        faults.point("store.remove.driver")
        call_os(store.driver.remove, _info(rec), doing=f"remove layer {rec.id}")
        faults.point("store.remove.after-driver")
    except Exception as exc:
        log.warning("%s; retried at the next open", exc)
        record_failure(store, rec.id, exc)
        return False
    with store.meta.transaction():
        store.meta.delete(rec.id)
        store.meta.delete_meta(FAILED + rec.id)
    return True


def each(
    what: str, records: Iterable[T], name: Callable[[T], str], step: Callable[[T], None]
) -> list[tuple[str, str]]:
    """Recover each of *records* with *step*: a record that fails is logged and left as it is
    (still in flight, so the next open tries again); it never stops the others. *what* names
    the kind of record in the log. Containers and volumes recover through it, and ``status``
    lists what it returns: ("Recovery Failed", "<what> <name>: <why>") for each failure.
    Layers keep each failure in the metadata instead (:func:`record_failure`)."""
    failed = []
    for rec in records:
        try:
            step(rec)
        except (GraphDriverError, OSError) as exc:
            log.warning("%s %s could not be recovered (retried at next open): %s",
                        what, name(rec), exc)  # fmt: skip
            failed.append(("Recovery Failed", f"{what} {name(rec)}: {_first_line(exc)}"))
    return failed


def record_failure(store: LayerStore, layer_id: str, exc: BaseException) -> None:
    """Keep why *layer_id* could not be recovered, for ``status`` and the next attempt."""
    with store.meta.transaction():
        store.meta.set_meta(FAILED + layer_id, _first_line(exc))


def failures(store: LayerStore) -> list[tuple[str, str]]:
    """("Recovery Failed", "<id>: <why>") for each record left by a dead process (where the
    open read the database as it was, on a full disk, recovery was not tried: it says so)."""
    if not any(r.state in IN_FLIGHT for r in store.meta.all()):
        return []
    out = []
    untried = "; not tried yet: no room on the disk (the first command with room recovers it)"
    untried = untried if is_frozen(store.meta.db) else ""
    with store.locked("read the store's status"):
        reasons = store.meta.meta_items(FAILED)
        for rec in store.meta.all():
            if rec.state in IN_FLIGHT and not store.layer_locks.busy(rec.id):
                why = reasons.get(rec.id, f"left {rec.state}")
                why += untried
                out.append(("Recovery Failed", f"{rec.id}: {why}"))
    return out


def _first_line(exc: BaseException) -> str:
    """Why *exc* happened, in one line for ``status``."""
    return str(exc).splitlines()[0] if str(exc) else repr(exc)
