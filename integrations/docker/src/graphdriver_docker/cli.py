"""``graphdriver serve docker-volume``: Docker's VolumeDriver plugin in the foreground."""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import logging
import os
import re
import signal
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from graphdriver import InUse, InvalidOption
from graphdriver.errors import call_os, from_oserror

from .http import Plugin, PluginServer

log = logging.getLogger("graphdriver.docker")

#: where dockerd looks for unmanaged plugins' sockets (``--exec-root`` does not move it)
PLUGIN_DIR = Path("/run/docker/plugins")
#: a plugin name dockerd can be given (``docker volume create -d NAME``)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: sun_path's size less its terminating NUL
MAX_SOCKET_PATH = 107


def _free_socket(path: Path) -> None:
    """Refuse a path that is not a socket, or a socket something answers on; remove a stale
    socket (a plugin that was killed)."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise InvalidOption(
            f"socket path {path} is {size} bytes; a unix socket's path holds at most "
            f"{MAX_SOCKET_PATH}: choose a shorter --socket"
        )
    try:
        st = path.lstat()
    except FileNotFoundError:
        call_os(path.parent.mkdir, 0o755, True, True, doing=f"make {path.parent}")
        return
    except OSError as exc:
        raise from_oserror(exc, f"serve on {path}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidOption(f"{path} exists and is not a socket; choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: left by a plugin that was killed
        return
    finally:
        probe.close()
    raise InUse(f"{path} is in use: another server answers on it")


@contextlib.contextmanager
def _serve_lock(path: Path, what: str) -> Iterator[None]:
    """One server of a kind per store: an flock on *path*, holding the server's pid."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise InUse(
                f"another {what} (pid {holder}) already serves {path.parent.parent}; stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def serve(socket_path: Path, plugins: list[Plugin], banner: str) -> None:
    """Serve *plugins* on *socket_path* (freed by :func:`_free_socket`) until SIGTERM or
    SIGINT, then remove the socket."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # `kill -USR1 PID` prints every thread's stack to stderr: what a stuck request waits for
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    try:
        server = PluginServer(str(socket_path), plugins)
    except OSError as exc:
        raise from_oserror(exc, f"listen on {socket_path}") from None
    try:
        # dockerd runs as root and connects as root; nobody else has business on the socket
        os.chmod(socket_path, 0o600)
        thread = threading.Thread(target=server.serve_forever, name="accept", daemon=True)
        thread.start()
        click.echo(f"graphdriver: {banner} on {socket_path}", err=True)
        while not stop.wait(3600):
            pass
        server.shutdown()
    finally:
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()


def _plugin_socket(name: str, socket_path: Path | None) -> Path:
    if not NAME_RE.fullmatch(name):
        raise InvalidOption(
            f"plugin name {name!r}: letters, digits, '_', '.' and '-', starting with a letter "
            f"or digit"
        )
    return (socket_path or PLUGIN_DIR / f"{name}.sock").absolute()


@click.command("docker-volume")
@click.option(
    "--name", "-n", required=True, help="The plugin's name: docker volume create -d NAME."
)
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Unix socket to serve on.  [default: /run/docker/plugins/NAME.sock, where dockerd "
    "finds it]",
)
@click.pass_context
def serve_docker_volume(ctx: click.Context, name: str, socket_path: Path | None) -> None:
    """Docker's volume plugin: the store's volumes for `docker volume create -d NAME`.

    dockerd finds the plugin by its socket; then `docker run -v VOL:/path`, --volumes-from,
    `docker volume ls/inspect/rm` keep their data under --root. `docker volume create -o
    volume-driver=D` picks the store's volume driver (local by default); the other -o go to it
    (local's type, device and o). Mount counts are kept per mount in the store, across
    restarts. Runs until SIGTERM or SIGINT, then removes the socket; mounted volumes stay
    mounted.
    """
    from .volume import VolumePlugin

    core: Any = ctx.find_root().obj
    root = Path(core.root).absolute()
    path = _plugin_socket(name, socket_path)
    with _serve_lock(root / "docker" / "volume-serve.lock", "volume plugin"):
        _free_socket(path)  # before the store opens: a wrong --socket is refused at once
        volumes = VolumePlugin(root)
        try:
            serve(path, [volumes.plugin()], f"serving the volumes of {root} as {name!r}")
        finally:
            volumes.close()
