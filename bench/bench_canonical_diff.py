"""Diff time of 20,000-file changes on overlay (loop xfs) and vfs (loop ext4), as root.

Run it on two checkouts to compare them (issue #13, canonical diffs): the figure is the best
of 5 whole ``diff`` streams, read and hashed, per kind of change. ``python
bench/bench_canonical_diff.py LABEL``; results in ``results/2026-11-30-canonical-diff.md``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from graphdriver import LayerStore, open_store
from graphdriver.testing.backings import loop_filesystem

DIRS, PER_DIR = 100, 200  # 20,000 files of 2 KiB


def _files(r: Path) -> list[Path]:
    return [r / f"d{d}" / f"f{f}" for d in range(DIRS) for f in range(PER_DIR)]


def base(r: Path) -> None:
    for d in range(DIRS):
        (r / f"d{d}").mkdir()
    for p in _files(r):
        p.write_bytes(b"x" * 2048)


def rewrite(r: Path) -> None:
    """A usual build step: new content, new mtimes."""
    for p in _files(r):
        p.write_bytes(b"z" * 2048)


def rewrite_same_mtime(r: Path) -> None:
    """The worst case for the compare: equal metadata, so the content is read on both sides."""
    for p in _files(r):
        st = os.stat(p)
        p.write_bytes(b"y" * 2048)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def rm_rf_recreate(r: Path) -> None:
    """Every directory deleted and made again with half its names: opaque dirs on overlay."""
    for d in range(DIRS):
        shutil.rmtree(r / f"d{d}")
        (r / f"d{d}").mkdir()
        for f in range(0, PER_DIR, 2):
            (r / f"d{d}" / f"f{f}").write_bytes(b"w" * 2048)


CASES: dict[str, Callable[[Path], None]] = {
    "rewrite": rewrite,
    "rewrite-same-mtime": rewrite_same_mtime,
    "rm-rf-recreate": rm_rf_recreate,
}


def best_diff(store: LayerStore, layer: str) -> tuple[float, float, int]:
    """Best wall and CPU seconds (this process, every thread) of 5 diffs, and the tar's size.
    CPU time is the steadier figure on a shared machine."""
    wall = cpu = float("inf")
    size = 0
    for _ in range(5):
        start, start_cpu = time.perf_counter(), time.process_time()
        digest, size = hashlib.sha256(), 0
        with store.diff(layer) as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu, size


def main(label: str) -> None:
    for driver, fstype in (("overlay", "xfs"), ("vfs", "ext4")):
        with loop_filesystem(fstype, size=8 << 30) as backing:
            store = open_store(backing.root / "store", driver, dict(backing.options))
            try:
                store.create("base")
                with store.mounted("base") as root:
                    base(root)
                for name, change in CASES.items():
                    store.create(name, "base")
                    with store.mounted(name) as root:
                        change(root)
                    wall, cpu, size = best_diff(store, name)
                    figures = f"{wall:.2f} s, cpu {cpu:.2f} s, {size} B"
                    print(f"{label} {driver}/{fstype} {name}: {figures}")
            finally:
                store.cleanup()
                store.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run")
