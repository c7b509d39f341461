"""apply-diff and diff of a driver against GNU tar, side by side on one loop filesystem.

    uv run --locked python bench/bench_core.py [--driver vfs] [--runs 5] [--out bench/results]

Data: a Debian minimal root filesystem (debootstrap --variant=minbase, from the Debian archive)
packed as a layer tar, cached under /var/tmp/graphdriver-bench; if debootstrap cannot run, a tar
of this host's /usr stands in (the report says which). Plus a synthetic 1 GiB layer for peak
memory. Each figure is the median over --runs interleaved runs with its spread (min..max), and
the ratio of medians to the reference (GNU tar) measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import figures

from graphdriver.testing.backings import loop_filesystem

CACHE = Path("/var/tmp/graphdriver-bench")
#: the console script a user runs (the venv's), else the module
_SCRIPT = Path(sys.executable).parent / "graphdriver"
GD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "graphdriver"]
#: GNU tar keeping what graphdriver keeps (owners by number, xattrs), for a fair comparison
GNU_TAR = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*"]


def rootfs_tar() -> tuple[Path, str]:
    """A real root filesystem as a layer tar, built once and cached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / "debian-minbase.tar"
    if out.exists():
        return out, "Debian bookworm minbase (debootstrap)"
    root = CACHE / "minbase"
    if shutil.which("debootstrap"):
        shutil.rmtree(root, ignore_errors=True)
        proc = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "bookworm",
                str(root),
                "http://deb.debian.org/debian",
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode == 0:
            subprocess.run([*GNU_TAR, "-C", str(root), "-cf", str(out), "."], check=True)
            shutil.rmtree(root)
            return out, "Debian bookworm minbase (debootstrap)"
        print(
            "debootstrap failed, using this host's /usr instead:",
            proc.stderr[-300:],
            file=sys.stderr,
        )
    fallback = CACHE / "host-usr.tar"
    if not fallback.exists():
        subprocess.run(
            [
                "tar",
                "--numeric-owner",
                "-C",
                "/",
                "-cf",
                str(fallback),
                "usr/lib",
                "usr/share",
                "usr/bin",
            ],
            check=False,
        )
    return fallback, "this host's /usr/{lib,share,bin}"


def big_tar() -> Path:
    """1 GiB of file data in 256 files of 4 MiB: for peak memory against layer size."""
    out = CACHE / "synthetic-1g.tar"
    if out.exists():
        return out
    block = os.urandom(4 << 20)
    with tarfile.open(out, "w") as tf:
        for i in range(256):
            info = tarfile.TarInfo(f"data/{i:03d}.bin")
            info.size = len(block)
            import io

            tf.addfile(info, io.BytesIO(block[i:] + block[:i]))
    return out


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB, the largest process of the command) of *cmd*."""
    got = figures.timed(cmd, rss=True)
    return got.wall, got.rss


LIB_OP = """
import io, json, os, subprocess, sys, tarfile, time
from figures import cpu_now, peak_rss
from graphdriver import open_store
store = open_store(sys.argv[1], sys.argv[5])
# untimed: one-file layers applied from a file and diffed, with and without an exact-diff record,
# so that the archive engine's modules (imported on first use) are loaded before the clock
# starts, as in a server that applies many layers
warm_tar = os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), "lib-warm-up.tar")
asked = os.environ.get("GRAPHDRIVER_TAR_SPLIT")
with tarfile.open(warm_tar, "w") as tf:
    info = tarfile.TarInfo("warm-up")
    info.size = 1
    tf.addfile(info, io.BytesIO(b"x"))
for record in ("on", "off"):
    os.environ["GRAPHDRIVER_TAR_SPLIT"] = record
    store.create("bench-warm-up", None)
    with open(warm_tar, "rb") as f:
        store.apply("bench-warm-up", f)
    with open(os.devnull, "wb") as f:
        store.write_diff("bench-warm-up", f)
    store.remove("bench-warm-up")
