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
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

from . import faults, recovery
from .archive.changes import Change
from .driver import CreateOpts, Driver, KernelMounts, MountEntry, MountSpec
from .errors import (
    GraphDriverError,
    InvalidLayerId,
    InvalidMountSpec,
    InvalidOption,
    LayerExists,
    LayerInUse,
    LayerNotFound,
    MaxDepthExceeded,
    NotMounted,
    StoreError,
    call_os,
    from_oserror,
)
from .lazy import LazyModule
from .linux.bind import container_path
from .locking import FileLock, LayerLocks
from .metadata import LayerRecord, Metadata, check_hint
from .plugins import Hooks, choose_driver, hooks, load_driver
from .recovery import layer_info as _info

if TYPE_CHECKING:
    from . import applying, archive, diffs
else:  # the diff and apply engine is imported by the first call that needs it
    applying, archive, diffs = (
        LazyModule(f"graphdriver.{m}") for m in ("applying", "archive", "diffs")
    )

log = logging.getLogger(__name__)

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")

_DOING = {"creating": "created", "applying": "filled by apply-diff", "removing": "removed"}


def private_dir(path: Path) -> None:
    """Make *path* (mode 0700), or take group and other access away from an existing one: a
    layer may hold a hostile tar's device nodes and setuid files (CVE-2021-41091)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if not st.st_mode & 0o077:
        return
    if st.st_mode & stat.S_ISVTX:  # /tmp and the like: shared by others, never ours to close
        log.warning("%s is a shared directory; give the store a directory of its own", path)
        return
    os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)


def validate_id(layer_id: str, what: str = "layer id") -> str:
    """Return *layer_id* if it is ``[A-Za-z0-9][A-Za-z0-9_.-]{0,127}``, else InvalidLayerId."""
    if not isinstance(layer_id, str) or not _ID.match(layer_id):
        shown = repr(layer_id) if len(str(layer_id)) <= 40 else repr(str(layer_id)[:40]) + "..."
        raise InvalidLayerId(
            f"invalid {what} {shown}: use 1-128 characters of A-Z a-z 0-9 _ . -, "
            f"starting with a letter or digit"
        )
    return layer_id


class LayerStore:
    """A stack of copy-on-write layers kept by one driver under ``<root>/<driver>``."""

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
            with self._locked("open the store"):
                recorded = self.meta.get_meta("driver")
                if recorded is not None and recorded != self.name:
                    raise StoreError(
                        f"{self.home} belongs to driver {recorded!r}, not {self.name!r}"
                    )
                self.driver = driver_cls(self.home, options)
                if recorded is None:
                    self._first_open()
                self._call(
                    self.driver.recover,
                    [_info(r) for r in self.meta.all()],
                    doing=f"recover driver {self.name}",
                )
            recovery.recover(self)
        except BaseException:
            if self.meta.created:
                # a refused first open (the driver cannot run here...) leaves no database, or
                # the next open would take this root for the refused driver's store
                self.meta.discard()
            else:
                self.meta.close()
            self._lock.close()
            raise

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

    # ------------------------------------------------------------------------ locking, recovery

    def _locked(self, doing: str = "change the store") -> contextlib.AbstractContextManager[None]:
        """Hold the store's exclusive lock (re-entrant within this object); *doing* is what
        a process waiting for it is told."""
        return self._lock.held(doing)

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

    def _ready(self, layer_id: str, what: str = "layer") -> LayerRecord:
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
            self._ready(layer_id)
        except GraphDriverError:
            return False
        return True

    def layers(self) -> list[str]:
        """Ids of every layer, oldest first."""
        return [r.id for r in self.meta.all() if r.state == "ready"]

    def metadata(self, layer_id: str) -> dict[str, object]:
        """What the store knows about a layer (``graphdriver inspect``)."""
        rec = self._ready(layer_id)
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

    @property
    def reproduces_exact_diffs(self) -> bool:
        """Docker's ``ReproducesExactDiffs``: the diff of a layer that apply-diff filled, while
        it is unchanged, is the applied tar byte for byte (on every driver: the core keeps a
        record of each applied tar, ``archive.tarsplit``)."""
        return applying.keeps_records()

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
        with self._locked(f"create layer {layer_id}"):
            self._free_id(layer_id)
            parent_rec = self._ready(parent, "parent") if parent is not None else None
            if parent_rec is not None and parent_rec.mount_count:
                raise LayerInUse(
                    f"parent {parent!r} is mounted, so its files can still change; unmount it "
                    f"before creating a layer on top"
                )
            depth = len(self.meta.chain(parent)) + 2 if parent is not None else 1
            if depth > self.driver.capabilities.max_depth:
                raise MaxDepthExceeded(
                    f"layer {layer_id!r} would be {depth} layers deep; driver {self.name!r} "
                    f"mounts at most {self.driver.capabilities.max_depth}"
                )
            rec = LayerRecord(
                id=layer_id,
                parent=parent,
                state="creating",
                rw=rw,
                size_limit=opts.size,
                mount_label=opts.mount_label,
                created=time.time(),
                labels=dict(labels or {}),
                volumes=sorted(set(declared)),
            )
            with self._operation(layer_id) as done:
                with self.meta.transaction():
                    self.meta.insert(rec)
                try:
                    faults.point("store.create.recorded")
                    self._call(
                        self.driver.create,
                        _info(rec),
                        _info(parent_rec) if parent_rec else None,
                        opts,
                        doing=f"create layer {layer_id}",
                    )
                    faults.point("store.create.after-driver")
                    rec.state = "ready"
                    rec.boundary_ns = self._boundary()
                    with self.meta.transaction():
                        self.meta.update(layer_id, state="ready", boundary_ns=rec.boundary_ns)
                except BaseException:
                    self._discard(rec)
                    raise
                done()
        self.hooks.layer_created(self, rec)

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
    def _operation(self, layer_id: str) -> Iterator[Callable[[], None]]:
        """Hold the layer's lock for an in-flight operation (the store lock is held); the
        yielded function marks the operation over, so the lock file can go."""
        fd = self.layer_locks.exclusive(layer_id)
        if fd is None:
            raise LayerInUse(
                f"layer {layer_id!r} is being read or changed by another command (a diff "
                f"streaming it?); try again when it is done"
            )
        over: list[bool] = []
        try:
            yield lambda: over.append(True)
        finally:
            self.layer_locks.release(fd, layer_id if over else None)

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

    def _discard(self, rec: LayerRecord) -> None:
        """Remove a half-made layer from the driver and the metadata, keeping the first error."""
        try:
            self.driver.remove(_info(rec))
        except Exception as exc:  # the error that got us here is the one to report
            log.warning(
                "cleaning up half-made layer %s failed (%s); retried at next open", rec.id, exc
            )
            log.debug("cleanup failure", exc_info=True)
            recovery.record_failure(self, rec.id, exc)
            return
        with self.meta.transaction():
            self.meta.delete(rec.id)

    def remove(self, layer_id: str) -> None:
        """Delete a layer; refused while it is mounted or has children.

        The layer disappears from the store first (state ``removing``); if the driver then
        fails (EBUSY), the removal is finished at the next open or on reuse of the id.
        """
        with self._locked(f"remove layer {layer_id}"):
            rec = self._ready(layer_id)
            if rec.mount_count:
                raise LayerInUse(
                    f"layer {layer_id!r} is mounted ({rec.mount_count} "
                    f"reference(s)); unmount it first"
                )
            children = self.meta.children(layer_id)
            if children:
                shown = ", ".join(children[:5]) + (" ..." if len(children) > 5 else "")
                raise LayerInUse(f"layer {layer_id!r} has children ({shown}); remove them first")
            owner = self.meta.container_of(layer_id)
            if owner is not None:
                raise LayerInUse(
                    f"layer {layer_id!r} is the read-write layer of container {owner!r}; "
                    f"use `graphdriver container rm {owner}`"
                )
            with self._operation(layer_id) as done:
                with self.meta.transaction():
                    self.meta.update(layer_id, state="removing")
                if not recovery.finish_removal(self, rec):
                    reason = self.meta.meta_items(recovery.FAILED).get(layer_id, "")
                    raise StoreError(
                        f"layer {layer_id!r} is removed from the store, but deleting its files "
                        f"failed ({reason}); that is retried at the next open"
                    )
                done()
        self.hooks.layer_removed(self, layer_id)

    def commit(self, layer_id: str) -> None:
        """Make a read-write layer a read-only (image) layer in place, copying nothing: what it
        holds becomes what children see (containerd's Commit). Refused while mounted; a layer
        that is already read-only is left as it is, so a retried commit succeeds."""
        with self._locked(f"commit layer {layer_id}"):
            rec = self._ready(layer_id)
            if not rec.rw:
                return
            if rec.mount_count:
                raise LayerInUse(
                    f"layer {layer_id!r} is mounted ({rec.mount_count} reference(s)); "
                    f"unmount it before committing it"
                )
            owner = self.meta.container_of(layer_id)
            if owner is not None:
                raise LayerInUse(
                    f"layer {layer_id!r} is the read-write layer of container {owner!r}"
                )
            with self.meta.transaction():
                self.meta.update(layer_id, rw=0)

    # ---------------------------------------------------------------------------- mounts

    def _driver_mount(self, rec: LayerRecord, chain: Sequence[LayerRecord]) -> Path:
        sealed = not rec.rw and bool(self.meta.children(rec.id))
        result = self._call(
            self.driver.mount,
            _info(rec, sealed=sealed),
            [_info(r) for r in chain],
            doing=f"mount layer {rec.id}",
        )
        assert isinstance(result, Path)
        return result

    def _mount_path(self, rec: LayerRecord) -> Path:
        """The layer's mounted root: the counted mount if it is still there, else a new one."""
        path: Path | None = Path(rec.mount_path) if rec.mount_path else None
        if path is None or (
            isinstance(self.driver, KernelMounts) and self.driver.is_mounted(_info(rec)) is False
        ):
            path = self.hooks.mount(self, rec, self.meta.chain(rec.id), self._driver_mount)
        return path

    def mount_spec(self, layer_id: str, readonly: bool = False) -> list[MountEntry] | None:
        """The mounts another program can make itself to see the layer (writable unless
        *readonly*), from a driver that implements :class:`MountSpec`; None when the caller
        must bind the mount that ``get`` returns instead."""
        rec = self._ready(layer_id)
        if not isinstance(self.driver, MountSpec):
            return None
        chain = self.meta.chain(layer_id)
        spec = self._call(
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
        with self._locked(f"mount layer {layer_id}"):
            rec = self._ready(layer_id)
            path = self._mount_path(rec)
            faults.point("store.get.after-driver")
            with self.meta.transaction():
                self.meta.update(
                    layer_id, mount_count=rec.mount_count + 1, mount_path=str(path), dirty=1
                )
            return path

    def put(self, layer_id: str) -> None:
        """Release one reference; the last one unmounts. ``put`` without ``get`` is an error."""
        with self._locked(f"unmount layer {layer_id}"):
            rec = self._ready(layer_id)
            if rec.mount_count <= 0:
                raise NotMounted(f"layer {layer_id!r} is not mounted")
            # a diff streaming the layer keeps the mount; it unmounts when it is done
            if rec.mount_count == 1 and not self.layer_locks.busy(layer_id):
                self._call(self.driver.unmount, _info(rec), doing=f"unmount layer {layer_id}")
            faults.point("store.put.after-driver")
            with self.meta.transaction():
                self.meta.update(
                    layer_id,
                    mount_count=rec.mount_count - 1,
                    mount_path=rec.mount_path if rec.mount_count > 1 else None,
                )

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
        with self._locked("clean up the store"):
            for rec in self.meta.all():
                if self.layer_locks.busy(rec.id):
                    log.warning("layer %s is in use by a running command; left mounted", rec.id)
                    continue
                if rec.mount_count or (
                    isinstance(self.driver, KernelMounts)
                    and self.driver.is_mounted(_info(rec)) is True
                ):
                    self._call(self.driver.unmount, _info(rec), doing=f"unmount {rec.id}")
                    with self.meta.transaction():
                        self.meta.update(rec.id, mount_count=0, mount_path=None)
            self._call(self.driver.cleanup, doing="clean up the driver")

    # ---------------------------------------------------------------------------- diffs

    def changes(self, layer_id: str, parent: str | None = None) -> list[Change]:
        """Sorted changes of *layer_id* relative to *parent* (default: its own parent)."""
        with diffs.change_source(self, layer_id, parent) as (changes, _root, _kind):
            return changes

    def diff_size(self, layer_id: str, parent: str | None = None) -> int:
        """Bytes of file data that ``diff`` would carry; what ``apply_diff`` returns for it."""
        with diffs.change_source(self, layer_id, parent) as (changes, root, _kind):
            return archive.changes_size(root, changes)

    def usage(self, layer_id: str) -> tuple[int, int]:
        """(bytes, inodes) of what the layer itself holds against its parent: the file data
        ``diff`` would carry, and the entries it adds or changes (containerd's Usage)."""
        with diffs.change_source(self, layer_id, None) as (changes, root, _kind):
            kept = [c for c in changes if c.kind != archive.ChangeKind.DELETE]
            return archive.changes_size(root, changes), len(kept)

    def write_diff(
        self,
        layer_id: str,
        out: IO[bytes] | int,
        parent: str | None = None,
        compress: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Write the OCI layer tar of *layer_id*'s changes to *out* (fd or binary file).

        Returns the bytes of (uncompressed) tar written.
        """
        return self.export(layer_id, out, parent, compress, progress).tar_size

    def export(
        self,
        layer_id: str,
        out: IO[bytes] | int,
        parent: str | None = None,
        compress: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> diffs.DiffResult:
        """``write_diff`` that says whether the tar is the applied one again, byte for byte
        (an applied layer that is unchanged), or generated, and why."""
        if compress not in (None, "none", "gzip", "zstd"):
            raise InvalidOption(f"unknown compression {compress!r}: use gzip, zstd or none")
        with diffs.diff_source(self, layer_id, parent) as source:
            return diffs.write_tar(layer_id, source, out, compress, progress)

    def diff(self, layer_id: str, parent: str | None = None) -> BinaryIO:
        """A readable stream of the uncompressed OCI layer tar; close it when done.

        The layers it reads are referenced from now until the stream ends or is closed.
        """
        return diffs.stream(self, layer_id, parent)

    def apply_diff(
        self, layer_id: str, stream: BinaryIO, progress: Callable[[int], None] | None = None
    ) -> int:
        """Unpack an OCI layer tar (plain, gzip or zstd) into a fresh layer; return its size.

        On any error the layer is rolled back to empty and the error raised; the layer's diffID
        is then in ``metadata(layer_id)["diff_id"]``.
        """
        return self.apply(layer_id, stream, progress).size

    def apply(
        self, layer_id: str, stream: BinaryIO, progress: Callable[[int], None] | None = None
    ) -> archive.ApplyResult:
        """``apply_diff`` that also returns the diffID and compression of the tar.

        The layer is marked ``applying`` under the store lock, the tar is extracted without
        it, and the lock is taken again to mark the layer ready (or empty it again).
        """
        return applying.apply(self, layer_id, stream, progress)


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
        return LayerStore(root_path, driver_cls, options, plugin_hooks, wait=wait)
    except OSError as exc:
        raise from_oserror(exc, f"open store at {root_path}") from exc
