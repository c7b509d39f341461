"""The ``graphdriver`` script's entry point: a command run by a resident command server
(:mod:`.command_server`), else here. The server is the one ``GRAPHDRIVER_SOCKET`` names, or,
where it is unset, this user's default one (:func:`default_socket`), which a command that
finds none starts in the background (:mod:`.command_start`); ``GRAPHDRIVER_SOCKET=`` (empty):
none.

A Python process that imports the CLI (click and the store's modules) takes 60-100 ms before it
does anything; one that forwards its command to a server that imported all that once takes
about 20 (Mercurial's chg does the same for hg). What the command sees does not change: the
server forks a worker that takes this process's standard streams and working directory (fds
passed over the socket), umask, environment and arguments, runs the command as this process
would, with this process's limits, and this process exits with its status; a signal sent here
(Ctrl-C, ``timeout``) goes on to the worker, unless this process ignores it
(``nohup``). Without a server, when the socket is not served by this user or root, when a
standard stream is closed, or when the server refuses (another user, less privileges,
another namespace, another installation of graphdriver), the command runs here, as it
always did; but never once the request has all gone and no answer came (the server stopped, a
worker killed): a worker may have run it, so the client says so and exits 1.

Only the standard library's C modules are imported before the command is sent: the point is
to start fast.
"""

from __future__ import annotations

import _socket
import os
import struct
import sys

TYPE_CHECKING = False  # typing's costs an import
if TYPE_CHECKING:
    import signal as _signal
    from typing import NoReturn
else:  # the C half of signal, without its enums (an import of enum)
    import _signal

#: the protocol, sent first; a server that speaks another refuses
MAGIC = b"graphdriver-command/6"
#: the client's first bytes, before the worker's hello: 4, which a server of protocol 5
#: reads as a request's length, too large, and refuses at once (nothing left unread)
PREAMBLE = b"\xffGD6"
#: what a worker sends first, before the client sends it anything
HELLO = b"H"
#: the environment variable that names the server's socket
SOCKET_ENV = "GRAPHDRIVER_SOCKET"
#: the fds sent with a request: stdin, stdout, stderr and the working directory
FDS = 4
_LENGTH = struct.Struct("<I")
_STATUS = struct.Struct("<i")
_PEERCRED = struct.Struct("3i")
#: signals that a terminal, ``timeout`` or ``kill`` send, passed on to the worker
FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)
#: signals whose default action dumps core: a worker killed by one is not killed again here
_CORE = {
    _signal.SIGQUIT, _signal.SIGILL, _signal.SIGTRAP, _signal.SIGABRT, _signal.SIGBUS,
    _signal.SIGFPE, _signal.SIGSEGV, _signal.SIGXCPU, _signal.SIGXFSZ, _signal.SIGSYS,
}  # fmt: skip


def main() -> None:
    """Run the command through the server, or here. Where ``GRAPHDRIVER_SOCKET`` is unset,
    the server is this user's default one (:func:`default_socket`), and one is started if
    none took the command (:mod:`.command_start`); ``graphdriver serve`` runs here."""
    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
        # a Ctrl-C before the CLI's handlers (or the forwarding's) ends this process as it
        # would any program that had not started: by the signal, without Python's traceback
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    path = os.environ.get(SOCKET_ENV)
    if _verb(sys.argv) == "serve":  # a server runs in its own process, never in a worker
        path = ""
    auto = path is None
    if auto:
        path = default_socket()
    status = _through_server(path, quiet=auto) if path else None
    if status is not None:
        _exit(status)
    if auto and path:
        from .command_start import start_server

        start_server(path)
    from .cli import main as run_here

    run_here()


