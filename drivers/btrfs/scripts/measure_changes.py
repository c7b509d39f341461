"""Library time of ``changes`` and ``diff`` of a 3-file change on the minbase image, btrfs's
native path (generation numbers) beside the walk of both trees, interleaved.

    uv run --locked python drivers/btrfs/scripts/measure_changes.py [RUNS]

Needs root, loop devices and /var/tmp/graphdriver-bench/debian-minbase.tar (bench/data.py).
Prints CPU (user+sys) and wall medians in ms per call.
"""

from __future__ import annotations

import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from graphdriver import LayerStore, open_store
from graphdriver.archive import tree_changes
from graphdriver.driver import LayerInfo
from graphdriver.testing.backings import loop_filesystem

MINBASE = Path("/var/tmp/graphdriver-bench/debian-minbase.tar")


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def _diff(store: LayerStore, layer: str, out: Path) -> None:
    with store.diff(layer) as stream, open(out, "wb") as f:
        while chunk := stream.read(1 << 20):
            f.write(chunk)


def _change(root: Path) -> None:
    (root / "etc" / "hostname").write_text("changed\n")
    (root / "new-file").write_bytes(b"n" * 4096)
    (root / "etc" / "motd").unlink()


class _Walking:
    """The driver answers "walk" (the fallback every driver has) for layer *walk* only."""

    def __init__(self, store: LayerStore, walk: str) -> None:
        self.native = store.driver.changes  # type: ignore[attr-defined]
        self.walk = walk
        store.driver.changes = self  # type: ignore[attr-defined]

    def __call__(self, layer: LayerInfo, chain: object) -> object:
        return None if layer.id == self.walk else self.native(layer, chain)


def _figures(store: LayerStore, runs: int, out: Path, which: dict[str, str]) -> None:
    figures: dict[str, list[tuple[float, float]]] = {}
    for i in range(runs + 1):  # the first round warms up and is not counted
        for how, layer in which.items():
            ch = _timed(functools.partial(store.changes, layer))
            df = _timed(functools.partial(_diff, store, layer, out))
            if i:
                figures.setdefault(f"changes {how}", []).append(ch)
                figures.setdefault(f"diff {how}", []).append(df)
    for name, values in figures.items():
        cpu = statistics.median(v[0] for v in values) * 1000
        wall = statistics.median(v[1] for v in values) * 1000
        print(f"{name:28} cpu {cpu:7.1f} ms   wall {wall:7.1f} ms   ({runs} runs)")


def main(runs: int) -> None:
    with loop_filesystem("btrfs", size=2 << 30) as backing:
        store = open_store(backing.root / "store", "btrfs", {})
        try:
            store.create("base")
            with open(MINBASE, "rb") as f:
                store.apply("base", f)
            for layer in ("c1", "c2"):
                store.create_rw(layer, "base")
                with store.mounted(layer) as root:
                    _change(root)
            _Walking(store, "c2")
            out = Path(tempfile.mkdtemp()) / "small.tar"
            print("changes:", [(c.path, c.kind.letter) for c in store.changes("c1")])
            assert store.changes("c1") == store.changes("c2")
            print("a fresh layer (c1 native, c2 walk, interleaved):")
            _figures(store, runs, out, {"native": "c1", "walk": "c2"})
            print("after a read of every directory of c1 (its atimes moved):")
            with store.mounted("c1") as root:
                tree_changes(str(root), None)
            _figures(store, runs, out, {"native, c1 read": "c1", "walk": "c2"})
            out.unlink()
            out.parent.rmdir()
        finally:
            store.cleanup()
            for layer in reversed(store.layers()):
                store.remove(layer)
            store.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
