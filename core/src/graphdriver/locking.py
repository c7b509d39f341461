"""The store's locks: one exclusive store lock, and a lock per layer that tells live work apart
from what a dead process left behind.

The store lock (``<home>/lock``) is a re-entrant ``flock(LOCK_EX)`` held only for state
transitions (a metadata transaction and the driver call it records). Its holder writes its pid
and what it does into the file, so that a waiter can say whom it waits for.

A layer lock (``<home>/inflight/<id>.lock``) is held exclusively by the process doing an
in-flight operation on the layer (creating, applying, removing) for the whole operation, and
shared by a process streaming the layer (a diff) for the whole stream. Both die with their
process, so whoever can take it exclusively knows that nobody is working on the layer. Layer
locks are taken, tested and deleted only under the store lock (a reader drops its share without
it), so a test of one never races a transition. The file is made by the layer's create and
deleted with the layer: a reader on a disk with no room for a new file finds it there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import StoreError

log = logging.getLogger(__name__)

#: seconds of waiting for the store lock after which the wait is reported, once
REPORT_AFTER = 2.0
#: the bytes of the lock file that tell who holds it (``PID what it does``, then spaces)
HOLDER_SIZE = 512


class FileLock:
    """``flock(LOCK_EX)`` on *path*, re-entrant within this object; close() releases the fd.

    *wait* bounds how long ``held`` waits (None: for ever); after :data:`REPORT_AFTER` seconds
    of waiting it logs, once, who holds the lock and what it does.
    """

    def __init__(self, path: Path, wait: float | None = None) -> None:
        self.path = path
        self.wait = wait
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._depth = 0
        self._thread_lock = threading.RLock()

    def holder(self) -> str:
        """``pid N (what it does)`` as the holder wrote it, or ``an unknown process``."""
        try:
            text = os.pread(self._fd, HOLDER_SIZE, 0).decode(errors="replace").strip()
        except OSError:
            text = ""
        pid, _, doing = text.partition(" ")
        if not pid.isdigit():
            return "an unknown process"
        return f"pid {pid} ({doing})" if doing else f"pid {pid}"

    def _timed_out(self, start: float, reported: list[bool]) -> bool:
        waited = time.monotonic() - start
        if waited >= REPORT_AFTER and not reported:
            reported.append(True)
            log.warning("waiting for the lock of %s, held by %s", self.path.parent, self.holder())
        return self.wait is not None and waited >= self.wait

    def _refuse(self) -> StoreError:
        return StoreError(
            f"the store {self.path.parent} is locked by {self.holder()}; gave up after "
            f"{self.wait:g} s (--wait): try again when it is done"
        )

    def _acquire(self) -> None:
        start = time.monotonic()
        reported: list[bool] = []
        while not self._thread_lock.acquire(timeout=0.05):
            if self._timed_out(start, reported):
                raise self._refuse()
        if self._depth:
            return
        try:
            self._flock(start, reported)
        except BaseException:  # a timeout, or a signal while waiting
            self._thread_lock.release()
            raise

    def _flock(self, start: float, reported: list[bool]) -> None:
        pause = 0.001
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            if self._timed_out(start, reported):
                raise self._refuse()
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _write_holder(self, doing: str) -> None:
        """Tell waiters who holds the lock and what for, in one write of :data:`HOLDER_SIZE`
        bytes over the last holder's (padded with spaces: the file is never truncated, and a
        release writes nothing; it was two truncations and a write besides: an overlay get +
        put on XFS 2.3-2.6x of a raw mount + umount, now 2.0-2.2x); on a full disk they may
        not be told: the lock is the flock, and the rollback of what filled the disk needs
        it."""
        text = f"{os.getpid()} {doing}".encode()[: HOLDER_SIZE - 1]
        text = text.decode(errors="ignore").encode() + b"\n"  # (no character cut in two)
        try:
            os.pwrite(self._fd, text.ljust(HOLDER_SIZE), 0)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # the last holder's note must not name it (btrfs copies even an overwrite, and
            # a full one refuses it): emptied, waiters are told of "an unknown process"
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)

    @contextlib.contextmanager
    def held(self, doing: str = "changes the store") -> Iterator[None]:
        """Hold the lock for the with-block; *doing* tells waiters what the holder does."""
        self._acquire()
        self._depth += 1
        try:
            if self._depth == 1:
                self._write_holder(doing)
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._thread_lock.release()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LayerLocks:
    """The per-layer locks of one store home (``<home>/inflight/<id>.lock``)."""

    def __init__(self, home: Path) -> None:
        self.dir = home / "inflight"
        self.dir.mkdir(mode=0o700, exist_ok=True)

    def _path(self, layer_id: str) -> Path:
        return self.dir / f"{layer_id}.lock"

    def _take(self, layer_id: str, mode: int) -> int | None:
        """An fd holding the layer's lock in *mode*, or None if someone else holds it."""
        fd = os.open(self._path(layer_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        return fd

    def exclusive(self, layer_id: str) -> int | None:
        """Take the layer's lock for an in-flight operation: an fd, or None while a live
        process works on or reads the layer. Release with :meth:`release`."""
        return self._take(layer_id, fcntl.LOCK_EX)

    def shared(self, layer_id: str) -> int | None:
        """Take the layer's lock as a reader (a diff stream): an fd, or None while a live
        process changes the layer."""
        return self._take(layer_id, fcntl.LOCK_SH)

    def busy(self, layer_id: str) -> bool:
        """Whether a live process holds the layer's lock (an operation or a reader)."""
        if not self._path(layer_id).exists():
            return False
        fd = self._take(layer_id, fcntl.LOCK_EX)
        if fd is None:
            return True
        os.close(fd)
        return False

    def release(self, fd: int, layer_id: str | None = None) -> None:
        """Release a lock taken here; with *layer_id*, also delete the file (the layer is gone,
        or the operation is over and the caller holds the store lock)."""
        if layer_id is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path(layer_id).unlink()
        os.close(fd)
