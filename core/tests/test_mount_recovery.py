"""Mount counts against reality, for a driver whose mounts are kernel mounts.

BindDriver keeps each layer as a plain directory and mounts it with a real bind mount, so the
store's recovery paths (a mount that vanished, a mount a dead process left behind) run against
/proc/self/mountinfo, not a mock.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from graphdriver import CreateOpts, Driver, LayerInfo, LayerStore, NotMounted, faults
from graphdriver.diffs import change_source
from graphdriver.linux.mount import MS_BIND, is_mountpoint, mount, unmount, unmount_all_under
from graphdriver.plugins import hooks
from graphdriver.recovery import MARKED, MOUNTING
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

    def _active(self, layer: LayerInfo) -> Path:
        """What a mount begins before the kernel mount and ``unmount`` ends (devmapper's
        activated thin device)."""
        return self.home / "active" / layer.id

    def mount(self, layer: LayerInfo, chain: Sequence[LayerInfo]) -> Path:
        target = self._mnt(layer)
        target.mkdir(parents=True, exist_ok=True)
        self._active(layer).parent.mkdir(exist_ok=True)
        self._active(layer).touch()
        faults.point("bindtest.mount.after-activate")
        if not is_mountpoint(target):
            mount(str(self._dir(layer)), target, None, MS_BIND)
        return target

    def unmount(self, layer: LayerInfo) -> None:
        unmount(self._mnt(layer))
        self._active(layer).unlink(missing_ok=True)

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
    active = root / "bindtest" / "active" / "c"
    assert active.exists()  # (devmapper: its thin device, left active by a killed put)
    with _open(root) as b:
        assert b.metadata("c")["mount_count"] == 0
        assert not active.exists(), "the driver's unmount did not undo the rest of the mount"
        with pytest.raises(NotMounted):
            b.put("c")
        assert is_mountpoint(b.get("c"))
        b.put("c")
        assert not is_mountpoint(path)


def _killed(root: Path, step: Callable[[LayerStore], object], fault: str | None = None) -> None:
    """Run *step* on the store in a child process that is SIGKILLed at *fault* (a
    ``faults.point``), or right after *step* (a reader killed mid-diff)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            if fault is not None:
                os.environ["GRAPHDRIVER_FAULT"] = fault
            store = _open(root)
            step(store)
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(70)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


@pytest.mark.parametrize("fault", ["store.get.after-driver", "store.mount.marked"])
def test_mount_left_by_a_dead_process_is_removed(root: Path, fault: str) -> None:
    """Killed with the mount made and its count not committed, or before the mount: the next
    open leaves neither a mount nor a count, and the layer mounts and goes as usual."""
    with _open(root) as a:
        a.create("c")
        a.create("other")
        a.get("other")
    _killed(root, lambda s: s.get("c"), fault)
    path = root / "bindtest" / "mnt" / "c"
    assert is_mountpoint(path) == (fault == "store.get.after-driver")
    with _open(root) as b:
        assert not is_mountpoint(path)
        assert b.metadata("c")["mount_count"] == 0
        assert b.metadata("other")["mount_count"] == 1  # another layer's count is kept
        assert b.meta.meta_items(MOUNTING) == {}  # settled: the next open is a quick one
        assert is_mountpoint(b.get("c"))
        b.put("c")
        assert not is_mountpoint(path)
        b.remove("c")
        b.cleanup()


def test_what_a_mount_killed_inside_the_driver_began_is_undone(root: Path) -> None:
    """Killed inside the driver's mount, after it began something (devmapper: the thin
    device activated) and before the kernel mount: the next open has the driver undo it, as
    the last ``put`` would, and drops the mark."""
    with _open(root) as a:
        a.create("c")
    _killed(root, lambda s: s.get("c"), "bindtest.mount.after-activate")
    active = root / "bindtest" / "active" / "c"
    assert active.exists() and not is_mountpoint(root / "bindtest" / "mnt" / "c")
    with _open(root) as b:
        assert not active.exists()
        assert b.metadata("c")["mount_count"] == 0
        assert b.meta.meta_items(MOUNTING) == {}
        assert is_mountpoint(b.get("c")) and active.exists()
        b.put("c")
        assert not active.exists()