os.unlink(warm_tar)
os.environ.pop("GRAPHDRIVER_TAR_SPLIT")
if asked is not None:
    os.environ["GRAPHDRIVER_TAR_SPLIT"] = asked
c, t = cpu_now(), time.perf_counter()
if sys.argv[2] == "apply":
    with open(sys.argv[4], "rb") as f:
        store.apply(sys.argv[3], f)
elif sys.argv[2] == "apply-piped":  # the tar through a pipe from cat, as from a client or engine
    cat = subprocess.Popen(["cat", sys.argv[4]], stdout=subprocess.PIPE)
    with cat:
        store.apply(sys.argv[3], cat.stdout)
else:
    with open(sys.argv[4], "wb") as f:
        store.write_diff(sys.argv[3], f)
t, c = time.perf_counter() - t, cpu_now() - c
store.close()
print(json.dumps({"s": t, "cpu": c, "rss": peak_rss()}))
"""


def in_process(script: str, *args: str) -> str:
    """stdout of a Python *script* run by this interpreter, with bench/ on its path (under GNU
    time, so that its own peak RSS does not start at this process's; see figures.TIME)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    argv = [figures.TIME, "-o", os.devnull, sys.executable, "-c", script, *args]
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"in-process benchmark failed: {out.stderr[-800:]}")
    return out.stdout


def lib_op(store: Path, op: str, layer: str, path: Path, driver: str) -> figures.Run:
    """The library call alone, without the interpreter's start-up: wall and CPU seconds of the
    call (its children included), and the process's peak RSS in KiB (interpreter included)."""
    got = json.loads(in_process(LIB_OP, str(store), op, layer, str(path), driver))
    return figures.Run(got["s"], got["cpu"], got["rss"])


