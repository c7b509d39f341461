"""The ``graphdriver`` script's entry point: a command run by a resident command server
(:mod:`.command_server`) when ``GRAPHDRIVER_SOCKET`` names one that answers, else here.

A Python process that imports the CLI (click and the store's modules) takes 60-100 ms before it
does anything; one that forwards its command to a server that imported all that once takes
about 20 (Mercurial's chg does the same for hg). What the command sees does not change: the
server forks a worker that takes this process's standard streams (passed over the socket),
working directory, umask, environment and arguments, runs the command as this process would, and
this process exits with its status; a signal sent here (Ctrl-C, ``timeout``) goes on to the
worker. Without a server, or when it refuses (another user, another mount namespace, another
installation of graphdriver), the command runs here, as it always did.

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
else:  # the C half of signal, without its enums (an import of enum)
    import _signal

#: the protocol, sent first; a server that speaks another refuses
MAGIC = b"graphdriver-command/1"
#: the environment variable that names the server's socket
SOCKET_ENV = "GRAPHDRIVER_SOCKET"
_LENGTH = struct.Struct("<I")
_STATUS = struct.Struct("<i")
#: signals that a terminal, ``timeout`` or ``kill`` send, passed on to the worker
FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)


def main() -> int | None:
    """Run the command through the server, or here."""
    path = os.environ.get(SOCKET_ENV)
    if path:
        status = _through_server(path)
        if status is not None:
            return status
    from .cli import main as run_here

    run_here()
    return None


def request(argv: list[str]) -> bytes:
    """The request for the command *argv*: NUL-separated fields (none can hold a NUL)."""
    umask = os.umask(0)
    os.umask(umask)
    env = [k + b"=" + v for k, v in os.environb.items()]
    fields = [MAGIC, package_dir(), os.fsencode(os.getcwd()), b"%o" % umask, b"%d" % len(argv)]
    return b"\0".join(fields + [os.fsencode(a) for a in argv] + env)


def package_dir() -> bytes:
    """Which installation of graphdriver this is: a server runs its own code, so one of another
    installation refuses."""
    return os.fsencode(os.path.dirname(os.path.abspath(__file__)))


class _Forward:
    """Signals that arrive while the command is with the server: passed on to its worker once
    its pid is known, kept until then."""

    def __init__(self) -> None:
        self.pid = 0
        self.pending: list[int] = []
        for signum in FORWARDED:
            _signal.signal(signum, self)

    def __call__(self, signum: int, _frame: object) -> None:
        if not self.pid:
            self.pending.append(signum)
            return
        try:  # noqa: SIM105 - contextlib is an import this module does without
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass  # it has just ended: its status is on the way

    def to(self, pid: int) -> None:
        self.pid = pid
        for signum in self.pending:
            self(signum, None)

    def restore(self) -> None:
        for signum in FORWARDED:
            _signal.signal(signum, _signal.SIG_DFL)
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)


def _through_server(path: str) -> int | None:
    """The command's exit status (negative: killed by that signal), or None if no server at
    *path* took it (nothing ran)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    forward = _Forward()  # from before the request: no signal may fall between the two
    try:
        try:
            sock.connect(path)
            data = request(sys.argv)
            fds = struct.pack("3i", 0, 1, 2)
            sock.sendmsg(
                [_LENGTH.pack(len(data)) + data],
                [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)],
            )
            answer = _read(sock, 1)
        except OSError:
            answer = b""  # no server there (or stdin, stdout or stderr is closed): run here
        if answer == b"P":  # the worker's pid: it runs the command
            (pid,) = _STATUS.unpack(_read(sock, _STATUS.size))
            forward.to(int(pid))
            return _status(sock, None)
        if answer == b"S":  # a worker killed before it could say it runs: ran nothing here
            return _status(sock, answer)
        if answer == b"R":
            why = _read(sock, 4096).decode(errors="replace")  # to the end: the server closes
            os.write(2, f"graphdriver: the command server refused ({why}); running here\n".encode())
        forward.restore()
        if forward.pending:  # asked to stop before anything ran
            return 128 + forward.pending[0]
        return None
    finally:
        sock.close()


def _status(sock: _socket.socket, tag: bytes | None) -> int:
    """The worker's status when it ends (it sends it; the server, if a signal killed it), of
    which *tag* was read, if not None."""
    try:
        head = (_read(sock, 1) if tag is None else tag) + _read(sock, _STATUS.size)
    except OSError:
        head = b""
    if len(head) != 1 + _STATUS.size or head[:1] != b"S":
        os.write(2, b"graphdriver: the command server stopped before the command ended\n")
        return 1
    status = int(_STATUS.unpack(head[1:])[0])
    if status < 0:  # killed by a signal: so is this process, as a shell would show it
        for signum in FORWARDED:
            _signal.signal(signum, _signal.SIG_DFL)
        try:  # noqa: SIM105 - (no contextlib) SIGKILL and SIGSTOP take no handler
            _signal.signal(-status, _signal.SIG_DFL)
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), -status)
        return 128 - status  # a signal whose default is to be ignored
    return status


def _read(sock: _socket.socket, n: int) -> bytes:
    """*n* bytes, fewer only at the end of the stream."""
    out = b""
    while len(out) < n:
        piece = sock.recv(n - len(out))
        if not piece:
            break
        out += piece
    return out
