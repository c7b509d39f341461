"""apply-diff: fill a fresh layer from an OCI layer tar, without holding the store lock.

The layer is checked and marked ``applying`` under the store lock, with its layer lock held for
the whole operation (so recovery knows the work is live); the extraction, the long part, runs
without the store lock; the lock is taken again to mark the layer ready. A failure or a signal
empties the layer again, as ``create`` made it: the record the user made is never deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from . import archive, faults
from .archive import tarsplit
from .driver import ApplyLowers, CreateOpts, NativeApply
from .errors import ArchiveError, GraphDriverError, LayerInUse
from .metadata import LayerRecord
from .recovery import FAILED, record_failure
from .recovery import layer_info as _info

if TYPE_CHECKING:
    from .store import LayerStore

log = logging.getLogger(__name__)


def apply(
    store: LayerStore,
    layer_id: str,
    stream: BinaryIO,
    progress: Callable[[int], None] | None = None,
    *,
    exact: bool = False,
) -> archive.ApplyResult:
    """``apply_diff`` that also returns the diffID and compression of the tar.

    The layer is marked ``applying`` under the store lock, the tar is extracted without
    it, and the lock is taken again to mark the layer ready (or empty it again). *exact*:
    refuse a tar whose record could not be kept (see ``LayerStore.apply``).
    """
    doing = f"apply-diff into layer {layer_id}"
    with contextlib.ExitStack() as stack:
        with store.locked(doing):
            rec = _refuse(store, layer_id)
            stack.enter_context(store._operation(layer_id))
            with store.meta.transaction():
                store.meta.update(layer_id, state="applying")
            try:
                faults.point("store.apply.recorded")
                target, whiteouts, lowers, mounted = _target(store, rec)
            except BaseException:
                reset(store, rec)
                raise
        try:
            faults.point("store.apply.prepared")
            result = archive.apply_layer(
                target,
                stream,
                whiteouts=whiteouts,
                lowers=lowers,
                progress=progress,
                record=keeps_records(),
            )
            faults.point("store.apply.extracted")
            if exact and result.no_record and keeps_records():
                raise ArchiveError(
                    f"layer {layer_id!r}: its diff could not be this tar again, byte for "
                    f"byte ({result.no_record}); refused, as dockerd refuses such a tar"
                )
            with store.locked(doing):
                _mark_ready(store, rec, result, mounted)
        except BaseException:
            _roll_back(store, rec, doing)
            raise
    rec.state = "ready"
    store.hooks.layer_applied(store, rec, result.size, result.diff_id)
    return result


def _roll_back(store: LayerStore, rec: LayerRecord, doing: str) -> None:
    """After a failed extraction: empty the layer again, unless its commit went through. If
    the rollback fails too (on a full disk its own record may not fit), the layer stays
    ``applying`` for the next open's recovery, and the extraction's error is the one told."""
    try:
        faults.point("store.apply.rollback")
        with store.locked(f"roll back {doing}"):
            now = store.meta.get(rec.id)
            if now is not None and now.state == "applying":  # not committed
                reset(store, rec)
    except Exception as exc:
        log.warning("layer %s: the rollback failed (%s); the next command finishes it", rec.id, exc)
        log.debug("rollback failure", exc_info=True)


def _mark_ready(
    store: LayerStore, rec: LayerRecord, result: archive.ApplyResult, mounted: bool
) -> None:
    """Under the store lock, after the extraction: unmount what apply mounted, then record
    the layer ready with its diffID, size and exact-diff record, in one transaction."""
    if result.no_record:
        log.warning(
            "layer %s: its diff will be generated, not the applied tar again: %s",
            rec.id,
            result.no_record,
        )
    if mounted:
        store._call(store.driver.unmount, _info(rec), doing=f"unmount {rec.id}")
    faults.point("store.apply.unmounted")
    with store.meta.transaction():
        store.meta.update(
            rec.id,
            state="ready",
            dirty=1,
            diff_id=result.diff_id,
            unpacked_size=result.size,
        )
        if result.record is not None:
            store.meta.set_tar_split(rec.id, tarsplit.digest(result.record), result.record)


def keeps_records() -> bool:
    """Whether apply-diff keeps exact-diff records (``GRAPHDRIVER_TAR_SPLIT=off`` turns them
    off, for measuring what they cost)."""
    return os.environ.get("GRAPHDRIVER_TAR_SPLIT", "on").lower() not in ("off", "0", "no")


def _refuse(store: LayerStore, layer_id: str) -> LayerRecord:
    """The layer's record if apply-diff may fill it; a refusal commits nothing."""
    rec = store.ready(layer_id)
    if rec.mount_count:
        raise LayerInUse(f"layer {layer_id!r} is mounted; apply-diff needs it unmounted")
    if store.meta.children(layer_id):
        raise LayerInUse(f"layer {layer_id!r} has children; apply-diff would change what they see")
    if rec.diff_id:
        raise LayerInUse(
            f"layer {layer_id!r} already has content (apply-diff filled it before); "
            f"apply-diff needs a fresh layer"
        )
    if rec.dirty and _has_changes(store, rec):
        raise LayerInUse(
            f"layer {layer_id!r} already has content (files were written while it was "
            f"mounted); apply-diff needs a fresh layer"
        )
    rec.state = "applying"
    return rec


def _has_changes(store: LayerStore, rec: LayerRecord) -> bool:
    """Whether a layer that was mounted changed anything (mounted and unmounted without a
    write is still fresh, as moby's graphtest DiffApply expects)."""
    from .diffs import change_source  # the diff engine, only for a layer mounted before

    with change_source(store, rec.id, None, filtered=False) as (changes, _root, _kind):
        return bool(changes)


def _target(store: LayerStore, rec: LayerRecord) -> tuple[Path, str, Sequence[Path], bool]:
    """(directory, whiteout format, lower dirs to copy up from, whether it was mounted for
    this) to extract into."""
    driver = store.driver
    if isinstance(driver, NativeApply):
        target = store._call(driver.apply_target, _info(rec), doing=f"apply {rec.id}")
        if target is not None:
            lowers: Sequence[Path] = ()
            if target[1] == "overlay" and isinstance(driver, ApplyLowers):
                lowers = store._call(driver.apply_lowers, _info(rec), doing=f"apply {rec.id}")
            return target[0], target[1], lowers, False
    return (
        store.hooks.mount(store, rec, store.meta.chain(rec.id), store._driver_mount),
        "delete",
        (),
        True,
    )


def reset(store: LayerStore, rec: LayerRecord) -> None:
    """After a failed apply: make the layer empty again, as ``create`` made it. If that
    fails too, the layer stays ``applying`` and recovery tries again at the next open;
    the record the user made is never deleted."""
    parent = store.meta.get(rec.parent) if rec.parent else None
    try:
        with contextlib.suppress(GraphDriverError, OSError):
            store.driver.unmount(_info(rec))
        store.driver.remove(_info(rec))
        store.driver.create(
            _info(rec),
            _info(parent) if parent else None,
            CreateOpts(size=rec.size_limit, mount_label=rec.mount_label),
        )
        faults.point("store.apply.reset")
    except Exception as exc:
        log.warning("layer %s could not be emptied after a failed apply: %s", rec.id, exc)
        log.debug("reset failure", exc_info=True)
        record_failure(store, rec.id, exc)
        return
    with store.meta.transaction():
        store.meta.update(
            rec.id,
            state="ready",
            boundary_ns=store._boundary(),
            dirty=0,
            diff_id=None,
            unpacked_size=None,
        )
        store.meta.delete_tar_split(rec.id)
        store.meta.delete_meta(FAILED + rec.id)