def _exit(status: int) -> NoReturn:
    """End this process with the served command's *status* at once. It ran nothing of the
    command and holds nothing that needs cleaning up, and an interpreter's finalisation
    (modules torn down, a last collection) took ~4 ms here, a tenth of a served command; its
    own streams are flushed first. (So an atexit handler that a sitecustomize registered,
    such as coverage's, or a profiler's report, is not written for a served command: profile
    or trace the command itself with ``GRAPHDRIVER_SOCKET=``, which runs it here.)"""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status & 0xFF)


def request(argv: list[str]) -> bytes:
    """The request for the command *argv*: NUL-separated fields (none can hold a NUL)."""
    umask = os.umask(0)
    os.umask(umask)
    env = [k + b"=" + v for k, v in os.environb.items()]
    fields = [MAGIC, package_dir(), b"%o" % umask, limits(), b"%d" % len(argv)]
    return b"\0".join(fields + [os.fsencode(a) for a in argv] + env)


def limits() -> bytes:
    """What limits this process: its rlimits (``ulimit``), nice value, CPUs and OOM score
    adjustment, which the worker takes on, as ``key=value`` words."""
    import resource  # a C module, as cheap as the calls

    words = [b"nice=%d" % os.getpriority(os.PRIO_PROCESS, 0)]
    words.append(b"cpus=" + b",".join(b"%d" % c for c in sorted(os.sched_getaffinity(0))))
    try:
        with open("/proc/self/oom_score_adj", "rb") as f:
            words.append(b"oom=" + f.read().strip())
    except OSError:
        pass
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            soft, hard = resource.getrlimit(getattr(resource, name))
            words.append(b"%s=%d:%d" % (name.encode(), soft, hard))
    return b" ".join(words)


def package_dir() -> bytes:
    """Which installation of graphdriver this is: a server runs its own code, so one of another
    installation refuses."""
    return os.fsencode(os.path.dirname(os.path.abspath(__file__)))


#: the largest unix socket path (sun_path less its NUL)
_MAX_PATH = 107
#: the CLI's options before the verb that take a value
_VALUED = ("--root", "--driver", "-d", "--opt", "--wait", "--log-level")
#: the environment that shapes the interpreter a server runs (its flags, its imports, what
#: the dynamic loader adds, glibc's tunables and malloc settings): a client whose own differs
#: has a server of its own
INTERPRETER_ENV = ("PYTHON", "LD_", "GLIBC_TUNABLES", "MALLOC_")


def default_socket() -> str | None:
    """The socket of the command server for this process when ``GRAPHDRIVER_SOCKET`` is
    unset: ``KEY.sock`` in ``$XDG_RUNTIME_DIR/graphdriver/commands`` if that directory is this
    user's and no one else may write in it, else, for root, in ``/run/graphdriver/commands``.
    KEY (a BLAKE2 hash) names what a server must share with its clients to serve them
    (:func:`_who`: namespaces, privileges, cgroup v1 hierarchies, security label, OOM score
    adjustment, hard limits) and to run what this process would (the interpreter, its flags,
    the environment that shapes it, :data:`INTERPRETER_ENV`, this installation and its import
    path): a client unlike the others has a server of its own, never one that refuses it.
    None where there is none: an unprivileged user without ``XDG_RUNTIME_DIR``."""
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if not (base.startswith("/") and _private(base)):
        base = "/run" if os.geteuid() == 0 else ""
    if not base:
        return None
    try:
        who = _who()
    except OSError:
        return None
    # sys.path less the script's directory, and the flags less -P (a server runs with -P)
    paths = sys.path if sys.flags.safe_path else sys.path[1:]
    flags = str(sys.flags).replace(f"safe_path={sys.flags.safe_path}", "")
    flags += repr((sys.warnoptions, sys._xoptions))  # -W, -X: not in sys.flags
    env = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith(INTERPRETER_ENV))
    key = os.fsencode("\0".join([sys.executable, flags, *env, *paths]))
    key += b"\0" + package_dir() + b"\0" + who
    from _blake2 import blake2b  # a C module, as hashlib's is

    path = f"{base}/graphdriver/commands/{blake2b(key, digest_size=8).hexdigest()}.sock"
    return path if len(os.fsencode(path)) <= _MAX_PATH else None


