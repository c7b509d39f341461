"""The command server a ``graphdriver`` command starts when ``GRAPHDRIVER_SOCKET`` is unset: the
next commands run through it, it holds nothing of the command that started it, one starts
however many commands find none at once, it starts again when its code changes, and it goes
when it is idle or alone in its mount namespace."""

from __future__ import annotations

import contextlib
import io
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from graphdriver.testing import Backing

GRAPHDRIVER = shutil.which("graphdriver", path=str(Path(sys.executable).parent))


@dataclass
class Runtime:
    """An ``XDG_RUNTIME_DIR`` of the test's own: where the servers it starts live."""

    dir: Path
    env: dict[str, str]

    @property
    def home(self) -> Path:
        return self.dir / "graphdriver" / "commands"

    def sockets(self) -> list[Path]:
        return sorted(self.home.glob("*.sock"))

    def pids(self) -> list[int]:
        """The servers that run (each holds its lock, which has its pid)."""
        out = []
        for lock in self.home.glob("*.lock"):
            text = "" if lock.is_symlink() else lock.read_text().strip()
            if text.isdigit() and _alive(int(text)) and b"serve\0commands" in _cmdline(int(text)):
                out.append(int(text))
        return sorted(out)

    def log(self) -> str:
        return "".join(p.read_text() for p in self.home.glob("*.log"))

    def run(self, *args: str, **env: str) -> tuple[int, str, str]:
        assert GRAPHDRIVER is not None
        proc = subprocess.run(
            [GRAPHDRIVER, *args], capture_output=True, timeout=60,
            env={**self.env, **env},
        )  # fmt: skip
        return proc.returncode, proc.stdout.decode(), proc.stderr.decode()

    def served(self, count: int = 1) -> int:
        """Wait until *count* servers answer on their sockets; the first one's pid."""
        deadline = time.monotonic() + 60
        while self.log().count("serving commands") < count or len(self.sockets()) < 1:
            assert time.monotonic() < deadline, f"no command server started: {self.log()}"
            time.sleep(0.05)
        return self.pids()[0]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != b"Z":
                out.append(int(entry.name))
    return out


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    if GRAPHDRIVER is None:
        pytest.fail("the graphdriver script is not installed beside this python: run the set-up")
    # short: a unix socket's path holds 107 bytes
    base = Path(tempfile.mkdtemp(prefix="gd-run-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "GRAPHDRIVER_SOCKET"}
    rt = Runtime(base, {**env, "XDG_RUNTIME_DIR": str(base)})
    try:
        yield rt
    finally:
        _stop_servers_of(base)
        shutil.rmtree(base, ignore_errors=True)


def _stop_servers_of(base: Path) -> None:
    """Stop every server whose command line names *base*, one still starting included (it
    shows up within a moment of the command that started it)."""
    time.sleep(0.3)
    mine = [p for p in _all_pids() if str(base).encode() in _cmdline(p) and p != os.getpid()]
    for pid in mine:
        os.kill(pid, signal.SIGTERM)
    for pid in mine:
        if not _gone(pid, 30):
            os.kill(pid, signal.SIGKILL)


def _tar(files: int, size: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(files):
            info = tarfile.TarInfo(f"f{i:04d}")
            info.size = size
            tf.addfile(info, io.BytesIO(bytes([i % 251]) * size))
    return buf.getvalue()


def test_the_first_command_starts_a_server_the_next_ones_run_through(
    runtime: Runtime, loop_ext4: Backing
) -> None:
    root = loop_ext4.root / "autostart"
    gd = ["--root", str(root), "--driver", "vfs"]
    # a descriptor the first command has (a pipe its caller waits on) is not the server's
    held_r, held_w = os.pipe()
    assert GRAPHDRIVER is not None
    first = subprocess.run(
        [GRAPHDRIVER, *gd, "create", "base"], capture_output=True, timeout=60,
        env=runtime.env, pass_fds=(held_w,), cwd=loop_ext4.root,
    )  # fmt: skip
    os.close(held_w)
    assert first.returncode == 0, first.stderr
    assert first.stderr == b""  # starting a server says nothing
    pid = runtime.served()
    # the write end is closed everywhere (else the caller would wait for the server)
    assert select.select([held_r], [], [], 10)[0] == [held_r], "the server kept the pipe"
    assert os.read(held_r, 1) == b""
    os.close(held_r)
    assert len(runtime.sockets()) == 1 and runtime.pids() == [pid]
    assert (runtime.sockets()[0].stat().st_mode & 0o777) == 0o600
    # in a session of its own, in / (no directory of a test's mount kept busy)
    assert os.getsid(pid) != os.getsid(0)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert sorted(os.listdir(f"/proc/{pid}/fd"), key=int)[:3] == ["0", "1", "2"]

    # the next command runs in a worker of the server: seen while it reads its layer
    assert GRAPHDRIVER is not None
    layer = _tar(200, 4096)
    client = subprocess.Popen(
        [GRAPHDRIVER, *gd, "apply-diff", "base", "-"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=runtime.env,
    )  # fmt: skip
    try:
        assert client.stdin is not None
        client.stdin.write(layer[:10240])
        client.stdin.flush()
        deadline = time.monotonic() + 30
        while not _children(pid):
            assert time.monotonic() < deadline, "no worker of the server ran the command"
            time.sleep(0.02)
        _out, err = client.communicate(layer[10240:], timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, err
    code, out_ls, err_ls = runtime.run(*gd, "ls")
    assert (code, out_ls.split(), err_ls) == (0, ["base"], "")
    code, diff, _ = runtime.run(*gd, "changes", "base")
    assert code == 0 and len(diff.splitlines()) == 200
    assert runtime.pids() == [pid]  # the same server all along


def test_commands_that_find_no_server_at_once_start_one(runtime: Runtime) -> None:
    assert GRAPHDRIVER is not None
    clients = [
        subprocess.Popen([GRAPHDRIVER, "--version"], stdout=subprocess.PIPE, env=runtime.env)
        for _ in range(6)
    ]
    for client in clients:
        out, _ = client.communicate(timeout=60)
        assert client.returncode == 0 and out.startswith(b"graphdriver, version ")
    pid = runtime.served()
    time.sleep(1)  # a second one, had it started, would be serving by now
    servers = [
        p for p in _all_pids() if str(runtime.dir).encode() in _cmdline(p) and p != os.getpid()
    ]
    assert servers == [pid], runtime.log()
    # one started: none was refused its lock
    assert runtime.log().count("serving commands") == 1, runtime.log()
    assert "already serves" not in runtime.log()


def _all_pids() -> list[int]:
    return [int(e.name) for e in os.scandir("/proc") if e.name.isdigit() and _alive(int(e.name))]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_a_server_whose_code_changed_starts_again(runtime: Runtime) -> None:
    """Code installed or changed after the server imported it is what the next command runs:
    a directory of the import path that changes (a package installed there) makes the
    server start again, in the same process, with the new code."""
    path = runtime.dir / "site"
    path.mkdir()
    env = {"PYTHONPATH": str(path)}
    assert runtime.run("--version", **env)[0] == 0
    pid = runtime.served()
    (path / "notes.txt").write_text("nothing Python imports\n")
    assert runtime.run("--version", **env)[0] == 0
    assert "starting again" not in runtime.log()  # other files come and go freely
    (path / "new_plugin.py").write_text("VALUE = 1\n")
    code, out, err = runtime.run("--version", **env)  # finds it changed: runs here
    assert (code, err) == (0, "") and out.startswith("graphdriver, version ")
    runtime.served(2)
    assert "changed since it was imported: starting again" in runtime.log()
    assert runtime.pids() == [pid]
    code, out, err = runtime.run("--version", **env)
    assert (code, err) == (0, "") and out.startswith("graphdriver, version ")


@pytest.mark.parametrize("named", [False, True])
def test_a_refusal_is_quiet_unless_the_server_was_named(runtime: Runtime, named: bool) -> None:
    """A server the user did not name refuses without a word; one named says why. Either
    way the command runs here."""
    path = _socket_of(runtime)
    path.parent.mkdir(parents=True, mode=0o700)
    with _fake_server(path, b"Rsome reason of its own") as asked:
        env = {"GRAPHDRIVER_SOCKET": str(path)} if named else {}
        code, out, err = runtime.run("--version", **env)
    assert asked.is_set()
    assert code == 0 and out.startswith("graphdriver, version ")
    said = "graphdriver: the command server refused (some reason of its own); running here\n"
    assert err == (said if named else "")


@contextlib.contextmanager
def _fake_server(path: Path, answer: bytes) -> Iterator[threading.Event]:
    """A server on *path* that reads a client's first 4 bytes (protocol 5: a request's
    length; 6: its preamble) and sends *answer*; the event is set once it did."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(30)
    asked = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4)
            conn.sendall(answer)
        asked.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield asked
    finally:
        thread.join(30)
        listener.close()


def test_no_server_starts_when_told_not_to(runtime: Runtime) -> None:
    assert runtime.run("--version", GRAPHDRIVER_SOCKET="")[0] == 0
    assert runtime.run("serve", "--help")[0] == 0  # servers run in their own process
    time.sleep(0.5)
    assert not (runtime.dir / "graphdriver").exists()


def test_a_server_in_a_mount_namespace_of_its_own_goes_with_it(runtime: Runtime) -> None:
    """A server started in a namespace made for one job would keep it (and every mount in
    it) alive: it goes once nothing else is left there."""
    assert GRAPHDRIVER is not None
    job = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'"{GRAPHDRIVER}" --version >/dev/null && read line'],
        stdin=subprocess.PIPE, env=runtime.env,
    )  # fmt: skip
    try:
        pid = runtime.served()
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        time.sleep(7)  # idle, but the job is still there
        assert _alive(pid)
    finally:
        job.communicate(b"\n", timeout=30)
    assert _gone(pid, 20), "the server outlived its namespace's job"
    assert "no other process is left in its mount namespace" in runtime.log()


def test_a_server_stops_when_idle(tmp_path: Path) -> None:
    assert GRAPHDRIVER is not None
    sock = Path(tempfile.mkdtemp(prefix="gd-idle-", dir="/tmp")) / "cmd.sock"
    try:
        proc = subprocess.run(
            [GRAPHDRIVER, "serve", "commands", "--socket", str(sock), "--idle-timeout", "1"],
            capture_output=True, timeout=60, env={**os.environ, "GRAPHDRIVER_SOCKET": ""},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert b"stopping: no command for 1 s" in proc.stderr
        assert not sock.exists()
    finally:
        shutil.rmtree(sock.parent, ignore_errors=True)


def _socket_of(runtime: Runtime, **env: str) -> Path:
    """The socket a command with *env* looks for (what the script computes)."""
    code = "from graphdriver.command_client import default_socket; print(default_socket())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**runtime.env, **env}, check=True)  # fmt: skip
    return Path(out.stdout.strip())


@pytest.mark.parametrize("planted", ["lock", "log", "open directory", "open parent"])
def test_a_planted_link_or_an_open_directory_starts_nothing(runtime: Runtime, planted: str) -> None:
    """The lock and log are never opened through a link, nor in a directory others may
    write in; the command runs, and nothing is started."""
    sock = _socket_of(runtime)
    assert sock.parent == runtime.home
    victim = runtime.dir / "victim"
    victim.write_text("precious\n")
    runtime.home.mkdir(parents=True)
    runtime.home.parent.chmod(0o700)
    runtime.home.chmod(0o700)
    if planted in ("lock", "log"):
        Path(f"{sock}.{planted}").symlink_to(victim)
    elif planted == "open directory":
        runtime.home.chmod(0o750)
    else:
        runtime.home.parent.chmod(0o777)
    code, out, _ = runtime.run("--version")
    assert code == 0 and out.startswith("graphdriver, version ")
    time.sleep(1)
    assert victim.read_text() == "precious\n"
    assert not sock.exists() and runtime.pids() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="root's fallback, /run/graphdriver (not root)")
def test_a_runtime_directory_others_may_write_is_not_used(runtime: Runtime) -> None:
    runtime.dir.chmod(0o1777)
    sock = _socket_of(runtime)
    assert not sock.is_relative_to(runtime.dir)  # root's falls back to /run/graphdriver
    assert sock.parent == Path("/run/graphdriver/commands")


def test_the_servers_interpreter_is_its_clients(runtime: Runtime) -> None:
    """A server runs the interpreter its client would (flags, the environment that shapes
    it): a client whose differs has its own, and the others see none of it."""
    assert runtime.run("--version", PYTHONOPTIMIZE="2")[0] == 0
    runtime.served()
    code, out, _ = runtime.run("--help")  # -OO strips docstrings: the help would be gone
    assert code == 0 and "Directory that holds the layers" in out
    runtime.served(2)
    assert len(runtime.sockets()) == 2
    code, out, _ = runtime.run("--help")
    assert code == 0 and "Directory that holds the layers" in out


def test_a_client_with_malloc_settings_has_a_server_started_with_them(runtime: Runtime) -> None:
    """glibc reads GLIBC_TUNABLES and MALLOC_*_ when a process starts: a server started by a
    client with them gets them (its workers' apply-diff then keeps them), and a client
    without them has another server."""
    tuned = {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072", "MALLOC_TOP_PAD_": "4096"}
    assert _socket_of(runtime, **tuned) != _socket_of(runtime)
    assert runtime.run("--version", **tuned)[0] == 0
    pid = runtime.served()
    with open(f"/proc/{pid}/environ", "rb") as f:
        environ = f.read().split(b"\0")
    assert b"GLIBC_TUNABLES=glibc.malloc.trim_threshold=131072" in environ
    assert b"MALLOC_TOP_PAD_=4096" in environ
    assert runtime.run("--version")[0] == 0
    runtime.served(2)
    assert len(runtime.sockets()) == 2


def test_a_first_command_with_sigchld_ignored_runs(runtime: Runtime) -> None:
    assert GRAPHDRIVER is not None
    code = "import os, signal, sys; signal.signal(signal.SIGCHLD, signal.SIG_IGN); "
    code += "os.execv(sys.argv[1], sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, GRAPHDRIVER, "--version"],
                          capture_output=True, env=runtime.env, timeout=60)  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, b"")
    assert proc.stdout.startswith(b"graphdriver, version ")
    runtime.served()


def test_a_niced_command_starts_no_server(runtime: Runtime) -> None:
    """Its server would run every later command niced."""
    assert GRAPHDRIVER is not None
    proc = subprocess.run(["nice", "-n", "5", GRAPHDRIVER, "--version"], capture_output=True,
                          env=runtime.env, timeout=60)  # fmt: skip
    assert proc.returncode == 0
    time.sleep(1)
    assert runtime.sockets() == []


def test_a_stopped_server_does_not_hold_commands(runtime: Runtime) -> None:
    """A server the user did not name is waited for a few seconds, then told not to run the
    command, which runs here; once it goes on, it runs nothing of it."""
    assert runtime.run("--version")[0] == 0
    pid = runtime.served()
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        code, out, err = runtime.run("--version")
        took = time.monotonic() - start
    finally:
        os.kill(pid, signal.SIGCONT)
    assert (code, err) == (0, "") and out.startswith("graphdriver, version ")
    assert 3 <= took < 15
    code, out, err = runtime.run("--version")
    assert (code, err) == (0, "") and out.startswith("graphdriver, version ")


def test_a_client_with_other_privileges_has_a_server_of_its_own(runtime: Runtime) -> None:
    """A server started by a client with no_new_privs would refuse every other client: the
    socket's key names privileges, so each kind gets its own, and neither refuses."""
    assert GRAPHDRIVER is not None
    nnp = ["setpriv", "--no-new-privs", GRAPHDRIVER, "--version"]
    proc = subprocess.run(nnp, capture_output=True, env=runtime.env, timeout=60)
    assert proc.returncode == 0
    runtime.served()
    assert runtime.run("--version")[0] == 0  # not the no_new_privs one's: a second server
    runtime.served(2)
    assert len(runtime.sockets()) == 2


def test_a_distribution_reinstalled_under_its_name_starts_it_again(runtime: Runtime) -> None:
    """``uv sync`` after an entry point was added reinstalls a distribution under the same
    name: its entry points may be new, so the server starts again."""
    site = runtime.dir / "site"
    meta = site / "gdfake-1.0.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: gdfake\nVersion: 1.0\n")
    env = {"PYTHONPATH": str(site)}
    assert runtime.run("--version", **env)[0] == 0
    runtime.served()
    shutil.rmtree(meta)
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: gdfake\nVersion: 1.0\n")
    assert runtime.run("--version", **env)[0] == 0
    runtime.served(2)
    assert "gdfake-1.0.dist-info changed since it was imported" in runtime.log()


def test_the_server_runs_with_its_starters_interpreter_flags(runtime: Runtime) -> None:
    assert GRAPHDRIVER is not None
    proc = subprocess.run([sys.executable, "-s", GRAPHDRIVER, "--version"], capture_output=True,
                          env=runtime.env, timeout=60)  # fmt: skip
    assert proc.returncode == 0
    pid = runtime.served()
    assert b"\0-s\0" in _cmdline(pid)


def test_a_server_of_another_protocol_refuses_at_once() -> None:
    """A client of a newer graphdriver and a server of an older one (or the reverse): the
    older one refuses what it does not understand at once, and the command runs here."""
    sock_dir = Path(tempfile.mkdtemp(prefix="gd-old-", dir="/tmp"))
    path = sock_dir / "old.sock"
    try:
        with _fake_server(path, b"Ra request too large") as asked:  # protocol 5
            start = time.monotonic()
            code, out, err = Runtime(sock_dir, dict(os.environ)).run(
                "--version", GRAPHDRIVER_SOCKET=str(path)
            )
        assert asked.is_set() and time.monotonic() - start < 2.5
        assert code == 0 and out.startswith("graphdriver, version ")
        assert "the command server refused (a request too large); running here" in err
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
