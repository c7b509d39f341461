"""Every benchmark, for every driver that works here, beside its references; one report.

    bash bench/run            # installs what it needs, then runs this (as root)

For each driver and backing filesystem (vfs on ext4, overlay on xfs and on ext4, btrfs on btrfs,
devmapper where the kernel has device-mapper), on a fresh sparse loop filesystem:

- unpack: ``graphdriver apply-diff`` of the Debian minbase layer, the apt-get layer on top of
  it, 10,000 small files and one 1 GiB file, beside GNU ``tar -x`` of the same tar onto the same
  filesystem, and ``podman import`` of the same tar with podman's own driver of that name into a
  private root (minbase and the small files; the 1 GiB file would take podman minutes);
- pack: ``graphdriver diff`` of the minbase layer (applied, so its exact-diff record is
  replayed) beside ``tar -c`` of the unpacked tree;
- exact diffs: apply-diff keeping the exact-diff record beside apply-diff without
  (``GRAPHDRIVER_TAR_SPLIT=off``), the record's size per layer, and the diff replayed from the
  record beside the diff generated from the same layer (minbase, apt, 10,000 small files);
- a small change (3 files) on the minbase image: ``changes`` and ``diff`` beside ``tar -c`` of
  the changed files;
- ``create`` of an empty layer, and of a child of the minbase layer beside a child of an empty
  one (the ratio says whether creation depends on the parent's size);
- ``mount`` + ``umount`` of a container layer beside ``mount -t overlay`` + ``umount`` of the
  same directories (overlay) and ``podman image mount`` + ``umount``; and the library's
  get + put beside raw mount(2) + umount2(2) in one process;
- reading a 1 MiB file from the bottom of a 128-deep chain through the top layer's mount,
  beside reading it in the bottom layer itself;
- peak RSS (``/usr/bin/time``) of apply-diff and diff;
- containerd (overlay on xfs only; ``bench_containerd.py``): a container snapshot's Prepare +
  Mounts + Remove through containerd, the garbage collection after them, and ``ctr image
  import``, on our proxy snapshotter beside containerd's own overlayfs on the same filesystem;
- docker (overlay on xfs only; ``bench_docker.py``): ``docker import`` of a rootfs tar and
  ``docker run --rm true`` through our GraphDriver plugin beside dockerd's built-in overlay2,
  both data-roots on the same filesystem.

Every figure is the median of --runs interleaved runs (5 by default) with its spread, and a
ratio to its reference. Writes ``results/<date>.md`` and ``results/<date>.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import data
from bench_core import GD, GNU_TAR, lib_op, timed

from graphdriver.linux.mount import unmount_all_under
from graphdriver.testing.backings import loop_filesystem

CONFIGS = [("vfs", "ext4"), ("overlay", "xfs"), ("overlay", "ext4"), ("btrfs", "btrfs")]
PODMAN_DRIVER = {"vfs": "vfs", "overlay": "overlay", "btrfs": "btrfs"}
DEPTH = 128


@dataclass
class Figure:
    """One measured operation, its reference, and what the issue asks of the ratio."""

    name: str
    ours: list[float] = field(default_factory=list)
    ref: list[float] = field(default_factory=list)
    ref_name: str = ""
    target: str = ""
    unit: str = "s"
    #: extra columns (MB/s, files/s) computed from the median
    extra: str = ""

    def ratio(self) -> float | None:
        if not self.ours or not self.ref:
            return None
        return statistics.median(self.ours) / statistics.median(self.ref)


def spread(xs: list[float], unit: str = "s") -> str:
    if not xs:
        return "-"
    if unit == "ms":
        return f"{statistics.median(xs) * 1e3:.1f} ({min(xs) * 1e3:.1f}..{max(xs) * 1e3:.1f})"
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}..{max(xs):.3f})"


def sync() -> None:
    subprocess.run(["sync"], check=True)


def run(cmd: list[str], **kw: object) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-800:]}")
    return str(proc.stdout)


def both(
    i: int, ref: list[str], ours: list[str], after: Callable[[], object] | None = None
) -> tuple[float, float, int]:
    """Run the reference and ours after a sync each, alternating who goes first (the second
    big writer after a sync is often throttled by the loop device's writeback, whoever it is).
    Returns (reference seconds, our seconds, our peak RSS in KiB)."""
    got: dict[str, tuple[float, int]] = {}
    for who in ("ref", "ours") if i % 2 == 0 else ("ours", "ref"):
        sync()
        got[who] = timed(ref if who == "ref" else ours)
        if after is not None:
            after()
    return got["ref"][0], got["ours"][0], got["ours"][1]


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    run(cmd)
    return time.perf_counter() - start


class Podman:
    """podman with a private root and run root on the benchmark's filesystem."""

    def __init__(self, base: Path, driver: str) -> None:
        self.base = base
        self.driver = driver
        self.cmd = [
            "podman",
            "--root",
            str(base / "root"),
            "--runroot",
            str(base / "run"),
            "--storage-driver",
            driver,
            "--events-backend",
            "none",
        ]

    def __call__(self, *args: str) -> list[str]:
        return [*self.cmd, *args]

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):
            run(self("rmi", "-a", "-f"))
        unmount_all_under(self.base)
        if self.driver == "btrfs":
            for sub in sorted((self.base / "root").glob("btrfs/subvolumes/*"), reverse=True):
                subprocess.run(["btrfs", "subvolume", "delete", str(sub)], capture_output=True)
        data.rmtree(self.base)


