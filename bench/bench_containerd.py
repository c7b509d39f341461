"""containerd on graphdriver (our proxy snapshotter) beside containerd's own overlayfs snapshotter.

One containerd (Debian's 1.6, the README's configuration, a private root) and
``graphdriver serve containerd`` with the overlay driver, both on one loop-xfs filesystem, so
that containerd's built-in ``overlayfs`` snapshotter and ours store layers on the same kind of
disk. Measured, interleaved (who goes first alternates), median of --runs:

- a container's snapshot: Prepare (on the image's top layer) + Mounts + Remove, through
  containerd's Snapshots gRPC service (a small client on the generated stubs of
  ``graphdriver_containerd.api``), snapshotter ``graphdriver`` vs ``overlayfs``; containerd
  removes only its record there, so the backends' removals are measured apart, as the
  synchronous garbage collection (``ctr leases delete --sync`` of the batch's lease) that
  follows each batch;
- the same cycle (on the same image layer) sent straight to the proxy's socket, no containerd in
  between, beside containerd's overlayfs path: what containerd's own bookkeeping and the extra
  gRPC hop add;
- ``ctr image import`` of the end-to-end tests' image (busybox-static, three layers),
  unpacked by each snapshotter (the image is removed with ``--sync`` between runs).

``python bench/bench_containerd.py`` (as root) prints a Markdown report; bench_all.py's step
``containerd`` puts the same figures in its report. Results: results/*-containerd.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from graphdriver.testing.backings import loop_filesystem
from graphdriver_containerd.api.containerd.services.snapshots.v1 import (
    snapshots_pb2 as pb,
)
from graphdriver_containerd.api.containerd.services.snapshots.v1 import (
    snapshots_pb2_grpc as pb_grpc,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations/containerd/tests"))
import containerd_engine

IMAGE = "localhost/gd-bench:test"
OURS, THEIRS = "graphdriver", "overlayfs"


@dataclass
class Measure:
    """One figure: our seconds and the reference's, per run."""

    name: str
    ref_name: str
    ours: list[float] = field(default_factory=list)
    ref: list[float] = field(default_factory=list)

    def ratio(self) -> float:
        return statistics.median(self.ours) / statistics.median(self.ref)


class Snapshots:
    """containerd's Snapshots service on a socket (containerd's own, or the proxy's)."""

    def __init__(self, socket: Path, namespace: str | None) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)
        self.md = [("containerd-namespace", namespace)] if namespace else []

    def cycle(self, snapshotter: str, key: str, parent: str, lease: str | None = None) -> None:
        """Prepare + Mounts + Remove of one snapshot (under *lease*: containerd's background
        GC collects a snapshot that nothing references)."""
        md = [*self.md, ("containerd-lease", lease)] if lease else self.md
        self.stub.Prepare(
            pb.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent),
            metadata=md,
        )
        got = self.stub.Mounts(pb.MountsRequest(snapshotter=snapshotter, key=key), metadata=md)
        assert got.mounts, f"{snapshotter}: no mounts for {key}"
        self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=key), metadata=md)

    def top(self, snapshotter: str) -> str:
        """The committed snapshot no other snapshot sits on: the image's top layer."""
        names, parents = set(), set()
        for page in self.stub.List(
            pb.ListSnapshotsRequest(snapshotter=snapshotter), metadata=self.md
        ):
            for info in page.info:
                names.add(info.name)
                parents.add(info.parent)
        tops = names - parents
        assert len(tops) == 1, f"{snapshotter}: {len(tops)} top snapshots"
        return tops.pop()

    def close(self) -> None:
        self.channel.close()


def _wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, timeout=300)
    return time.perf_counter() - start


def _lease(eng: containerd_engine.Engine) -> str:
    return eng.ctr("leases", "create", "--expires", "0").split()[0]


def _gc(eng: containerd_engine.Engine, lease: str) -> float:
    """The synchronous garbage collection that deleting *lease* with --sync runs."""
    return _wall(eng.ctr.argv("leases", "delete", "--sync", lease))


