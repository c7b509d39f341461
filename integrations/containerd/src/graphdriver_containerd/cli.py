"""``graphdriver serve containerd``: the proxy snapshotter in the foreground."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
from pathlib import Path
from typing import Any

import click

from graphdriver import InUse, serving
from graphdriver.cli_common import announce
from graphdriver.plugins import choose_driver

log = logging.getLogger("graphdriver.containerd")

#: threads answering requests: a long Prepare (a vfs copy) leaves the others to Stat, List...
WORKERS = 8
#: seconds requests under way get to finish after SIGTERM
GRACE = 10.0


@click.command("containerd")
@click.option(
    "--address",
    default="/run/graphdriver/containerd.sock",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Unix socket to serve on (containerd's proxy_plugins address).",
)
@click.pass_context
def serve_containerd(ctx: click.Context, address: Path) -> None:
    """containerd's proxy snapshotter: the Snapshots gRPC service on a unix socket.

    In containerd's config: [proxy_plugins.graphdriver] type = "snapshot" address = ADDRESS;
    then `ctr run --snapshotter graphdriver ...`, or CRI's snapshotter = "graphdriver". Runs
    until SIGTERM or SIGINT, then removes the socket; mounts stay with their owners.
    """
    import grpc  # here, not at import: `graphdriver serve --help` must not need grpcio

    from .service import add_to_server
    from .snapshotter import Snapshotter

    core: Any = ctx.find_root().obj
    root = Path(core.root).absolute()
    address = address.absolute()
    driver = core.driver or choose_driver(root)
    stop = serving.stop_event()
    home = root / "containerd" / driver

    databases = (root / driver, home)  # the store's, its catalogue
    with serving.engine_lock(
        home / "serve.lock", "proxy", home, address, "--address", core.free_room, databases
    ):
        snapshotter = Snapshotter(root, driver, core.opts, core.wait)
        server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="grpc")
        )
        try:
            add_to_server(snapshotter, server)
            try:
                server.add_insecure_port(f"unix://{address}")
            except RuntimeError as exc:  # grpc says only "Failed to bind"
                raise InUse(f"cannot listen on {address}: {exc}") from None
            server.start()
            announce(
                f"serving containerd snapshots of {snapshotter.store.name} "
                f"under {root} on {address}",
                server="containerd",
                driver=snapshotter.store.name,
                root=root,
                address=address,
            )
            serving.wait(stop)
            server.stop(GRACE).wait()
        finally:
            server.stop(None)
            snapshotter.close()
            with contextlib.suppress(FileNotFoundError):
                address.unlink()
