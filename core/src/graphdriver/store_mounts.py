"""The mount half of :class:`~graphdriver.store.LayerStore`: counted mounts of layers.

``get`` mounts a layer (first reference) and counts it in the metadata, ``put`` releases one
reference and unmounts at zero; the counts live in the database, so one process can mount and
another unmount, and :mod:`.recovery` matches them to the kernel's mounts at open. A layer that
a diff is reading keeps its mount (the reader unmounts it when it is done). A kernel mount
that no count holds (being made, or a reader's) is marked in the metadata first
(:data:`.recovery.MOUNTING`), so that the open after a crash finds it without looking at every
layer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from . import faults, reserve
from .driver import Driver, KernelMounts, MountEntry, MountSpec
from .errors import LayerInUse, NotMounted, StoreError, call_os
from .locking import LayerLocks
from .metadata import LayerRecord, Metadata
from .recovery import MOUNTING
from .recovery import layer_info as _info

if TYPE_CHECKING:
    from .plugins import Hooks
    from .store import LayerStore

log = logging.getLogger(__name__)


class LayerMounts:
    """Mounting and unmounting layers; mixed into :class:`~graphdriver.store.LayerStore`."""

    name: str
    root: Path
    home: Path
    driver: Driver
    meta: Metadata
    hooks: Hooks
    layer_locks: LayerLocks

    if TYPE_CHECKING:

        def locked(self, doing: str = ...) -> contextlib.AbstractContextManager[None]: ...

        def ready(self, layer_id: str, what: str = ...) -> LayerRecord: ...

    def _driver_mount(self, rec: LayerRecord, chain: Sequence[LayerRecord]) -> Path:
        """The driver's mount of *rec* (what the ``mount`` hook's default implementation
        calls); an image layer with children is mounted sealed (read-only)."""
        sealed = not rec.rw and bool(self.meta.children(rec.id))
        result = call_os(
            self.driver.mount,
            _info(rec, sealed=sealed),
            [_info(r) for r in chain],
            doing=f"mount layer {rec.id}",
        )
        assert isinstance(result, Path)
        return result

    def _mount_path(self, rec: LayerRecord, *, reader: bool = False) -> Path:
        """The layer's mounted root: the counted mount if it is still there, else a new one
        (marked first; a *reader*'s is made on a full disk too)."""
        path: Path | None = Path(rec.mount_path) if rec.mount_path else None
        kernel = isinstance(self.driver, KernelMounts)
        if path is None or (
            kernel and cast(KernelMounts, self.driver).is_mounted(_info(rec)) is False
        ):
            chain = self.meta.chain(rec.id)
            if kernel:
                self.mark_mounting(rec.id, reader=reader)
            path = self.hooks.mount(cast("LayerStore", self), rec, chain, self._driver_mount)
        return path

    def mark_mounting(self, layer_id: str, *, reader: bool = False) -> None:
        """Mark the layer's kernel mount as held by no count before it is made (dropped with
        the count, by ``get``, or with the reader's unmount). A caller that runs ``get`` in a
        transaction of its own (a container's mount) marks the layer before it begins: a
        mark must be committed before the mount. On a full disk a *reader*'s mount is made
        unmarked (reading a layer must not need room; a crash then leaves it to ``check
        --repair``); ``get`` fails before it mounts, as its count could not be kept."""
        key = MOUNTING + layer_id
        if self.meta.db.in_transaction:
            assert self.meta.get_meta(key) is not None, f"{key} must be committed first"
            return
        try:
            with self.meta.transaction():
                self.meta.set_meta(key, "")
        except StoreError as exc:
            if not reader or exc.errno != errno.ENOSPC:
                raise
            log.debug("layer %s mounted without its mark: %s", layer_id, exc)
        faults.point("store.mount.marked")

    def mount_spec(self, layer_id: str, readonly: bool = False) -> list[MountEntry] | None:
        """The mounts another program can make itself to see the layer (writable unless
        *readonly*), from a driver that implements :class:`MountSpec`; None when the caller
        must bind the mount that ``get`` returns instead."""
        rec = self.ready(layer_id)
        if not isinstance(self.driver, MountSpec):
            return None
        chain = self.meta.chain(layer_id)
        spec = call_os(
            self.driver.mount_spec,
            _info(rec),
            [_info(r) for r in chain],
            readonly,
            doing=f"describe the mounts of layer {layer_id}",
        )
        return None if spec is None else list(spec)

    def get(self, layer_id: str) -> Path:
        """Mount the layer (first reference) and return its merged root; counts references.

        The layer counts as written to from then on (see ``apply_diff``).
        """
        with self.locked(f"mount layer {layer_id}"):
            rec = self.ready(layer_id)
            path = self._mount_path(rec)
            faults.point("store.get.after-driver")
            with self.meta.transaction():
                self.meta.update(
                    layer_id, mount_count=rec.mount_count + 1, mount_path=str(path), dirty=1
                )
                self.meta.delete_meta(MOUNTING + layer_id)
            return path

    def put(self, layer_id: str, *, container: bool = False) -> None:
        """Release one reference; the last one unmounts. ``put`` without ``get`` is an error,
        and so is the last ``put`` of a mounted container's layer but by that container
        (*container*: its unmount). On a full disk the store's reserve is given back first,
        to record it."""
        with self.locked(f"unmount layer {layer_id}"):
            rec = self.ready(layer_id)
            if rec.mount_count <= 0:
                raise NotMounted(f"layer {layer_id!r} is not mounted")
            owner = (
                None
                if container or rec.mount_count > 1
                else self.meta.containers.owner_of(layer_id, mounted=True)
            )
            if owner is not None:
                raise LayerInUse(
                    f"layer {layer_id!r} is mounted by container {owner!r}, its read-write "
                    f"layer; use `graphdriver container umount {owner}`"
                )
            if rec.mount_count == 1 and not container:
                self.hooks.releasing(cast("LayerStore", self), "unmount", layer_id)
            reserve.release_if_full(self.root, self.home)
            # a diff streaming the layer keeps the mount; it unmounts when it is done
            kept = rec.mount_count == 1 and self.layer_locks.busy(layer_id)
            if rec.mount_count == 1 and not kept:
                call_os(self.driver.unmount, _info(rec), doing=f"unmount layer {layer_id}")
            faults.point("store.put.after-driver")
            try:
                with self.meta.transaction():
                    self.meta.update(
                        layer_id,
                        mount_count=rec.mount_count - 1,
                        mount_path=rec.mount_path if rec.mount_count > 1 else None,
                    )
                    if kept and isinstance(self.driver, KernelMounts):  # uncounted from now on
                        self.meta.set_meta(MOUNTING + layer_id, "")
            except StoreError as exc:
                if rec.mount_count > 1 or kept:
                    raise
                # (a full disk) the layer is unmounted all the same: a later open with room
                # finds the count without its mount and resets it
                raise StoreError(
                    f"layer {layer_id!r} is unmounted, but its count is not: {exc}",
                    errno_=exc.errno,
                ) from exc

    @contextlib.contextmanager
    def mounted(self, layer_id: str) -> Iterator[Path]:
        """``get`` for the length of a with-block, then ``put``."""
        path = self.get(layer_id)
        try:
            yield path
        finally:
            self.put(layer_id)

    def cleanup(self) -> None:
        """Unmount every layer of this store, whoever mounted it, and zero the counts; a
        layer that a running diff streams keeps its mount."""
        with self.locked("clean up the store"):
            self.hooks.releasing(cast("LayerStore", self), "cleanup")
            for rec in self.meta.all():
                if self.layer_locks.busy(rec.id):
                    log.warning("layer %s is in use by a running command; left mounted", rec.id)
                    continue
                if rec.mount_count or (
                    isinstance(self.driver, KernelMounts)
                    and self.driver.is_mounted(_info(rec)) is True
                ):
                    call_os(self.driver.unmount, _info(rec), doing=f"unmount {rec.id}")
                    with self.meta.transaction():
                        self.meta.update(rec.id, mount_count=0, mount_path=None)
                        self.meta.delete_meta(MOUNTING + rec.id)
            call_os(self.driver.cleanup, doing="clean up the driver")
