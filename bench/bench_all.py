"""Every benchmark, for every driver that works here, beside its references; one report.

    bash bench/run            # installs what it needs, then runs this (as root)

For each driver and backing filesystem (vfs on ext4, overlay on xfs, btrfs on btrfs; overlay on
ext4 with ``--only overlay/ext4``), on a fresh sparse loop filesystem, references on the same
filesystem in the same loop, who goes first alternating:

- unpack: ``apply-diff`` of the Debian minbase layer (plain, gzip and zstd), the apt-get layer
  on top of it, 10,000 small files and one 1 GiB file, beside GNU ``tar -x`` of the same tar
  (``--gzip``/``--zstd``: GNU tar decompresses in a child process, beside it; the apt layer, on a
  driver whose child layer starts as a copy of its parent, beside ``rm -rf`` of what its
  whiteouts remove and ``tar -x``, in an unpacked minbase); ``podman import`` of
  minbase and the small files into a WARM podman root (one per data set, set up and warmed by
  an untimed import first; the image is removed between runs, the store kept); minbase and the
  small files read from a pipe (``cat TAR |``, as a client or an engine hands a layer over:
  the data then crosses to the sandbox inline), library call and through the command server,
  beside ``cat TAR | tar -x``;
- pack: ``diff`` of the minbase and small-files layers beside GNU ``tar -c`` of the unpacked
  tree into a file on the same filesystem (never /dev/null, which GNU tar short-circuits); the
  diff generated from a container layer on the small files, each rewritten, beside GNU
  ``tar -c --format=posix`` of a copy of its tree (nanosecond mtimes in both);
- exact diffs: apply-diff keeping the exact-diff record beside apply-diff without
  (``GRAPHDRIVER_TAR_SPLIT=off``), and the record replayed beside the diff generated;
- a small change (3 files) on minbase: ``changes`` and ``diff``, CLI and library time, beside
  ``tar -c`` of the changed files into a file;
- CLI start-up (``graphdriver --version``, ``graphdriver ls``) beside the venv's
  ``python -c pass``, through the command server the first command starts
  (``Bench.command_server``; so are the CLI's transfers and mounts) and by a process of its
  own; the first command, which starts the server; a served ``inspect`` with 500 more layers
  in the store beside the same in the bench's store (what a store's size adds to every command);
  ``create`` of a child of minbase beside a child of an empty layer;
- ``mount`` + ``umount`` (CLI, and through the command server) beside ``podman image mount``
  + ``umount`` on a warm store and ``mount -t overlay`` + ``umount``; get + put beside
  mount(2) + umount2(2) in one process;
- a 1 MiB read at the bottom of a 128-deep chain;
- peak RSS of apply-diff and diff, CLI and library, of every data set (the 1 GiB one included);
- containerd and docker (overlay on xfs; ``bench_containerd.py``, ``bench_docker.py``).

Every figure is the median of --runs runs with its spread, its ratio to the reference, the ratio
of user+sys CPU time (steadier than wall time on a shared machine), and its target where the
issue sets one; the report lists the figures that miss their target at the top. Writes
``results/<date>.md``, ``.json`` and ``.png`` (``<date>-partial.*`` for a subset run).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import data
from bench_core import GD, GNU_TAR, in_process, lib_op
from figures import Figure, Run, Target, chart, misses, recorded, table, timed
from library_calls import (
    CHANGES_VS_WALK,
    DEEP_READ,
    MANY_LAYERS,
    MOUNT,
    RECORD_SIZE,
    SMALL_CHANGE,
)

from graphdriver.linux.dm import device_mapper_missing
from graphdriver.linux.mount import unmount_all_under
from graphdriver.testing.backings import loop_filesystem

CONFIGS = [("vfs", "ext4"), ("overlay", "xfs"), ("btrfs", "btrfs")]
#: measured only when named in --only
MORE_CONFIGS = [("overlay", "ext4")]
SETS = ("minbase", "minbase.gz", "minbase.zst", "apt", "small10k", "big1g")
#: GNU tar's option for a compressed data set (it runs gzip or zstd as a child, beside it)
TAR_DECOMPRESS = {"minbase.gz": ["--gzip"], "minbase.zst": ["--zstd"]}
STEPS = ("unpack", "pack", "exact", "small_change", "create", "mounts", "deep_read",
         "containerd", "docker")  # fmt: skip
PODMAN_DRIVER = {"vfs": "vfs", "overlay": "overlay", "btrfs": "btrfs"}
DEPTH = 128
#: layers added to the store to see what its size costs every command
MANY = 500
#: issue #15's targets
AS_FAST_AS_TAR = Target(1.1)
#: data sets whose apply-diff is also measured through the command server (diff: minbase,
#: small10k and the rewritten files)
SERVED = ("minbase", "minbase.gz", "minbase.zst", "apt", "small10k")
#: data sets whose apply-diff is also measured from a pipe
PIPED = ("minbase", "small10k")
#: the CLI's figures are of the command as a user runs it, through the command server the
#: first command starts (GRAPHDRIVER_SOCKET unset), and of a process that runs its command
#: itself (GRAPHDRIVER_SOCKET=, python -m graphdriver, a first command), same targets
OWN = " (a process of its own)"
START_UP = Target(3.0)
MOUNT_VS_PODMAN = Target(1.5)
CHANGES_MS = Target(20.0, absolute=True)
#: the drivers that list a layer's changes without the tree compare
NATIVE_CHANGES = ("overlay", "btrfs")
#: the project's earlier targets (bench/README.md)
FLAT_MEMORY = Target(100.0, absolute=True)
MOUNT_VS_RAW = Target(2.0)
RECORD_COST = Target(1.05)
PARENT_SIZE = Target(1.2)


def sync() -> None:
    subprocess.run(["sync"], check=True)


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-800:]}")
    return proc.stdout


def both(
    i: int, ref: list[str], ours: list[str], after: Callable[[], object] | None = None
) -> tuple[Run, Run]:
    """Run the reference and ours after a sync each, alternating who goes first (the second
    big writer after a sync is often throttled by the loop device's writeback, whoever it is).
    Both run under GNU time, for our peak RSS."""
    got: dict[str, Run] = {}
    for who in ("ref", "ours") if i % 2 == 0 else ("ours", "ref"):
        sync()
        got[who] = timed(ref if who == "ref" else ours, rss=True)
        if after is not None:
            after()
    return got["ref"], got["ours"]


def whited_out(tar: Path, into: Path) -> Path:
    """A file of the paths the whiteouts of *tar* remove (NUL-separated, for ``xargs -0``,
    relative to the layer's root), written in *into*. The names are read with tarfile (``tar
    -t`` escapes some bytes); a name that is absolute or has a ``..`` part, and an opaque
    directory, are not in a layer bench/ makes, and end the run rather than reach ``rm``."""
    out = into / f"{tar.stem}.whiteouts"
    if not out.exists():
        paths = []
        with tarfile.open(tar) as tf:
            for name in tf.getnames():
                parts = [p for p in name.split("/") if p not in ("", ".")]
                if name.startswith("/") or ".." in parts:
                    sys.exit(f"bench: {tar} has the entry {name!r}, outside the layer's root")
                if parts and parts[-1].startswith(".wh."):
                    if parts[-1] == ".wh..wh..opq":
                        sys.exit(f"bench: {tar} has an opaque directory, which the reference skips")
                    paths.append("/".join([*parts[:-1], parts[-1][4:]]))
        out.write_bytes(b"".join(os.fsencode(p) + b"\0" for p in paths))
    return out


def plus(a: Run, b: Run) -> Run:
    return Run(a.wall + b.wall, a.cpu + b.cpu, max(a.rss, b.rss))


class Podman:
    """podman with a private root on the benchmark's filesystem and a private run root (in
    /tmp: podman refuses a run root path over 50 characters)."""

    def __init__(self, base: Path, driver: str) -> None:
        self.base = base
        self.driver = driver
        self.run_root = Path(tempfile.mkdtemp(prefix="gdpm-"))
        self.cmd = ["podman", "--root", str(base / "root"), "--runroot", str(self.run_root),
                    "--storage-driver", driver, "--events-backend", "none"]  # fmt: skip

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
        unmount_all_under(self.run_root)
        shutil.rmtree(self.run_root, ignore_errors=True)


def podman_ok() -> str | None:
    """None if podman can run here, else why not."""
    if shutil.which("podman") is None:
        return "podman is not installed (bench/run installs it from Debian)"
    return None


class Bench:
    def __init__(
        self,
        driver: str,
        fstype: str,
        fs: Path,
        runs: int,
        sets: dict,
        keys: list[str],  # type: ignore[type-arg]
    ) -> None:
        self.driver = driver
        self.fstype = fstype
        self.fs = fs
        self.runs = runs
        self.sets = sets
        self.keys = keys
        self.store = fs / "store"
        self.gd = [*GD, "--root", str(self.store), "--driver", driver]
        self.figs: list[Figure] = []
        self.podman = podman_ok() is None and driver in PODMAN_DRIVER
        self.pods: dict[str, Podman] = {}
        #: seconds each step took
        self.took: dict[str, float] = {}
        self.n = 0
        #: the command server's (``command_server``)
        self.server_home = Path("/nonexistent")
        self.server_pid = self.server_pidfd = 0
        self.served_env: dict[str, str] = {}

    def fig(self, name: str, table: str = "cli", **kw: object) -> Figure:
        f = Figure(name, table, **kw)  # type: ignore[arg-type]
        self.figs.append(f)
        return f

    def mem(self, name: str) -> Figure:
        return self.fig(name, "mem", unit="MiB", target=FLAT_MEMORY)

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def tar(self, key: str) -> Path:
        return Path(self.sets[key][0])

    def has(self, layer: str) -> bool:
        return subprocess.run([*self.gd, "exists", layer], capture_output=True).returncode == 0

    def layer_of(self, layer: str, key: str, parent: str | None = None) -> str:
        """*layer* applied from data set *key* (made once, untimed)."""
        if not self.has(layer):
            run([*self.gd, "create", *(["--parent", parent] if parent else []), layer])
            run([*self.gd, "apply-diff", layer, str(self.tar(key))])
        return layer

    def base(self) -> str:
        return self.layer_of("base", "minbase")

    def podman_for(self, key: str) -> Podman:
        """The warm podman root of data set *key*: its store set up by one untimed import."""
        if key not in self.pods:
            pod = Podman(self.fs / f"podman-{key}", PODMAN_DRIVER[self.driver])
            run(pod("import", str(self.tar(key)), "bench:warm"))
            run(pod("rmi", "-f", "bench:warm"))
            self.pods[key] = pod
        return self.pods[key]

    def cli_and_lib(self, name: str, ref_name: str, target: Target | None) -> list[Figure]:
        """The CLI figure of a process of its own, the library figure (same reference) and
        their peak RSS figures."""
        cli = self.fig(name + OWN, ref_name=ref_name, target=target)
        lib = self.fig(name, "lib", ref_name=ref_name.replace("(to a file)", "").strip() +
                       " (process)", target=target, ref=cli.ref, ref_cpu=cli.ref_cpu)  # fmt: skip
        return [cli, lib, self.mem(f"{name} (CLI)"), self.mem(f"{name} (library call)")]

    def run_three(
        self,
        i: int,
        figs: list[Figure],
        ref: list[str],
        ours: list[str],
        call: tuple[str, str, Path],
        after: Callable[[], object] | None = None,
        served: tuple[Figure, list[str]] | None = None,
    ) -> Run:
        """One run of the reference, the CLI command by a process of its own, the same
        operation as a library call (*call*: op, layer, path for ``lib_op``) and, with
        *served* (its figure and command), the CLI command through the command server, each
        after a sync and followed by *after*, in an order turned by one each run (reference,
        CLI, library, served; CLI, library, served, reference; ...): a big writer after
        another is often throttled by the loop device's writeback, whoever it is."""
        cli, lib, mem_cli, mem_lib = figs
        got: dict[str, Run] = {}
        order = ("ref", "cli", "lib", "srv") if served is not None else ("ref", "cli", "lib")
        for who in order[i % len(order) :] + order[: i % len(order)]:
            sync()
            if who == "lib":
                got[who] = lib_op(self.store, call[0], call[1], call[2], self.driver)
            elif who == "srv" and served is not None:
                got[who] = self.through_server(served[1], rss=True)  # (as the others)
            else:
                got[who] = timed(ref if who == "ref" else ours, rss=True)
            if after is not None:
                after()
        cli.add(got["cli"], got["ref"])
        mem_cli.ours.append(got["cli"].rss / 1024)
        lib.add(got["lib"])
        mem_lib.ours.append(got["lib"].rss / 1024)
        if served is not None:
            served[0].add(got["srv"], got["ref"])
        return got["cli"]

    def served_fig(self, name: str, cli: Figure, target: Target | None) -> Figure:
        """The figure of *name* through the command server, beside *cli*'s reference."""
        return self.fig(f"{name} through the command server", ref_name=cli.ref_name,
                        target=target, unit=cli.unit)  # fmt: skip

    def through_server(self, cmd: list[str], rss: bool = False) -> Run:
        """*cmd* run through the command server (named, so that a refusal would say so:
        ``timed`` then fails; a server gone fails too); its CPU time is the client's, its
        worker's and the server's own for it (the server's and its reaped children's: clock
        ticks, 10 ms)."""
        before = self.server_cpu()
        got = timed(cmd, rss=rss, env=self.served_env)
        deadline = time.monotonic() + 2
        children = Path(f"/proc/{self.server_pid}/task/{self.server_pid}/children")
        while children.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.001)
        return Run(got.wall, got.cpu + self.server_cpu() - before, got.rss)

    def server_cpu(self) -> float:
        """The user+sys CPU seconds of the command server and its reaped children (its
        workers); RuntimeError if it is gone (its log says why)."""
        if not self.server_pid or select.select([self.server_pidfd], [], [], 0)[0]:
            log = "".join(p.read_text() for p in self.server_home.glob("graphdriver/*/*.log"))
            raise RuntimeError(f"the command server is gone: {log[-800:]}")
        fields = Path(f"/proc/{self.server_pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    # ---------------------------------------------------------------------------- unpack

    def unpack(self) -> None:
        self.base()
        for key in [k for k in SETS if k in self.keys]:
            tar = self.tar(key)
            entries, files = data.tar_stats(tar)
            target = AS_FAST_AS_TAR if key != "big1g" else None
            # the apt layer goes on a child of minbase; where the child starts as a copy of
            # it (every driver but overlay), its ~220 whiteouts remove ~1,700 documentation
            # files there, which tar -x into an empty directory would not do: the reference
            # does both, in an unpacked minbase
            on_base = key == "apt" and self.driver != "overlay"
            unzip = TAR_DECOMPRESS.get(key, [])
            ref_name = "rm -rf of what it whites out + GNU tar -x, on minbase" if on_base else (
                f"GNU tar {unzip[0]} -x" if unzip else "GNU tar -x")  # fmt: skip
            figs = self.cli_and_lib(f"apply-diff {key}", ref_name, target)
            srv = self.served_fig(f"apply-diff {key}", figs[0], target) if key in SERVED else None
            pod = None
            if self.podman and key in ("minbase", "small10k"):
                pod = self.fig(f"apply-diff {key} vs podman import",
                               ref_name="podman import (warm root)")  # fmt: skip
            for i in range(self.runs):
                into = self.fs / self.fresh("tar-x-")
                into.mkdir()
                ref = [*GNU_TAR, *unzip, "-C", str(into), "-xf", str(tar)]
                if on_base:
                    run([*GNU_TAR, "-C", str(into), "-xf", str(self.tar("minbase"))])
                    ref = ["sh", "-c", 'cd "$1" && shift && xargs -0 -r rm -rf -- < "$1" && '
                           'shift && exec "$@"', "sh", str(into), str(whited_out(tar, self.fs)),
                           *ref]  # fmt: skip
                layer, again, third = self.fresh("L"), self.fresh("L"), self.fresh("L")
                parent = ["--parent", self.base()] if key == "apt" else []
                for name in (layer, again, third):
                    run([*self.gd, "create", *parent, name])
                ours = self.run_three(
                    i,
                    figs,
                    ref,
                    [*self.gd, "apply-diff", layer, str(tar)],
                    ("apply", again, tar),
                    served=None
                    if srv is None
                    else (srv, [*self.gd, "apply-diff", third, str(tar)]),
                )
                if pod is not None:
                    podman = self.podman_for(key)
                    sync()
                    pod.add(ours, timed(podman("import", str(tar), "bench:layer")))
                    run(podman("rmi", "-f", "bench:layer"))
                run([*self.gd, "rm", layer, again, third])
                data.rmtree(into)
            piped = self.piped(key, tar) if key in PIPED else []
            for f in [*figs[:2], *([srv] if srv else []), *piped]:
                med = f.value() or 1.0
                f.extra = f"{data.plain_of(tar).stat().st_size / 1e6 / med:.0f} MB/s"
                if files > 1:
                    f.extra += f", {files / med:,.0f} files/s ({entries:,} entries)"

    def piped(self, key: str, tar: Path) -> list[Figure]:
        """apply-diff of *tar* read from a pipe (``cat TAR |``), as a client or an engine hands
        a layer over, beside GNU tar -x reading the same pipe: the library call, and the CLI
        through the command server. From a pipe the entries' data crosses to the sandbox
        inline (``archive.feed``), where from a file the sandbox reads it itself."""
        ref_name = "cat | GNU tar -x"
        lib = self.fig(f"apply-diff {key} from a pipe", "lib", ref_name=f"{ref_name} (process)",
                       target=AS_FAST_AS_TAR)  # fmt: skip
        srv = self.fig(f"apply-diff {key} from a pipe through the command server",
                       ref_name=ref_name, target=AS_FAST_AS_TAR)  # fmt: skip
        cat = ["sh", "-c", 'cat "$0" | exec "$@"', str(tar)]
        order = ("ref", "lib", "srv")
        for i in range(self.runs):
            into = self.fs / self.fresh("tar-x-")
            into.mkdir()
            layer, again = self.fresh("L"), self.fresh("L")
            for name in (layer, again):
                run([*self.gd, "create", name])
            got: dict[str, Run] = {}
            for who in order[i % len(order) :] + order[: i % len(order)]:
                sync()
                if who == "ref":
                    got[who] = timed([*cat, *GNU_TAR, "-C", str(into), "-xf", "-"])
                elif who == "lib":
                    got[who] = lib_op(self.store, "apply-piped", layer, tar, self.driver)
                else:
                    got[who] = self.through_server([*cat, *self.gd, "apply-diff", again])
            lib.add(got["lib"], got["ref"])
            srv.add(got["srv"], got["ref"])
            run([*self.gd, "rm", layer, again])
            data.rmtree(into)
        return [lib, srv]

    # ------------------------------------------------------------------------------ pack

    def pack(self) -> None:
        out = self.fs / "out.tar"
        for key in [k for k in ("minbase", "small10k") if k in self.keys]:
            layer = self.base() if key == "minbase" else self.layer_of("small", key)
            tree = self.fs / f"{key}-tree"
            tree.mkdir()
            run([*GNU_TAR, "-C", str(tree), "-xf", str(self.tar(key))])
            figs = self.cli_and_lib(f"diff {key}", "GNU tar -c (to a file)", AS_FAST_AS_TAR)
            srv = self.served_fig(f"diff {key}", figs[0], AS_FAST_AS_TAR)
            diff = [*self.gd, "diff", layer, "-o", str(out)]
            for i in range(self.runs):
                self.run_three(
                    i,
                    figs,
                    [*GNU_TAR, "-C", str(tree), "-cf", str(out), "."],
                    diff,
                    ("diff", layer, out),
                    after=out.unlink,
                    served=(srv, diff),
                )
            data.rmtree(tree)
        if "small10k" in self.keys:
            self.rewritten(out)
        if "big1g" in self.keys:
            big = self.layer_of(self.fresh("big"), "big1g")
            mem_cli, mem_lib = self.mem("diff big1g (CLI)"), self.mem("diff big1g (library call)")
            for _ in range(min(self.runs, 3)):  # memory, not time: steady
                mem_cli.ours.append(timed([*self.gd, "diff", big, "-o", str(out)], True).rss / 1024)
                out.unlink()
                mem_lib.ours.append(lib_op(self.store, "diff", big, out, self.driver).rss / 1024)
                out.unlink()
            run([*self.gd, "rm", big])

    def rewritten(self, out: Path) -> None:
        """The diff generated from a container layer on the small files whose every file was
        rewritten (as after a build step: no record; overlay reads its upper directory, btrfs
        its generation numbers, vfs compares the trees), beside GNU tar -c of a copy of its
        tree in PAX format without atime and ctime, whose headers then carry the files'
        nanosecond mtimes as ours do (the same bytes give or take the root entry)."""
        layer, tree = self.fresh("rewritten"), self.fs / "rewritten-tree"
        run([*self.gd, "create", "--rw", "--parent", self.layer_of("small", "small10k"), layer])
        root = Path(run([*self.gd, "mount", layer]).strip())
        try:
            for path in sorted(root.rglob("*")):
                if path.is_file() and not path.is_symlink():  # never through a link, as root
                    with open(path, "r+b") as f:
                        f.write(b"rewritten")
            run(["cp", "-a", f"{root}/.", str(tree)])
        finally:
            run([*self.gd, "umount", layer])
        name = "diff of a container layer, every small10k file rewritten"
        figs = self.cli_and_lib(name, "GNU tar -c --format=posix (to a file)", AS_FAST_AS_TAR)
        srv = self.served_fig(name, figs[0], AS_FAST_AS_TAR)
        posix = ["--format=posix", "--pax-option=delete=atime,delete=ctime"]
        diff = [*self.gd, "diff", layer, "-o", str(out)]
        for i in range(self.runs):
            self.run_three(
                i,
                figs,
                [*GNU_TAR, *posix, "-C", str(tree), "-cf", str(out), "."],
                diff,
                ("diff", layer, out),
                after=out.unlink,
                served=(srv, diff),
            )
        data.rmtree(tree)
        run([*self.gd, "rm", layer])

    # ----------------------------------------------------------------------- exact diffs

    def exact(self) -> None:
        """What exact-diff records cost: apply-diff keeping them beside apply-diff without
        (GRAPHDRIVER_TAR_SPLIT=off), the bytes each takes, and the diff of an applied layer
        replayed from its record beside the diff generated from the same layer."""
        off = ["env", "GRAPHDRIVER_TAR_SPLIT=off"]
        out = self.fs / "exact.tar"
        for key in [k for k in ("minbase", "apt", "small10k") if k in self.keys]:
            tar = self.tar(key)
            parent = ["--parent", self.base()] if key == "apt" else []
            fig = self.fig(f"apply-diff {key}, keeping its exact-diff record",
                           ref_name="apply-diff without records", target=RECORD_COST)  # fmt: skip
            dfig = self.fig(f"diff of the applied {key} (its record replayed)",
                            ref_name="diff generated from the layer")  # fmt: skip
            stored: list[int] = []
            for i in range(self.runs):
                kept, plain = self.fresh("X"), self.fresh("Y")
                run([*self.gd, "create", *parent, kept])
                run([*self.gd, "create", *parent, plain])
                ref, ours = both(
                    i,
                    [*off, *self.gd, "apply-diff", plain, str(tar)],
                    [*self.gd, "apply-diff", kept, str(tar)],
                )
                fig.add(ours, ref)
                stored.append(int(in_process(RECORD_SIZE, str(self.store), self.driver, kept)))
                ref, ours = both(
                    i,
                    [*self.gd, "diff", plain, "-o", str(out)],
                    [*self.gd, "diff", kept, "-o", str(out)],
                    after=out.unlink,
                )
                dfig.add(ours, ref)
                run([*self.gd, "rm", kept, plain])
            size = tar.stat().st_size
            per_layer = sorted(stored)[len(stored) // 2]
            fig.extra = (
                f"record {per_layer / 1024:,.0f} KiB per layer, {100 * per_layer / size:.2f}% "
                f"of the {size / 1e6:,.0f} MB tar"
            )

    # ----------------------------------------------------------------------- small change

    def container(self) -> str:
        """c1: a container layer on minbase with 3 files changed (made once)."""
        if not self.has("c1"):
            run([*self.gd, "create", "--rw", "--parent", self.base(), "c1"])
            root = Path(run([*self.gd, "mount", "c1"]).strip())
            (root / "etc" / "hostname").write_text("changed\n")
            (root / "new-file").write_bytes(b"n" * 4096)
            (root / "etc" / "motd").unlink()
            run([*self.gd, "umount", "c1"])
        return "c1"

    def small_change(self) -> None:
        layer = self.container()
        changed = self.fs / "changed"
        (changed / "etc").mkdir(parents=True)
        (changed / "etc" / "hostname").write_text("changed\n")
        (changed / "new-file").write_bytes(b"n" * 4096)
        out, ref_out = self.fs / "small.tar", self.fs / "small-ref.tar"
        ref_name = "tar -c of the changes (to a file)"
        ch = self.fig("changes, 3 files on minbase", ref_name=ref_name)
        df = self.fig("diff, 3 files on minbase", ref_name=ref_name, ref=ch.ref, ref_cpu=ch.ref_cpu)
        for _ in range(self.runs):
            ref = timed([*GNU_TAR, "-C", str(changed), "-cf", str(ref_out), "."])
            ch.add(timed([*self.gd, "changes", layer]), ref)
            df.add(timed([*self.gd, "diff", layer, "-o", str(out)]))
        got = json.loads(in_process(SMALL_CHANGE, str(self.store), self.driver, layer,
                                    str(out), str(self.runs)))  # fmt: skip
        target = CHANGES_MS if self.driver == "btrfs" else None
        lch = self.fig("changes, 3 files on minbase (after one untimed call)", "lib", unit="ms",
                       target=target, ref=ch.ref, ref_cpu=ch.ref_cpu,
                       ref_name="tar -c of the changes (process)")  # fmt: skip
        ldf = self.fig("diff, 3 files on minbase (after one untimed call)", "lib", unit="ms",
                       ref=ch.ref, ref_cpu=ch.ref_cpu,
                       ref_name="tar -c of the changes (process)")  # fmt: skip
        lch.ours, lch.ours_cpu = got["changes"], got["changes_cpu"]
        ldf.ours, ldf.ours_cpu = got["diff"], got["diff_cpu"]
        for path in (out, ref_out):
            path.unlink()
        data.rmtree(changed)
        if self.driver in NATIVE_CHANGES:
            self.installed()

    def installed(self) -> None:
        """changes() of a container layer on minbase into which the apt layer was unpacked
        by GNU tar (~1,500 changes, in dirs minbase fills: /usr/bin, /var/lib/dpkg/info...),
        beside the tree compare of the two mounted trees, in one process (library calls):
        what the driver's own changes save (vfs has none: its changes are that compare)."""
        layer = self.fresh("installed")
        run([*self.gd, "create", "--rw", "--parent", self.base(), layer])
        try:
            root = run([*self.gd, "mount", layer]).strip()
            try:
                run([*GNU_TAR, "-C", root, "-xf", str(self.tar("apt"))])
            finally:
                run([*self.gd, "umount", layer])
            got = json.loads(in_process(CHANGES_VS_WALK, str(self.store), self.driver, layer,
                                        self.base(), str(self.runs)))  # fmt: skip
        finally:
            run([*self.gd, "rm", layer])
        name = "changes, apt's files unpacked in a container layer on minbase"
        walk = "the tree compare of the layer and its parent"
        fig = self.fig(name, "lib", unit="ms", ref_name=walk)
        fig.ours, fig.ours_cpu = got["changes"], got["changes_cpu"]
        fig.ref, fig.ref_cpu = got["walk"], got["walk_cpu"]

    # ---------------------------------------------------------------------------- create

    def create(self) -> None:
        base = self.base()
        pyname = f"python -c pass ({sys.executable})"
        version = self.fig(f"CLI start-up (graphdriver --version){OWN}", ref_name=pyname,
                           target=START_UP, unit="ms")  # fmt: skip
        ls = self.fig(f"CLI start-up (graphdriver ls){OWN}", ref_name=pyname, unit="ms",
                      target=START_UP, ref=version.ref, ref_cpu=version.ref_cpu)  # fmt: skip
        served = [self.fig(f"CLI start-up through the command server (graphdriver {verb})",
                           ref_name=pyname, target=START_UP, unit="ms", ref=version.ref,
                           ref_cpu=version.ref_cpu) for verb in ("--version", "ls")]  # fmt: skip
        for _ in range(self.runs):
            version.add(timed([*GD, "--version"]), timed([sys.executable, "-c", "pass"]))
            served[0].add(self.through_server([*GD, "--version"]))
            ls.add(timed([*self.gd, "ls"]))
            served[1].add(self.through_server([*self.gd, "ls"]))
        first = self.fig("CLI start-up, a first command that starts the command server "
                         "(graphdriver --version)", ref_name=pyname, unit="ms", ref=version.ref,
                         ref_cpu=version.ref_cpu)  # fmt: skip
        for _ in range(self.runs):
            first.add(self.first_command())
        self.many_layers(base)
        run([*self.gd, "create", "empty"])
        empty = self.fig("create empty layer", unit="ms")
        child = self.fig("create child of minbase", ref_name="child of an empty layer", unit="ms",
                         target=None if self.driver == "vfs" else PARENT_SIZE)  # fmt: skip
        for _ in range(self.runs):
            a, b, c = self.fresh("e"), self.fresh("ce"), self.fresh("cb")
            empty.add(timed([*self.gd, "create", a]))
            child.add(timed([*self.gd, "create", "--parent", base, c]),
                      timed([*self.gd, "create", "--parent", "empty", b]))  # fmt: skip
            run([*self.gd, "rm", a, b, c])
        run([*self.gd, "rm", "empty"])

    def many_layers(self, layer: str) -> None:
        """What a store's size adds to every command: ``inspect`` of one layer, served, in
        the bench's store and with MANY more layers in it (an open reads the records in flight
        or mounted, not every one: this stays near 1x unless that changes). Not interleaved:
        the reference runs come first, then the runs with the layers, which take seconds to
        make and remove, synced first."""
        fig = self.fig(f"inspect through the command server, {MANY:,} more layers in the store",
                       unit="ms", ref_name="the same in the bench's store")  # fmt: skip
        inspect = [*self.gd, "inspect", layer]
        refs = [self.through_server(inspect) for _ in range(self.runs)]
        in_process(MANY_LAYERS, str(self.store), self.driver, "create", str(MANY))
        sync()  # their writeback was in the runs' time: 1.65x on overlay in a full run, 0.97x alone
        try:
            for ref in refs:
                fig.add(self.through_server(inspect), ref)
        finally:
            in_process(MANY_LAYERS, str(self.store), self.driver, "remove", str(MANY))

    # ----------------------------------------------------------------------------- mount

    def mounts(self) -> None:
        layer = self.container()
        ours = [*self.gd, "mount", layer], [*self.gd, "umount", layer]
        for cmd in ours:  # warm: the first mount after a create pays more, on both sides
            run(cmd)
        cli = self.fig(f"mount + umount{OWN}", unit="ms", ref_name="-")
        pod = None
        if self.podman:
            podman = self.podman_for("minbase")
            run(podman("import", str(self.tar("minbase")), "bench:mount"))
            theirs = (
                podman("image", "mount", "bench:mount"),
                podman("image", "umount", "bench:mount"),
            )
            for cmd in theirs:
                run(cmd)
            pod = self.fig(f"mount + umount vs podman{OWN}", unit="ms", target=MOUNT_VS_PODMAN,
                           ref_name="podman image mount + umount (warm store)")  # fmt: skip
            served = self.fig("mount + umount through the command server vs podman", unit="ms",
                              target=MOUNT_VS_PODMAN, ref_name=pod.ref_name)  # fmt: skip
        for i in range(self.runs):
            got: dict[str, Run] = {}
            order = ("ours", "srv", "theirs") if pod is not None else ("ours",)
            for who in order[i % len(order) :] + order[: i % len(order)]:
                if who == "ours":
                    got[who] = plus(timed(ours[0]), timed(ours[1]))
                elif who == "srv":
                    got[who] = plus(self.through_server(ours[0]), self.through_server(ours[1]))
                elif pod is not None:
                    got[who] = plus(timed(theirs[0]), timed(theirs[1]))
            cli.add(got["ours"])
            if pod is not None:
                pod.add(got["ours"], got["theirs"])
                served.add(got["srv"], got["theirs"])
        if self.driver == "overlay":
            self.raw_mounts(layer, cli)

    @contextlib.contextmanager
    def command_server(self) -> Iterator[None]:
        """The command server a graphdriver command starts where GRAPHDRIVER_SOCKET is unset,
        in a runtime directory of this run's, for the figures through it; stopped after."""
        self.server_home = Path(tempfile.mkdtemp(prefix="gd-bench-", dir="/tmp"))  # a short path
        try:
            self.start_server()
            yield
        finally:
            self.stop_server()
            shutil.rmtree(self.server_home, ignore_errors=True)

    def auto_env(self) -> dict[str, str]:
        """The environment of a command as a user runs it: GRAPHDRIVER_SOCKET unset."""
        env = {k: v for k, v in os.environ.items() if k != "GRAPHDRIVER_SOCKET"}
        return {**env, "XDG_RUNTIME_DIR": str(self.server_home)}

    def start_server(self) -> Run:
        """Run a first command, which starts the command server (no lock left: not within
        the pause between starts), and wait for it to serve; that command's run. The timed
        commands name its socket (``through_server``)."""
        home = self.server_home / "graphdriver" / "commands"
        for old in [*home.glob("*.lock"), *home.glob("*.sock")]:  # (a server killed)
            old.unlink()
        first = timed([*GD, "--version"], env=self.auto_env())
        deadline = time.monotonic() + 60
        while not (socks := list(home.glob("*.sock"))) or not (
            pid := Path(f"{socks[0]}.lock").read_text().strip()
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("no graphdriver command started a command server")
            time.sleep(0.05)
        self.server_pid, self.server_pidfd = int(pid), os.pidfd_open(int(pid))
        self.served_env = {**os.environ, "GRAPHDRIVER_SOCKET": str(socks[0])}
        return first

    def stop_server(self) -> None:
        """Stop the command server (and any other that a command started in this run's
        runtime directory: one still starting when a start timed out)."""
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
        for pid in pids:
            with contextlib.suppress(OSError):
                line = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"serve\0commands" in line and str(self.server_home).encode() in line:
                    os.kill(pid, signal.SIGTERM)
        if self.server_pid:
            if not select.select([self.server_pidfd], [], [], 30)[0]:
                signal.pidfd_send_signal(self.server_pidfd, signal.SIGKILL)
                select.select([self.server_pidfd], [], [], 30)
            os.close(self.server_pidfd)
        self.server_pid = 0

    def first_command(self) -> Run:
        """``graphdriver --version`` as the first command: none serves, it starts the server
        (which then serves the figures after it)."""
        self.stop_server()
        return self.start_server()

    def raw_mounts(self, layer: str, cli: Figure) -> None:
        """overlay: the same mount by mount(8) and by mount(2) in one process."""
        home = self.store / "overlay"
        target = self.fs / "raw-merged"
        target.mkdir(exist_ok=True)
        opts = (f"lowerdir={home / 'base' / 'diff'},upperdir={home / layer / 'diff'},"
                f"workdir={home / layer / 'work'}")  # fmt: skip
        raw = self.fig("mount + umount vs mount(8)", unit="ms", target=MOUNT_VS_RAW,
                       ref_name="mount -t overlay + umount (commands)")  # fmt: skip
        raw.ours, raw.ours_cpu = cli.ours, cli.ours_cpu
        for _ in range(self.runs):
            got = plus(timed(["mount", "-t", "overlay", "overlay", "-o", opts, str(target)]),
                       timed(["umount", str(target)]))  # fmt: skip
            raw.ref.append(got.wall)
            raw.ref_cpu.append(got.cpu)
        lib = self.fig("get + put", "lib", ref_name="mount(2) + umount2(2)", target=MOUNT_VS_RAW,
                       unit="ms")  # fmt: skip
        got_lib = json.loads(in_process(MOUNT, str(self.store), layer, str(self.runs), opts,
                                        str(target)))  # fmt: skip
        lib.ours, lib.ref = got_lib["lib"], got_lib["raw"]
        lib.ours_cpu, lib.ref_cpu = got_lib["lib_cpu"], got_lib["raw_cpu"]

    # ------------------------------------------------------------------------ deep chain

    def deep_read(self) -> None:
        got = json.loads(in_process(DEEP_READ, str(self.store), self.driver, str(DEPTH),
                                    str(self.runs)))  # fmt: skip
        fig = self.fig(f"read 1 MiB at the bottom of a {DEPTH}-deep chain", "lib",
                       ref_name="the same read in the bottom layer", unit="ms")  # fmt: skip
        fig.ours, fig.ref = got["deep"], got["direct"]
        mnt = self.fig(f"get + put of the top of a {DEPTH}-deep chain", "lib", unit="ms")
        mnt.ours = got["mount"]

    # ---------------------------------------------------------------------------- engines

    def containerd(self) -> None:
        """graphdriver as containerd's proxy snapshotter beside containerd's overlayfs, on
        this filesystem (its own store and containerd root; see bench_containerd.py)."""
        if (self.driver, self.fstype) != ("overlay", "xfs"):
            return
        import bench_containerd  # grpcio, only for this step

        self.engine("containerd", bench_containerd, bench_containerd.containerd_engine)

    def docker(self) -> None:
        """graphdriver as dockerd's GraphDriver plugin beside dockerd's overlay2, on this
        filesystem (its own store and data-roots; see bench_docker.py)."""
        if (self.driver, self.fstype) != ("overlay", "xfs"):
            return
        import bench_docker

        self.engine("docker", bench_docker, bench_docker.engine)

    def engine(self, name: str, module: object, tools: object) -> None:
        lacking = tools.missing_tools()  # type: ignore[attr-defined]
        if lacking is not None:
            print(f"bench: {name} step skipped: needs {lacking}", file=sys.stderr)
            return
        measured, _ = module.measure(self.fs, self.runs)  # type: ignore[attr-defined]
        for m in measured:
            fig = self.fig(f"{name}: {m.name}", "engine", ref_name=m.ref_name, unit="ms")
            fig.ours, fig.ref = m.ours, m.ref

    def cleanup(self) -> None:
        for pod in self.pods.values():
            pod.destroy()
        subprocess.run([*self.gd, "cleanup"], capture_output=True)


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
        f"- Python {platform.python_version()} ({sys.executable}); {first([*GD, '--version'])} "
        f"(`{' '.join(GD)}`); {first(['tar', '--version'])}; {first(['podman', '--version'])}",
    ]


def engines_section(results: list[tuple[str, Bench | str]], out: Path) -> list[str]:
    """Where the containerd and docker figures are: in this run, or the last recorded ones."""
    ran = {f.name.split(":")[0] for _, b in results if isinstance(b, Bench) for f in b.figs
           if f.table == "engine"}  # fmt: skip
    lines = []
    for name in ("containerd", "docker"):
        if name in ran:
            lines.append(f"- {name}: measured in this run (overlay on xfs, table below)")
        else:
            link = recorded(out, name) or "none recorded"
            lines.append(f"- {name}: not measured in this run; latest recorded results: {link}")
    return ["## Container engines", "", *lines, ""]


def report(results: list[tuple[str, Bench | str]], sets: dict, args: argparse.Namespace,  # type: ignore[type-arg]
           took: float, load: str) -> str:  # fmt: skip
    today = datetime.date.today().isoformat()
    figs = {t: b.figs for t, b in results if isinstance(b, Bench)}
    lines = [f"# graphdriver benchmarks, {today}", "", *machine()]
    for key, (path, what) in sets.items():
        entries, files = data.tar_stats(path)
        lines.append(
            f"- data `{key}`: {what}; {path.stat().st_size / 1e6:.0f} MB "
            f"{'tar' if data.plain_of(path) == path else 'compressed'}, "
            f"{entries:,} entries, {files:,} files"
        )
    lines += [
        f"- {args.runs} runs per figure, reference and ours interleaved: median (min..max), "
        "seconds unless marked ms; CPU ratio: user+sys CPU time of ours (its children included) "
        "over the reference's",
        f"- command: `bash bench/run {' '.join(sys.argv[1:])}` (whole run {took / 60:.1f} min; "
        f"load average {load})",
        "",
        *misses(figs),
        *engines_section(results, args.out),
    ]
    for title, bench in results:
        lines += [f"## {title}", ""]
        if isinstance(bench, str):
            lines += [f"Not run: {bench}", ""]
            continue
        steps = ", ".join(f"{k} {v:.0f} s" for k, v in bench.took.items())
        lines += [f"Steps: {steps}.", ""]
        for kind in ("lib", "cli", "engine", "mem"):
            lines += table(bench.figs, kind)
    return "\n".join(lines)


def main() -> None:
    # the CLI figures are of processes that run their command themselves (no server started),
    # but for those through the command server (Bench.command_server)
    os.environ["GRAPHDRIVER_SOCKET"] = ""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per figure (default 5)")
    ap.add_argument("--only", default=None,
                    help="comma list of driver/fs: vfs/ext4, overlay/xfs, btrfs/btrfs, "
                    "overlay/ext4 (default: all but overlay/ext4)")  # fmt: skip
    ap.add_argument("--steps", default=None,
                    help=f"comma list of steps ({','.join(STEPS)}); default all; the base "
                    "layer and container layer they share are made when needed")  # fmt: skip
    ap.add_argument(
        "--sets",
        default=None,
        help=f"comma list of data sets for unpack, pack and exact ({','.join(SETS)})",
    )
    ap.add_argument("--no-podman", action="store_true", help="leave podman's figures out")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                    help="where the report goes (default bench/results)")  # fmt: skip
    ap.add_argument("--chart", type=Path, default=None, help="redraw the PNG of a results JSON")
    args = ap.parse_args()
    if args.chart is not None:
        saved = json.loads(args.chart.read_text())
        chart(saved["ratios"], saved.get("targets", {}), args.chart.with_suffix(".png"),
              saved["title"])  # fmt: skip
        return
    if os.geteuid() != 0:
        sys.exit("bench: needs root (loop devices and mounts)")
    start, load = time.perf_counter(), f"{os.getloadavg()[0]:.2f}"
    sets = data.all_data()
    configs = CONFIGS
    if args.only:
        wanted = set(args.only.split(","))
        configs = [c for c in CONFIGS + MORE_CONFIGS if f"{c[0]}/{c[1]}" in wanted]
    steps = args.steps.split(",") if args.steps else list(STEPS)
    keys = args.sets.split(",") if args.sets else list(SETS)
    results: list[tuple[str, Bench | str]] = []
    for driver, fstype in configs:
        title = f"{driver} on {fstype}"
        print(f"bench: {title}", file=sys.stderr)
        with backing_for(fstype) as fs:
            bench = Bench(driver, fstype, fs, args.runs, sets, keys)
            bench.podman = bench.podman and not args.no_podman
            try:
                with bench.command_server():
                    for step in [s for s in STEPS if s in steps]:
                        print(f"bench: {title}: {step}", file=sys.stderr)
                        began = time.perf_counter()
                        getattr(bench, step)()
                        bench.took[step] = time.perf_counter() - began
            finally:
                bench.cleanup()
                unmount_all_under(fs / "store")
        results.append((title, bench))
    if not args.only or "devmapper" in args.only:
        results.append(("devmapper", devmapper_here()))
    if podman_ok() is not None:
        results.append(("podman", str(podman_ok())))
    took = time.perf_counter() - start
    load += f" before, {os.getloadavg()[0]:.2f} after"
    write(results, sets, args, took, load)


def write(results: list[tuple[str, Bench | str]], sets: dict, args: argparse.Namespace,  # type: ignore[type-arg]
          took: float, load: str) -> None:  # fmt: skip
    """results/<date>[-partial].md, .json (every run) and .png."""
    text = report(results, sets, args, took, load)
    partial = args.only or args.steps or args.sets or args.no_podman
    name = datetime.date.today().isoformat() + ("-partial" if partial else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text(text + f"\n![ratios to the references]({name}.png)\n")
    title = f"graphdriver vs references, {name}"
    benches = [(t, b) for t, b in results if isinstance(b, Bench)]
    ratios = {t: chart_ratios(b.figs) for t, b in benches}
    targets = {f.key: f.target.limit for _, b in benches for f in b.figs
               if f.target and not f.target.absolute}  # fmt: skip
    targets.update({f"{f.key} / target": 1.0 for _, b in benches for f in b.figs
                    if f.target and f.target.absolute})  # fmt: skip
    raw = {t: {f.key: {"ours": f.ours, "ref": f.ref, "ours_cpu": f.ours_cpu, "ref_cpu": f.ref_cpu,
                       "ref_name": f.ref_name, "unit": f.unit,
                       "target": f.target.text(f.unit) if f.target else None}
               for f in b.figs} for t, b in benches}  # fmt: skip
    (args.out / f"{name}.json").write_text(
        json.dumps({"title": title, "ratios": ratios, "targets": targets, "runs": raw}, indent=1)
    )
    chart(ratios, targets, args.out / f"{name}.png", title)
    print(text)
    print(f"bench: wrote {args.out / name}.md, .json, .png", file=sys.stderr)


def chart_ratios(figs: list[Figure]) -> dict[str, float | None]:
    """Each figure's ratio to its reference; a figure with an absolute target also as its
    value over the target (key "<key> / target")."""
    got = {f.key: f.ratio() for f in figs}
    for f in figs:
        value = f.value()
        if f.target and f.target.absolute and value is not None:
            got[f"{f.key} / target"] = value * (1e3 if f.unit == "ms" else 1) / f.target.limit
    return got


def devmapper_here() -> str:
    if device_mapper_missing() is None:
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
