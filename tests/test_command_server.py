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
    env: dict[str, str], *args: str, stdin: bytes | None = None, cwd: Path | None = None
) -> tuple[int, bytes, str]:
    assert GRAPHDRIVER is not None
    proc = subprocess.run(
        [GRAPHDRIVER, *args], input=stdin, capture_output=True, env=env, cwd=cwd, timeout=120
    )
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
            got.append(_run(env, *gd, "umount", "c1"))
            code, out, err = _run(env, *gd, "diff", "c1")  # its names and bytes: times differ
            got.append((code, repr(_members(out)).encode(), err))
            got.append((0, (cwd / "rel.tar").read_bytes(), ""))
            results[label] = [(code, out.replace(str(root).encode(), b"ROOT"), err)
                              for code, out, err in got]  # fmt: skip
        finally:
            _run(here, *gd, "cleanup")
            shutil.rmtree(root, ignore_errors=True)
    assert [r[0] for r in results["here"]] == [0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0]
    assert "layer 'nosuch' does not exist" in results["here"][5][2]
    assert results["server"] == results["here"]
    assert results["here"][7][1] == layer  # the exact diff of the applied layer
    # every command of the server's run ran in one of its workers: the 12 above and `mount`
    assert len(server.workers()) == 13


def _start_apply(server: Server, root: Path) -> tuple[subprocess.Popen[bytes], str]:
    """An apply-diff through the server whose stdin stays open (half a layer sent): the
    client, and the pid of the worker that runs it."""
    assert GRAPHDRIVER is not None
    gd = [GRAPHDRIVER, "--driver", "vfs", "--root", str(root)]
    subprocess.run([*gd, "create", "slow"], check=True, env=server.env(), timeout=120)
    before = len(server.workers())
    client = subprocess.Popen(
        [*gd, "apply-diff", "slow"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL, env=server.env(),
    )  # fmt: skip
    assert client.stdin is not None
    client.stdin.write(_layer_tar()[:4096])
    client.stdin.flush()
    deadline = time.monotonic() + 60
    while len(server.workers()) == before:
        assert time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.05)
    worker = server.workers()[-1].split(" worker ")[1].split()[0]
    time.sleep(0.5)  # the worker is reading the layer
    return client, worker


def test_signals_reach_the_worker_and_its_status_the_client(
    server: Server, loop_ext4: Backing
) -> None:
    root = loop_ext4.root / "cmd-signals"
    try:
        # Ctrl-C: the worker rolls the half-made layer back, as a command run here does
        client, _ = _start_apply(server, root)
        client.send_signal(signal.SIGINT)
        _, err = client.communicate(timeout=60)
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
        _, err = client.communicate(timeout=60)
        assert client.returncode == -signal.SIGKILL, err
    finally:
        for r in (root, root / "again"):
            _run(server.env(), "--driver", "vfs", "--root", str(r), "cleanup")
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
    assert "refused a client: another mnt namespace" in server.log.read_text()
