"""Starting the command server a ``graphdriver`` command found missing (``GRAPHDRIVER_SOCKET``
unset; :mod:`.command_client`): in the background, while the command runs here, so that the
next command finds it. Imported only then, by a process that imports the CLI next anyway.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import sys
import time

from .command_client import INTERPRETER_ENV

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal

#: seconds a server started on first use waits for a command before it stops
IDLE_TIMEOUT = 600
#: seconds between two starts (one that failed: its log says why)
RETRY = 10
#: the environment variable that hands a server the fd of its lock, already held
LOCK_FD_ENV = "GRAPHDRIVER_COMMANDS_LOCK_FD"
#: what of the caller's environment the server gets: what shapes its interpreter (the
#: socket's key names it: see :data:`.command_client.INTERPRETER_ENV`; HOME for the user's
#: site directory), its PATH and locale; a command gets its own client's environment
_SERVER_ENV = (*INTERPRETER_ENV, "PATH", "LANG", "LC_", "HOME")
#: the size beyond which a start empties the server's log
LOG_MAX = 1 << 20
#: util-linux's ionice, to start the server in the default I/O class whatever the caller's
_IONICE = "/usr/bin/ionice"


def start_server(path: str) -> None:
    """Start ``graphdriver serve commands --socket PATH`` in the background, unless one holds
    its lock ``PATH.lock`` (it is starting, serving, or refused this command) or the last start
    was tried within :data:`RETRY` seconds (the lock's mtime), or this process's scheduling is
    not the default (a server would pass it on to every command it runs). The lock is taken
    here and handed to the server, so that no second one starts meanwhile. The server runs in
    a session of its own, in ``/``, with none of this process's descriptors (a caller that
    waits for this command's output never waits for it), the default signal dispositions,
    mask and I/O class, and its output in ``PATH.log``; it stops after :data:`IDLE_TIMEOUT`
    seconds without a command. Its log is emptied beyond :data:`LOG_MAX`."""
    if os.getpriority(os.PRIO_PROCESS, 0) != 0 or os.sched_getscheduler(0) != os.SCHED_OTHER:
        return
    home = os.path.dirname(path)
    try:
        _private_dir(os.path.dirname(home), 0o022)
        _private_dir(home, 0o077)
        lock = _own_file(path + ".lock", os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st = os.fstat(lock)  # empty: no start was tried (made just now, by this or another)
        if st.st_size and time.time() - st.st_mtime < RETRY:
            raise BlockingIOError
        os.ftruncate(lock, 0)
        os.write(lock, b"starting\n")  # a start tried now (its mtime): the server's pid next
        log = _own_file(path + ".log", os.O_WRONLY | os.O_APPEND)
        if os.fstat(log).st_size > LOG_MAX:  # (each start adds a line or two)
            os.ftruncate(log, 0)
    except OSError:  # (BlockingIOError: a server holds it, or one was started just now)
        os.close(lock)
        return
    from subprocess import _args_from_interpreter_flags  # type: ignore[attr-defined]

    # this interpreter as it runs (-E, -s, -I, -O, -X, -W: what the socket's key names)
    flags = [f for f in _args_from_interpreter_flags() if f != "-P"]
    argv = [sys.executable, *flags, "-P", "-m", "graphdriver", "serve", "commands"]
    argv += ["--socket", path]
    argv += ["--idle-timeout", str(IDLE_TIMEOUT)]
    if os.access(_IONICE, os.X_OK):
        argv = [_IONICE, "-t", "-c", "0", *argv]  # -t: where it may not, as it is
    env = {k: v for k, v in os.environ.items() if k.startswith(_SERVER_ENV)}
    env[LOCK_FD_ENV] = "3"
    _spawn(argv, env, lock, log)


def _spawn(argv: list[str], env: dict[str, str], lock: int, log: int) -> None:
    """Run *argv* with *env* as a grandchild (not this process's child: reparented once its
    parent ends), *lock* as its fd 3, *log* as its stdout and stderr; then close both here."""
    try:
        child = os.fork()
    except OSError:
        child = -1
    if child == 0:  # pragma: no cover - the intermediate child, then the server
        try:
            _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
            os.setsid()  # no terminal: its signals are not the server's
            if os.fork() == 0:
                os.chdir("/")
                null = os.open(os.devnull, os.O_RDWR)
                for fd, to in ((null, 0), (log, 1), (log, 2), (lock, 3)):
                    os.dup2(fd, to)
                    os.set_inheritable(to, True)  # (dup2 onto itself keeps O_CLOEXEC)
                os.closerange(4, 0x7FFFFFFF)
                for signum in _signal.valid_signals():
                    if signum not in (_signal.SIGKILL, _signal.SIGSTOP):
                        try:  # noqa: SIM105 - (contextlib: an import) some take no handler
                            _signal.signal(signum, _signal.SIG_DFL)
                        except (OSError, ValueError):
                            pass
                _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
                os.execve(argv[0], argv, env)  # noqa: S606 - this interpreter, no shell
        finally:
            os._exit(0)
    os.close(lock)
    os.close(log)
    if child > 0:
        with contextlib.suppress(ChildProcessError):  # SIGCHLD ignored: reaped already
            os.waitpid(child, 0)


def _private_dir(path: str, forbidden: int) -> None:
    """Make the directory *path* (0700) if missing; OSError unless it is a directory of this
    user's (not a link) without any of the *forbidden* mode bits."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & forbidden:
        raise PermissionError(path)


def _own_file(path: str, flags: int) -> int:
    """Open the regular file *path* of this user's, never through a link, or make it
    (0600)."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC, 0o600)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise PermissionError(path)
    return fd
