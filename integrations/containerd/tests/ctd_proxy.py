"""A `graphdriver serve containerd` process for the tests, and a gRPC client for it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc

from graphdriver_containerd.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from graphdriver_containerd.api.containerd.services.snapshots.v1 import (
    snapshots_pb2_grpc as pb_grpc,
)

GRAPHDRIVER = str(Path(sys.executable).parent / "graphdriver")
SNAPSHOTTER = "graphdriver"


def graphdriver(
    root: Path, driver: str, *args: str, options: Mapping[str, str] | None = None
) -> list[str]:
    opts = [f"--opt={k}={v}" for k, v in (options or {}).items()]
    return [GRAPHDRIVER, "--root", str(root), "--driver", driver, *opts, *args]


def listening(address: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(address))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class Proxy:
    """One proxy process; :meth:`start` again after :meth:`stop` or :meth:`kill`."""

    def __init__(
        self,
        root: Path,
        driver: str,
        address: Path,
        options: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.root, self.driver, self.address = root, driver, address
        self.options = dict(options or {})
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root.parent / f"{address.name}.log"
        self._channel: grpc.Channel | None = None

    def command(self, *args: str) -> list[str]:
        return graphdriver(self.root, self.driver, *args, options=self.options)

    def start(self, env: Mapping[str, str] | None = None) -> Proxy:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command("serve", "containerd", "--address", str(self.address)),
                stdout=log,
                stderr=log,
                env={**os.environ, **self.env, **(env or {})},
            )
        deadline = time.monotonic() + 60
        while not listening(self.address):
            if self.proc.poll() is not None:
                raise AssertionError(f"the proxy exited before serving:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the proxy did not listen within 60 s:\n{self.output()}")
            time.sleep(0.02)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def stub(self) -> pb_grpc.SnapshotsStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix://{self.address}")
        return pb_grpc.SnapshotsStub(self._channel)

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the proxy and wait; returns its exit status (SIGKILL after *timeout*)."""
        self.close_channel()
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"the proxy ignored {sig} for {timeout} s") from None
        status = self.proc.returncode
        self.proc = None
        return status

    def wait_dead(self, timeout: float = 60) -> int:
        """Wait for a proxy that kills itself (a fault point) to be gone."""
        assert self.proc is not None
        status = self.proc.wait(timeout)
        self.proc = None
        self.close_channel()
        return status

    # ------------------------------------------------------------------ calls

    def prepare(self, key: str, parent: str = "", **labels: str) -> list[object]:
        req = pb.PrepareSnapshotRequest(
            snapshotter=SNAPSHOTTER, key=key, parent=parent, labels=labels
        )
        return list(self.stub.Prepare(req, timeout=120).mounts)

    def view(self, key: str, parent: str = "", **labels: str) -> list[object]:
        req = pb.ViewSnapshotRequest(snapshotter=SNAPSHOTTER, key=key, parent=parent, labels=labels)
        return list(self.stub.View(req, timeout=120).mounts)

    def commit(self, name: str, key: str, **labels: str) -> None:
        req = pb.CommitSnapshotRequest(snapshotter=SNAPSHOTTER, name=name, key=key, labels=labels)
        self.stub.Commit(req, timeout=120)

    def remove(self, key: str) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key=key), timeout=120)

    def stat(self, key: str) -> pb.Info:
        req = pb.StatSnapshotRequest(snapshotter=SNAPSHOTTER, key=key)
        return self.stub.Stat(req, timeout=30).info

    def mounts(self, key: str) -> list[object]:
        req = pb.MountsRequest(snapshotter=SNAPSHOTTER, key=key)
        return list(self.stub.Mounts(req, timeout=30).mounts)

    def list(self, *filters: str) -> list[str]:
        req = pb.ListSnapshotsRequest(snapshotter=SNAPSHOTTER, filters=list(filters))
        return sorted(i.name for batch in self.stub.List(req, timeout=30) for i in batch.info)

    def usage(self, key: str) -> tuple[int, int]:
        got = self.stub.Usage(pb.UsageRequest(snapshotter=SNAPSHOTTER, key=key), timeout=120)
        return got.size, got.inodes

    def cleanup(self) -> None:
        self.stub.Cleanup(pb.CleanupRequest(snapshotter=SNAPSHOTTER), timeout=120)

    def layers(self) -> list[str]:
        out = subprocess.run(
            self.command("ls"), capture_output=True, text=True, check=True
        ).stdout.split()
        return sorted(out)


@contextlib.contextmanager
def running(
    root: Path,
    driver: str,
    options: Mapping[str, str] | None = None,
    *,
    beside: Path | None = None,
) -> Iterator[Proxy]:
    """A started proxy on *root*; stopped, and the store's mounts released, whatever happens.
    Its socket and log are beside *root*, or in the directory *beside*."""
    where = root.parent if beside is None else beside
    proxy = Proxy(root, driver, where / f"{root.name}.sock", options)
    proxy.log = where / f"{root.name}.sock.log"
    try:
        yield proxy.start()
    finally:
        with contextlib.suppress(AssertionError):
            proxy.stop()
        if proxy.proc is not None:
            proxy.proc.kill()
        subprocess.run(proxy.command("cleanup"), capture_output=True, check=False)


def code(exc: BaseException) -> grpc.StatusCode:
    assert isinstance(exc, grpc.RpcError), exc
    return exc.code()  # type: ignore[no-any-return]