def podman_ok() -> str | None:
    """None if podman can run here, else why not."""
    if shutil.which("podman") is None:
        return "podman is not installed (bench/run installs it from Debian)"
    return None


class Bench:
    def __init__(self, driver: str, fstype: str, fs: Path, runs: int, sets: dict) -> None:  # type: ignore[type-arg]
        self.driver = driver
        self.fstype = fstype
        self.fs = fs
        self.runs = runs
        self.sets = sets
        self.store = fs / "store"
        self.gd = [*GD, "--root", str(self.store), "--driver", driver]
        self.figs: list[Figure] = []
        self.rss: dict[str, list[int]] = {}
        self.podman = podman_ok() is None and driver in PODMAN_DRIVER
        self.n = 0

    def fig(self, *args: object, **kw: object) -> Figure:
        f = Figure(*args, **kw)  # type: ignore[arg-type]
        self.figs.append(f)
        return f

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    # ---------------------------------------------------------------------------- unpack

    def unpack(self) -> None:
        run([*self.gd, "create", "base"])
        run([*self.gd, "apply-diff", "base", str(self.sets["minbase"][0])])
        for key in ("minbase", "apt", "small10k", "big1g"):
            tar = self.sets[key][0]
            entries, files = data.tar_stats(tar)
            mb = tar.stat().st_size / 1e6
            fig = self.fig(f"apply-diff {key}", ref_name="GNU tar -x", target="<= 1.2x")
            pod = None
            if self.podman and key in ("minbase", "small10k"):
                pod = self.fig(f"apply-diff {key} vs podman import", ref_name="podman import",
                               target="< 1x")  # fmt: skip
            lib = None
            if key == "minbase":
                lib = self.fig("apply-diff minbase (library call)", ref_name="GNU tar -x")
                lib.ref = fig.ref
            rss = self.rss.setdefault(f"apply-diff {key}", [])
            for i in range(self.runs):
                target = self.fs / self.fresh("tar-x-")
                target.mkdir()
                layer = self.fresh("L")
                parent = ["--parent", "base"] if key == "apt" else []
                run([*self.gd, "create", *parent, layer])

                ref_t, t, m = both(
                    i,
                    [*GNU_TAR, "-C", str(target), "-xf", str(tar)],
                    [*self.gd, "apply-diff", layer, str(tar)],
                )
                fig.ref.append(ref_t)
                fig.ours.append(t)
                rss.append(m)
                if lib is not None:
                    again = self.fresh("L")
                    run([*self.gd, "create", again])
                    sync()
                    lib.ours.append(lib_op(self.store, "apply", again, tar, self.driver))
                    run([*self.gd, "rm", again])
                if pod is not None:
                    pod.ours.append(t)
                    podman = Podman(self.fs / self.fresh("podman-"), PODMAN_DRIVER[self.driver])
                    sync()
                    pod.ref.append(wall(podman("import", str(tar), "bench:layer")))
                    podman.destroy()
                run([*self.gd, "rm", layer])
                data.rmtree(target)
            med = statistics.median(fig.ours)
            fig.extra = f"{mb / med:.0f} MB/s, {files / med:,.0f} files/s ({entries:,} entries)"

    # ------------------------------------------------------------------------------ pack

    def pack(self) -> None:
        tree = self.fs / "minbase-tree"
        tree.mkdir()
        run([*GNU_TAR, "-C", str(tree), "-xf", str(self.sets["minbase"][0])])
        fig = self.fig("diff minbase", ref_name="GNU tar -c", target="<= 1.2x")
        lib = self.fig("diff minbase (library call)", ref_name="GNU tar -c")
        lib.ref = fig.ref
        out = self.fs / "out.tar"
        for i in range(self.runs):
            ref_t, t, m = both(
                i,
                [*GNU_TAR, "-C", str(tree), "-cf", str(out), "."],
                [*self.gd, "diff", "base", "-o", str(out)],
                after=out.unlink,
            )
            fig.ref.append(ref_t)
            fig.ours.append(t)
            self.rss.setdefault("diff minbase", []).append(m)
            sync()
            lib.ours.append(lib_op(self.store, "diff", "base", out, self.driver))
            out.unlink()
        data.rmtree(tree)
        run([*self.gd, "create", "big"])
        run([*self.gd, "apply-diff", "big", str(self.sets["big1g"][0])])
        for _ in range(self.runs):
            _, m = timed([*self.gd, "diff", "big", "-o", str(out)])
            self.rss.setdefault("diff big1g", []).append(m)
            out.unlink()
        run([*self.gd, "rm", "big"])

    # ----------------------------------------------------------------------- exact diffs

    def exact(self) -> None:
        """What exact-diff records cost: apply-diff keeping them beside apply-diff without
        (GRAPHDRIVER_TAR_SPLIT=off), the bytes each takes, and the diff of an applied layer
        replayed from its record beside the diff generated from the same layer."""
        off = ["env", "GRAPHDRIVER_TAR_SPLIT=off"]
        out = self.fs / "exact.tar"
        have = {layer["id"] for layer in json.loads(run([*self.gd, "--json", "ls"]))}
        if "base" not in have:  # the unpack step did not run
            run([*self.gd, "create", "base"])
            run([*self.gd, "apply-diff", "base", str(self.sets["minbase"][0])])
        for key in ("minbase", "apt", "small10k"):
            tar = self.sets[key][0]
            parent = ["--parent", "base"] if key == "apt" else []
            fig = self.fig(f"apply-diff {key}, keeping its exact-diff record",
                           ref_name="apply-diff without records", target="<= 1.05x")  # fmt: skip
            dfig = self.fig(f"diff of the applied {key} (its record replayed)",
                            ref_name="diff generated from the layer")  # fmt: skip
            stored: list[int] = []
            for i in range(self.runs):
                kept, plain = self.fresh("X"), self.fresh("Y")
                run([*self.gd, "create", *parent, kept])
                run([*self.gd, "create", *parent, plain])
                ref_t, t, _m = both(
                    i,
                    [*off, *self.gd, "apply-diff", plain, str(tar)],
                    [*self.gd, "apply-diff", kept, str(tar)],
                )
                fig.ref.append(ref_t)
                fig.ours.append(t)
                stored.append(json.loads(run([*self.gd, "inspect", kept]))["exact_diff_record"])
                ref_t, t, _m = both(
                    i,
                    [*self.gd, "diff", plain, "-o", str(out)],
                    [*self.gd, "diff", kept, "-o", str(out)],
                    after=out.unlink,
                )
                dfig.ref.append(ref_t)
                dfig.ours.append(t)
                run([*self.gd, "rm", kept, plain])
            size = tar.stat().st_size
            per_layer = statistics.median(stored)
            fig.extra = (
                f"record {per_layer / 1024:,.0f} KiB per layer, {100 * per_layer / size:.2f}% "
                f"of the {size / 1e6:,.0f} MB tar"
            )

    # ----------------------------------------------------------------------- small change

    def small_change(self) -> None:
        run([*self.gd, "create", "--rw", "--parent", "base", "c1"])
        root = Path(run([*self.gd, "mount", "c1"]).strip())
        (root / "etc" / "hostname").write_text("changed\n")
        (root / "new-file").write_bytes(b"n" * 4096)
        (root / "etc" / "motd").unlink()
        run([*self.gd, "umount", "c1"])
        changed = self.fs / "changed"
        (changed / "etc").mkdir(parents=True)
        (changed / "etc" / "hostname").write_text("changed\n")
        (changed / "new-file").write_bytes(b"n" * 4096)
        ref = []
        for _ in range(self.runs):
            ref.append(wall([*GNU_TAR, "-C", str(changed), "-cf", "/dev/null", "."]))
        out = self.fs / "small.tar"
        ch = self.fig("changes, 3 files on minbase", ref=ref, ref_name="tar -c of the changes")
        df = self.fig("diff, 3 files on minbase", ref=ref, ref_name="tar -c of the changes")
        for _ in range(self.runs):
            ch.ours.append(wall([*self.gd, "changes", "c1"]))
            df.ours.append(wall([*self.gd, "diff", "c1", "-o", str(out)]))
            out.unlink()
        data.rmtree(changed)

    # ---------------------------------------------------------------------------- create

    def create(self) -> None:
        start = self.fig("CLI start-up (graphdriver ls)", ref_name="python -c pass")
        for _ in range(self.runs):
            start.ours.append(wall([*self.gd, "ls"]))
            start.ref.append(wall([sys.executable, "-c", "pass"]))
        run([*self.gd, "create", "empty"])
        empty = self.fig("create empty layer", ref_name="")
        big = self.fig("create child of minbase", ref_name="child of an empty layer",
                       target="~1x (independent of the parent's size)")  # fmt: skip
        for _ in range(self.runs):
            a, b, c = self.fresh("e"), self.fresh("ce"), self.fresh("cb")
            empty.ours.append(wall([*self.gd, "create", a]))
            big.ref.append(wall([*self.gd, "create", "--parent", "empty", b]))
            big.ours.append(wall([*self.gd, "create", "--parent", "base", c]))
            run([*self.gd, "rm", a, b, c])
        run([*self.gd, "rm", "empty"])

    # ----------------------------------------------------------------------------- mount

    def mounts(self) -> None:
        cli = self.fig("mount + umount (CLI)", ref_name="")
        for _ in range(self.runs):
            cli.ours.append(wall([*self.gd, "mount", "c1"]) + wall([*self.gd, "umount", "c1"]))
        if self.driver == "overlay":
            home = self.store / "overlay"
            lower = home / "base" / "diff"
            layer = home / "c1"
            target = self.fs / "raw-merged"
            target.mkdir()
            opts = f"lowerdir={lower},upperdir={layer / 'diff'},workdir={layer / 'work'}"
            cli.ref_name, cli.target = "mount -t overlay + umount (commands)", "<= 2x"
            for _ in range(self.runs):
                cli.ref.append(
                    wall(["mount", "-t", "overlay", "overlay", "-o", opts, str(target)])
                    + wall(["umount", str(target)])
                )
            lib = self.fig("get + put (library)", ref_name="mount(2) + umount2(2)",
                           target="<= 2x", unit="ms")  # fmt: skip
            script = LIB_MOUNT.format(store=str(self.store), runs=self.runs, opts=opts,
                                      target=str(target))  # fmt: skip
            got = json.loads(run([sys.executable, "-c", script]))
            lib.ours, lib.ref = got["lib"], got["raw"]
        if self.podman:
            podman = Podman(self.fs / "podman-mount", PODMAN_DRIVER[self.driver])
            run(podman("import", str(self.sets["small10k"][0]), "bench:mount"))
            pod = self.fig("mount + umount (CLI) vs podman", ref_name="podman image mount + umount")
            pod.ours = cli.ours
            for _ in range(self.runs):
                pod.ref.append(
                    wall(podman("image", "mount", "bench:mount"))
                    + wall(podman("image", "umount", "bench:mount"))
                )
            podman.destroy()

    # ------------------------------------------------------------------------ deep chain

    def deep_read(self) -> None:
        script = DEEP_READ.format(store=str(self.store), driver=self.driver, depth=DEPTH,
                                  runs=self.runs)  # fmt: skip
        got = json.loads(run([sys.executable, "-c", script]))
        fig = self.fig(f"read 1 MiB at the bottom of a {DEPTH}-deep chain",
                       ref_name="the same read in the bottom layer", unit="ms")  # fmt: skip
        fig.ours, fig.ref = got["deep"], got["direct"]
        mnt = self.fig(f"get + put of the top of a {DEPTH}-deep chain (library)", unit="ms")
        mnt.ours = got["mount"]

    # ------------------------------------------------------------------------- containerd

    def containerd(self) -> None:
        """graphdriver as containerd's proxy snapshotter beside containerd's overlayfs, on
        this filesystem (its own store and containerd root; see bench_containerd.py)."""
        if (self.driver, self.fstype) != ("overlay", "xfs"):
            return
        import bench_containerd  # grpcio, only for this step

        lacking = bench_containerd.containerd_engine.missing_tools()
        if lacking is not None:
            print(f"bench: containerd step skipped: needs {lacking}", file=sys.stderr)
            return
        figures, _ = bench_containerd.measure(self.fs, self.runs)
        for m in figures:
            fig = self.fig(f"containerd: {m.name}", ref_name=m.ref_name, unit="ms")
            fig.ours, fig.ref = m.ours, m.ref

    # ----------------------------------------------------------------------------- docker

    def docker(self) -> None:
        """graphdriver as dockerd's GraphDriver plugin beside dockerd's overlay2, on this
        filesystem (its own store and data-roots; see bench_docker.py)."""
        if (self.driver, self.fstype) != ("overlay", "xfs"):
            return
        import bench_docker

        lacking = bench_docker.engine.missing_tools()
        if lacking is not None:
            print(f"bench: docker step skipped: needs {lacking}", file=sys.stderr)
            return
        figures, _ = bench_docker.measure(self.fs, self.runs)
        for m in figures:
            fig = self.fig(f"docker: {m.name}", ref_name=m.ref_name, unit="ms")
            fig.ours, fig.ref = m.ours, m.ref

    def cleanup(self) -> None:
        subprocess.run([*self.gd, "cleanup"], capture_output=True)


