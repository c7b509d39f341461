"""``graphdriver serve commands``: a resident process that runs ``graphdriver`` commands for the
clients that name its socket in ``GRAPHDRIVER_SOCKET`` (:mod:`.command_client`).

It imports the CLI, the store and the installed drivers once; each connection gets a worker
forked from it, which reads the client's request and, if it may, takes the client's standard
streams and working directory (fds received over the socket), umask, environment and arguments
and runs the command exactly as the ``graphdriver`` process would have: the same output, errors
and exit status, a rollback on SIGINT or SIGTERM (the client passes them on; a client that goes
away is taken for a SIGTERM). A worker starts in about a millisecond where a process takes
60-100 ms to import what it needs.

It serves the callers it sees are like itself: a client of another uid, gid or (but for root)
groups, other capabilities, no_new_privs or seccomp mode, another root directory, security
label, or mount, PID or user namespace (a mount made in the server's would not be its own), or
of another installation of graphdriver is refused, and then runs the command itself; what it
cannot see (Landlock, seccomp rules) does not refuse, so the socket is the privilege. A worker
joins its client's cgroup and takes its rlimits, nice value, CPUs and OOM score adjustment, so
that the client's limits hold (:mod:`.command_worker`). The socket is its user's alone (0600).
The drivers and plugins are the ones installed when it started: restart it after installing
more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import click

from . import serving
from .cli_common import announce
from .command_client import _STATUS, SOCKET_ENV
from .command_worker import SIGNALS, close_all, run_worker
from .errors import from_oserror

log = logging.getLogger(__name__)


class CommandServer:
    """Accepts clients on *path* and forks a worker for each; sends the client of a worker
    that a signal killed its status, and stops (SIGTERM) the worker of a client that left."""

    def __init__(self, path: Path, inherited: tuple[int, ...] = ()) -> None:
        self.path = path
        #: fds the server was started with: no worker keeps them
        self.inherited = list(inherited)
        self.workers: dict[int, socket.socket] = {}
        self.by_fd: dict[int, int] = {}
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
        self.poll = select.poll()
        self.poll.register(self.listener.fileno(), select.POLLIN)
        self.poll.register(self.wake_r, select.POLLIN)

    def run(self, stopped: threading.Event) -> None:
        while not stopped.is_set():
            try:
                events = self.poll.poll(1000)
            except InterruptedError:
                continue
            for fd, _mask in events:
                if fd == self.wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
                elif fd in self.by_fd:  # a client hung up before its command ended
                    self.poll.unregister(fd)
                    worker = self.by_fd.pop(fd)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker, signal.SIGTERM)
                        os.kill(worker, signal.SIGCONT)  # if it was stopped, it must see it
            self.reap()
            if any(fd == self.listener.fileno() for fd, _ in events):
                self.accept()

    def accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError as exc:  # out of fds or memory: the next command may find some
            log.warning("cannot take a command: %s", exc.strerror)
            time.sleep(0.1)
            return
        closing = [self.listener.fileno(), self.wake_r, self.wake_w, *self.inherited]
        closing += [c.fileno() for c in self.workers.values()]
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # the worker unblocks them
        try:
            worker = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            log.warning("cannot fork a worker: %s", exc.strerror)
            conn.close()
            return
        if worker == 0:  # pragma: no cover - the worker
            try:
                run_worker(conn, closing)
            finally:
                os._exit(1)  # never back into the server's frames
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        self.workers[worker] = conn
        self.by_fd[conn.fileno()] = worker
        self.poll.register(conn.fileno(), select.POLLRDHUP)

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
            if self.by_fd.pop(conn.fileno(), None) is not None:
                self.poll.unregister(conn.fileno())
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
        close_all([self.wake_r, self.wake_w])
        for conn in self.workers.values():
            conn.close()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


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
    few milliseconds instead of 60-100. Clients less privileged than the server, or in
    another namespace, run theirs themselves. Runs until SIGTERM or SIGINT."""
    stopped = serving.stop_event()
    # what the server was started with beyond its stdio is none of a command's business
    inherited = [int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2]
    inherited = [fd for fd in inherited if _is_open(fd)]  # (listdir's own fd is gone)
    warm_up()
    serving.free_socket(socket_path, "--socket")
    try:
        server = CommandServer(socket_path, tuple(inherited))
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
