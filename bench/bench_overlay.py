"""overlay: native against naive diff, and mounting a 128-deep chain against a raw mount.

    uv run --locked python bench/bench_overlay.py [--runs 5] [--out bench/results]

1. A 10,000-file image layer (100 directories of 100 files) and a container layer on top that
   changes one file: `diff` with the native diff (reads the upper dir) against the naive one
   (overlay.native_diff=off: compares the merged trees), both as library calls in one process.
2. A 128-deep chain: LayerStore get+put of the top layer (overlay's mount and umount, classic
   and new mount API) against mount(2)+umount(2) of the very same directories with the
   option string Docker would pass, both in one process; and the `graphdriver mount` +
   `graphdriver umount` commands against `mount -t overlay` + `umount` commands.
Medians over --runs, spread as min..max; ratios are ours over the reference.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from graphdriver import LayerStore, open_store
from graphdriver.linux.mount import mount, unmount
from graphdriver.testing.backings import loop_filesystem

GD = [sys.executable, "-m", "graphdriver"]


def median_spread(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.1f} ({min(xs) * 1000:.1f}..{max(xs) * 1000:.1f})"


def measure(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def ten_thousand_files() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for d in range(100):
            info = tarfile.TarInfo(f"dir{d:03d}")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tf.addfile(info)
            for f in range(100):
                data = f"file {d} {f}\n".encode() * 20
                info = tarfile.TarInfo(f"dir{d:03d}/file{f:03d}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def bench_diff(root: Path, runs: int) -> tuple[list[float], list[float]]:
    native = open_store(root, "overlay")
    native.create("image")
    native.apply("image", io.BytesIO(ten_thousand_files()))
    native.create_rw("container", "image")
    with native.mounted("container") as merged:
        (merged / "dir050" / "file050").write_text("changed")
    naive = open_store(root, "overlay", {"overlay.native_diff": "off"})
    sink = io.BytesIO()

    def diff(store: LayerStore) -> Callable[[], object]:
        def run() -> None:
            sink.seek(0)
            sink.truncate()
            store.write_diff("container", sink)

        return run

    assert [c.path for c in native.changes("container")] == ["/dir050", "/dir050/file050"], (
        native.changes("container")
    )
    assert native.changes("container") == naive.changes("container")
    fast = measure(diff(native), runs)
    slow = measure(diff(naive), runs)
    native.close()
    naive.close()
    return fast, slow


def bench_mount(root: Path, runs: int, api: str) -> tuple[list[float], list[float]]:
    store = open_store(root, "overlay", {"overlay.mount_api": api})
    store.create("c0")
    for i in range(1, 128):
        store.create(f"c{i}", f"c{i - 1}")
    top = "c127"
    ours = measure(lambda: (store.get(top), store.put(top)), runs)
    home = root / "overlay"
    lower = (home / top / "lower").read_text()
    data = f"lowerdir={lower},upperdir={top}/diff,workdir={top}/work,index=off"
    target = home / "raw-merged"
    target.mkdir(exist_ok=True)
    cwd = os.getcwd()
    os.chdir(home)  # the l/ paths are relative to home, as Docker mounts them

    def raw() -> None:
        mount("overlay", target, "overlay", 0, data)
        unmount(target)

    try:
        reference = measure(raw, runs)
    finally:
        os.chdir(cwd)
    store.close()
    return ours, reference


def bench_mount_commands(root: Path, runs: int) -> tuple[list[float], list[float]]:
    gd = [*GD, "--root", str(root), "--driver", "overlay"]
    home = root / "overlay"
    top = "c127"
    lower = (home / top / "lower").read_text()
    data = f"lowerdir={lower},upperdir={top}/diff,workdir={top}/work,index=off"
    target = home / "raw-merged"

    def ours() -> None:
        subprocess.run([*gd, "mount", top], check=True, capture_output=True)
        subprocess.run([*gd, "umount", top], check=True, capture_output=True)

    def raw() -> None:  # from home with the short l/ paths: absolute ones exceed a page
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", data, str(target)], check=True, cwd=home
        )
        subprocess.run(["umount", str(target)], check=True)

    return measure(ours, runs), measure(raw, runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root (loop devices and mounts)")
    with loop_filesystem("xfs", size=8 << 30) as backing:
        fast, slow = bench_diff(backing.root / "diff", args.runs)
        new_ours, new_ref = bench_mount(backing.root / "mount-new", args.runs, "new")
        cl_ours, cl_ref = bench_mount(backing.root / "mount-classic", args.runs, "classic")
        cmd_ours, cmd_ref = bench_mount_commands(backing.root / "mount-classic", args.runs)

    def ratio(a: list[float], b: list[float]) -> str:
        return f"{statistics.median(a) / statistics.median(b):.2f}x"

    today = datetime.date.today().isoformat()
    report = "\n".join(
        [
            f"# overlay: native diff and deep mounts, {today}",
            "",
            f"- machine: {platform.node()}, {os.cpu_count()} cores, kernel {platform.release()}, "
            f"Python {platform.python_version()}; backing: xfs on a loop device",
            f"- runs: {args.runs}; milliseconds as median (min..max)",
            "- command: `uv run --locked python bench/bench_overlay.py`",
            "",
            "| what | graphdriver (ms) | reference (ms) | ratio | target |",
            "|---|---|---|---|---|",
            f"| diff of a 1-file change on a 10,000-file image: native vs naive | "
            f"{median_spread(fast)} | {median_spread(slow)} | "
            f"{statistics.median(slow) / statistics.median(fast):.0f}x faster | >= 20x faster |",
            f"| get+put of a 128-deep chain, new mount API vs mount(2)+umount(2) | "
            f"{median_spread(new_ours)} | {median_spread(new_ref)} | {ratio(new_ours, new_ref)} "
            f"| < 2x |",
            f"| get+put of a 128-deep chain, classic mount vs mount(2)+umount(2) | "
            f"{median_spread(cl_ours)} | {median_spread(cl_ref)} | {ratio(cl_ours, cl_ref)} "
            "| < 2x |",
            f"| `graphdriver mount`+`umount` commands vs `mount -t overlay`+`umount` | "
            f"{median_spread(cmd_ours)} | {median_spread(cmd_ref)} | "
            f"{ratio(cmd_ours, cmd_ref)} | |",
            "",
        ]
    )
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{today}-overlay-diff-and-mount.md").write_text(report)


if __name__ == "__main__":
    main()
