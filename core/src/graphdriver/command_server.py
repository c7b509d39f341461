"""``graphdriver serve commands``: a resident process that runs ``graphdriver`` commands for the
clients that name its socket in ``GRAPHDRIVER_SOCKET`` (:mod:`.command_client`).

It imports the CLI, the store and the installed drivers once; each command then runs in a
worker forked from it, which takes the client's standard streams (received over the socket),
working directory, umask, environment and arguments, and runs the command exactly as the
``graphdriver`` process would have: the same output, errors and exit status, a rollback on
SIGINT or SIGTERM (the client passes them on). A worker starts in about a millisecond where a
process takes 60-100 ms to import what it needs.

It serves only its own kind: a client of another user, of another mount, PID or user namespace
(a mount made there would not be the client's), or of another installation of graphdriver is
refused, and then runs the command itself. The socket is the server's user's alone (0600). The
drivers and plugins are the ones installed when it started: restart it after installing more.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
from pathlib import Path

import click

from . import serving
from .cli_common import announce
from .command_client import _LENGTH, _STATUS, MAGIC, SOCKET_ENV, package_dir
from .errors import from_oserror

log = logging.getLogger(__name__)

#: the most a request may hold (arguments and environment)
MAX_REQUEST = 1 << 20
#: seconds a client has to send its request once connected
REQUEST_TIMEOUT = 5.0
_PEERCRED = struct.Struct("3i")
#: the namespaces a client must share with the server
NAMESPACES = ("mnt", "pid", "user")


class Refused(Exception):
    """A request the server does not run; the client runs the command itself."""


class _Request:
    """What a client asked: its arguments, where and how to run them, and its three streams."""

    def __init__(self, data: bytes, fds: list[int]) -> None:
        fields = data.split(b"\0")
        if len(fields) < 5 or fields[0] != MAGIC:
            raise Refused("another protocol")
        if fields[1] != package_dir():
            raise Refused(f"another installation of graphdriver ({os.fsdecode(fields[1])})")
        self.cwd = os.fsdecode(fields[2])
        self.umask = int(fields[3], 8)
        argc = int(fields[4])
        self.argv = [os.fsdecode(a) for a in fields[5 : 5 + argc]]
        if len(self.argv) != argc or len(fds) != 3:
            raise Refused("a malformed request")
        self.env = dict(f.partition(b"=")[::2] for f in fields[5 + argc :] if f)
        self.fds = fds


def _peer(conn: socket.socket) -> tuple[int, int]:
    """The client's (pid, uid), if it may use this server; else :class:`Refused`."""
    pid, uid, _gid = _PEERCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    if uid != os.geteuid():
        raise Refused(f"uid {uid} is not the server's ({os.geteuid()})")
    for ns in NAMESPACES:
        try:
            same = os.readlink(f"/proc/{pid}/ns/{ns}") == os.readlink(f"/proc/self/ns/{ns}")
        except OSError:
            same = False
        if not same:
            raise Refused(f"another {ns} namespace")
    return pid, uid


def _receive(conn: socket.socket) -> _Request:
    """Read one request and the three fds that come with its first bytes."""
    fds: list[int] = []
    data = b""
    need = _LENGTH.size
    size = None
    while len(data) < need:
        piece, ancillary, _flags, _addr = conn.recvmsg(
            min(need - len(data), 1 << 16), socket.CMSG_SPACE(3 * 4)
        )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                n = len(payload) // 4
                fds += struct.unpack(f"{n}i", payload[: 4 * n])
        if not piece:
            break
        data += piece
        if size is None and len(data) >= _LENGTH.size:
            (size,) = _LENGTH.unpack(data[: _LENGTH.size])
            if size > MAX_REQUEST:
                _close_all(fds)
                raise Refused("a request too large")
            need = _LENGTH.size + size
    if size is None or len(data) != need:
        _close_all(fds)
        raise Refused("a request cut short")
    try:
        return _Request(data[_LENGTH.size :], fds)
    except (Refused, ValueError) as exc:
        _close_all(fds)
        raise Refused(str(exc) if isinstance(exc, Refused) else "a malformed request") from None


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _run_worker(
    req: _Request, conn: socket.socket, closing: list[int]
) -> None:  # pragma: no cover - a fork
    """In the forked worker: send the client its pid, become the client's process, run its
    command and send the client its exit status (itself, so that it arrives even if the
    server stops meanwhile); never returns."""
    code = 1
    try:
        # the worker alone writes to the client until it ends: its pid first, then its status
        conn.sendall(b"P" + _STATUS.pack(os.getpid()))
        for fd in closing:
            os.close(fd)
        os.setsid()  # a Ctrl-C at the server's terminal is not the client's
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_DFL)
        # above 2 first, so that placing one of them does not overwrite another
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in req.fds]
        _close_all(req.fds)
        for target, fd in enumerate(high):
            os.dup2(fd, target)
        _close_all(high)
        os.chdir(req.cwd)
        os.umask(req.umask)
        os.environb.clear()
        os.environb.update(req.env)
        sys.argv = req.argv
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own streams
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - line-buffered on a tty
        sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")  # noqa: SIM115
        logging.root.handlers.clear()  # the command sets up its own, on its stderr
        logging.root.setLevel(logging.WARNING)
        from .cli import main

        try:
            main()
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc.code)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            print(f"graphdriver: command server worker: {exc!r}", file=sys.stderr)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(Exception):
            conn.sendall(b"S" + _STATUS.pack(code))
        os._exit(code)