#: the namespaces a client must share with its server (:mod:`.command_worker` checks them)
NAMESPACES = ("mnt", "pid", "user")
#: the lines of /proc/PID/status that say what a process may do: a client's must be the
#: server's (:mod:`.command_worker` compares them, root's Groups aside)
PRIVILEGE_FIELDS = (
    "Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs",
    "Seccomp",
)  # fmt: skip


def _who() -> bytes:
    """What a server must share with its clients: its namespaces (mount, PID, user), the
    privilege lines of /proc/self/status (root's groups aside, as the worker does), its
    cgroup v1 hierarchies (a worker joins its client's cgroup v2 only), security label, OOM
    score adjustment (none can lower its own) and hard limits (none can raise its own).
    A worker joins its client's cgroup v2: root may always, a user not into another
    session's scope, so for a user that too is named."""
    import resource  # a C module, as cheap as its calls (the request imports it anyway)

    root = os.geteuid() == 0
    fields = {f.encode() for f in PRIVILEGE_FIELDS if not (root and f == "Groups")}
    parts = [os.fsencode(os.readlink(f"/proc/self/ns/{ns}")) for ns in NAMESPACES]
    for name in ("status", "cgroup", "attr/current", "oom_score_adj"):
        try:
            with open(f"/proc/self/{name}", "rb") as f:
                text = f.read()
        except OSError:  # (attr: no LSM that labels processes)
            text = b""
        lines = text.splitlines(True)
        if name == "status":
            lines = [x for x in lines if x.partition(b":")[0] in fields]
        elif name == "cgroup" and root:  # (root joins any cgroup v2)
            lines = [x for x in lines if not x.startswith(b"0::")]
        parts.append(b"".join(lines))
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            parts.append(b"%d" % resource.getrlimit(getattr(resource, name))[1])
    return b"\0".join(parts)


def _private(path: str) -> bool:
    """Whether *path* is this user's and no one else may write in it."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _verb(argv: list[str]) -> str | None:
    """The verb of the command line *argv* (the first word that is no option or value)."""
    words = iter(argv[1:])
    for word in words:
        if word in _VALUED:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


class _Stop(BaseException):
    """A signal that arrived before the worker's pid: the command ends here."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Forward:
    """Passes the signals this process does not ignore on to the worker once it runs (by a
    pidfd: never to another process that took its pid). One that comes while the request
    goes and the answer is awaited (*waiting*) ends the command here (:class:`_Stop`, then
    :func:`_stop_asking`: no worker starts after it, one that had started gets it); one that
    comes at any other moment before the worker's pid is held, and passed on to it if the
    answer is its pid, else it ends the command here."""

    def __init__(self) -> None:
        self.pidfd = -1
        self.waiting = False
        #: whether (some of) the request was sent
        self.sent = False
        self.held: list[int] = []
        self.before = {signum: _signal.getsignal(signum) for signum in FORWARDED}
        for signum, was in self.before.items():
            if was != _signal.SIG_IGN:
                _signal.signal(signum, self)

    def to(self, pid: int, sock: _socket.socket) -> None:
        """The worker *pid* runs the command: signals go to it from now on, unless its status
        is already in *sock* (then it has ended, and its pid may be another's)."""
        try:
            self.pidfd = os.pidfd_open(pid)
        except OSError:
            self.pidfd = -2  # it has ended already: its status is on the way
        if self.pidfd >= 0 and _available(sock, _socket.MSG_PEEK):
            os.close(self.pidfd)
            self.pidfd = -2
        held, self.held = self.held, []
        for signum in held:
            self(signum, None)

    def __call__(self, signum: int, _frame: object) -> None:
        if self.pidfd == -1:
            if self.waiting:
                raise _Stop(signum)
            self.held.append(signum)
            return
        self.send(signum)

    def send(self, signum: int) -> None:
        if self.pidfd >= 0:
            try:  # noqa: SIM105 - contextlib is an import this module does without
                _signal.pidfd_send_signal(self.pidfd, signum)
            except OSError:
                pass  # it has just ended: its status is on the way

    def restore(self) -> None:
        for signum, was in self.before.items():
            _signal.signal(signum, was)
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -2


