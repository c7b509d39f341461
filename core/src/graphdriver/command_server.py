"""``graphdriver serve commands``: a resident process that runs ``graphdriver`` commands for the
clients that name its socket in ``GRAPHDRIVER_SOCKET``, or find it at their default socket
(:mod:`.command_client`; a command that finds none there starts one, :mod:`.command_start`).

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
When the code it imported changes (an upgrade, a driver or plugin installed), it starts again
in the same process (:class:`CodeWatch`); with ``--idle-timeout``, it stops when idle that
long, or once alone in its mount namespace.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import signal
import socket
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any

import click

from . import serving
from .cli_common import announce
from .command_client import _STATUS, SOCKET_ENV, default_socket
from .command_start import LOCK_FD_ENV
from .command_worker import REFUSED, SIGNALS, OwnSide, close_all, run_worker
from .errors import InvalidOption, from_oserror

log = logging.getLogger(__name__)

#: the exit status of a server that stopped because its code changed and could not start
#: again (EX_TEMPFAIL: restart it)
CODE_CHANGED = 75
#: idle seconds after which, and between looks, a server with an idle timeout looks whether
#: it is alone in its mount namespace
ALONE_AFTER = 5.0


class CommandServer:
    """Accepts clients on *path* and forks a worker for each; sends the client of a worker
    that a signal killed its status, and stops (SIGTERM) the worker of a client that left."""

    def __init__(self, path: Path, inherited: tuple[int, ...] = ()) -> None:
        self.path = path
        #: fds the server was started with (and its lock): no worker keeps them
        self.inherited = list(inherited)
        #: what :meth:`run` stops on by itself: seconds without a command (0: never), and
        #: the code that was imported changing
        self.idle_timeout = 0.0
        self.code: CodeWatch | None = None
        #: when the last command ended (a refused one is none), or the server started
        self.last_command = time.monotonic()
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

    def run(self, stopped: threading.Event) -> tuple[str, int] | None:
        """Take commands until *stopped* is set (then None), or until it should stop by
        itself: no command run or running for :attr:`idle_timeout` seconds, or a client
        waiting while the code this process imported has changed; then why, and the exit
        status that says it."""
        next_look = time.monotonic()
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
                changed = self.code.changed() if self.code else None
                if changed:  # the waiting client is let go (its command runs there)
                    return f"{changed} changed since it was imported", CODE_CHANGED
                self.accept()
            elif self.idle_timeout and not self.workers:
                idle = time.monotonic() - self.last_command
                if idle >= self.idle_timeout:
                    return f"no command for {self.idle_timeout:g} s", 0
                if idle >= ALONE_AFTER and time.monotonic() >= next_look:
                    next_look = time.monotonic() + ALONE_AFTER
                    if not shares_namespace():
                        return "no other process is left in its mount namespace", 0
        return None

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
        send minus that signal. (Also those of the process this one was before it started
        again, which it does not know.)"""
        while True:
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
            if code != REFUSED:
                self.last_command = time.monotonic()
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


#: names in a directory of the import path that can change what is imported: modules,
#: extensions, .pth files and distributions' metadata (and packages: directories)
_IMPORTABLE = (".py", ".pyc", ".so", ".pth", ".dist-info", ".egg-info", ".egg-link")


def _importable(directory: str) -> dict[str, _Identity | None]:
    """What in *directory* can change what is imported: its modules, packages and .pth files
    by name, its distributions' metadata also by identity (a distribution reinstalled under
    the same name: its entry points may have changed)."""
    out: dict[str, _Identity | None] = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            if name.endswith((".dist-info", ".egg-info", ".egg-link")):
                out[name] = _identity(entry.path)
            elif name.endswith(_IMPORTABLE) or (
                "." not in name and name != "__pycache__" and entry.is_dir()
            ):
                out[name] = None
    return out


#: a file's identity: inode, mtime, ctime, size, link count
_Identity = tuple[int, int, int, int, int]


def _identity(path: str) -> _Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_nlink


def _linked_elsewhere(seen: _Identity | None, now: _Identity | None) -> bool:
    """Whether the file is as *seen* but for a link made or removed somewhere else: its
    ctime and link count moved, its inode, mtime and size did not. (uv hard-links a venv's
    files from its cache, and each venv made from that cache links them again: no code
    changed.)"""
    return (
        seen is not None
        and now is not None
        and (seen[0], seen[1], seen[3]) == (now[0], now[1], now[3])
        and seen[4] != now[4]
    )


class CodeWatch:
    """The code a server imported, as it was: the inode, mtime and ctime of the interpreter
    and of every module file it imported that is not the standard library's (graphdriver, its
    drivers, plugins and dependencies; a ctime that moved with the link count alone is a link
    made elsewhere, :func:`_linked_elsewhere`), and what each directory of the import path
    holds that can be imported (a package installed or removed there; other files come and
    go freely). A worker runs what the server imported, so once any of it changed the server
    must start again."""

    def __init__(self) -> None:
        stdlib = tuple(sysconfig.get_path(p) + os.sep for p in ("stdlib", "platstdlib"))

        def ours(name: str) -> bool:
            return not name.startswith(stdlib) or f"{os.sep}site-packages{os.sep}" in name

        files = [sys.executable]
        for module in list(sys.modules.values()):
            name = getattr(module, "__file__", None)
            if isinstance(name, str) and ours(name):
                files.append(name)
        self.files = {name: _identity(name) for name in files}
        #: each directory of the import path: its identity (None: missing) and, if it is
        #: one, what it holds that can be imported (:func:`_importable`)
        self.dirs: dict[str, tuple[_Identity | None, dict[str, Any]]] = {}
        for name in sys.path:
            if name and ours(os.path.join(os.path.abspath(name), "")):
                self.dirs[name] = self._look(name)

    @staticmethod
    def _look(name: str) -> tuple[_Identity | None, dict[str, Any]]:
        seen = _identity(name)
        try:
            return seen, _importable(name) if seen and os.path.isdir(name) else {}
        except OSError:
            return seen, {}

    def changed(self) -> str | None:
        """The first file or directory that changed (or came, or went) since, if any."""
        for name, seen in self.files.items():
            now = _identity(name)
            if now != seen:
                if not _linked_elsewhere(seen, now):
                    return name
                self.files[name] = now
        for name, (seen, names) in self.dirs.items():
            now = _identity(name)
            if now == seen:
                continue
            again = self._look(name)
            if (again[0] is None) != (seen is None):
                return name
            for entry in sorted(again[1].keys() ^ names.keys()) or [
                k for k, v in again[1].items() if names[k] != v
            ]:
                return os.path.join(name, entry)
            self.dirs[name] = again  # only other files came or went
        return None