LIB_MOUNT = """
import json, time
from graphdriver import open_store
from graphdriver.linux.mount import mount, unmount
s = open_store({store!r}, "overlay")
lib, raw = [], []
s.get("c1"); s.put("c1")  # warm: the first call opens the database and loads the driver
for _ in range({runs}):
    t = time.perf_counter(); s.get("c1"); s.put("c1"); lib.append(time.perf_counter() - t)
    t = time.perf_counter()
    mount("overlay", {target!r}, "overlay", 0, {opts!r}); unmount({target!r})
    raw.append(time.perf_counter() - t)
print(json.dumps({{"lib": lib, "raw": raw}}))
"""

DEEP_READ = """
import io, json, os, tarfile, time
from graphdriver import open_store
s = open_store({store!r}, {driver!r})
def tar(name, size):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo(name); info.size = size
        tf.addfile(info, io.BytesIO(os.urandom(size)))
    buf.seek(0)
    return buf
parent = None
for i in range({depth}):
    s.create(f"deep{{i}}", parent)
    s.apply(f"deep{{i}}", tar("bottom.bin" if i == 0 else f"f{{i}}", 1 << 20 if i == 0 else 16))
    parent = f"deep{{i}}"
deep, direct, mnt = [], [], []
def read(path):
    t = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
    return time.perf_counter() - t
for _ in range({runs}):
    bottom = s.get("deep0")
    direct.append(read(os.path.join(bottom, "bottom.bin")))
    s.put("deep0")
    t = time.perf_counter(); top = s.get(parent); mnt.append(time.perf_counter() - t)
    deep.append(read(os.path.join(top, "bottom.bin")))
    t = time.perf_counter(); s.put(parent); mnt[-1] += time.perf_counter() - t
for i in reversed(range({depth})):
    s.remove(f"deep{{i}}")
print(json.dumps({{"deep": deep, "direct": direct, "mount": mnt}}))
"""


