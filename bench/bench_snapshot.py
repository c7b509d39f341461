"""Creating a child of a small and of a large parent: btrfs and overlay against vfs.

    uv run --locked python bench/bench_snapshot.py [--runs 5] [--drivers btrfs,vfs,overlay]
    vm/run -- .venv/bin/python bench/bench_snapshot.py --drivers devmapper,overlay --large 20000

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


def measure(
    root: Path, driver: str, runs: int, large: int, options: dict[str, str] | None = None
) -> dict[int, list[float]]:
    store = open_store(root, driver, options)
    result = {}
    for count in (1_000, large):
        parent = f"p{count}"
        store.create(parent)
        store.apply(parent, io.BytesIO(files_tar(count)))
        result[count] = child_times(store, parent, runs)
    store.cleanup()
    store.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--drivers", default="btrfs,vfs,overlay")
    ap.add_argument("--large", type=int, default=100_000, help="files in the large parent")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root (loop devices and mounts)")
    drivers = args.drivers.split(",")
    results = {}
    with loop_filesystem("btrfs", size=8 << 30) as fs:
        if "btrfs" in drivers:
            results["btrfs"] = measure(fs.root / "btrfs", "btrfs", args.runs, args.large)
        if "vfs" in drivers:
            results["vfs (on btrfs, reflinks)"] = measure(
                fs.root / "vfs", "vfs", args.runs, args.large
            )
    with loop_filesystem("xfs", size=8 << 30) as fs:
        if "overlay" in drivers:
            results["overlay (on xfs)"] = measure(
                fs.root / "overlay", "overlay", args.runs, args.large
            )
        if "devmapper" in drivers:  # a loop-backed pool, files on the same xfs
            results["devmapper (loop pool, ext4 1G base)"] = measure(
                fs.root / "devmapper",
                "devmapper",
                args.runs,
                args.large,
                {"dm.loopdatasize": "6G", "dm.loopmetadatasize": "128M", "dm.basesize": "1G"},
            )
    today = datetime.date.today().isoformat()
    lines = [
        f"# Child creation against the parent's size, {today}",
        "",
        f"- machine: {platform.node()}, {os.cpu_count()} cores, kernel {platform.release()}, "
        f"Python {platform.python_version()}",
        f"- runs: {args.runs}; milliseconds as median (min..max) of LayerStore.create",
        f"- command: `{'vm/run --share bench/results -- ' if _in_guest() else ''}"
        f"python bench/bench_snapshot.py {' '.join(sys.argv[1:])}`",
        "",
        f"- kernel {platform.release()}{' (qemu guest, vm/run)' if _in_guest() else ''}",
        "",
        f"| driver | parent of 1,000 files | parent of {args.large:,} files | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for driver, by_count in results.items():
        small, large = by_count[1_000], by_count[args.large]
        ratio = statistics.median(large) / statistics.median(small)
        target = "" if driver.startswith("vfs") else "<= 1.5x"
        lines.append(f"| {driver} | {_fmt(small)} | {_fmt(large)} | {ratio:.2f}x | {target} |")
    report = "\n".join([*lines, ""])
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    where = "-guest" if _in_guest() else ""
    (args.out / f"{today}-snapshot-vs-parent-size{where}.md").write_text(report)


def _in_guest() -> bool:
    return Path("/gdvm-run").is_dir()


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.1f} ({min(xs) * 1000:.1f}..{max(xs) * 1000:.1f})"


if __name__ == "__main__":
    main()