def measure(
    fs: Path, runs: int = 5, batch: int = 20, log: bool = True
) -> tuple[list[Measure], list[str]]:
    """Every figure on the filesystem mounted at *fs* (loop-xfs); also a few lines about
    what was run (versions)."""
    load = f"{os.getloadavg()[0]:.2f}"
    work = fs / "bench-containerd"
    work.mkdir()
    archive = containerd_engine.build_image(work / "image")
    cycle = Measure("Prepare + Mounts + Remove, through containerd (per snapshot)",
                    "containerd overlayfs")  # fmt: skip
    gc = Measure(f"synchronous GC after {batch} removals", "containerd overlayfs")
    direct = Measure("Prepare + Mounts + Remove, straight to the proxy (per snapshot)",
                     "containerd overlayfs, through containerd")  # fmt: skip
    imp = Measure("ctr image import (3 layers, 1 MB gzip)", "containerd overlayfs")
    with containerd_engine.engine(work / "engine", "overlay") as eng:
        api = Snapshots(eng.containerd.socket, eng.ctr.namespace)
        proxy = Snapshots(eng.proxy.socket, None)
        try:
            for i in range(runs):
                order = (OURS, THEIRS) if i % 2 == 0 else (THEIRS, OURS)
                for sn in order:
                    t = _wall(eng.ctr.argv("images", "import", "--base-name",
                                           IMAGE.rsplit(":", 1)[0], "--snapshotter", sn,
                                           str(archive)))  # fmt: skip
                    (imp.ours if sn == OURS else imp.ref).append(t)
                    if i < runs - 1:
                        eng.ctr("images", "rm", "--sync", IMAGE)
            # the image stays, unpacked by both (the last run imported it twice)
            parents = {sn: api.top(sn) for sn in (OURS, THEIRS)}
            # the same layer under the key containerd gave it in the proxy ("NS/N/sha256:...")
            direct_parent = proxy.top(OURS)
            for i in range(runs):
                order = (OURS, THEIRS) if i % 2 == 0 else (THEIRS, OURS)
                for sn in order:
                    lease = _lease(eng)
                    start = time.perf_counter()
                    for j in range(batch):
                        api.cycle(sn, f"bench-{sn}-{i}-{j}", parents[sn], lease)
                    per = (time.perf_counter() - start) / batch
                    (cycle.ours if sn == OURS else cycle.ref).append(per)
                    # the removed snapshots are only records gone; GC removes the backend's
                    (gc.ours if sn == OURS else gc.ref).append(_gc(eng, lease))
                start = time.perf_counter()
                for j in range(batch):
                    proxy.cycle(OURS, f"direct-{i}-{j}", direct_parent)
                direct.ours.append((time.perf_counter() - start) / batch)
            direct.ref = cycle.ref
            eng.ctr("images", "rm", "--sync", IMAGE)
            leftover = eng.proxy.layers()
            if log:
                print(f"bench_containerd: store after the last GC: {leftover}", file=sys.stderr)
        finally:
            api.close()
            proxy.close()
    versions = [
        subprocess.run([cmd, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        for cmd in (containerd_engine.CONTAINERD, "runc")
    ]
    versions.append(f"load average {load} before, {os.getloadavg()[0]:.2f} after")
    return [cycle, gc, direct, imp], versions


def ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.1f} ({min(xs) * 1e3:.1f}..{max(xs) * 1e3:.1f})"


def report(figures: list[Measure], versions: list[str], runs: int, batch: int) -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lines = [
        f"# containerd: graphdriver (proxy snapshotter) vs containerd's overlayfs, "
        f"{datetime.date.today().isoformat()}",
        "",
        f"- machine: {os.cpu_count()} cores, {mem:.0f} GiB, kernel {platform.release()}, "
        f"Python {platform.python_version()}; {'; '.join(versions)}",
        "- one containerd (the README's version-2 configuration, private root and sockets) with "
        "`graphdriver serve containerd --driver overlay` beside it; containerd's root and the "
        "store on one 4 GiB loop-xfs filesystem",
        f"- {runs} interleaved runs per figure (who goes first alternates), median (min..max) "
        f"in ms; snapshot cycles in batches of {batch}, on the imported image's top layer",
        "- command: `python bench/bench_containerd.py` (or `bash bench/run --only overlay/xfs "
        "--steps containerd`)",
        "",
        "| operation | graphdriver | reference | ratio |",
        "|---|---|---|---|",
    ]
    for f in figures:
        lines.append(f"| {f.name} | {ms(f.ours)} | {f.ref_name}: {ms(f.ref)} | {f.ratio():.2f}x |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def xfs() -> Iterator[Path]:
    with (
        tempfile.TemporaryDirectory(prefix="gd-bench-containerd-") as tmp,
        loop_filesystem("xfs", size=4 << 30, workdir=Path(tmp)) as backing,
    ):
        yield backing.root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=20, help="snapshots per timed batch")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_containerd: needs root (loop devices, mounts, containerd)")
    lacking = containerd_engine.missing_tools()
    if lacking:
        sys.exit(f"bench_containerd: needs {lacking}")
    with xfs() as fs:
        figures, versions = measure(fs, args.runs, args.batch)
    text = report(figures, versions, args.runs, args.batch)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
