"""dockerd on graphdriver (our GraphDriver plugin) beside dockerd's built-in overlay2.

Two private dockerds (Debian's 20.10), each with its own containerd, data-root, exec-root and
sockets, no bridge and no iptables, both on one 4 GiB loop-xfs filesystem:

- ours: ``graphdriver serve docker-graphdriver`` with the overlay driver, its store on the
  loop-xfs, and dockerd configured as the README says (``experimental``, ``storage-driver
  NAME``; the end-to-end tests' ``graph_dockerd``), its data-root on the same filesystem;
- the reference: dockerd with ``--storage-driver overlay2``, its data-root on the same
  filesystem.

Measured, interleaved (who goes first alternates), median of --runs, whole ``docker``
processes (Debian's client, as old as the daemon):

- ``docker import`` of the end-to-end tests' rootfs tar (busybox-static and its applets, one
  layer), then ``docker rmi`` (not timed) before the next run;
- ``docker run --rm --network none IMG true`` of that image.

``python bench/bench_docker.py`` (as root) prints a Markdown report; bench_all.py's step
``docker`` puts the same figures in its report. Results: results/*-docker.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from graphdriver.linux.mount import unmount_all_under
from graphdriver.testing.backings import loop_filesystem

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations/docker/tests"))
import dockerd as engine
from plugin_proc import GraphPlugin, VolumePlugin
from test_graph_dockerd import graph_dockerd

IMAGE = "gd-bench:1"
OURS, THEIRS = "graphdriver", "overlay2"


@dataclass
class Measure:
    """One figure: our seconds and the reference's, per run."""

    name: str
    ref_name: str
    ours: list[float] = field(default_factory=list)
    ref: list[float] = field(default_factory=list)

    def ratio(self) -> float:
        return statistics.median(self.ours) / statistics.median(self.ref)


@contextlib.contextmanager
def overlay2_dockerd(base: Path) -> Iterator[engine.Docker]:
    """containerd and dockerd with its built-in overlay2 under *base* (the tests' private
    paths and network flags); everything stopped and unmounted at the end."""
    ctd = base / "containerd"
    ctd.mkdir(parents=True)
    (ctd / "config.toml").write_text(engine.containerd_config(ctd))
    config = base / "daemon.json"
    config.write_text(json.dumps({"deprecated-key-path": str(base / "key.json")}))
    flags = [f for f in engine.DOCKERD_FLAGS if not f.startswith("--storage-driver")]
    api = base / "docker.sock"
    cgroup = f"gd-bench-{secrets.token_hex(4)}"
    made_plugin_dir = not engine.PLUGIN_DIR.parent.exists()  # dockerd makes it at start
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            engine._start(
                [engine.CONTAINERD, "--config", str(ctd / "config.toml")],
                base / "containerd.log",
                ctd / "containerd.sock",
            )
        )
        flags = [*flags, "--storage-driver=overlay2"]
        procs.append(
            engine.start_dockerd(base, config, ctd / "containerd.sock", api, flags, cgroup)
        )
        # engine.Docker carries a plugin for the volume tests; this one is never started
        unused = VolumePlugin(base, "none", base / "none.sock", base / "none.log")
        docker = engine.Docker(base, api, unused)
        try:
            yield docker
        finally:
            engine._remove_containers(docker)
    finally:
        engine.release(base, procs, ctd / "containerd.sock", cgroup, made_plugin_dir)


def _wall(docker: engine.Docker, *args: str) -> float:
    start = time.perf_counter()
    docker.run(*args)
    return time.perf_counter() - start