#: every answer's first bytes: P and the worker's pid, S and a status, or R and why
_ANSWER = 1 + _STATUS.size


def _through_server(path: str, quiet: bool = False) -> int | None:
    """The command's exit status (negative: killed by that signal), or None if no server at
    *path* took it (nothing ran); *quiet*: a server that refuses or is another user's says
    nothing (one the user did not name)."""
    try:
        for fd in (0, 1, 2):  # a closed one: the socket would take its number
            os.fstat(fd)
    except OSError:
        return None
    forward = _Forward()  # from before the request: no signal may slip past it
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            forward.waiting = True
            asked = _ask(sock, path, quiet, forward)
            forward.waiting = False
        except _Stop as stop:  # nothing of the answer was taken yet
            forward.waiting = False
            forward.held.append(stop.signum)
            asked = _stop_asking(sock) if forward.sent else False
        # the answer is taken now, signals held until it says whether a worker runs
        status = _answered(sock, _available(sock) if asked else b"", forward, quiet, asked)
    finally:
        forward.restore()
        sock.close()
    if status is None and forward.held:  # asked to stop before anything ran: nothing will
        return 128 + forward.held[0]
    return status


def _ask(sock: _socket.socket, path: str, quiet: bool, forward: _Forward) -> bool:
    """Say which protocol this is, wait (:data:`HELLO_WAIT` at most) for a worker's hello,
    send the request and wait for the answer's first bytes without taking them (a signal
    meanwhile leaves them in the socket); False if no server took the request. Nothing of
    this process goes before the hello: a stopped or frozen server with this connection in
    its queue holds none of its descriptors (such as the pipe its caller reads). A worker
    that said hello answers (it may refuse: R); one of another protocol refuses at once."""
    try:  # (a stopped server whose queue is full would block a connect)
        sock.settimeout(HELLO_WAIT)
        sock.connect(path)
    except OSError:
        return False  # no server there: run here
    _pid, uid, _gid = _PEERCRED.unpack(
        sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _PEERCRED.size)
    )
    if uid not in (0, os.geteuid()):  # not a server of ours: it gets nothing of this process
        if not quiet:
            _say(f"{SOCKET_ENV} {path} is served by uid {uid}, not this user or root; running here")
        return False
    try:
        sock.sendall(PREAMBLE)
        first = sock.recv(len(HELLO), _socket.MSG_PEEK)
        sock.settimeout(None)
        if first != HELLO:  # a refusal (R, read by _answered), or nothing
            return bool(first)
        sock.recv(len(HELLO))
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except TimeoutError:
        if not quiet:
            _say(f"the command server on {path} did not answer in {HELLO_WAIT:g} s; running here")
        return False
    except OSError:
        return False
    try:
        body = request(sys.argv)
        data = _LENGTH.pack(len(body)) + body
        fds = struct.pack(f"{FDS}i", 0, 1, 2, cwd)
        forward.sent = True
        sent = sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        if sent < len(data):  # (never a send of nothing: once a worker that had it all
            sock.sendall(data[sent:])  # closed, that fails, and the command would run twice)
    except OSError:
        return False  # the request did not all go: no worker can run it
    finally:
        os.close(cwd)
    # from now on a worker may run the command: what comes (or nothing) is the answer
    try:  # noqa: SIM105 - contextlib is an import this module does without
        sock.recv(_ANSWER, _socket.MSG_PEEK | _socket.MSG_WAITALL)
    except OSError:
        pass
    return True