def shares_namespace() -> bool:
    """Whether a process other than this one and its children (that this process may look
    at) is in its mount namespace: one that could be a client. A server started in a
    namespace made for one job (``unshare -m``) keeps it, and every mount in it, alive: once
    the job is gone, it must go too."""
    mine = os.readlink("/proc/self/ns/mnt")
    me = str(os.getpid())
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or entry.name == me:
            continue
        try:
            if os.readlink(f"/proc/{entry.name}/ns/mnt") != mine:
                continue
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                ppid = f.read().rsplit(b")", 1)[1].split()[1]
        except (OSError, IndexError):
            continue
        if ppid != me.encode():
            return True
    return False


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
    hooks = plugins.hooks()  # the hook plugins, loaded once
    if hooks.implemented:
        hooks.pm  # noqa: B018 (pluggy, imported and set up once, not in every worker)
    for name, value in plugins.installed_drivers().items():
        try:
            plugins.load_entry_point(value)
        except Exception as exc:  # a driver that cannot load here fails in its commands
            log.info("driver %s not loaded: %s", name, exc)


@click.command("commands")
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Where to listen; clients name it in {SOCKET_ENV}. Default: the socket a client "
    f"finds when {SOCKET_ENV} is unset.",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    help="Stop after this many seconds without a command (0: never).",
)
def serve_commands(socket_path: Path | None, idle_timeout: float) -> None:
    """Run graphdriver commands for clients that set GRAPHDRIVER_SOCKET to --socket, each in a
    worker forked from this process, which has imported the CLI once: a command starts in a
    few milliseconds instead of 60-100. Clients less privileged than the server, or in
    another namespace, run theirs themselves. Without --socket, serves the socket that a
    graphdriver command finds when GRAPHDRIVER_SOCKET is unset (one that finds no server
    there starts one, with --idle-timeout 600). Runs until SIGTERM or SIGINT or the idle
    timeout; when the code it imported changes (an upgrade, a new plugin), it starts again
    (the same process) with the new code."""
    if socket_path is None:
        default = default_socket()
        if default is None:
            raise InvalidOption(
                "no default socket for this user (no XDG_RUNTIME_DIR): give --socket"
            )
        socket_path = Path(default)
    socket_path = socket_path.absolute()
    stopped = serving.stop_event()
    # what the server was started with beyond its stdio is none of a command's business
    inherited = [int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2]
    inherited = [fd for fd in inherited if _is_open(fd)]  # (listdir's own fd is gone)
    started_in = os.getcwd()
    os.chdir("/")  # a server keeps no directory (a mount) busy; workers take the client's
    held = os.environ.pop(LOCK_FD_ENV, None)
    lock_path = Path(f"{socket_path}.lock")
    with serving.serve_lock(lock_path, "command server", socket_path, _fd(held)) as lock:
        warm_up()
        code = CodeWatch()
        OwnSide.remember()
        # what warm_up made is every worker's too: out of the collector's way, no worker's
        # collection walks it (and so copies its pages); its garbage collected first
        gc.collect()
        gc.freeze()
        serving.free_socket(socket_path, "--socket")
        try:
            server = CommandServer(socket_path, (*[fd for fd in inherited if fd != lock], lock))
        except OSError as exc:
            raise from_oserror(exc, f"listen on {socket_path}") from None
        server.idle_timeout, server.code = idle_timeout, code
        try:
            # (started by a command, it is found without GRAPHDRIVER_SOCKET, which would
            # keep clients from starting it again once it stopped)
            hint = f" (export {SOCKET_ENV}={socket_path})" if held is None else ""
            announce(f"serving commands on {socket_path}{hint}", socket=str(socket_path))
            with contextlib.suppress(BrokenPipeError):
                sys.stdout.flush()
            ended = server.run(stopped)
        finally:
            server.close()
        if ended is not None and ended[1] == CODE_CHANGED:
            log.warning("%s: starting again", ended[0])
            _start_again(started_in, lock)
    if ended is not None:
        log.warning("stopping: %s", ended[0])
        sys.exit(ended[1])


def _fd(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def _start_again(cwd: str, lock: int) -> None:
    """Run this server's command line again in this process, with the code as it is now,
    from the directory it was started in, its lock held across (no second server starts
    meanwhile; the workers that run go on, and this process reaps them); return if it
    cannot."""
    with contextlib.suppress(OSError):
        os.chdir(cwd)
    with contextlib.suppress(BrokenPipeError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    try:
        os.set_inheritable(lock, True)
        os.environ[LOCK_FD_ENV] = str(lock)
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # noqa: S606
    except OSError as exc:
        log.warning("cannot start again: %s", exc.strerror)
    os.environ.pop(LOCK_FD_ENV, None)
    os.chdir("/")
