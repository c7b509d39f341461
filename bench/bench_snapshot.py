"""Creating a child of a small and of a large parent: btrfs and overlay against vfs.

    uv run --locked python bench/bench_snapshot.py [--runs 5] [--out bench/results]

A parent of 1,000 files and one of 100,000 files (a few bytes each, 100 per directory); the
figure is LayerStore.create(child, parent) as a library call, median over --runs. btrfs and
vfs run on one loop-backed btrfs (so vfs copies with reflinks: the walk is what grows), overlay
on a loop-backed xfs. The ratio large/small says whether creation depends on the parent's size.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import sys
import tarfile
import time
from pathlib import Path

from graphdriver import LayerStore, open_store
from graphdriver.testing.backings import loop_filesystem


def files_tar(count: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for d in range(count // 100):
            info = tarfile.TarInfo(f"d{d:04d}")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tf.addfile(info)
            for f in range(100):
                data = b"x%d\n" % f
                info = tarfile.TarInfo(f"d{d:04d}/f{f:03d}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def child_times(store: LayerStore, parent: str, runs: int) -> list[float]:
    out = []
    for i in range(runs):
        t = time.perf_counter()
        store.create(f"{parent}-child{i}", parent)
        out.append(time.perf_counter() - t)
    return out


def measure(root: Path, driver: str, runs: int) -> dict[int, list[float]]:
    store = open_store(root, driver)
    result = {}
    for count in (1_000, 100_000):
        parent = f"p{count}"
        store.create(parent)
        store.apply(parent, io.BytesIO(files_tar(count)))
        result[count] = child_times(store, parent, runs)
    store.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root (loop devices and mounts)")
    results = {}
    with loop_filesystem("btrfs", size=8 << 30) as fs:
        results["btrfs"] = measure(fs.root / "btrfs", "btrfs", args.runs)
        results["vfs (on btrfs, reflinks)"] = measure(fs.root / "vfs", "vfs", args.runs)
    with loop_filesystem("xfs", size=8 << 30) as fs:
        results["overlay (on xfs)"] = measure(fs.root / "overlay", "overlay", args.runs)
    today = datetime.date.today().isoformat()
    lines = [
        f"# Child creation against the parent's size, {today}",
        "",
        f"- machine: {platform.node()}, {os.cpu_count()} cores, kernel {platform.release()}, "
        f"Python {platform.python_version()}",
        f"- runs: {args.runs}; milliseconds as median (min..max) of LayerStore.create",
        "- command: `uv run --locked python bench/bench_snapshot.py`",
        "",
        "| driver | parent of 1,000 files | parent of 100,000 files | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for driver, by_count in results.items():
        small, large = by_count[1_000], by_count[100_000]
        ratio = statistics.median(large) / statistics.median(small)
        target = "" if driver.startswith("vfs") else "<= 1.5x"
        lines.append(f"| {driver} | {_fmt(small)} | {_fmt(large)} | {ratio:.2f}x | {target} |")
    report = "\n".join([*lines, ""])
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{today}-snapshot-vs-parent-size.md").write_text(report)


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.1f} ({min(xs) * 1000:.1f}..{max(xs) * 1000:.1f})"


if __name__ == "__main__":
    main()
