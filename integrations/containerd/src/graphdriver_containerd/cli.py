"""``graphdriver serve containerd``: the proxy snapshotter in the foreground."""

from __future__ import annotations

import concurrent.futures
import contextlib
import faulthandler
import fcntl
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from graphdriver import InUse, InvalidOption
from graphdriver.plugins import choose_driver

log = logging.getLogger("graphdriver.containerd")

#: threads answering requests: a long Prepare (a vfs copy) leaves the others to Stat, List...
WORKERS = 8
#: seconds requests under way get to finish after SIGTERM
GRACE = 10.0


#: sun_path's size less its terminating NUL
MAX_SOCKET_PATH = 107


def _free_address(address: Path) -> None:
    """Refuse a path that is not a socket, or a socket something answers on; remove a stale
    socket (a proxy that was killed)."""
    size = len(os.fsencode(address))
    if size > MAX_SOCKET_PATH:
        raise InvalidOption(
            f"socket path {address} is {size} bytes; a unix socket's path holds at most "
            f"{MAX_SOCKET_PATH}: choose a shorter --address"
        )
    try:
        st = address.lstat()
    except FileNotFoundError:
        address.parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidOption(f"{address} exists and is not a socket; choose another --address")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(address))
    except OSError:
        address.unlink()  # nobody listens: left by a proxy that was killed
        return
    finally:
        probe.close()
    raise InUse(f"{address} is in use: another server answers on it")


@contextlib.contextmanager
def _serve_lock(path: Path) -> Iterator[None]:
    """One proxy per store: an flock on ``<root>/containerd/<driver>/serve.lock``."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise InUse(
                f"another proxy (pid {holder}) already serves {path.parent}; stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


@click.command("containerd")
@click.option(
    "--address",
    "-a",
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
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    # at once: the socket accepts connections before start() returns, so a client may
    # already be done and signalling (the core's handler would raise mid-start)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # `kill -USR1 PID` prints every thread's stack to stderr: what a stuck request waits for
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    with _serve_lock(root / "containerd" / driver / "serve.lock"):
        _free_address(address)
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
            click.echo(
                f"graphdriver: serving containerd snapshots of {snapshotter.store.name} "
                f"under {root} on {address}",
                err=True,
            )
            while not stop.wait(3600):
                pass
            server.stop(GRACE).wait()
        finally:
            server.stop(None)
            snapshotter.close()
            with contextlib.suppress(FileNotFoundError):
                address.unlink()