@contextlib.contextmanager
def backing_for(fstype: str) -> Iterator[Path]:
    with loop_filesystem(fstype, size=24 << 30) as backing:
        yield backing.root


def machine() -> list[str]:
    def first(cmd: list[str]) -> str:
        try:
            return run(cmd).splitlines()[0]
        except (RuntimeError, OSError, IndexError):
            return f"{cmd[0]}: not available"

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"- machine: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, kernel {platform.release()}",
        f"- Python {platform.python_version()}; {first([*GD, '--version'])}; "
        f"{first(['tar', '--version'])}; {first(['podman', '--version'])}",
    ]


def report(results: list[tuple[str, Bench | str]], sets: dict, runs: int, took: float) -> str:  # type: ignore[type-arg]
    today = datetime.date.today().isoformat()
    lines = [f"# graphdriver benchmarks, {today}", "", *machine()]
    for key, (path, what) in sets.items():
        entries, files = data.tar_stats(path)
        lines.append(
            f"- data `{key}`: {what}; {path.stat().st_size / 1e6:.0f} MB tar, "
            f"{entries:,} entries, {files:,} files"
        )
    lines += [
        f"- {runs} interleaved runs per figure: median (min..max); seconds unless marked ms; "
        "CLI figures are whole processes (Python start-up, ~0.1 s, included)",
        f"- command: `bash bench/run` (whole run {took / 60:.1f} min)",
        "",
    ]
    for title, bench in results:
        lines.append(f"## {title}")
        lines.append("")
        if isinstance(bench, str):
            lines += [f"Not run: {bench}", ""]
            continue
        lines += [
            "| operation | graphdriver | reference | ratio | target | |",
            "|---|---|---|---|---|---|",
        ]
        for f in bench.figs:
            r = f.ratio()
            ref = f"{f.ref_name}: {spread(f.ref, f.unit)}" if f.ref else f.ref_name or "-"
            lines.append(
                f"| {f.name} | {spread(f.ours, f.unit)} | {ref} | "
                f"{'-' if r is None else f'{r:.2f}x'} | {f.target} | {f.extra} |"
            )
        lines += ["", "| peak RSS | MiB (max of runs) |", "|---|---|"]
        for name, values in bench.rss.items():
            lines.append(f"| {name} | {max(values) / 1024:.0f} |")
        lines.append("")
    return "\n".join(lines)