#: seconds a signalled client waits for a worker that may have said it runs
_STOP_WAIT = 1.0
#: seconds a client waits for a worker's hello (a server stopped, frozen or overloaded)
HELLO_WAIT = 3.0


def _stop_asking(sock: _socket.socket) -> bool:
    """After a signal that came while the answer was awaited: ask that nothing run (a byte
    after the request, which a worker looks for just before it says it runs), then wait a
    moment for the pid of a worker that had already looked; whether an answer is there."""
    try:
        sock.send(b"X")
        sock.settimeout(_STOP_WAIT)
        return bool(sock.recv(_ANSWER, _socket.MSG_PEEK))
    except OSError:  # (a timeout too) no worker runs, nor will: the byte is in its way
        return False
    finally:
        sock.settimeout(None)


def _available(sock: _socket.socket, flags: int = 0) -> bytes:
    """The answer's first bytes that have arrived, taken from the socket (or, with
    MSG_PEEK, looked at)."""
    sock.setblocking(False)
    try:
        return sock.recv(_ANSWER, flags)
    except OSError:
        return b""
    finally:
        sock.setblocking(True)


def _answered(
    sock: _socket.socket, head: bytes, forward: _Forward, quiet: bool, asked: bool = True
) -> int | None:
    """What to do on the answer that starts with *head*: wait for the worker that runs the
    command, or None to run it here (refused, or no server). Once a request has all gone
    (*asked*), no answer at all is never a reason to run the command here: a worker may
    have run it (it says so before it runs, but an answer lost on the way would make the
    command run twice)."""
    try:
        if len(head) < _ANSWER and head[:1] in (b"P", b"S"):
            head += _read(sock, _ANSWER - len(head))  # sent at once: the rest is there
        if head[:1] == b"R":
            head += _read(sock, 4096)
    except OSError:
        pass
    if head[:1] == b"P":  # the worker's pid: it runs the command
        if len(head) != _ANSWER:
            _say("the command server stopped before the command ended")
            return 1
        forward.to(int(_STATUS.unpack(head[1:])[0]), sock)
        return _status(sock, None)
    if head[:1] == b"S":  # a worker killed before it could say it runs: it ran nothing
        return _status(sock, head[:1], head[1:])
    if not head and asked:  # the request went, and no answer came: it may have run there
        _say("the command server stopped before it answered; the command may have run")
        return 1
    if head[:1] == b"R" and not forward.held and not quiet:
        _say(f"the command server refused ({head[1:].decode(errors='replace')}); running here")
    return None


def _say(text: str) -> None:
    os.write(2, f"graphdriver: {text}\n".encode(errors="replace"))


def _status(sock: _socket.socket, tag: bytes | None, got: bytes = b"") -> int:
    """The worker's status when it ends (it sends it; the server, if a signal killed it), of
    which *tag* and then *got* were read."""
    try:
        tag = _read(sock, 1) if tag is None else tag
        head = tag + got + _read(sock, _STATUS.size - len(got))
    except OSError:
        head = b""
    if len(head) != 1 + _STATUS.size or head[:1] != b"S":
        _say("the command server stopped before the command ended")
        return 1
    status = int(_STATUS.unpack(head[1:])[0])
    if status < 0 and -status not in _CORE:  # killed by a signal: so is this process
        for signum in FORWARDED:
            _signal.signal(signum, _signal.SIG_DFL)
        try:  # noqa: SIM105 - (no contextlib) SIGKILL and SIGSTOP take no handler
            _signal.signal(-status, _signal.SIG_DFL)
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), -status)
    return 128 - status if status < 0 else status  # a signal ignored here, or one that dumps


def _read(sock: _socket.socket, n: int) -> bytes:
    """*n* bytes, fewer only at the end of the stream."""
    out = b""
    while len(out) < n:
        piece = sock.recv(n - len(out))
        if not piece:
            break
        out += piece
    return out
