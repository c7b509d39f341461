"""Mount counts against reality, for a driver whose mounts are kernel mounts.

BindDriver keeps each layer as a plain directory and mounts it with a real bind mount, so the
store's recovery paths (a mount that vanished, a mount a dead process left behind) run against
/proc/self/mountinfo, not a mock.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from graphdriver import CreateOpts, Driver, LayerInfo, LayerStore, NotMounted
from graphdriver.linux.mount import MS_BIND, is_mountpoint, mount, unmount, unmount_all_under
from graphdriver.plugins import hooks
from graphdriver.testing import host_lacks


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        host_lacks("needs root for bind mounts", "root")


class BindDriver(Driver):
    name = "bindtest"

    def _dir(self, layer: LayerInfo) -> Path:
        return self.home / "layers" / layer.id

    def _mnt(self, layer: LayerInfo) -> Path:
        return self.home / "mnt" / layer.id

    def create(self, layer: LayerInfo, parent: LayerInfo | None, opts: CreateOpts) -> None:
        self._dir(layer).parent.mkdir(parents=True, exist_ok=True)
        if parent is None:
            self._dir(layer).mkdir(0o755)
        else:
            subprocess.run(["cp", "-a", str(self._dir(parent)), str(self._dir(layer))], check=True)

    def remove(self, layer: LayerInfo) -> None:
        shutil.rmtree(self._dir(layer), ignore_errors=True)

    def mount(self, layer: LayerInfo, chain: Sequence[LayerInfo]) -> Path:
        target = self._mnt(layer)
        target.mkdir(parents=True, exist_ok=True)
        if not is_mountpoint(target):
            mount(str(self._dir(layer)), target, None, MS_BIND)
        return target

    def unmount(self, layer: LayerInfo) -> None:
        unmount(self._mnt(layer))

    def is_mounted(self, layer: LayerInfo) -> bool:
        return is_mountpoint(self._mnt(layer))


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    try:
        yield tmp_path
    finally:
        unmount_all_under(tmp_path)


def _open(root: Path) -> LayerStore:
    return LayerStore(root, BindDriver, {}, hooks())


def test_count_reset_when_the_mount_vanished(root: Path) -> None:
    with _open(root) as a:
        a.create("c")
        path = a.get("c")
        assert is_mountpoint(path)
        unmount(path)  # behind the store's back (a reboot, an admin's umount)
    with _open(root) as b:
        assert b.metadata("c")["mount_count"] == 0
        with pytest.raises(NotMounted):
            b.put("c")
        assert is_mountpoint(b.get("c"))
        b.put("c")
        assert not is_mountpoint(path)


def test_mount_left_by_a_dead_process_is_removed(root: Path) -> None:
    with _open(root) as a:
        a.create("c")
        info = LayerInfo("c", None, False)
        path = a.driver.mount(info, [])  # mounted, but the count was never committed
    assert is_mountpoint(path)
    with _open(root) as b:
        assert not is_mountpoint(path)
        assert b.metadata("c")["mount_count"] == 0
        b.remove("c")


def test_get_remounts_a_counted_mount_that_vanished(root: Path) -> None:
    with _open(root) as s:
        s.create("c")
        path = s.get("c")
        unmount(path)
        assert s.get("c") == path and is_mountpoint(path)
        assert s.metadata("c")["mount_count"] == 2
        s.cleanup()
        assert not is_mountpoint(path)
        assert s.metadata("c")["mount_count"] == 0


def test_real_mount_driver_passes_the_refcount_cases(root: Path) -> None:
    with _open(root) as s:
        s.create("base")
        with s.mounted("base") as p:
            (p / "f").write_text("x")
        s.create("child", "base")
        p1 = s.get("child")
        p2 = s.get("child")
        s.put("child")
        assert p1 == p2 and is_mountpoint(p1) and (p1 / "f").read_text() == "x"
        s.put("child")
        assert not is_mountpoint(p1)
        assert [c.path for c in s.changes("child")] == []
