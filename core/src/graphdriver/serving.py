"""What every ``graphdriver serve`` server does the same way (the integrations' commands):
one server of a kind per store, a unix socket that is free, and a stop on SIGTERM/SIGINT."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import faulthandler
import fcntl
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from .errors import InUse, InvalidOption, call_os, from_oserror

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Closable(Protocol):
    def close(self) -> None: ...


S = TypeVar("S", bound=_Closable)

#: sun_path's size less its terminating NUL
MAX_SOCKET_PATH = 107


def check_socket(path: Path, option: str) -> str:
    """Refuse a *path* that cannot be listened on: too long for a unix socket, or not a
    socket (*option* is the flag that names it); else say what is there: ``"none"``,
    ``"stale"`` (a socket nobody answers on, left by a server that was killed) or
    ``"answered"`` (a server answers on it: :func:`free_socket` refuses it). It only reads."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise InvalidOption(
            f"socket path {path} is {size} bytes; a unix socket's path holds at most "
            f"{MAX_SOCKET_PATH}: choose a shorter {option}"
        )
    try:
        st = path.lstat()
    except FileNotFoundError:
        return "none"
    except OSError as exc:
        raise from_oserror(exc, f"serve on {path}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidOption(f"{path} exists and is not a socket; choose another {option}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return "stale"
    finally:
        probe.close()
    return "answered"


def free_socket(path: Path, option: str) -> None:
    """Make *path* ready to listen on (under the server's lock): refuse what
    :func:`check_socket` refuses and a socket a server answers on, remove a stale one, or
    make the parent directory."""
    there = check_socket(path, option)
    if there == "answered":
        raise InUse(f"{path} is in use: another server answers on it")
    if there == "stale":
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # nobody listens: left by a server that was killed
    else:
        call_os(path.parent.mkdir, 0o755, True, True, doing=f"make {path.parent}")


@contextlib.contextmanager
def engine_lock(
    lock: Path,
    what: str,
    served: Path,
    socket_path: Path,
    option: str,
    free_room: Callable[..., object],
    databases: Sequence[Path],
) -> Iterator[int]:
    """:func:`serve_lock` and :func:`free_socket` for an engine's server (the integrations'
    ``serve`` commands), in the order a full disk needs: a start refused at its socket
    (*socket_path*, the flag *option*) or at the lock takes nothing; a first start makes room
    for its lock file on the lock's filesystem; a start that goes on then gives back the
    reserve of its *databases*' filesystems (*free_room*: ``Context.free_room``), since a
    server that cannot open them cannot free the disk (the engine's removals run through
    it). Yields the lock's fd."""
    answered = check_socket(socket_path, option) == "answered"  # (refused below, named)
    with serve_lock(lock, what, served, make_room=None if answered else free_room) as fd:
        free_socket(socket_path, option)
        free_room(*databases)
        yield fd


@contextlib.contextmanager
def serve_lock(
    path: Path,
    what: str,
    served: Path,
    held: int | None = None,
    make_room: Callable[[Path], object] | None = None,
) -> Iterator[int]:
    """One *what* per store: an flock on *path* that holds the server's pid, so that a second
    one is refused in one line naming the first (*served* is what it serves). *held*: an fd
    of *path* this process was handed with the lock taken (by what started it), used if it
    is one. Yields the lock's fd: a process forked from the server that must not hold it
    closes it. Where the disk has no room for a new lock file (a first start on a full disk),
    *make_room* is called with the lock's directory and the lock made once more; where it has
    none for the pid, the lock holds none (a second server says "pid ?")."""
    fd = held if held is not None and _is_lock_of(held, path) else None
    if held is not None and fd is None:  # its starter's lock is gone (removed meanwhile)
        with contextlib.suppress(OSError):
            os.close(held)
        raise InUse(f"the lock {path} its starter took is gone: not serving {served}")
    if fd is None:
        try:
            try:
                fd = _open_lock(path)
            except OSError as exc:
                if make_room is None or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                make_room(path.parent)
                fd = _open_lock(path)
        except OSError as exc:
            raise from_oserror(exc, f"open the lock {path}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidOption(f"{path} is not a regular file: it cannot be a lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise InUse(
                f"another {what} (pid {holder}) already serves {served}; stop it first"
            ) from None
        os.set_inheritable(fd, False)
        os.ftruncate(fd, 0)
        try:
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:  # (only a full disk: the lock is taken either way)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
        yield fd
    finally:
        os.close(fd)


def _open_lock(path: Path) -> int:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def _is_lock_of(fd: int, path: Path) -> bool:
    try:
        st, here = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def stop_event() -> threading.Event:
    """An event SIGTERM and SIGINT set (installed now, before the socket takes connections:
    the core's own handlers would raise mid-start); SIGUSR1 prints every thread's stack to
    stderr, to see what a stuck request waits for."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    return stop


#: how often the main thread looks for a signal that another thread received
SIGNAL_POLL = 0.2


def wait(stop: threading.Event) -> None:
    """Block until *stop* is set. In short slices: the kernel may deliver SIGTERM to any
    thread (grpc's and the servers' threads do not block signals), and then Python runs the
    handler only when the main thread next runs bytecode, not when its wait is interrupted;
    one long wait would sleep through the signal."""
    while not stop.wait(SIGNAL_POLL):
        pass


class StoreThread(Generic[S]):
    """A store (LayerStore, VolumeStore) owned by one thread: its SQLite connection belongs to
    the thread that opened it, so a server's request threads hand every call to this one."""

    def __init__(self, name: str, opener: Callable[[], S]) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        try:
            self.store: S = self._pool.submit(opener).result()
        except BaseException:
            self._pool.shutdown()
            raise

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the store's thread, after the calls before it."""
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        """Let the call under way finish, then close the store (mounts stay)."""
        try:
            self._pool.submit(self.store.close).result()
        finally:
            self._pool.shutdown(wait=True)
