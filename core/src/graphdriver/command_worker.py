"""The worker of ``graphdriver serve commands`` (:mod:`.command_server`): the process forked
for one client, which checks that the client may use the server, reads its request, takes on
its cgroup, limits, streams, working directory, environment and arguments, and runs its
command as the client's own process would; then it sends the client the exit status.
"""

from __future__ import annotations

import codecs
import contextlib
import faulthandler
import fcntl
import io
import locale
import logging
import os
import resource
import signal
import socket
import struct
import sys
import time
from typing import Any

from .command_client import _LENGTH, _STATUS, FDS, HELLO, MAGIC, PREAMBLE, package_dir
from .command_client import NAMESPACES as NAMESPACES
from .command_client import PRIVILEGE_FIELDS as PRIVILEGE_FIELDS

log = logging.getLogger("graphdriver.command_server")

#: the most a request may hold (arguments and environment)
MAX_REQUEST = 1 << 20
#: seconds a client has to send its whole request once connected
REQUEST_TIMEOUT = 5.0
_PEERCRED = struct.Struct("3i")
#: what the server blocks around fork, so that a worker never runs the server's handlers
SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD}


#: the exit status of a worker that refused its client (the server's idle time goes on)
REFUSED = 249


class Refused(Exception):
    """A request the server does not run; the client runs the command itself."""


class _Request:
    """What a client asked: its arguments, how to run them, and its fds (stdin, stdout, stderr,
    its working directory)."""

    def __init__(self, data: bytes, fds: list[int]) -> None:
        fields = data.split(b"\0")
        if len(fields) < 5 or fields[0] != MAGIC:
            raise Refused("another protocol")
        if fields[1] != package_dir():
            raise Refused(f"another installation of graphdriver ({os.fsdecode(fields[1])})")
        self.umask = int(fields[2], 8)
        self.limits = dict(w.decode().partition("=")[::2] for w in fields[3].split())
        argc = int(fields[4])
        # the arguments' bytes, as the server's own encoding keeps them: what the command
        # opens or names is then the bytes the client was given
        self.argv = [os.fsdecode(a) for a in fields[5 : 5 + argc]]
        if len(self.argv) != argc or len(fds) != FDS:
            raise Refused("a malformed request")
        self.env = dict(f.partition(b"=")[::2] for f in fields[5 + argc :] if f)
        self.fds = fds


