"""Reading layers: changes, diff sizes and diff streams, without holding the store lock.

A reader takes, under the store lock, a shared layer lock on each layer it reads (so the layer
cannot be removed, applied to or unmounted under it) and mounts what it must; the tree walk and
the tar stream run without the store lock; at the end it drops its references and unmounts a
layer that was mounted only for readers.

The diff of a layer that apply-diff filled, while that layer is unchanged, is the applied tar
again, byte for byte (``archive.tarsplit``); otherwise it is generated from the layer's changes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

from . import archive, faults
from .archive.changes import Change, ChangeKind
from .driver import NativeDiff
from .errors import LayerInUse, StoreError, from_oserror
from .lazy import LazyModule
from .linux.mount import MS_BIND, mount, mounts_under, unmount
from .linux.signals import start_thread
from .metadata import LayerRecord
from .recovery import MOUNTING
from .recovery import layer_info as _info
from .sqlite_readonly import is_frozen

if TYPE_CHECKING:
    from .archive import exact as exact_diff
    from .archive import streams, tar_writer, tarsplit
    from .store import LayerStore
else:  # the tar engine (hashlib, zstandard), imported by the first diff: not by ``changes``
    exact_diff, streams, tar_writer, tarsplit = (
        LazyModule(f"graphdriver.archive.{m}")
        for m in ("exact", "streams", "tar_writer", "tarsplit")
    )

log = logging.getLogger(__name__)

#: write ends of the pipes of running ``diff`` streams: a child forked meanwhile (the apply
#: sandbox) must not keep one open, or the reader would never see the end of the tar
_DIFF_PIPES: set[int] = set()


def _close_diff_pipes() -> None:
    for fd in list(_DIFF_PIPES):
        with contextlib.suppress(OSError):
            os.close(fd)
    _DIFF_PIPES.clear()


os.register_at_fork(after_in_child=_close_diff_pipes)


def against(
    store: LayerStore, layer_id: str, parent: str | None
) -> tuple[LayerRecord, LayerRecord | None, bool]:
    rec = store.ready(layer_id)
    if parent is None:
        base = store.ready(rec.parent, "parent") if rec.parent else None
        return rec, base, True
    base = store.ready(parent, "parent")
    return rec, base, base.id == rec.parent


def _read_ref(
    store: LayerStore, stack: contextlib.ExitStack, rec: LayerRecord, mount: bool
) -> Path | None:
    """Take a reader's reference on *rec* (store lock held) until *stack* closes: the layer
    cannot be removed, changed or unmounted under it. With *mount*, its mounted root."""
    fd = store.layer_locks.shared(rec.id)
    if fd is None:
        raise LayerInUse(f"layer {rec.id!r} is being changed; try again when it is done")
    stack.callback(_end_read, store, rec.id, fd, mount)
    return store._mount_path(rec, reader=True) if mount else None


def _end_read(store: LayerStore, layer_id: str, fd: int, mounted: bool) -> None:
    """Drop a reader's reference; unmount the layer if it is mounted only for readers: one
    this reader *mounted*, or one whose last ``put`` came while readers held it (marked).
    Not from records read as they were on a full disk (``is_frozen``): a count another
    command took meanwhile is not in them (a reader's own mount, unmarked there, stays for
    ``cleanup`` or ``check --repair``)."""
    with store.locked(f"end the diff of layer {layer_id}"):
        store.layer_locks.release(fd)
        if is_frozen(store.meta.db):
            return
        if not mounted and store.meta.get_meta(MOUNTING + layer_id) is None:
            return  # nothing mounted for readers
        rec = store.meta.get(layer_id)
        if rec is not None and not rec.mount_count and not store.layer_locks.busy(layer_id):
            store._call(store.driver.unmount, _info(rec), doing=f"unmount layer {layer_id}")
            if store.meta.get_meta(MOUNTING + layer_id) is not None:  # the reader's mount
                try:
                    with store.meta.transaction():
                        store.meta.delete_meta(MOUNTING + layer_id)
                except StoreError as exc:  # a full disk: the next open drops it
                    log.debug("the mark of layer %s stays: %s", layer_id, exc)


@contextlib.contextmanager
def change_source(
    store: LayerStore, layer_id: str, parent: str | None, *, filtered: bool = True
) -> Iterator[tuple[list[Change], str, str]]:
    """The changes of *layer_id* against *parent*, and (root, kind) to read files from.

    References are taken under the store lock; the tree walk and whatever the caller
    streams run without it, so a long diff never holds up other commands.
    """
    with _layer_source(store, layer_id, parent) as found:
        changes = found.walk() if found.changes is None else found.changes
        yield (_filtered(store, layer_id, changes) if filtered else changes), found.root, found.kind


@dataclass(frozen=True)
class _Found:
    """A layer to diff, referenced (and mounted) until its context ends: its changes when the
    driver listed them, else :meth:`walk` finds them in the tree at *root*."""

    changes: list[Change] | None
    root: str
    kind: str
    below: str | None
    boundary_ns: int | None

    def walk(self) -> list[Change]:
        return archive.tree_changes(self.root, self.below, self.boundary_ns)


def _native_changes(found: Sequence[tuple[str, int]]) -> list[Change]:
    """A driver's changes, (path, kind number), as Change: the kinds looked up by number
    (the enum's call, ~1 us each, was a tenth of the 10k-file container layer's changes); a
    number that is no kind fails as the enum's call does. A Change of a kind is kept as it is
    (overlay's, from the core's compare)."""
    kinds = {int(k): k for k in archive.ChangeKind}

    def pair(found: tuple[str, int]) -> Change:
        path, kind = found  # a longer tuple fails here
        return Change(path, kinds[kind])

    try:
        return [
            c if type(c) is Change and type(c[1]) is ChangeKind else pair(c) for c in found
        ]  # fmt: skip
    except KeyError as exc:
        raise ValueError(f"{exc.args[0]!r} is not a valid ChangeKind") from None


@contextlib.contextmanager
def _layer_source(store: LayerStore, layer_id: str, parent: str | None) -> Iterator[_Found]:
    with contextlib.ExitStack() as stack:
        native: list[Change] | None = None
        top = below = None
        root = ""
        with store.locked(f"diff layer {layer_id}"):
            rec, base, direct = against(store, layer_id, parent)
            drv = store.driver
            if direct and isinstance(drv, NativeDiff):
                found = drv.changes(_info(rec), [_info(r) for r in store.meta.chain(layer_id)])
                source = drv.diff_source(_info(rec))
                if found is not None and source is not None:
                    _read_ref(store, stack, rec, mount=False)
                    native = _native_changes(found)
                    root = str(source)
            if native is None:
                top = _read_ref(store, stack, rec, mount=True)
                below = _read_ref(store, stack, base, mount=True) if base else None
        if native is not None:
            yield _Found(native, root, "overlay", None, None)
            return
        assert top is not None
        root = str(_without_submounts(store, stack, top))
        boundary = rec.boundary_ns if direct else None
        yield _Found(None, root, "tree", str(below) if below else None, boundary)


def _without_submounts(store: LayerStore, stack: contextlib.ExitStack, root: Path) -> Path:
    """*root*, or, when something is mounted inside it (a mounted container's volumes), a
    private non-recursive copy of its mount: a diff must not walk into volumes. The copy is
    attached nowhere where the kernel can (:func:`.linux.bind.detached_copy`): a diff killed
    while it reads leaves no mount; else a bind on a directory of the store's home."""
    real = os.path.realpath(root)
    if not any(m != real for m in mounts_under(real)):
        return root
    from .linux.bind import detached_copy  # (ctypes) here only: rare, and a diff needs none

    fd = detached_copy(real)
    if fd is not None:
        stack.callback(os.close, fd)
        view = Path(f"/proc/self/fd/{fd}")
    else:
        import tempfile  # here only: it imports shutil and random, needed nowhere else

        view = Path(tempfile.mkdtemp(prefix=".diff-view-", dir=store.home))
        stack.callback(view.rmdir)
        mount(real, view, None, MS_BIND)
        stack.callback(unmount, view)
    faults.point("store.diff.view")
    return view


@dataclass(frozen=True)
class DiffResult:
    """What ``LayerStore.export`` wrote."""

    #: bytes of (uncompressed) tar
    tar_size: int
    #: whether it is the tar apply-diff read, byte for byte (its sha256 is ``diff_id``)
    exact: bool
    #: why it is generated instead (None when exact, or when the layer was never applied)
    reason: str | None
    #: the layer's diffID when the tar is exact
    diff_id: str | None


@dataclass(frozen=True)
class _Source:
    changes: list[Change]
    root: str
    kind: str
    record: tarsplit.Record | None
    diff_id: str | None
    reason: str | None


@contextlib.contextmanager
def diff_source(store: LayerStore, layer_id: str, parent: str | None) -> Iterator[_Source]:
    """What a diff of *layer_id* writes: the applied tar again when its record still holds,
    else the layer's changes.

    A layer without a parent whose record holds needs no walk (:func:`exact.unchanged_alone`
    checks it from the record's paths); any other, or one that fails that check, is walked."""
    with _layer_source(store, layer_id, parent) as found:
        record, diff_id, reason = _record(store, layer_id, parent)
        if (
            record is not None
            and found.changes is None
            and found.below is None
            and exact_diff.unchanged_alone(record.checks(), found.root)
        ):
            yield _Source([], found.root, found.kind, record, diff_id, None)
            return
        changes = found.walk() if found.changes is None else found.changes
        changes = _filtered(store, layer_id, changes)
        if record is not None:
            listed = [(c.path, c.kind == ChangeKind.DELETE) for c in changes]
            reason = exact_diff.stale(record.checks(), found.root, listed)
            if reason is not None:
                record = diff_id = None
        yield _Source(changes, found.root, found.kind, record, diff_id, reason)


def _record(
    store: LayerStore, layer_id: str, parent: str | None
) -> tuple[tarsplit.Record | None, str | None, str | None]:
    """(record, diffID, None) when the layer's diff can be the applied tar again if the layer
    is unchanged (:func:`exact.stale`), else (None, None, why not)."""
    rec = store.meta.get(layer_id)
    if rec is None or not rec.diff_id:
        return None, None, None  # never applied: a generated diff is all there is
    if parent is not None and parent != rec.parent:
        return None, None, f"it is compared with {parent}, not its parent"
    if store.hooks.filters_diff:
        return None, None, "a plugin filters diff entries"
    row = store.meta.tar_split(layer_id)
    if row is None:
        return None, None, "no record of the applied tar was kept"
    digest, blob = row
    try:
        if tarsplit.digest(blob) != digest:
            raise tarsplit.RecordError("the record was changed behind the store")
        record = tarsplit.Record(blob)
        record.checks()
    except tarsplit.RecordError as exc:
        log.warning("layer %s: its exact-diff record is unusable: %s", layer_id, exc)
        return None, None, f"its record is unusable: {exc}"
    return record, rec.diff_id, None


def _filtered(store: LayerStore, layer_id: str, changes: list[Change]) -> list[Change]:
    if not store.hooks.filters_diff:
        return changes
    return [c for c in changes if store.hooks.keep_change(layer_id, c)]


def stream(store: LayerStore, layer_id: str, parent: str | None = None) -> BinaryIO:
    """A readable stream of the uncompressed OCI layer tar; close it when done.

    The layers it reads are referenced from now until the stream ends or is closed.
    """
    source = diff_source(store, layer_id, parent)
    found = source.__enter__()
    r, w = streams.big_pipe()
    _DIFF_PIPES.add(w)
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            write_tar(layer_id, found, w, None, None)
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
    try:
        start_thread(thread)  # signals go to the caller's main thread
    except BaseException:  # a signal's handler raised as it started, or before
        os.close(r)  # a producer that runs ends on the closed pipe
        if thread.ident is None:  # it never ran: its cleanup is this
            _DIFF_PIPES.discard(w)
            os.close(w)
            source.__exit__(None, None, None)
        raise
    return io.BufferedReader(streams.DiffStream(r, thread, failure), buffer_size=1 << 20)


def write_tar(
    layer_id: str,
    source: _Source,
    out: IO[bytes] | int,
    compress: str | None,
    progress: Callable[[int], None] | None,
) -> DiffResult:
    """Write the tar of *source* to *out*."""
    writer, finish = streams.tar_writer(out, compress)
    writer.progress = progress
    try:
        if source.record is not None:
            exact_diff.replay(source.record, source.root, writer, source.diff_id)
            writer.flush()
        else:
            if source.reason:
                log.info("layer %s: diff generated from the layer: %s", layer_id, source.reason)
            tar_writer.write_changes_tar(writer, source.root, source.changes, source=source.kind)
    except OSError as exc:
        raise from_oserror(exc, f"diff of layer {layer_id}") from exc
    finish()
    exact = source.record is not None
    return DiffResult(writer.bytes_written, exact, source.reason, source.diff_id)
