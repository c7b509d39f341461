"""``graphdriver serve docker-volume``: Docker's VolumeDriver plugin in the foreground."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import click

from graphdriver import InvalidOption, serving
from graphdriver.cli_common import announce
from graphdriver.errors import from_oserror

from .http import Plugin, PluginServer

log = logging.getLogger("graphdriver.docker")

#: where dockerd looks for unmanaged plugins' sockets (``--exec-root`` does not move it)
PLUGIN_DIR = Path("/run/docker/plugins")
#: a plugin name dockerd can be given (``docker volume create -d NAME``)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def serve(socket_path: Path, plugins: list[Plugin], banner: str, **fields: object) -> None:
    """Serve *plugins* on *socket_path* (freed by ``serving.free_socket``) until SIGTERM or
    SIGINT, then remove the socket; say so with *banner* (*fields* with --json)."""
    stop = serving.stop_event()

    try:
        server = PluginServer(str(socket_path), plugins)
    except OSError as exc:
        raise from_oserror(exc, f"listen on {socket_path}") from None
    try:
        # dockerd runs as root and connects as root; nobody else has business on the socket
        os.chmod(socket_path, 0o600)
        thread = threading.Thread(target=server.serve_forever, name="accept", daemon=True)
        thread.start()
        announce(f"{banner} on {socket_path}", **fields, socket=socket_path)
        serving.wait(stop)
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
    lock = root / "docker" / "volume-serve.lock"
    databases = (root / "volumes",)
    with serving.engine_lock(
        lock, "volume plugin", root, path, "--socket", core.free_room, databases
    ):
        volumes = VolumePlugin(root)
        try:
            serve(
                path,
                [volumes.plugin()],
                f"serving the volumes of {root} as {name!r}",
                server="docker-volume",
                name=name,
                root=root,
            )
        finally:
            volumes.close()


@click.command("docker-graphdriver")
@click.option(
    "--name", "-n", required=True, help="The plugin's name: dockerd --storage-driver NAME."
)
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Unix socket to serve on.  [default: /run/docker/plugins/NAME.sock, where dockerd "
    "finds it]",
)
@click.pass_context
def serve_docker_graphdriver(ctx: click.Context, name: str, socket_path: Path | None) -> None:
    """Docker's graphdriver plugin: dockerd's image and container layers in the store.

    dockerd (20.10 to 26, started with --experimental --storage-driver NAME) finds the plugin
    by its socket and keeps every layer in the store of --root and --driver, under the ids it
    gives them. Runs until SIGTERM or SIGINT, then removes the socket; mounted layers stay
    mounted (dockerd's Cleanup, at its own exit, leaves them too, as live-restore needs:
    `graphdriver cleanup` unmounts them).
    """
    from graphdriver.plugins import choose_driver

    from .graph import GraphPlugin

    core: Any = ctx.find_root().obj
    root = Path(core.root).absolute()
    driver = core.driver or choose_driver(root)
    path = _plugin_socket(name, socket_path)
    lock = root / "docker" / f"graph-{driver}-serve.lock"
    databases = (root / driver,)
    with serving.engine_lock(
        lock, "graphdriver plugin", root / driver, path, "--socket", core.free_room, databases
    ):
        graph = GraphPlugin(root, driver, core.opts, core.wait)
        try:
            serve(
                path,
                [graph.plugin()],
                f"serving the {driver} layers of {root} to dockerd as {name!r}",
                server="docker-graphdriver",
                name=name,
                driver=driver,
                root=root,
            )
        finally:
            graph.close()
