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
from .streams import LayerDecoder, big_pipe, compression_of
from .tar import CHUNK
from .tar_reader import write_all

log = logging.getLogger(__name__)


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
            done = _apply_file(target, *direct, Sandbox(whiteouts, lower_fds, record), progress)
            if done is not None:
                return done
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
    data_r, data_w = big_pipe()
    res_r, res_w = os.pipe2(os.O_CLOEXEC)
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
        decoding.stop()  # the child stopped reading: its report says why
    except GraphDriverError as exc:
        feed_error = exc
    except BaseException:
        decoding.stop()
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(data_w)
        report = _read_all(res_r)
        os.close(res_r)
        _, status = os.waitpid(pid, 0)
    return _result(report, status, feed_error, digest, decoding.kind, tar_size)


class _Decoding:
    """gzip or zstd undone in a thread of its own, one read ahead: while it decodes a piece
    of the stream, the calling thread reads the next one and hashes and writes the one
    before into the sandbox's pipe (zlib, zstandard, hashlib and os.write let go of the
    GIL). Only the calling thread reads the stream: a signal never leaves a thread inside a
    read of it. Iterating gives (plain bytes, stream bytes they came from); a decoding
    error is raised there."""

    _STOP = object()
    _DONE = object()

    def __init__(self, stream: BinaryIO, head: bytes) -> None:
        self._stream = stream
        self._head = head
        self._decoder = LayerDecoder(head)
        self.kind = self._decoder.kind
        self._in: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._out: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="graphdriver-decode", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while isinstance(piece := self._in.get(), bytes):
                self._out.put((self._decoder.feed(piece), len(piece)))
            if piece is self._DONE:
                self._decoder.finish()
                self._out.put(self._DONE)
        except BaseException as exc:  # handed to the calling thread
            self._out.put(exc)

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        self._in.put(self._head)
        while True:
            chunk = self._stream.read(_READ)  # while the thread decodes the one before
            self._in.put(chunk or self._DONE)
            item = self._out.get()
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
            if not chunk:
                break
        item = self._out.get()
        if isinstance(item, BaseException):
            raise item
        self._thread.join()

    def stop(self) -> None:
        """Stop the thread (it is at most decoding one piece)."""
        self._in.put(self._STOP)
        self._thread.join()


#: a read of the caller's stream: one in decoding and one read ahead stay within CHUNK
_READ = CHUNK // 2


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
) -> ApplyResult | None:
    """apply_layer for a plain tar in a regular file: the sandbox reads the file itself while
    this process hashes it, so no byte goes through a pipe. None (nothing done) when the file
    cannot be opened again: an fd handed over by a more privileged process (``sudo -u user
    graphdriver apply-diff L < /root/layer.tar``) is read as a stream."""
    try:  # an offset of its own
        own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
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