def _exit_code(code: object) -> int:
    """What the process would exit with on ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


class CommandServer:
    """Accepts clients on *path* and forks a worker for each; reports each worker's status
    to its client when it ends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.workers: dict[int, socket.socket] = {}
        old = os.umask(0o177)  # the socket is made 0600: no moment when others may connect
        try:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(str(path))
        finally:
            os.umask(old)
        self.listener.listen(64)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that it wakes us
        signal.set_wakeup_fd(self.wake_w)

    def run(self, stopped: threading.Event) -> None:
        while not stopped.is_set():
            try:
                ready, _, _ = select.select([self.listener.fileno(), self.wake_r], [], [], 1.0)
            except InterruptedError:
                continue
            if self.wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_r, 4096)
            self.reap()
            if self.listener.fileno() in ready:
                self.accept()

    def accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError as exc:  # out of fds or memory: the next command may find some
            log.warning("cannot take a command: %s", exc.strerror)
            select.select([], [], [], 0.1)
            return
        conn.settimeout(REQUEST_TIMEOUT)
        req = None
        try:
            req = _receive(conn)  # first: a refusal sent before it is read may never arrive
            pid, _uid = _peer(conn)
        except Refused as exc:
            if req is not None:
                _close_all(req.fds)
            log.info("refused a client: %s", exc)
            with contextlib.suppress(OSError):
                conn.sendall(b"R" + str(exc).encode())
            conn.close()
            return
        except OSError as exc:
            log.info("a client left before its request: %s", exc)
            conn.close()
            return
        closing = [self.listener.fileno(), self.wake_r, self.wake_w]
        closing += [c.fileno() for c in self.workers.values()]
        try:
            worker = os.fork()
        except OSError as exc:
            _close_all(req.fds)
            with contextlib.suppress(OSError):
                conn.sendall(b"R" + f"cannot fork: {exc.strerror}".encode())
            conn.close()
            return
        if worker == 0:  # pragma: no cover - the worker
            _run_worker(req, conn, closing)
        _close_all(req.fds)
        log.info("pid %d: worker %d runs %s", pid, worker, " ".join(req.argv[1:]))
        self.workers[worker] = conn

    def reap(self) -> None:
        """Collect ended workers; to the client of one that a signal killed (it sent nothing),
        send minus that signal."""
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            conn = self.workers.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if code < 0:
                with contextlib.suppress(OSError):
                    conn.sendall(b"S" + _STATUS.pack(code))
            conn.close()

    def close(self) -> None:
        """Stop taking commands; the workers running go on and send their clients their
        status themselves (one killed by a signal meanwhile: its client says the server
        stopped)."""
        signal.set_wakeup_fd(-1)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        _close_all([self.wake_r, self.wake_w])
        for conn in self.workers.values():
            conn.close()


def warm_up() -> None:
    """Import what commands use, once, so that no worker does: the CLI's verbs, the store,
    the archive engine, the hook plugins and every installed driver."""
    from . import cli, plugins

    cli.cli.load_all()
    for module in ("store", "applying", "diffs", "archive.apply", "archive.tar_writer"):
        __import__(f"graphdriver.{module}")
    plugins.hooks()  # the hook plugins, loaded once
    for name, value in plugins.installed_drivers().items():
        try:
            plugins.load_entry_point(value)
        except Exception as exc:  # a driver that cannot load here fails in its commands
            log.info("driver %s not loaded: %s", name, exc)


@click.command("commands")
@click.option(
    "--socket",
    "socket_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Where to listen; clients name it in {SOCKET_ENV}.",
)
def serve_commands(socket_path: Path) -> None:
    """Run graphdriver commands for clients that set GRAPHDRIVER_SOCKET to --socket, each in a
    worker forked from this process, which has imported the CLI once: a command starts in a
    few milliseconds instead of 60-100. Clients of another user or namespace run theirs
    themselves. Runs until SIGTERM or SIGINT."""
    stopped = serving.stop_event()
    warm_up()
    serving.free_socket(socket_path, "--socket")
    try:
        server = CommandServer(socket_path)
    except OSError as exc:
        raise from_oserror(exc, f"listen on {socket_path}") from None
    try:
        announce(
            f"serving commands on {socket_path} (export {SOCKET_ENV}={socket_path})",
            socket=str(socket_path),
        )
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.flush()
        server.run(stopped)
    finally:
        server.close()
