"""`graphdriver serve docker-volume` and `docker-graphdriver` processes for the tests, and an
HTTP client for their sockets."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

GRAPHDRIVER = str(Path(sys.executable).parent / "graphdriver")
START_TIMEOUT = 60.0


class UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 on a unix socket, kept alive between requests like dockerd's client."""

    def __init__(self, path: Path, timeout: float = 60) -> None:
        super().__init__("plugin.moby.localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.socket_path))
        self.sock = sock

    def __enter__(self) -> UnixConnection:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def call(self, method: str, body: Any = None, *, raw: bytes | None = None) -> tuple[int, Any]:
        """POST /*method* with *body* as JSON (or the bytes *raw*); (status, decoded JSON)."""
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        self.request(
            "POST",
            f"/{method}",
            body=data,
            headers={"Accept": "application/vnd.docker.plugins.v1.2+json"},
        )
        resp = self.getresponse()
        payload = resp.read()
        assert resp.getheader("Content-Type") == "application/vnd.docker.plugins.v1+json"
        return resp.status, json.loads(payload)


def listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class VolumePlugin:
    """``graphdriver --root ROOT serve docker-volume --name NAME --socket SOCKET``."""

    def __init__(self, root: Path, name: str, socket_path: Path, log: Path) -> None:
        self.root, self.name, self.socket, self.log = root, name, socket_path, log
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, *args: str) -> list[str]:
        return [GRAPHDRIVER, "--root", str(self.root), *args]

    def serve_command(self) -> list[str]:
        return self.command(
            "serve", "docker-volume", "--name", self.name, "--socket", str(self.socket)
        )

    def start(self) -> VolumePlugin:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.serve_command(), stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not listening(self.socket):
            if self.proc.poll() is not None:
                raise AssertionError(f"the plugin exited before serving:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the plugin did not listen in {START_TIMEOUT} s")
            time.sleep(0.02)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the plugin and wait; its exit status (SIGKILL after *timeout*)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"the plugin ignored {sig} for {timeout} s") from None
        status = self.proc.returncode
        self.proc = None
        return status

    def connect(self) -> UnixConnection:
        return UnixConnection(self.socket)

    def volumes(self) -> list[str]:
        """``graphdriver volume ls -q``: what the store holds, as its own CLI lists it."""
        out = subprocess.run(
            self.command("volume", "ls", "-q"), capture_output=True, text=True, check=True
        )
        return out.stdout.split()


@contextlib.contextmanager
def running(root: Path, name: str, socket_path: Path) -> Iterator[VolumePlugin]:
    """A started plugin; stopped, and its volumes' mounts undone, whatever happens."""
    plugin = VolumePlugin(root, name, socket_path, root.parent / f"{name}.log")
    try:
        yield plugin.start()
    finally:
        with contextlib.suppress(AssertionError):
            plugin.stop()
        if plugin.proc is not None:
            plugin.proc.kill()
            plugin.proc.wait()
        with contextlib.suppress(FileNotFoundError):
            if socket_path.is_socket():
                os.unlink(socket_path)


class GraphPlugin(VolumePlugin):
    """``graphdriver --root ROOT --driver DRIVER [--opt K=V...] serve docker-graphdriver
    --name NAME --socket SOCKET``."""

    def __init__(
        self,
        root: Path,
        driver: str,
        name: str,
        socket_path: Path,
        options: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(root, name, socket_path, root.parent / f"{name}.log")
        self.driver = driver
        self.options = dict(options or {})

    def command(self, *args: str) -> list[str]:
        opts = [f"--opt={k}={v}" for k, v in self.options.items()]
        return [GRAPHDRIVER, "--root", str(self.root), "--driver", self.driver, *opts, *args]

    def serve_command(self) -> list[str]:
        return self.command(
            "serve", "docker-graphdriver", "--name", self.name, "--socket", str(self.socket)
        )

    def layers(self) -> list[str]:
        """``graphdriver ls``: the store's layers, as its own CLI lists them."""
        out = subprocess.run(self.command("ls"), capture_output=True, text=True, check=True)
        return sorted(out.stdout.split())


@contextlib.contextmanager
def running_graph(
    root: Path,
    driver: str,
    name: str,
    socket_path: Path,
    options: Mapping[str, str] | None = None,
) -> Iterator[GraphPlugin]:
    """A started graphdriver plugin; stopped, and the store's mounts released (``graphdriver
    cleanup``), whatever happens."""
    plugin = GraphPlugin(root, driver, name, socket_path, options)
    try:
        plugin.start()
        yield plugin
    finally:
        with contextlib.suppress(AssertionError):
            plugin.stop()
        if plugin.proc is not None:
            plugin.proc.kill()
            plugin.proc.wait()
        subprocess.run(plugin.command("cleanup"), capture_output=True, check=False)
        with contextlib.suppress(FileNotFoundError):
            if socket_path.is_socket():
                os.unlink(socket_path)
