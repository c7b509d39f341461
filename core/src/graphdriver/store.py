"""LayerStore: what users of graphdriver call.

The store validates input, keeps the layer catalogue (:mod:`.metadata`), serialises mutations
across processes with an fcntl lock, counts mounts, calls hooks, and asks the driver to move
bytes. Every mutation is recorded as in flight (``creating``, ``applying``, ``removing``) before
the driver is called, so that :func:`open_store` can roll back what a killed process left behind.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, BinaryIO

from . import archive
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
from .locking import FileLock
from .metadata import IN_FLIGHT, LayerRecord, Metadata
from .plugins import Hooks, choose_driver, hooks, load_driver

log = logging.getLogger(__name__)

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")


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
        self, root: Path, driver_cls: type[Driver], options: Mapping[str, str], plugin_hooks: Hooks
    ) -> None:
        self.root = root
        self.home = root / driver_cls.name
        self.hooks = plugin_hooks
        self.home.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.home / "lock")
        self.driver = driver_cls(self.home, options)
        self.name = driver_cls.name
        self.meta = Metadata(self.home / "metadata.db")
        with self._locked():
            with self.meta.transaction():
                recorded = self.meta.get_meta("driver")
                if recorded is None:
                    self.meta.set_meta("driver", self.name)
                elif recorded != self.name:
                    raise StoreError(
                        f"{self.home} belongs to driver {recorded!r}, not {self.name!r}"
                    )
            self._recover()

    # ------------------------------------------------------------------------ locking, recovery

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the store's exclusive lock (re-entrant within this object)."""
        return self._lock.held()

    def _recover(self) -> None:
        """Roll back what a killed process left half-done, and match mount counts to reality."""
        real = self.driver.capabilities.real_mounts
        for rec in reversed(self.meta.all()):
            info = _info(rec)
            if rec.state in IN_FLIGHT:
                log.warning(
                    "rolling back layer %s left %s by a process that died", rec.id, rec.state
                )
                with contextlib.suppress(GraphDriverError, OSError):
                    self.driver.unmount(info)
                self._call(self.driver.remove, info, doing=f"roll back layer {rec.id}")
                with self.meta.transaction():
                    self.meta.delete(rec.id)
                continue
            if not real:
                continue
            mounted = self.driver.is_mounted(info)
            if mounted is None:
                continue
            if rec.mount_count and not mounted:
                log.warning(
                    "layer %s was counted as mounted %d times but is not mounted",
                    rec.id,
                    rec.mount_count,
                )
                with self.meta.transaction():
                    self.meta.update(rec.id, mount_count=0, mount_path=None)
            elif not rec.mount_count and mounted:
                log.warning("unmounting layer %s, left mounted by a process that died", rec.id)
                self._call(self.driver.unmount, info, doing=f"unmount layer {rec.id}")

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
        if rec is None or rec.state != "ready":
            raise LayerNotFound(f"{what} {layer_id!r} does not exist")
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
        """Key/value pairs like the storage section of ``docker info``."""
        recs = [r for r in self.meta.all() if r.state == "ready"]
        return [
            ("Storage Driver", self.name),
            ("Root Dir", str(self.home)),
            ("Layers", str(len(recs))),
            ("Mounted Layers", str(sum(1 for r in recs if r.mount_count))),
            *self.driver.status(),
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
        with self._locked():
            if self.meta.get(layer_id) is not None:
                raise LayerExists(f"layer {layer_id!r} already exists")
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
            with self.meta.transaction():
                self.meta.insert(rec)
            try:
                self._call(
                    self.driver.create,
                    _info(rec),
                    _info(parent_rec) if parent_rec else None,
                    opts,
                    doing=f"create layer {layer_id}",
                )
            except BaseException:
                self._discard(rec)
                raise
            rec.state = "ready"
            rec.boundary_ns = self._boundary()
            with self.meta.transaction():
                self.meta.update(layer_id, state="ready", boundary_ns=rec.boundary_ns)
        self.hooks.layer_created(self, rec)

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
        except Exception:  # the error that got us here is the one to report
            log.exception(
                "cleaning up half-made layer %s failed; it is retried at next open", rec.id
            )
            return
        with self.meta.transaction():
            self.meta.delete(rec.id)

    def remove(self, layer_id: str) -> None:
        """Delete a layer; refused while it is mounted or has children."""
        with self._locked():
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
            with self.meta.transaction():
                self.meta.update(layer_id, state="removing")
            self._call(self.driver.remove, _info(rec), doing=f"remove layer {layer_id}")
            with self.meta.transaction():
                self.meta.delete(layer_id)
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

    def get(self, layer_id: str, *, _internal: bool = False) -> Path:
        """Mount the layer (first reference) and return its merged root; counts references."""
        with self._locked():
            rec = self._ready(layer_id)
            path: Path | None = Path(rec.mount_path) if rec.mount_path else None
            if path is None or (
                self.driver.capabilities.real_mounts and self.driver.is_mounted(_info(rec)) is False
            ):
                path = self.hooks.mount(self, rec, self.meta.chain(layer_id))
            with self.meta.transaction():
                fields: dict[str, object] = {
                    "mount_count": rec.mount_count + 1,
                    "mount_path": str(path),
                }
                if not _internal:
                    fields["dirty"] = 1
                self.meta.update(layer_id, **fields)
            return path

    def put(self, layer_id: str) -> None:
        """Release one reference; the last one unmounts. ``put`` without ``get`` is an error."""
        with self._locked():
            rec = self._ready(layer_id)
            if rec.mount_count <= 0:
                raise NotMounted(f"layer {layer_id!r} is not mounted")
            if rec.mount_count == 1:
                self._call(self.driver.unmount, _info(rec), doing=f"unmount layer {layer_id}")
            with self.meta.transaction():
                self.meta.update(
                    layer_id,
                    mount_count=rec.mount_count - 1,
                    mount_path=rec.mount_path if rec.mount_count > 1 else None,
                )

    @contextlib.contextmanager
    def mounted(self, layer_id: str) -> Iterator[Path]:
        """``get`` for the length of a with-block, then ``put``."""
        path = self.get(layer_id, _internal=True)
        try:
            yield path
        finally:
            self.put(layer_id)

    def cleanup(self) -> None:
        """Unmount every layer of this store, whoever mounted it, and zero the counts."""
        with self._locked():
            for rec in self.meta.all():
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

    @contextlib.contextmanager
    def _change_source(
        self, layer_id: str, parent: str | None
    ) -> Iterator[tuple[list[Change], str, str]]:
        """The changes of *layer_id* against *parent*, and (root, kind) to read files from."""
        with self._locked():
            rec, base, direct = self._against(layer_id, parent)
            drv = self.driver
            if direct and isinstance(drv, NativeDiff):
                chain = [_info(r) for r in self.meta.chain(layer_id)]
                native = drv.changes(_info(rec), chain)
                source = drv.diff_source(_info(rec))
                if native is not None and source is not None:
                    changes = [Change(p, archive.ChangeKind(k)) for p, k in native]
                    yield self._filtered(layer_id, changes), str(source), "overlay"
                    return
            with contextlib.ExitStack() as stack:
                top = self._without_submounts(stack, stack.enter_context(self.mounted(layer_id)))
                below = stack.enter_context(self.mounted(base.id)) if base else None
                changes = archive.tree_changes(
                    str(top), str(below) if below else None, rec.boundary_ns if direct else None
                )
                yield self._filtered(layer_id, changes), str(top), "tree"

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
        with self._change_source(layer_id, parent) as (changes, root, kind):
            writer, finish = tar_writer(out, compress)
            writer.progress = progress
            try:
                write_changes_tar(writer, root, changes, source=kind)
            except OSError as exc:
                raise from_oserror(exc, f"diff of layer {layer_id}") from exc
            finish()
            return writer.bytes_written

    def diff(self, layer_id: str, parent: str | None = None) -> BinaryIO:
        """A readable stream of the uncompressed OCI layer tar; close it when done."""
        self._ready(layer_id)
        r, w = os.pipe2(os.O_CLOEXEC)
        failure: list[BaseException] = []

        def produce() -> None:
            try:
                self.write_diff(layer_id, w, parent)
            except BrokenPipeError:
                pass  # the reader closed early
            except BaseException as exc:
                failure.append(exc)
            finally:
                os.close(w)

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
        """``apply_diff`` that also returns the diffID and compression of the tar."""
        with self._locked():
            rec = self._ready(layer_id)
            if rec.mount_count:
                raise LayerInUse(f"layer {layer_id!r} is mounted; apply-diff needs it unmounted")
            if self.meta.children(layer_id):
                raise LayerInUse(
                    f"layer {layer_id!r} has children; apply-diff would change what they see"
                )
            if rec.dirty or rec.diff_id:
                raise LayerInUse(
                    f"layer {layer_id!r} already has content (it was mounted or "
                    f"applied before); apply-diff needs a fresh layer"
                )
            with self.meta.transaction():
                self.meta.update(layer_id, state="applying")
            try:
                result = self._apply_into(rec, stream, progress)
            except BaseException:
                self._reset(rec)
                raise
            with self.meta.transaction():
                self.meta.update(
                    layer_id,
                    state="ready",
                    dirty=1,
                    diff_id=result.diff_id,
                    unpacked_size=result.size,
                )
        rec.state = "ready"
        self.hooks.layer_applied(self, rec, result.size, result.diff_id)
        return result

    def _apply_into(
        self, rec: LayerRecord, stream: BinaryIO, progress: Callable[[int], None] | None
    ) -> archive.ApplyResult:
        target = (
            self.driver.apply_target(_info(rec)) if isinstance(self.driver, NativeApply) else None
        )
        if target is not None:
            return archive.apply_layer(target[0], stream, whiteouts=target[1], progress=progress)
        chain = self.meta.chain(rec.id)
        path = self.hooks.mount(self, rec, chain)
        try:
            return archive.apply_layer(path, stream, whiteouts="delete", progress=progress)
        finally:
            self._call(self.driver.unmount, _info(rec), doing=f"unmount layer {rec.id}")

    def _reset(self, rec: LayerRecord) -> None:
        """After a failed apply: make the layer empty again, or drop it if that fails too."""
        parent = self.meta.get(rec.parent) if rec.parent else None
        try:
            self.driver.remove(_info(rec))
            self.driver.create(
                _info(rec),
                _info(parent) if parent else None,
                CreateOpts(size=rec.size_limit, mount_label=rec.mount_label),
            )
        except Exception:
            log.exception("layer %s could not be reset after a failed apply; removing it", rec.id)
            self._discard(rec)
            return
        with self.meta.transaction():
            self.meta.update(rec.id, state="ready", boundary_ns=self._boundary())


def open_store(
    root: str | os.PathLike[str],
    driver: str | None = None,
    options: Mapping[str, str] | None = None,
) -> LayerStore:
    """Open (creating it if needed) the store under *root*, with *driver* or the default one."""
    root_path = Path(root).absolute()
    try:
        root_path.mkdir(parents=True, exist_ok=True)
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
        return LayerStore(root_path, driver_cls, options, plugin_hooks)
    except OSError as exc:
        raise from_oserror(exc, f"open store at {root_path}") from exc