def measure(fs: Path, runs: int = 9) -> tuple[list[Measure], list[str]]:
    """Both figures on the filesystem mounted at *fs* (loop-xfs); also a few lines about what
    was run (versions, load)."""
    load = f"{os.getloadavg()[0]:.2f}"
    work = fs / "d"  # short: containerd's ttrpc socket path must stay under 104 bytes
    work.mkdir()
    tar = engine._rootfs_tar(work)
    imp = Measure(f"docker import ({tar.stat().st_size / 1e6:.1f} MB rootfs tar, 1 layer)",
                  "dockerd overlay2")  # fmt: skip
    run = Measure("docker run --rm --network none IMG true", "dockerd overlay2")
    try:
        with (
            graph_dockerd(work / "g", work / "store", "overlay", {}) as ours,
            overlay2_dockerd(work / "o") as theirs,
        ):
            daemons = {OURS: ours, THEIRS: theirs}
            for name, docker in daemons.items():
                driver = docker.run("info", "--format", "{{.Driver}}").strip()
                assert driver == (docker.plugin_name if name == OURS else "overlay2"), driver
            for i in range(runs):
                for name in (OURS, THEIRS) if i % 2 == 0 else (THEIRS, OURS):
                    t = _wall(daemons[name], "import", str(tar), IMAGE)
                    (imp.ours if name == OURS else imp.ref).append(t)
                    if i < runs - 1:
                        daemons[name].run("rmi", IMAGE)
            for docker in daemons.values():  # one untimed start each: the first pays extra
                docker.container("--rm", IMAGE, "true")
            for i in range(runs):
                for name in (OURS, THEIRS) if i % 2 == 0 else (THEIRS, OURS):
                    t = _wall(daemons[name], "run", "--rm", "--network", "none", IMAGE, "true")
                    (run.ours if name == OURS else run.ref).append(t)
            for docker in daemons.values():
                docker.run("rmi", IMAGE)
            assert isinstance(ours.plugin, GraphPlugin)
            left = ours.plugin.layers()
            print(f"bench_docker: layers left in the plugin's store: {left}", file=sys.stderr)
            server = ours.run("version", "--format", "{{.Server.Version}}").strip()
    finally:
        unmount_all_under(work / "store")
    versions = [
        f"dockerd {server} (Debian docker.io)",
        subprocess.run(["runc", "--version"], capture_output=True, text=True).stdout.split("\n")[0],
        f"load average {load} before, {os.getloadavg()[0]:.2f} after",
    ]
    return [imp, run], versions


def ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.1f} ({min(xs) * 1e3:.1f}..{max(xs) * 1e3:.1f})"


def report(figures: list[Measure], versions: list[str], runs: int) -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lines = [
        f"# docker: graphdriver (GraphDriver plugin) vs dockerd's overlay2, "
        f"{datetime.date.today().isoformat()}",
        "",
        f"- machine: {os.cpu_count()} cores, {mem:.0f} GiB, kernel {platform.release()}, "
        f"Python {platform.python_version()}; {'; '.join(versions)}",
        "- two private dockerds, each with its own containerd, data-root, exec-root and "
        "sockets, `--bridge=none --iptables=false`: one with `--experimental --storage-driver "
        "NAME` on `graphdriver serve docker-graphdriver --driver overlay`, one with "
        "`--storage-driver overlay2`; both data-roots and the plugin's store on one 4 GiB "
        "loop-xfs filesystem",
        f"- {runs} interleaved runs per figure (who goes first alternates), median (min..max) "
        "in ms, whole `docker` client processes (Debian's `/usr/bin/docker`)",
        "- command: `python bench/bench_docker.py` (or `bash bench/run --only overlay/xfs "
        "--steps docker`)",
        "",
        "| operation | graphdriver | reference | ratio |",
        "|---|---|---|---|",
    ]
    for f in figures:
        lines.append(f"| {f.name} | {ms(f.ours)} | {f.ref_name}: {ms(f.ref)} | {f.ratio():.2f}x |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def xfs() -> Iterator[Path]:
    with loop_filesystem("xfs", size=4 << 30) as backing:  # under /tmp: short socket paths
        yield backing.root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_docker: needs root (loop devices, mounts, dockerd)")
    lacking = engine.missing_tools()
    if lacking:
        sys.exit(f"bench_docker: needs {lacking}")
    with xfs() as fs:
        figures, versions = measure(fs, args.runs)
    text = report(figures, versions, args.runs)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
