"""Unpack an OCI layer tar into a layer, in a sandbox.

The parent process (this module) reads the caller's stream, undoes gzip or zstd in a thread
of its own, hashes the plain tar (the layer's diffID) and feeds it through a pipe to a forked
child that has chrooted into the layer (like Docker's chrootarchive; a plain tar in a regular
file the child reads itself while the parent hashes it). The child (:mod:`.extract`) refuses
entries that would leave the layer (``..``, absolute names, writes through symlinks, hardlinks
to outside names, whiteouts of ``..``) and reports back one JSON line. Whatever a hostile tar
holds, no write can land outside the layer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import signal
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ArchiveError, GraphDriverError, UnsafeArchive
from .extract import Sandbox, run_child
from .streams import LayerDecoder, compression_of
from .tar import CHUNK
from .tar_reader import write_all

log = logging.getLogger(__name__)

F_SETPIPE_SZ = 1031


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply_layer`` unpacked."""

    #: bytes of file data written (each file once; hardlinks add nothing)
    size: int
    #: "sha256:<hex>" of the uncompressed tar: the OCI diffID
    diff_id: str
    #: "none", "gzip" or "zstd"
    compression: str
    #: bytes of the uncompressed tar
    tar_size: int
    #: what an exact diff of the layer needs (``archive.tarsplit``), or None
    record: bytes | None = None
    #: why no record was kept (None when one was, or none was asked for)
    no_record: str | None = None


# ---------------------------------------------------------------------------------- the parent