def stats(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}..{max(xs):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--driver", default="vfs")
    ap.add_argument("--fs", default=None, help="ext4 (default), xfs or btrfs (default for btrfs)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root (loop devices and mounts)")
    tar, what = rootfs_tar()
    big = big_tar()
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
    files = sum(1 for m in members if m.isfile())
    size_mb = tar.stat().st_size / 1e6
    rows: dict[str, list[float]] = {
        k: [] for k in ("tar -x", "apply-diff", "tar -c", "diff", "apply lib", "diff lib")
    }
    rss: dict[str, list[int]] = {k: [] for k in ("apply-diff", "diff", "apply-diff 1G", "diff 1G")}
    fstype = args.fs or ("btrfs" if args.driver == "btrfs" else "ext4")
    with loop_filesystem(fstype, size=16 << 30) as backing:
        fs = backing.root
        store = fs / "store"
        gd = [*GD, "--root", str(store), "--driver", args.driver]
        for run in range(args.runs):
            # unpack: GNU tar into a plain directory vs apply-diff into a fresh layer
            target = fs / f"tar-x-{run}"
            target.mkdir()
            subprocess.run(["sync"], check=True)
            t, _ = timed([*GNU_TAR, "-C", str(target), "-xf", str(tar)])
            rows["tar -x"].append(t)
            layer = f"layer{run}"
            subprocess.run([*gd, "create", layer], check=True, capture_output=True)
            subprocess.run(["sync"], check=True)
            t, m = timed([*gd, "apply-diff", layer, str(tar)])
            rows["apply-diff"].append(t)
            rss["apply-diff"].append(m)
            # pack: GNU tar of the unpacked tree vs diff of the layer, both to a file on fs
            out = fs / "out.tar"
            subprocess.run(["sync"], check=True)
            t, _ = timed([*GNU_TAR, "-C", str(target), "-cf", str(out), "."])
            rows["tar -c"].append(t)
            out.unlink()
            subprocess.run(["sync"], check=True)
            t, m = timed([*gd, "diff", layer, "-o", str(out)])
            rows["diff"].append(t)
            rss["diff"].append(m)
            out.unlink()
            subprocess.run(["sync"], check=True)
            rows["diff lib"].append(lib_op(store, "diff", layer, out, args.driver).wall)
            out.unlink()
            subprocess.run([*gd, "create", layer + "-lib"], check=True, capture_output=True)
            subprocess.run(["sync"], check=True)
            rows["apply lib"].append(lib_op(store, "apply", layer + "-lib", tar, args.driver).wall)
            shutil.rmtree(target)
            subprocess.run([*gd, "rm", layer, layer + "-lib"], check=True)
        for run in range(2):
            layer = f"big{run}"
            subprocess.run([*gd, "create", layer], check=True, capture_output=True)
            _, m = timed([*gd, "apply-diff", layer, str(big)])
            rss["apply-diff 1G"].append(m)
            out = fs / "big-out.tar"
            _, m = timed([*gd, "diff", layer, "-o", str(out)])
            rss["diff 1G"].append(m)
            out.unlink()
            subprocess.run([*gd, "rm", layer], check=True)
    ratio_x = statistics.median(rows["apply-diff"]) / statistics.median(rows["tar -x"])
    ratio_c = statistics.median(rows["diff"]) / statistics.median(rows["tar -c"])

    def ratio(ours: str, ref: str) -> str:
        return f"{statistics.median(rows[ours]) / statistics.median(rows[ref]):.2f}x"

    today = datetime.date.today().isoformat()
    gdver = subprocess.run([*GD, "--version"], capture_output=True, text=True).stdout.strip()
    tarver = subprocess.run(
        ["tar", "--version"], capture_output=True, text=True
    ).stdout.splitlines()[0]
    lines = [
        f"# {args.driver} apply-diff and diff against GNU tar, {today}",
        "",
        f"- machine: {platform.node()}, {os.cpu_count()} cores, kernel {platform.release()}, "
        f"Python {platform.python_version()}",
        f"- {gdver}; {tarver}",
        f"- data: {what}: {size_mb:.0f} MB tar, {len(members)} entries, {files} files",
        f"- backing: {fstype} on a sparse file on a loop device; both sides write to it",
        f"- runs: {args.runs}, interleaved; seconds as median (min..max); graphdriver timed as "
        "the whole CLI process (Python start-up included)",
        "- command: `uv run --locked python bench/bench_core.py "
        f"--driver {args.driver} --fs {fstype} --runs {args.runs}`",
        "",
        f"| operation | GNU tar (s) | graphdriver {args.driver} (s) | ratio | target |",
        "|---|---|---|---|---|",
        f"| unpack (tar -x / apply-diff) | {stats(rows['tar -x'])} | "
        f"{stats(rows['apply-diff'])} | {ratio_x:.2f}x | <= 1.5x |",
        f"| pack (tar -c / diff) | {stats(rows['tar -c'])} | {stats(rows['diff'])} | "
        f"{ratio_c:.2f}x | <= 1.5x |",
        f"| unpack, library call only | {stats(rows['tar -x'])} | {stats(rows['apply lib'])} "
        f"| {ratio('apply lib', 'tar -x')} | |",
        f"| pack, library call only | {stats(rows['tar -c'])} | {stats(rows['diff lib'])} "
        f"| {ratio('diff lib', 'tar -c')} | |",
        "",
        "| peak RSS (MiB) | rootfs layer | 1 GiB layer | target |",
        "|---|---|---|---|",
        f"| apply-diff | {max(rss['apply-diff']) / 1024:.0f} | "
        f"{max(rss['apply-diff 1G']) / 1024:.0f} | < 100, flat |",
        f"| diff | {max(rss['diff']) / 1024:.0f} | {max(rss['diff 1G']) / 1024:.0f} | "
        "< 100, flat |",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{today}-{args.driver}-vs-gnu-tar.md").write_text(report)


if __name__ == "__main__":
    main()
