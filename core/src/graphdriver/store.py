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
import io
import logging
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, BinaryIO

from . import archive, faults, recovery
from .archive.changes import Change
from .archive.streams import DiffStream, tar_writer
from .archive.tar import write_changes_tar
from .driver import CreateOpts, Driver, LayerInfo, NativeApply, NativeDiff
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
from .linux.bind import container_path
from .linux.mount import MS_BIND, mount, mounts_under, unmount
from .locking import FileLock, LayerLocks
from .metadata import LayerRecord, Metadata
from .plugins import Hooks, choose_driver, hooks, load_driver

log = logging.getLogger(__name__)

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
#: write ends of the pipes of running ``diff`` streams: a child forked meanwhile (the apply
#: sandbox) must not keep one open, or the reader would never see the end of the tar
_DIFF_PIPES: set[int] = set()


def _close_diff_pipes() -> None:
    for fd in list(_DIFF_PIPES):
        with contextlib.suppress(OSError):
            os.close(fd)
    _DIFF_PIPES.clear()


os.register_at_fork(after_in_child=_close_diff_pipes)

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


def _info(rec: LayerRecord, *, sealed: bool = False) -> LayerInfo:
    return LayerInfo(
        id=rec.id,
        parent=rec.parent,
        rw=rec.rw,
        size=rec.size_limit,
        mount_label=rec.mount_label,
        sealed=sealed,
    )


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
                with self.meta.transaction():
                    recorded = self.meta.get_meta("driver")
                    if recorded is None:
                        self.meta.set_meta("driver", self.name)
                    elif recorded != self.name:
                        raise StoreError(
                            f"{self.home} belongs to driver {recorded!r}, not {self.name!r}"
                        )
                self.driver = driver_cls(self.home, options)
                self._call(
                    self.driver.recover,
                    [_info(r) for r in self.meta.all()],
                    doing=f"recover driver {self.name}",
                )
            recovery.recover(self)
        except BaseException:
            self.meta.close()
            self._lock.close()
            raise

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
            *self.driver.status(),
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
                faults.point("store.remove.recorded")
                if not recovery.finish_removal(self, rec):
                    reason = self.meta.meta_items(recovery.FAILED).get(layer_id, "")
                    raise StoreError(
                        f"layer {layer_id!r} is removed from the store, but deleting its files "
                        f"failed ({reason}); that is retried at the next open"
                    )
                done()
        self.hooks.layer_removed(self, layer_id)

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
            self.driver.capabilities.real_mounts and self.driver.is_mounted(_info(rec)) is False
        ):
            path = self.hooks.mount(self, rec, self.meta.chain(rec.id))
        return path

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
                    self.driver.capabilities.real_mounts
                    and self.driver.is_mounted(_info(rec)) is True
                ):
                    self._call(self.driver.unmount, _info(rec), doing=f"unmount {rec.id}")
                    with self.meta.transaction():
                        self.meta.update(rec.id, mount_count=0, mount_path=None)
            self._call(self.driver.cleanup, doing="clean up the driver")

    # ---------------------------------------------------------------------------- diffs

    def _against(
        self, layer_id: str, parent: str | None
    ) -> tuple[LayerRecord, LayerRecord | None, bool]:
        rec = self._ready(layer_id)
        if parent is None:
            base = self._ready(rec.parent, "parent") if rec.parent else None
            return rec, base, True
        base = self._ready(parent, "parent")
        return rec, base, base.id == rec.parent

    def _read_ref(self, stack: contextlib.ExitStack, rec: LayerRecord, mount: bool) -> Path | None:
        """Take a reader's reference on *rec* (store lock held) until *stack* closes: the layer
        cannot be removed, changed or unmounted under it. With *mount*, its mounted root."""
        fd = self.layer_locks.shared(rec.id)
        if fd is None:
            raise LayerInUse(f"layer {rec.id!r} is being changed; try again when it is done")
        stack.callback(self._end_read, rec.id, fd)
        return self._mount_path(rec) if mount else None

    def _end_read(self, layer_id: str, fd: int) -> None:
        """Drop a reader's reference; unmount the layer if it was mounted only for readers."""
        with self._locked(f"end the diff of layer {layer_id}"):
            self.layer_locks.release(fd)
            rec = self.meta.get(layer_id)
            if rec is not None and not rec.mount_count and not self.layer_locks.busy(layer_id):
                self._call(self.driver.unmount, _info(rec), doing=f"unmount layer {layer_id}")

    @contextlib.contextmanager
    def _change_source(
        self, layer_id: str, parent: str | None, *, filtered: bool = True
    ) -> Iterator[tuple[list[Change], str, str]]:
        """The changes of *layer_id* against *parent*, and (root, kind) to read files from.

        References are taken under the store lock; the tree walk and whatever the caller
        streams run without it, so a long diff never holds up other commands.
        """
        with contextlib.ExitStack() as stack:
            native: list[Change] | None = None
            top = below = None
            root = kind = ""
            with self._locked(f"diff layer {layer_id}"):
                rec, base, direct = self._against(layer_id, parent)
                drv = self.driver
                if direct and isinstance(drv, NativeDiff):
                    found = drv.changes(_info(rec), [_info(r) for r in self.meta.chain(layer_id)])
                    source = drv.diff_source(_info(rec))
                    if found is not None and source is not None:
                        self._read_ref(stack, rec, mount=False)
                        native = [Change(p, archive.ChangeKind(k)) for p, k in found]
                        root, kind = str(source), "overlay"
                if native is None:
                    top = self._read_ref(stack, rec, mount=True)
                    below = self._read_ref(stack, base, mount=True) if base else None
            if native is None:
                assert top is not None
                root, kind = str(self._without_submounts(stack, top)), "tree"
                native = archive.tree_changes(
                    root, str(below) if below else None, rec.boundary_ns if direct else None
                )
            yield (self._filtered(layer_id, native) if filtered else native), root, kind

    def _without_submounts(self, stack: contextlib.ExitStack, root: Path) -> Path:
        """*root*, or, when something is mounted inside it (a mounted container's volumes), a
        private non-recursive bind of it: a diff must not walk into volumes."""
        real = os.path.realpath(root)
        if not any(m != real for m in mounts_under(real)):
            return root
        view = Path(tempfile.mkdtemp(prefix=".diff-view-", dir=self.home))
        stack.callback(view.rmdir)
        mount(real, view, None, MS_BIND)
        stack.callback(unmount, view)
        return view

    def _filtered(self, layer_id: str, changes: list[Change]) -> list[Change]:
        if not self.hooks.filters_diff:
            return changes
        return [c for c in changes if self.hooks.keep_change(layer_id, c)]

    def changes(self, layer_id: str, parent: str | None = None) -> list[Change]:
        """Sorted changes of *layer_id* relative to *parent* (default: its own parent)."""
        with self._change_source(layer_id, parent) as (changes, _root, _kind):
            return changes

    def diff_size(self, layer_id: str, parent: str | None = None) -> int:
        """Bytes of file data that ``diff`` would carry; what ``apply_diff`` returns for it."""
        with self._change_source(layer_id, parent) as (changes, root, _kind):
            return archive.changes_size(root, changes)

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
        if compress not in (None, "none", "gzip", "zstd"):
            raise InvalidOption(f"unknown compression {compress!r}: use gzip, zstd or none")
        with self._change_source(layer_id, parent) as source:
            return _write_tar(layer_id, source, out, compress, progress)

    def diff(self, layer_id: str, parent: str | None = None) -> BinaryIO:
        """A readable stream of the uncompressed OCI layer tar; close it when done.

        The layers it reads are referenced from now until the stream ends or is closed.
        """
        source = self._change_source(layer_id, parent)
        found = source.__enter__()
        r, w = os.pipe2(os.O_CLOEXEC)
        _DIFF_PIPES.add(w)
        failure: list[BaseException] = []

        def produce() -> None:
            try:
                _write_tar(layer_id, found, w, None, None)
            except BrokenPipeError:
                pass  # the reader closed early
            except BaseException as exc:
                failure.append(exc)
            finally:
                _DIFF_PIPES.discard(w)
                os.close(w)
                try:
                    source.__exit__(None, None, None)
                except BaseException as exc:
                    failure.append(exc)

        thread = threading.Thread(target=produce, name=f"diff-{layer_id}", daemon=True)
        thread.start()
        return io.BufferedReader(DiffStream(r, thread, failure), buffer_size=1 << 20)

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
        doing = f"apply-diff into layer {layer_id}"
        with contextlib.ExitStack() as stack:
            with self._locked(doing):
                rec = self._refuse_apply(layer_id)
                done = stack.enter_context(self._operation(layer_id))
                with self.meta.transaction():
                    self.meta.update(layer_id, state="applying")
                try:
                    faults.point("store.apply.recorded")
                    target, whiteouts, mounted = self._apply_target(rec)
                except BaseException:
                    self._reset(rec)
                    done()
                    raise
            try:
                faults.point("store.apply.prepared")
                result = archive.apply_layer(target, stream, whiteouts=whiteouts, progress=progress)
                faults.point("store.apply.extracted")
                with self._locked(doing):
                    if mounted:
                        self._call(self.driver.unmount, _info(rec), doing=f"unmount {layer_id}")
                    faults.point("store.apply.unmounted")
                    with self.meta.transaction():
                        self.meta.update(
                            layer_id,
                            state="ready",
                            dirty=1,
                            diff_id=result.diff_id,
                            unpacked_size=result.size,
                        )
                    done()
            except BaseException:
                with self._locked(f"roll back {doing}"):
                    now = self.meta.get(layer_id)
                    if now is not None and now.state == "applying":  # not committed
                        self._reset(rec)
                        done()
                raise
        rec.state = "ready"
        self.hooks.layer_applied(self, rec, result.size, result.diff_id)
        return result

    def _refuse_apply(self, layer_id: str) -> LayerRecord:
        """The layer's record if apply-diff may fill it; a refusal commits nothing."""
        rec = self._ready(layer_id)
        if rec.mount_count:
            raise LayerInUse(f"layer {layer_id!r} is mounted; apply-diff needs it unmounted")
        if self.meta.children(layer_id):
            raise LayerInUse(
                f"layer {layer_id!r} has children; apply-diff would change what they see"
            )
        if rec.diff_id:
            raise LayerInUse(
                f"layer {layer_id!r} already has content (apply-diff filled it before); "
                f"apply-diff needs a fresh layer"
            )
        if rec.dirty and self._has_changes(rec):
            raise LayerInUse(
                f"layer {layer_id!r} already has content (files were written while it was "
                f"mounted); apply-diff needs a fresh layer"
            )
        rec.state = "applying"
        return rec

    def _has_changes(self, rec: LayerRecord) -> bool:
        """Whether a layer that was mounted changed anything (mounted and unmounted without a
        write is still fresh, as moby's graphtest DiffApply expects)."""
        with self._change_source(rec.id, None, filtered=False) as (changes, _root, _kind):
            return bool(changes)

    def _apply_target(self, rec: LayerRecord) -> tuple[Path, str, bool]:
        """(directory, whiteout format, whether it was mounted for this) to extract into."""
        if isinstance(self.driver, NativeApply):
            target = self._call(self.driver.apply_target, _info(rec), doing=f"apply {rec.id}")
            if target is not None:
                return target[0], target[1], False
        return self.hooks.mount(self, rec, self.meta.chain(rec.id)), "delete", True

    def _reset(self, rec: LayerRecord) -> None:
        """After a failed apply: make the layer empty again, as ``create`` made it. If that
        fails too, the layer stays ``applying`` and recovery tries again at the next open;
        the record the user made is never deleted."""
        parent = self.meta.get(rec.parent) if rec.parent else None
        try:
            with contextlib.suppress(GraphDriverError, OSError):
                self.driver.unmount(_info(rec))
            self.driver.remove(_info(rec))
            self.driver.create(
                _info(rec),
                _info(parent) if parent else None,
                CreateOpts(size=rec.size_limit, mount_label=rec.mount_label),
            )
            faults.point("store.apply.reset")
        except Exception as exc:
            log.warning("layer %s could not be emptied after a failed apply: %s", rec.id, exc)
            log.debug("reset failure", exc_info=True)
            recovery.record_failure(self, rec.id, exc)
            return
        with self.meta.transaction():
            self.meta.update(
                rec.id,
                state="ready",
                boundary_ns=self._boundary(),
                dirty=0,
                diff_id=None,
                unpacked_size=None,
            )
            self.meta.delete_meta(recovery.FAILED + rec.id)


def _write_tar(
    layer_id: str,
    source: tuple[list[Change], str, str],
    out: IO[bytes] | int,
    compress: str | None,
    progress: Callable[[int], None] | None,
) -> int:
    """Write the tar of *source* (changes, root, kind) to *out*; the tar's byte count."""
    changes, root, kind = source
    writer, finish = tar_writer(out, compress)
    writer.progress = progress
    try:
        write_changes_tar(writer, root, changes, source=kind)
    except OSError as exc:
        raise from_oserror(exc, f"diff of layer {layer_id}") from exc
    finish()
    return writer.bytes_written


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