def _status_fields(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/status", errors="surrogateescape") as f:  # Name: is any bytes
        return dict(line.rstrip("\n").partition(":\t")[::2] for line in f)


def _label(pid: int | str) -> str:
    try:
        with open(f"/proc/{pid}/attr/current", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""  # no LSM that labels processes


class OwnSide:
    """The server's side of the peer check that only the server itself can change (and does
    not): its namespaces, the privilege lines of its status and its root directory, read
    once before it forks workers (:meth:`remember`): a worker's are the server's, and read
    again in a fresh fork they cost a millisecond of copied pages at every command. (Its
    security label, which an administrator can change under it, is read by each worker.)"""

    facts: tuple[dict[str, str], dict[str, str], tuple[int, int]] | None = None

    @classmethod
    def remember(cls) -> None:
        cls.facts = cls.read()

    @staticmethod
    def read() -> tuple[dict[str, str], dict[str, str], tuple[int, int]]:
        root = os.stat("/")
        status = _status_fields("self")
        return (
            {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in NAMESPACES},
            {field: status[field] for field in PRIVILEGE_FIELDS if field in status},
            (root.st_dev, root.st_ino),
        )


def peer_problem(conn: socket.socket) -> tuple[int, str | None]:
    """The client's pid, and why it may not use this server (None if it may): its uid,
    privileges, root directory, security label or namespaces differ from the server's."""
    pid, uid, _gid = _PEERCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    if uid != os.geteuid():
        return pid, f"uid {uid} is not the server's ({os.geteuid()})"
    try:
        spaces, ours, own_root = OwnSide.facts or OwnSide.read()
        for ns in NAMESPACES:
            if os.readlink(f"/proc/{pid}/ns/{ns}") != spaces[ns]:
                return pid, f"another {ns} namespace"
        theirs = _status_fields(pid)
        for field in PRIVILEGE_FIELDS:
            if field == "Groups" and uid == 0:
                continue  # root's own group (Gid) owns what it makes; the others change nothing
            if theirs.get(field) != ours.get(field):
                return pid, f"other privileges ({field})"
        root = os.stat(f"/proc/{pid}/root")
        if (root.st_dev, root.st_ino) != own_root:
            return pid, "another root directory (chroot)"
        if _label(pid) != _label("self"):
            return pid, "another security label"
    except OSError as exc:
        return pid, f"its process cannot be read ({exc.strerror})"
    return pid, None


def _join_cgroup(pid: int) -> None:
    """Move this process (a worker) into the cgroup v2 of the client *pid*; Refused if it
    cannot (cgroup v1, or not allowed)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            theirs = f.read()
        with open("/proc/self/cgroup") as f:
            ours = f.read()
        if theirs == ours:
            return
        if not theirs.startswith("0::") or "\n" in theirs.rstrip("\n"):
            raise Refused("another cgroup (v1)")
        procs = f"/sys/fs/cgroup{theirs[3:].strip()}/cgroup.procs"
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    except OSError as exc:
        raise Refused(f"its cgroup cannot be joined ({exc.strerror})") from None


def _take_limits(limits: dict[str, str]) -> None:
    """Take on the client's rlimits, nice value, CPUs and OOM score adjustment; Refused,
    naming it, for one this process cannot take (a server not root, or a memory limit under
    what the server's image already takes: the command would fail where by itself it might
    not)."""
    status: dict[str, str] = {}  # read only for a finite memory limit
    in_use = {"RLIMIT_AS": "VmSize", "RLIMIT_DATA": "VmData"}
    for key, value in limits.items():
        if not key.startswith("RLIMIT_") or not hasattr(resource, key):
            continue
        soft, _, hard = value.partition(":")
        if key in in_use and int(soft) >= 0:
            status = status or _status_fields("self")
            used = status.get(in_use[key], "").split()
            if used and int(soft) < int(used[0]) * 1024:
                raise Refused(f"its {key} ({int(soft) >> 10} KiB) is under the server's use")
        try:
            resource.setrlimit(getattr(resource, key), (int(soft), int(hard)))
        except (OSError, ValueError) as exc:
            raise Refused(f"its {key} cannot be taken ({exc})") from None
    try:
        if "nice" in limits:
            os.setpriority(os.PRIO_PROCESS, 0, int(limits["nice"]))
        if limits.get("cpus"):
            os.sched_setaffinity(0, {int(c) for c in limits["cpus"].split(",")})
        if "oom" in limits:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(limits["oom"])
    except OSError as exc:
        why = f"its nice value, CPUs or OOM score cannot be taken ({exc.strerror})"
        raise Refused(why) from None


def _receive(conn: socket.socket) -> _Request:
    """Read one request and the fds that come with it, within :data:`REQUEST_TIMEOUT`."""
    deadline = time.monotonic() + REQUEST_TIMEOUT
    fds: list[int] = []
    data = b""
    need = _LENGTH.size
    size = None
    try:
        while len(data) < need:
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            piece, ancillary, flags, _addr = conn.recvmsg(
                min(need - len(data), 1 << 16), socket.CMSG_SPACE(FDS * 4)
            )
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    n = len(payload) // 4
                    fds += struct.unpack(f"{n}i", payload[: 4 * n])
            if flags & socket.MSG_CTRUNC:
                raise Refused("its file descriptors could not be received (out of fds?)")
            if not piece:
                break
            data += piece
            if size is None and len(data) >= _LENGTH.size:
                (size,) = _LENGTH.unpack(data[: _LENGTH.size])
                if size > MAX_REQUEST:
                    raise Refused("a request too large")
                need = _LENGTH.size + size
        if size is None or len(data) != need:
            raise Refused("a request cut short")
        try:
            return _Request(data[_LENGTH.size :], fds)
        except ValueError:
            raise Refused("a malformed request") from None
    except TimeoutError:
        close_all(fds)
        raise Refused("a request not sent in time") from None
    except BaseException:
        close_all(fds)
        raise


def _protocol(conn: socket.socket) -> None:
    """Read the client's first bytes, its protocol (:data:`PREAMBLE`, sent before the hello
    it waits for); Refused if it is another, or not sent in time."""
    got = b""
    conn.settimeout(REQUEST_TIMEOUT)
    try:
        while len(got) < len(PREAMBLE):
            piece = conn.recv(len(PREAMBLE) - len(got))
            if not piece:
                break
            got += piece
    except TimeoutError:
        raise Refused("a request not sent in time") from None
    finally:
        conn.settimeout(None)
    if got != PREAMBLE:
        raise Refused("another protocol")


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _stdio(env: dict[bytes, bytes]) -> None:
    """New sys.stdin, stdout and stderr on fds 0-2, as Python makes them for a process with
    the client's environment: the server's encoding and error handler unless
    PYTHONIOENCODING says otherwise, stdout line-buffered on a terminal, stderr always,
    neither buffered with PYTHONUNBUFFERED."""
    encoding, errors = _locale_stdio(env)
    io_enc = os.fsdecode(env.get(b"PYTHONIOENCODING", b"")).partition(":")
    encoding, errors = io_enc[0] or encoding, io_enc[2] or errors
    unbuffered = bool(env.get(b"PYTHONUNBUFFERED"))
    made = []
    for fd in (0, 1, 2):
        raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
        buffered: Any = raw  # python -u: stdout and stderr write the raw stream at once
        if fd == 0:
            buffered = io.BufferedReader(raw)
        elif not unbuffered:
            buffered = io.BufferedWriter(raw)
        stream = io.TextIOWrapper(
            buffered, encoding=encoding, errors="backslashreplace" if fd == 2 else errors,
            write_through=unbuffered and fd > 0,
            line_buffering=fd == 2 or (fd == 1 and os.isatty(1)),
        )  # fmt: skip
        made.append(stream)
    sys.stdin, sys.stdout, sys.stderr = made


#: LC_CTYPE locales in which Python makes its stdio UTF-8 with surrogateescape (PEP 538
#: coerces the C locale to C.UTF-8)
_C_LOCALES = {"C", "POSIX", "C.UTF-8", "C.utf8", "UTF-8"}


def _locale_stdio(env: dict[bytes, bytes]) -> tuple[str, str]:
    """Set this process's LC_CTYPE from the environment (the client's, already in place) as
    Python does at start-up, and return the encoding and error handler Python would give its
    stdio: UTF-8 and surrogateescape in the C locale or UTF-8 mode, else the locale's
    encoding, strict."""
    utf8_mode = env.get(b"PYTHONUTF8", b"")
    if utf8_mode == b"1":
        return "utf-8", "surrogateescape"
    try:
        name = locale.setlocale(locale.LC_CTYPE, "")
    except locale.Error:  # a locale this machine lacks: the C locale, as at start-up
        name = locale.setlocale(locale.LC_CTYPE, "C")
    if (
        name in ("C", "POSIX")
        and utf8_mode == b"0"
        and (env.get(b"LC_ALL") or env.get(b"PYTHONCOERCECLOCALE") == b"0")
    ):  # neither UTF-8 mode nor the coercion to C.UTF-8: the C locale's own ASCII
        return codecs.lookup(locale.getencoding()).name, "surrogateescape"
    if name in _C_LOCALES:
        return "utf-8", "surrogateescape"
    return codecs.lookup(locale.getencoding()).name, "strict"


def _serve_one(conn: socket.socket, closing: list[int]) -> int | None:  # pragma: no cover
    """In the forked worker: check and read the client's request; refuse it (None), or send
    the client this process's pid, become the client's process and run its command. Its exit
    status, which the worker sends the client itself (so that it arrives even if the server
    stops meanwhile)."""
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    faulthandler.unregister(signal.SIGUSR1)  # the server's stack dumps are not the command's
    signal.set_wakeup_fd(-1)
    # SIGINT (only the client sends it, once the command runs) stays blocked until the CLI's
    # handler is in place: a KeyboardInterrupt raised meanwhile could land where Python ignores
    # it (logging's weakref callbacks below), and the command would run on, deaf to it
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS - {signal.SIGINT})
    close_all(closing)
    os.setsid()  # a Ctrl-C at the server's terminal is not the client's
    # the server's log goes on to the server's stderr once fds 0-2 are the client's
    server_log = open(os.dup(2), "w", buffering=1, errors="backslashreplace")  # noqa: SIM115
    for handler in logging.root.handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(server_log)
    pid = 0
    try:  # whatever goes wrong before the command starts is a refusal: the client runs it
        pid, problem = peer_problem(conn)  # at once: the pid is the client's while it waits
        _protocol(conn)
        if problem is not None:
            raise Refused(problem)
        conn.sendall(HELLO)  # the client may send its request and its fds
        req = _receive(conn)
        _join_cgroup(pid)
        _become(req)
        if _stop_asked(conn):
            raise Refused("stopped by a signal before it ran")
    except Exception as exc:
        why = str(exc) if isinstance(exc, Refused) else f"its request failed: {exc!r}"
        log.info("refused a client (pid %d): %s", pid, why)
        with contextlib.suppress(OSError):
            conn.sendall(b"R" + why.encode())
        return None
    try:
        conn.sendall(b"P" + _STATUS.pack(os.getpid()))
    except OSError:  # the client left: nothing runs
        return None
    log.info("pid %d: worker %d runs %s", pid, os.getpid(), " ".join(req.argv[1:]))
    server_log.close()  # not the command's
    _stdio(req.env)
    logging.root.handlers.clear()  # the command sets up its own, on its stderr
    logging.root.setLevel(logging.WARNING)
    from .cli import main

    try:
        main(blocked={signal.SIGINT})
    except SystemExit as exc:
        return _exit_code(exc.code)
    return 0


def _become(req: _Request) -> None:
    """Take the client's place: its fds (stdin, stdout, stderr, cwd), umask, environment,
    arguments and limits."""
    # the client's fds, placed above 2 first, so that placing one does not overwrite another
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in req.fds]
    close_all(req.fds)
    for target, fd in enumerate(high[:3]):
        os.dup2(fd, target)
    os.fchdir(high[3])
    close_all(high)
    os.umask(req.umask)
    os.environb.clear()
    os.environb.update(req.env)
    sys.argv = req.argv
    _take_limits(req.limits)  # last: a lower RLIMIT_NOFILE must not stop the steps above


def _stop_asked(conn: socket.socket) -> bool:
    """Whether the client, signalled before it had an answer, asked that nothing run (a byte
    after its request), or left."""
    conn.setblocking(False)
    try:
        conn.recv(1)  # a byte, or b"" at the end: either way, nothing is to run
    except BlockingIOError:
        return False
    finally:
        conn.setblocking(True)
    return True


def run_worker(conn: socket.socket, closing: list[int]) -> None:  # pragma: no cover - a fork
    """The forked worker's life (:func:`_serve_one`), then its status to the client; never
    returns."""
    code: int | None = 1
    try:
        code = _serve_one(conn, closing)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            print(f"graphdriver: command server worker: {exc!r}", file=sys.stderr)
    finally:
        # what is left in the buffers goes first, signals still on: a flush into a full pipe
        # that nobody reads ends on the client's second SIGTERM, as the command by itself
        # would (the CLI's handler ends the process); then none may interrupt the status
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        with contextlib.suppress(BaseException):  # a handler pending now runs, and may raise
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        if code is not None:  # None: refused, and told so
            with contextlib.suppress(Exception):
                conn.sendall(b"S" + _STATUS.pack(code))
        os._exit(REFUSED if code is None else code)


def _exit_code(code: object) -> int:
    """What the process would exit with on ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1