def test_mount_of_a_reader_killed_mid_diff_is_removed(root: Path) -> None:
    """A diff mounts an unmounted layer without counting it; its process killed, the next
    open unmounts what it left."""
    with _open(root) as a:
        a.create("base")
        with a.mounted("base") as p:
            (p / "f").write_text("x")
        a.create("c", "base")

    def read(store: LayerStore) -> None:
        with change_source(store, "c", None):
            assert is_mountpoint(root / "bindtest" / "mnt" / "c")
            os.kill(os.getpid(), signal.SIGKILL)

    _killed(root, read)
    assert is_mountpoint(root / "bindtest" / "mnt" / "c")
    with _open(root) as b:
        assert not is_mountpoint(root / "bindtest" / "mnt" / "c")
        assert b.metadata("c")["mount_count"] == 0
        b.remove("c")


def test_mount_a_reader_kept_after_the_last_put_is_removed_once_it_is_killed(root: Path) -> None:
    """The last ``put`` while a diff reads the layer leaves the mount to the reader; the
    reader killed, the next open unmounts it."""
    with _open(root) as a:
        a.create("c")  # no parent: the diff mounts nothing else, whose mark would be found

    def read(store: LayerStore) -> None:
        store.get("c")
        with change_source(store, "c", None):
            store.put("c")
            assert is_mountpoint(root / "bindtest" / "mnt" / "c")
            os.kill(os.getpid(), signal.SIGKILL)

    _killed(root, read)
    with _open(root) as b:
        assert not is_mountpoint(root / "bindtest" / "mnt" / "c")
        assert b.metadata("c")["mount_count"] == 0


def test_no_mark_outlives_the_mounts_of_get_put_diff_and_cleanup(root: Path) -> None:
    """A mark left behind would send every later open to the lock and every layer: marks
    are gone once each mount is counted or undone, and a live reader's stays while it reads,
    through another process's open."""
    with _open(root) as s:
        s.create("base")
        with s.mounted("base") as p:
            (p / "f").write_text("x")
        s.create("c", "base")
        s.get("c")
        s.get("c")
        assert s.meta.meta_items(MOUNTING) == {}
        s.put("c")
        s.put("c")
        with change_source(s, "c", None):
            assert set(s.meta.meta_items(MOUNTING)) == {"base", "c"}  # the reader's mounts
            with _open(root) as other:
                assert set(other.meta.meta_items(MOUNTING)) == {"base", "c"}
            assert is_mountpoint(root / "bindtest" / "mnt" / "c")
        assert s.meta.meta_items(MOUNTING) == {}
        assert not is_mountpoint(root / "bindtest" / "mnt" / "c")
        s.get("c")
        s.cleanup()
        assert s.meta.meta_items(MOUNTING) == {}
        assert s.meta.get_meta(MARKED) == "1"


def test_a_store_from_before_the_marks_is_checked_once_layer_by_layer(root: Path) -> None:
    """An uncounted mount in a store that older code wrote (no marks) is found at its
    first open by the store's code of now; a mount made behind the store's back after that
    is not looked for (open costs what is mounted, not what is stored)."""
    with _open(root) as a:
        a.create("c")
        with a.meta.transaction():
            a.meta.delete_meta(MARKED)
        path = a.driver.mount(LayerInfo("c", None, False), [])
    with _open(root):
        assert not is_mountpoint(path)
    with _open(root) as a:
        path = a.driver.mount(LayerInfo("c", None, False), [])
    with _open(root) as b:
        assert is_mountpoint(path)
        b.cleanup()  # which does look at every layer
        assert not is_mountpoint(path)


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
