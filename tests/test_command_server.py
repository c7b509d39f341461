"""``graphdriver serve commands`` and the client in the ``graphdriver`` script: a command run
through the server gives what it gives run here (output, files, errors, exit status), signals
reach it, and clients the server does not serve run their command themselves."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from graphdriver.testing import Backing

GRAPHDRIVER = shutil.which("graphdriver", path=str(Path(sys.executable).parent))


@dataclass
class Server:
    socket: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "GRAPHDRIVER_SOCKET": str(self.socket), **extra}

    def workers(self) -> list[str]:
        """The server's log lines of the commands it ran."""
        return [line for line in self.log.read_text().splitlines() if " worker " in line]


@pytest.fixture
def server(loop_ext4: Backing, request: pytest.FixtureRequest) -> Iterator[Server]:
    if GRAPHDRIVER is None:
        pytest.fail("the graphdriver script is not installed beside this python: run the set-up")
    work = loop_ext4.root / f"cmd-{request.node.name}"[:60]
    work.mkdir()
    sock, log = work / "cmd.sock", work / "server.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [GRAPHDRIVER, "--log-level", "info", "serve", "commands", "--socket", str(sock)],
            stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "GRAPHDRIVER_SOCKET": ""},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "serving commands" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the command server did not start"
            time.sleep(0.05)
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        yield Server(sock, log, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, log.read_text()
    assert not sock.exists()  # it removes its socket as it stops


def _layer_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(50):
            data = f"file {i}\n".encode() * (i + 1)
            info = tarfile.TarInfo(f"etc/f{i}")
            info.size, info.mtime = len(data), 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _members(tar: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        return [(m.name, tf.extractfile(m).read() if m.isfile() else b"") for m in tf]  # type: ignore[union-attr]


def _run(
    env: dict[str, str],
    *args: str,
    stdin: bytes | None = None,
    cwd: Path | None = None,
    runner: list[str] | None = None,
) -> tuple[int, bytes, str]:
    """The graphdriver command *args* (or, with *runner* [], the command *args* itself)."""
    assert GRAPHDRIVER is not None
    argv = [*(runner if runner is not None else [GRAPHDRIVER]), *args]
    proc = subprocess.run(argv, input=stdin, capture_output=True, env=env, cwd=cwd, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr.decode(errors="replace")


def test_a_command_through_the_server_is_the_command_run_here(
    server: Server, loop_ext4: Backing, tmp_path: Path
) -> None:
    here = {**os.environ, "GRAPHDRIVER_SOCKET": ""}
    layer = _layer_tar()
    results = {}
    for label, env in (("server", server.env()), ("here", here)):
        root = loop_ext4.root / f"cmd-root-{label}"
        gd = ["--driver", "vfs", "--root", str(root)]
        cwd = tmp_path / label
        cwd.mkdir()
        try:
            got = [
                _run(env, "--version"),
                _run(env, *gd, "create", "base"),
                _run(env, *gd, "apply-diff", "base", stdin=layer),  # stdin passed on
                _run(env, *gd, "create", "--rw", "--parent", "base", "c1"),
                _run(env, *gd, "ls"),
                _run(env, *gd, "mount", "nosuch"),  # one line of error, exit 1
                _run(env, *gd, "create", "--bogus", "x"),  # usage: exit 2
                _run(env, *gd, "diff", "base"),  # the tar on stdout, byte for byte
                # the client's working directory and environment
                _run({**env, "GRAPHDRIVER_ROOT": str(root)}, "--driver", "vfs", "ls", cwd=cwd),
                _run(env, *gd, "diff", "base", "-o", "rel.tar", cwd=cwd),
            ]
            mounted = _run(env, *gd, "mount", "c1")[1].decode().strip()
            (Path(mounted) / "new").write_text("written in the container\n")
            os.close(os.open(os.fsencode(mounted) + b"/caf\xe9", os.O_CREAT | os.O_WRONLY))
            # a name that is not UTF-8, to a stdout whose environment asks for strict UTF-8
            # (as tox's does): its bytes as they are
            got.append(_run({**env, "PYTHONIOENCODING": "utf-8"}, *gd, "changes", "c1"))
            got.append(_run(env, *gd, "umount", "c1"))
            code, out, err = _run(env, *gd, "diff", "c1")  # its names and bytes: times differ
            got.append((code, repr(_members(out)).encode(), err))
            got.append((0, (cwd / "rel.tar").read_bytes(), ""))
            results[label] = [(code, out.replace(str(root).encode(), b"ROOT"), err)
                              for code, out, err in got]  # fmt: skip
        finally:
            _run(here, *gd, "cleanup")
            shutil.rmtree(root, ignore_errors=True)
    assert [r[0] for r in results["here"]] == [0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0]
    assert "layer 'nosuch' does not exist" in results["here"][5][2]
    assert results["server"] == results["here"]
    assert results["here"][7][1] == layer  # the exact diff of the applied layer
    assert results["here"][10][1] == b"A /caf\xe9\nA /new\n"
    # every command of the server's run ran in one of its workers: the 13 above and `mount`
    assert len(server.workers()) == 14


def _ended(client: subprocess.Popen[bytes]) -> bytes:
    """Wait for *client* (signalled) to end, its stdin still open: the signal, passed on,
    must reach the worker before an end of input could; then its stderr. One that does not
    end fails the test with where it and the processes it started wait."""
    try:
        client.wait(timeout=60)
    except subprocess.TimeoutExpired:
        try:
            where = _waiting(client.pid)
        finally:
            client.kill()
            client.wait()
        pytest.fail(f"the client did not end in 60 s: {where}")
    assert client.stdin is not None and client.stderr is not None
    client.stdin.close()
    return client.stderr.read()


def _waiting(client: int) -> str:
    """Where *client* and every graphdriver process wait: each thread's system call and
    kernel wait channel (found once in CI, never here: the next time says where)."""

    def read(path: str) -> str:
        try:
            return Path(path).read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return "?"

    seen = []
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        cmd = read(f"/proc/{pid}/cmdline")
        if pid != client and "bin/graphdriver" not in cmd:
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # ended meanwhile
        threads = [
            f"{tid}: {read(f'/proc/{pid}/task/{tid}/wchan')} "
            f"{read(f'/proc/{pid}/task/{tid}/syscall').split()[:2]}"
            for tid in tids
        ]
        seen.append(f"{pid} {cmd[:80]!r} [{'; '.join(threads)}]")
    return " | ".join(seen)


def _start_apply(
    server: Server,
    root: Path,
    nohup: bool = False,
    prefix: list[str] | None = None,
    layer: str = "slow",
    settle: float = 0.5,
) -> tuple[subprocess.Popen[bytes], str]:
    """An apply-diff into a new *layer* through the server whose stdin stays open (half a
    layer sent): the client (under nohup: SIGHUP ignored; run by *prefix*, a command that
    execs it), *settle* seconds after its worker started (by then reading the layer), and the
    pid of that worker."""
    assert GRAPHDRIVER is not None
    gd = [GRAPHDRIVER, "--driver", "vfs", "--root", str(root)]
    subprocess.run([*gd, "create", layer], check=True, env=server.env(), timeout=120)
    before = len(server.workers())
    client = subprocess.Popen(
        [*(prefix or []), *(["nohup"] if nohup else []), *gd, "apply-diff", layer],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=server.env(),
    )  # fmt: skip
    assert client.stdin is not None
    client.stdin.write(_layer_tar()[:4096])
    client.stdin.flush()
    deadline = time.monotonic() + 60
    while len(server.workers()) == before:
        assert time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.001)
    worker = server.workers()[-1].split(" worker ")[1].split()[0]
    time.sleep(settle)
    return client, worker


def test_signals_reach_the_worker_and_its_status_the_client(
    server: Server, loop_ext4: Backing
) -> None:
    root = loop_ext4.root / "cmd-signals"
    try:
        # Ctrl-C: the worker rolls the half-made layer back, as a command run here does
        client, _ = _start_apply(server, root)
        client.send_signal(signal.SIGINT)
        err = _ended(client)
        assert client.returncode == 128 + signal.SIGINT, err
        assert b"interrupted by SIGINT; what it had half done was rolled back" in err
        code, _, err2 = _run(
            server.env(), "--driver", "vfs", "--root", str(root), "apply-diff", "slow",
            stdin=_layer_tar(),
        )  # fmt: skip
        assert code == 0, err2
        # a worker killed outright: the client ends by the same signal
        client, worker = _start_apply(server, root / "again")
        os.kill(int(worker), signal.SIGKILL)
        err = _ended(client)
        assert client.returncode == -signal.SIGKILL, err
    finally:
        for r in (root, root / "again"):
            _run(server.env(), "--driver", "vfs", "--root", str(r), "cleanup")
        shutil.rmtree(root, ignore_errors=True)


def test_a_ctrl_c_at_any_moment_of_a_command_reaches_it(server: Server, loop_ext4: Backing) -> None:
    # from the moment the worker starts to when it waits for input, in steps: a signal then
    # must not land where Python ignores it (an at-fork hook, a weakref callback) or where
    # nothing wakes the main thread (another thread, just before its read)
    root = loop_ext4.root / "cmd-sweep"
    try:
        for i in range(24):
            client, _ = _start_apply(server, root, layer=f"l{i}", settle=i * 0.002)
            client.send_signal(signal.SIGINT)
            err = _ended(client)
            assert client.returncode == 128 + signal.SIGINT, (i, err)
            assert b"interrupted by SIGINT; what it had half done was rolled back" in err, i
    finally:
        _run(server.env(), "--driver", "vfs", "--root", str(root), "cleanup")
        shutil.rmtree(root, ignore_errors=True)


def test_clients_it_does_not_serve_run_their_command_themselves(server: Server) -> None:
    # no server at the socket named: run here, quietly
    code, out, err = _run(server.env(GRAPHDRIVER_SOCKET=str(server.socket) + ".none"), "--version")
    assert (code, err) == (0, "") and out.startswith(b"graphdriver, version")
    # a client in another mount namespace (a container's): a mount made for it in the
    # server's would not be its own; refused by the server, run here
    unshare = shutil.which("unshare")
    assert unshare is not None, "util-linux's unshare is part of every Debian"
    before = len(server.workers())
    proc = subprocess.run(
        [unshare, "--mount", "--propagation", "private", str(GRAPHDRIVER), "--version"],
        capture_output=True, env=server.env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"graphdriver, version")
    assert (
        proc.stderr
        == b"graphdriver: the command server refused (another mnt namespace); running here\n"
    )
    assert len(server.workers()) == before
    assert ": another mnt namespace" in server.log.read_text()
    # and each other difference the worker checks against the server's side, which the
    # server reads once before it forks (OwnSide): a PID or user namespace, no_new_privs
    for prefix, why in (
        ([unshare, "--pid", "--fork"], "another pid namespace"),
        ([unshare, "--user", "--map-root-user"], "another user namespace"),
        (["setpriv", "--no-new-privs"], "other privileges (NoNewPrivs)"),
    ):
        proc = subprocess.run(
            [*prefix, str(GRAPHDRIVER), "--version"],
            capture_output=True, env=server.env(), timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0 and proc.stdout.startswith(b"graphdriver, version"), why
        assert (
            proc.stderr
            == f"graphdriver: the command server refused ({why}); running here\n".encode()
        )


def test_a_client_that_leaves_or_is_stopped_stops_its_command(
    server: Server, loop_ext4: Backing
) -> None:
    root = loop_ext4.root / "cmd-leave"
    gd = ["--driver", "vfs", "--root", str(root)]
    try:
        # killed outright (a runtime's timeout): its worker is stopped and rolls back
        client, _ = _start_apply(server, root)
        client.kill()
        client.wait()
        code, _, err = _run(server.env(), *gd, "--wait", "30", "rm", "slow")
        assert code == 0, err  # the worker let go of the layer
        # a server that does not answer (stopped): a signal still ends the client at once,
        # and the command it asked for never runs, not even when the server goes on
        server.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            # (its streams not pipes: the request holds them open until the server reads it)
            proc = subprocess.run(
                ["timeout", "2", str(GRAPHDRIVER), *gd, "create", "late"], env=server.env(),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
            )  # fmt: skip
            assert proc.returncode == 124 and time.monotonic() - started < 20
        finally:
            server.proc.send_signal(signal.SIGCONT)
        time.sleep(1)  # the server takes the request now, and refuses it or finds no client
        assert _run(server.env(), *gd, "exists", "late")[1] == b"false\n"
        # a signal the client ignores (nohup) is not passed on: the command goes on
        client, _ = _start_apply(server, root / "nohup", nohup=True)
        client.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert client.poll() is None
        client.terminate()
        _ended(client)
        assert client.returncode == 128 + signal.SIGTERM
    finally:
        for r in (root, root / "nohup"):
            _run(server.env(), "--driver", "vfs", "--root", str(r), "cleanup")
        shutil.rmtree(root, ignore_errors=True)


def test_a_closed_stream_or_a_foreign_socket_runs_the_command_here(server: Server) -> None:
    assert GRAPHDRIVER is not None
    # stdin closed: the client runs the command itself (the socket would take fd 0)
    proc = subprocess.run(
        [GRAPHDRIVER, "--version"], env=server.env(), capture_output=True, timeout=60,
        preexec_fn=lambda: os.close(0),
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith(b"graphdriver, version")
    # a socket another user listens on gets nothing of the client: not its environment,
    # not its streams
    public = Path(tempfile.mkdtemp(prefix="gd-public-", dir="/tmp"))  # one nobody can reach
    os.chmod(public, 0o1777)
    got = public / "got"
    listener = subprocess.Popen(
        ["/usr/bin/python3", "-c", LISTENER, str(public / "gd.sock"), str(got)], user=65534,
        stdout=subprocess.PIPE, cwd="/",
    )  # fmt: skip
    try:
        assert listener.stdout is not None and listener.stdout.readline() == b"listening\n"
        proc = subprocess.run(
            [GRAPHDRIVER, "--version"], capture_output=True, timeout=60,
            env=server.env(GRAPHDRIVER_SOCKET=str(public / "gd.sock"), SECRET="hunter2"),
        )  # fmt: skip
        assert proc.returncode == 0 and proc.stdout.startswith(b"graphdriver, version")
        assert b"is served by uid 65534, not this user or root; running here" in proc.stderr
        listener.wait(timeout=60)
        assert got.read_bytes() == b""  # connected, and sent nothing
    finally:
        listener.kill()
        listener.wait()
        shutil.rmtree(public)
    # a caller with fewer capabilities than the server: refused, runs the command itself
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "util-linux's setpriv is part of every Debian"
    proc = subprocess.run(
        [setpriv, "--bounding-set", "-sys_admin", GRAPHDRIVER, "--version"],
        env=server.env(), capture_output=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith(b"graphdriver, version")
    assert b"the command server refused (other privileges (Cap" in proc.stderr


#: a listener of another user: it records what a client sends it
LISTENER = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(1)
print("listening", flush=True)
conn, _ = s.accept()
conn.settimeout(2)
try:
    data = conn.recv(65536)
except OSError:
    data = b""
open(sys.argv[2], "wb").write(data)
conn.close()
"""


def test_a_client_in_another_cgroup_runs_there(server: Server) -> None:
    """A worker joins its client's cgroup (v2), so that the client's limits hold; where the
    client's cgroups are v1 (a hybrid hierarchy), the server refuses and it runs the command
    itself."""
    with open("/proc/self/cgroup") as f:
        lines = f.read().strip().splitlines()
    v2_only = len(lines) == 1 and lines[0].startswith("0::")
    unified = Path("/sys/fs/cgroup" if v2_only else "/sys/fs/cgroup/unified")
    assert (unified / "cgroup.procs").exists(), "no cgroup v2 hierarchy mounted"
    group = unified / lines[-1].partition("::")[2].strip("/") / f"gd-test-{os.getpid()}"
    group.mkdir()
    try:
        before = len(server.workers())
        script = f'echo $$ > {group}/cgroup.procs && exec "$0" --version'
        proc = subprocess.run(
            ["sh", "-c", script, str(GRAPHDRIVER)], env=server.env(), capture_output=True,
            timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0 and proc.stdout.startswith(b"graphdriver, version")
        if v2_only:  # the worker ran it, in the client's cgroup
            assert proc.stderr == b"" and len(server.workers()) == before + 1
        else:
            assert b"refused (another cgroup (v1)); running here" in proc.stderr
            assert len(server.workers()) == before
    finally:
        group.rmdir()


@pytest.mark.parametrize(
    "env",
    [
        {},  # no locale: C, coerced to C.UTF-8
        {"LANG": "C.UTF-8"},
        {"LANG": "en_US.UTF-8"},  # installed or not, as Python takes it
        {"LANG": "en_US.UTF-8", "LC_ALL": "C"},
        {"LANG": "de_DE.ISO-8859-1"},
        {"LANG": "en_US.UTF-8", "PYTHONUTF8": "1"},
        {"LC_CTYPE": "POSIX"},
        {"LC_ALL": "C", "PYTHONUTF8": "0"},  # no UTF-8 mode, no coercion: ASCII
    ],
)
def test_a_workers_stdio_is_what_python_makes_for_its_clients_locale(
    env: dict[str, str],
) -> None:
    base = {"PATH": os.environ.get("PATH", ""), **env}

    def run(code: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", code], env=base, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    python = run("import codecs, sys; print(codecs.lookup(sys.stdout.encoding).name, "
                 "sys.stdout.errors)")  # fmt: skip
    ours = run("import os; from graphdriver.command_worker import _locale_stdio; "
               "print(*_locale_stdio(dict(os.environb)))")  # fmt: skip
    assert ours == python


def test_the_worker_takes_its_clients_limits(server: Server, loop_ext4: Backing) -> None:
    """ulimit, nice and the CPUs of the client hold in its worker; a limit the worker cannot
    take (an address space under what the server's image already takes) is a refusal."""
    root = loop_ext4.root / "cmd-limits"
    try:
        cpu = min(os.sched_getaffinity(0))
        client, worker = _start_apply(
            server, root, prefix=["prlimit", "--nofile=200:300", "nice", "-n", "7",
                                  "taskset", "-c", str(cpu)],
        )  # fmt: skip
        with open(f"/proc/{worker}/limits") as f:
            nofile = next(line for line in f if line.startswith("Max open files")).split()
        assert nofile[3:5] == ["200", "300"]
        assert os.getpriority(os.PRIO_PROCESS, int(worker)) == 7
        assert os.sched_getaffinity(int(worker)) == {cpu}
        client.terminate()
        _ended(client)
        assert client.returncode == 128 + signal.SIGTERM
        # few fds: served (the worker takes the limit after it placed the client's fds)
        code, out, err = _run(
            server.env(), "prlimit", "--nofile=16", str(GRAPHDRIVER), "--driver", "vfs",
            "--root", str(root), "ls", runner=[],
        )  # fmt: skip
        assert (code, out, err) == (0, b"slow\n", "")
        proc = subprocess.run(
            ["prlimit", "--as=30000000", str(GRAPHDRIVER), "--version"], env=server.env(),
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert b"refused (its RLIMIT_AS (29296 KiB) is under the server's use)" in proc.stderr
    finally:
        _run(server.env(), "--driver", "vfs", "--root", str(root), "cleanup")
        shutil.rmtree(root, ignore_errors=True)


def test_a_module_linked_elsewhere_is_no_code_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uv hard-links a venv's files from its cache, and every venv made from it links them
    again, which moves their ctime: the server must not take that for new code (found in
    review: a test waited out its 60 s while this machine's CI built its venvs). A file
    rewritten in place, its size and mtime kept (``cp -p``, ``rsync -t``), still is new code."""
    from graphdriver.command_server import CodeWatch

    src = tmp_path / "src"
    src.mkdir()
    module = src / "gd_codewatch_probe.py"
    module.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(src))
    monkeypatch.delitem(sys.modules, "gd_codewatch_probe", raising=False)
    __import__("gd_codewatch_probe")
    watch = CodeWatch()
    assert watch.changed() is None
    os.link(module, tmp_path / "another-venv.py")
    assert watch.changed() is None
    (tmp_path / "another-venv.py").unlink()
    assert watch.changed() is None
    before = module.stat()
    module.write_text("X = 2\n")
    os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert watch.changed() == str(module)


def test_a_request_with_no_answer_is_never_run_again_here(tmp_path: Path) -> None:
    """A server that took the whole request and then went without a word (stopped, or its
    worker killed, as the answer was on its way): the client says so and does not run the
    command itself, since a worker may have run it. It used to run it here too: a create
    that had worked there said "already exists", a mount or umount counted twice. (The
    client also sent the request's empty rest after it had all gone, which fails once the
    worker has closed: a race, so the test asks 20 times.)"""
    import socket
    import struct
    import threading

    from graphdriver.command_client import FDS, HELLO, PREAMBLE

    assert GRAPHDRIVER is not None
    rounds = 20
    path = tmp_path / "mute.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    got: list[bytes] = []

    def mute() -> None:  # a worker's half: hello, then the request read, then nothing
        for _ in range(rounds):
            conn, _ = listener.accept()
            with conn:
                assert conn.recv(len(PREAMBLE)) == PREAMBLE
                conn.sendall(HELLO)
                (length,) = struct.unpack("<I", conn.recv(4, socket.MSG_WAITALL))
                data, fds, _flags, _addr = socket.recv_fds(conn, length, FDS, socket.MSG_WAITALL)
                for fd in fds:
                    os.close(fd)
                got.append(data)

    thread = threading.Thread(target=mute)
    thread.start()
    root = tmp_path / "root"
    argv = [GRAPHDRIVER, "--driver", "vfs", "--root", str(root), "create", "once"]
    env = {**os.environ, "GRAPHDRIVER_SOCKET": str(path)}
    procs = []
    try:
        for _ in range(rounds):
            procs.append(subprocess.run(argv, env=env, capture_output=True, timeout=60))
    finally:
        thread.join(30)
        listener.close()
    assert len(got) == rounds and all(b"create\0once" in g for g in got)  # the requests went
    for proc in procs:
        assert proc.returncode == 1, proc
        assert proc.stderr == (
            b"graphdriver: the command server stopped before it answered; the command may have "
            b"run\n"
        )
    listed = subprocess.run(
        [GRAPHDRIVER, "--driver", "vfs", "--root", str(root), "ls"],
        env={**os.environ, "GRAPHDRIVER_SOCKET": ""}, capture_output=True, timeout=60,
    )  # fmt: skip
    assert b"once" not in listed.stdout  # not run here