def apply_layer(
    target: Path,
    stream: BinaryIO,
    *,
    whiteouts: str = "delete",
    lowers: Sequence[Path] = (),
    progress: Callable[[int], None] | None = None,
    record: bool = False,
) -> ApplyResult:
    """Unpack the layer tar read from *stream* into the directory *target*.

    *whiteouts* is ``"delete"`` (target is the layer's full view: remove what a whiteout names)
    or ``"overlay"`` (target is an overlay upper: write overlayfs whiteouts). *lowers* are an
    overlay upper's lower dirs, nearest first: a hardlink to a file in them copies it up, as
    the kernel does. With *record*, the result carries what an exact diff of the layer
    needs (``tarsplit``). On error the target is left half-written; the caller rolls it back.
    """
    if whiteouts not in ("delete", "overlay"):
        raise ValueError(whiteouts)
    lower_fds: list[int] = []
    try:  # opened before the sandbox's chroot: its only way to the lower dirs
        for lower in lowers:
            lower_fds.append(os.open(lower, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        direct = _plain_file(stream)
        if direct is not None:
            return _apply_file(target, *direct, Sandbox(whiteouts, lower_fds, record), progress)
        return _apply_stream(target, stream, Sandbox(whiteouts, lower_fds, record), progress)
    finally:
        for fd in lower_fds:
            os.close(fd)


def _apply_stream(
    target: Path,
    stream: BinaryIO,
    sandbox: Sandbox,
    progress: Callable[[int], None] | None,
) -> ApplyResult:
    """apply_layer for any stream: decoded and hashed here, fed to the sandbox by a pipe."""
    head = stream.read(8)
    data_r, data_w = os.pipe2(os.O_CLOEXEC)
    res_r, res_w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # a bigger pipe is faster, not needed
        fcntl.fcntl(data_w, F_SETPIPE_SZ, 1 << 20)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, reported through res_w
        os.close(data_w)
        os.close(res_r)
        run_child(str(target), data_r, res_w, sandbox)
    os.close(data_r)
    os.close(res_w)
    digest = hashlib.sha256()
    tar_size = 0
    feed_error: GraphDriverError | None = None
    decoding = _Decoding(stream, head)
    try:
        for plain, used in decoding:
            if plain:
                digest.update(plain)
                tar_size += len(plain)
                write_all(data_w, plain)
            if progress is not None:
                progress(used)
    except BrokenPipeError:
        decoding.stop(wait=True)  # the child stopped reading: its report says why
    except GraphDriverError as exc:
        feed_error = exc
    except BaseException:
        decoding.stop(wait=False)
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(data_w)
        report = _read_all(res_r)
        os.close(res_r)
        _, status = os.waitpid(pid, 0)
    return _result(report, status, feed_error, digest, decoding.kind, tar_size)


class _Decoding:
    """The caller's stream read and decoded in a thread of its own, so that reading and
    undoing gzip or zstd overlap the hashing and the writes into the sandbox's pipe (zlib,
    zstandard, hashlib and os.write all let go of the GIL). Iterating gives (plain bytes,
    stream bytes they came from); a decoding error is raised there."""

    _DONE = object()

    def __init__(self, stream: BinaryIO, head: bytes) -> None:
        self._decoder = LayerDecoder(head)
        self.kind = self._decoder.kind
        # four reads of a quarter of CHUNK in flight: no more memory than one read of CHUNK
        self._queue: queue.Queue[object] = queue.Queue(maxsize=4)
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(stream, head), name="graphdriver-decode", daemon=True
        )
        self._thread.start()

    def _run(self, stream: BinaryIO, head: bytes) -> None:
        try:
            chunk = head
            while chunk and not self._stopped.is_set():
                self._put((self._decoder.feed(chunk), len(chunk)))
                chunk = stream.read(CHUNK // 4)
            self._decoder.finish()
            self._put(self._DONE)
        except BaseException as exc:  # handed to the reading thread
            self._put(exc)

    def _put(self, item: object) -> None:
        while not self._stopped.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=0.1)
                return

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        while (item := self._queue.get()) is not self._DONE:
            if isinstance(item, BaseException):
                self._thread.join()
                raise item
            yield item  # type: ignore[misc]
        self._thread.join()

    def stop(self, *, wait: bool) -> None:
        """Stop reading the stream; *wait*: until the thread is done with it (it may be
        inside a read that never ends: a signal does not wait)."""
        self._stopped.set()
        if wait:
            self._thread.join()


def _plain_file(stream: BinaryIO) -> tuple[int, int] | None:
    """(fd, offset) if *stream* is an uncompressed tar in a regular file, else None."""
    try:
        fd = stream.fileno()
        offset = stream.tell()
    except (AttributeError, OSError, ValueError):
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return None
    if compression_of(os.pread(fd, 8, offset)) != "none":
        return None
    return fd, offset


def _apply_file(
    target: Path,
    fd: int,
    offset: int,
    sandbox: Sandbox,
    progress: Callable[[int], None] | None,
) -> ApplyResult:
    """apply_layer for a plain tar in a regular file: the sandbox reads the file itself while
    this process hashes it, so no byte goes through a pipe."""
    own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)  # an offset of its own
    os.lseek(own, offset, os.SEEK_SET)
    res_r, res_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, reported through res_w
        os.close(res_r)
        run_child(str(target), own, res_w, sandbox)
    os.close(own)
    os.close(res_w)
    digest = hashlib.sha256()
    pos = offset
    try:
        while chunk := os.pread(fd, CHUNK, pos):
            digest.update(chunk)
            pos += len(chunk)
            if progress is not None:
                progress(len(chunk))
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        report = _read_all(res_r)
        os.close(res_r)
        _, status = os.waitpid(pid, 0)
    return _result(report, status, None, digest, "none", pos - offset)


def _result(
    report: bytes,
    status: int,
    feed_error: GraphDriverError | None,
    digest: Any,
    compression: str,
    tar_size: int,
) -> ApplyResult:
    line, _, blob = report.partition(b"\n")
    result = json.loads(line) if line else {}
    if result.get("unsafe"):
        raise UnsafeArchive(result["error"])
    if feed_error is not None:  # the sandbox saw a cut stream: its error is a consequence
        raise feed_error
    if "error" in result:
        raise ArchiveError(result["error"], errno_=result.get("errno"))
    if status != 0 or "size" not in result:
        raise ArchiveError(f"the extraction process died ({_describe(status)})")
    if tar_size == 0:
        log.warning(
            "the layer stream was empty (0 bytes): applied as an empty layer, as Docker does"
        )
    no_record = result.get("no_record")
    if blob and result.get("tar_size") != tar_size:  # never: the sandbox read what was hashed
        no_record, blob = "its record does not cover the whole tar", b""
    return ApplyResult(
        size=int(result["size"]),
        diff_id="sha256:" + digest.hexdigest(),
        compression=compression,
        tar_size=tar_size,
        record=blob or None,
        no_record=no_record,
    )


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 65536):
        parts.append(chunk)
    return b"".join(parts)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