CHART_FIGURES = [
    ("apply-diff minbase", "apply-diff / tar -x"),
    ("apply-diff minbase (library call)", "apply-diff, library call / tar -x"),
    ("apply-diff small10k", "apply-diff 10k files / tar -x"),
    ("apply-diff big1g", "apply-diff 1 GiB / tar -x"),
    ("diff minbase", "diff / tar -c"),
    ("diff minbase (library call)", "diff, library call / tar -c"),
    ("apply-diff minbase vs podman import", "apply-diff / podman import"),
    ("mount + umount (CLI)", "mount+umount / mount -t overlay"),
    ("get + put (library)", "get+put / mount(2)"),
    ("create child of minbase", "child of minbase / of empty"),
]


def ratios(results: list[tuple[str, Bench | str]]) -> dict[str, dict[str, float | None]]:
    """{configuration: {figure: ratio}} of what ran."""
    return {t: {f.name: f.ratio() for f in b.figs} for t, b in results if isinstance(b, Bench)}


def chart(by_config: dict[str, dict[str, float | None]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 7.5))
    height = 0.8 / max(1, len(by_config))
    for i, (label, by_name) in enumerate(by_config.items()):
        ys, xs = [], []
        for j, (name, _) in enumerate(CHART_FIGURES):
            r = by_name.get(name)
            if r is not None:
                ys.append(j + i * height)
                xs.append(r)
        bars = ax.barh(ys, xs, height=height, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(CHART_FIGURES))])
    ax.set_yticklabels([label for _, label in CHART_FIGURES])
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.axvline(1.2, color="green", linestyle="--", linewidth=0.8, label="1.2x target")
    ax.axvline(2.0, color="orange", linestyle="--", linewidth=0.8, label="2x target (mount)")
    ax.set_xscale("log")
    ax.set_xlabel("ratio to the reference (median of runs; lower is better, log scale)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default=None, help="comma list of driver/fs, e.g. overlay/xfs")
    ap.add_argument("--steps", default=None,
                    help="comma list of steps (unpack,pack,exact,small_change,create,mounts,"
                    "deep_read,containerd,docker); unpack makes the base layer the others "
                    "need (containerd and docker need none of them)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--chart", type=Path, default=None, help="redraw the PNG of a results JSON")
    args = ap.parse_args()
    if args.chart is not None:
        saved = json.loads(args.chart.read_text())
        chart(saved["ratios"], args.chart.with_suffix(".png"), saved["title"])
        return
    if os.geteuid() != 0:
        sys.exit("bench: needs root (loop devices and mounts)")
    start = time.perf_counter()
    sets = data.all_data()
    configs = CONFIGS
    if args.only:
        wanted = set(args.only.split(","))
        configs = [c for c in CONFIGS if f"{c[0]}/{c[1]}" in wanted]
    results: list[tuple[str, Bench | str]] = []
    for driver, fstype in configs:
        title = f"{driver} on {fstype}"
        print(f"bench: {title}", file=sys.stderr)
        with backing_for(fstype) as fs:
            bench = Bench(driver, fstype, fs, args.runs, sets)
            try:
                steps: list[Callable[[], None]] = [
                    bench.unpack, bench.pack, bench.exact, bench.small_change, bench.create,
                    bench.mounts, bench.deep_read, bench.containerd, bench.docker,
                ]  # fmt: skip
                for step in steps:
                    if args.steps and step.__name__ not in args.steps.split(","):
                        continue
                    step()
            finally:
                bench.cleanup()
                unmount_all_under(fs / "store")
        results.append((title, bench))
    if not args.only or "devmapper" in args.only:
        results.append(("devmapper", devmapper_here()))
    if podman_ok() is not None:
        results.append(("podman", str(podman_ok())))
    took = time.perf_counter() - start
    text = report(results, sets, args.runs, took)
    today = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{today}.md").write_text(text + f"\n![ratios]({today}.png)\n")
    title = f"graphdriver vs references, {today}"
    raw = {
        t: {f.name: {"ours": f.ours, "ref": f.ref, "ref_name": f.ref_name} for f in b.figs}
        for t, b in results
        if isinstance(b, Bench)
    }
    (args.out / f"{today}.json").write_text(
        json.dumps({"title": title, "ratios": ratios(results), "runs": raw}, indent=1)
    )
    chart(ratios(results), args.out / f"{today}.png", title)
    print(text)


def devmapper_here() -> str:
    if os.path.exists("/dev/mapper/control"):
        return (
            "this host has device-mapper, but the thin-pool set-up is not part of this run yet; "
            "see bench_snapshot.py"
        )
    return (
        "this kernel has no device-mapper (the devmapper tests run in a qemu guest, where TCG "
        "emulation makes timings incomparable; bench_snapshot.py measures it there)"
    )


if __name__ == "__main__":
    main()
