"""Docker's plugins started on a full disk (dockerd or the plugin restarted while a container
had filled it): they give the store's reserve back and serve, so that dockerd's removals,
which free the disk (``docker rm``, ``docker volume prune``), go through them. They used to
exit at once, "the filesystem holding ... is full"."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from plugin_proc import GraphPlugin, VolumePlugin

from graphdriver.linux.mount import unmount_all_under
from graphdriver.testing import Backing, backing_or_skip, fill_filesystem, freed

pytestmark = pytest.mark.privileged

MiB = 1 << 20
IMAGE, CONTAINER = "1" * 64, "2" * 64


@pytest.fixture
def small_xfs() -> Iterator[Backing]:
    for backing in backing_or_skip("loop-xfs", size=320 * MiB):
        try:
            yield backing
        finally:
            unmount_all_under(backing.root)


def _restarted_full(plugin: VolumePlugin, root: Path, filler: Path, size: int) -> None:
    """Stop *plugin*, take what its stop freed, start it again: it says that it gave the
    reserve (*size* bytes) back."""
    assert plugin.stop() == 0
    fill_filesystem(filler)  # what the stop freed (its databases' -wal and -shm)
    plugin.log.write_text("")
    plugin.start()
    assert plugin.output().splitlines()[0] == _warning(root, size), plugin.output()


def _warning(root: Path, size: int) -> str:
    """What a server says when it gives the reserve (*size* bytes) back."""
    return (
        f"graphdriver: WARNING: the filesystem of {root} is full: its reserve ({size >> 10} "
        "KiB, 16 inodes) was given back so that this command's records can be written; it is "
        "made again once there is room"
    )


def _reserve(root: Path) -> int:
    return (root / ".reserve" / "space").stat().st_blocks * 512


def test_the_graphdriver_plugin_started_first_on_a_full_disk_serves(
    small_xfs: Backing, tmp_path: Path
) -> None:
    """Its first start there: its lock file, not made yet, needs the reserve's room too."""
    root = small_xfs.root / "store"
    plugin = GraphPlugin(root, "overlay", "gd-full", tmp_path / "g.sock", small_xfs.options)
    plugin.log = tmp_path / "g.log"  # not on the disk that fills
    for argv in (["create", IMAGE], ["create", "--rw", "--parent", IMAGE, CONTAINER]):
        subprocess.run(plugin.command(*argv), capture_output=True, check=True)
    size = _reserve(root)
    merged = subprocess.run(
        plugin.command("mount", CONTAINER), capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        fill_filesystem(Path(merged) / "filler")
        assert not (root / "docker").exists()  # its first start: no lock file yet
        plugin.start()
        assert plugin.output().splitlines()[0] == _warning(root, size), plugin.output()
        subprocess.run(plugin.command("umount", CONTAINER), capture_output=True, check=True)
        with plugin.connect() as conn:  # dockerd's docker rm of the container
            assert conn.call("GraphDriver.Remove", {"ID": CONTAINER})[1] == {"Err": ""}
        assert freed(root, 200 * MiB)
        assert plugin.layers() == [IMAGE]
        assert plugin.stop() == 0
    finally:
        plugin.stop()
        subprocess.run(plugin.command("cleanup"), capture_output=True, check=False)
    check = subprocess.run(plugin.command("check"), capture_output=True, text=True)
    assert (check.returncode, check.stdout, check.stderr) == (0, "", ""), check
    assert _reserve(root) == size  # made again by an open with room


def test_the_volume_plugin_restarted_on_a_full_disk_serves(
    small_xfs: Backing, tmp_path: Path
) -> None:
    root = small_xfs.root / "store"
    plugin = VolumePlugin(root, "gd-full-vol", tmp_path / "v.sock", tmp_path / "v.log")
    try:
        with plugin.start().connect() as conn:
            assert conn.call("VolumeDriver.Create", {"Name": "v1"})[1] == {"Err": ""}
            got = conn.call("VolumeDriver.Mount", {"Name": "v1", "ID": "a" * 64})[1]
        size = _reserve(root)
        fill_filesystem(Path(got["Mountpoint"]) / "filler")
        _restarted_full(plugin, root, Path(got["Mountpoint"]) / "filler", size)
        with plugin.connect() as conn:  # docker rm -v, docker volume prune
            body = {"Name": "v1", "ID": "a" * 64}
            assert conn.call("VolumeDriver.Unmount", body)[1] == {"Err": ""}
            assert conn.call("VolumeDriver.Remove", {"Name": "v1"})[1] == {"Err": ""}
        assert freed(root, 200 * MiB)
        assert plugin.volumes() == []
        assert plugin.stop() == 0
    finally:
        plugin.stop()
    subprocess.run(plugin.command("volume", "ls"), capture_output=True, check=True)
    assert _reserve(root) == size


def test_a_plugin_whose_lock_is_on_another_filesystem_makes_room_there(
    small_xfs: Backing, tmp_path: Path
) -> None:
    """The driver's home on a filesystem of its own (an XFS with project quota, say) and the
    root's full: the plugin's lock, in the root, needs the root's reserve, and the home's
    stays."""
    for homes in backing_or_skip("loop-xfs", size=320 * MiB):
        root = small_xfs.root / "store"
        plugin = GraphPlugin(root, "vfs", "gd-apart", tmp_path / "g.sock")
        plugin.log = tmp_path / "g.log"
        home = root / "vfs"
        home.mkdir(parents=True)
        subprocess.run(["mount", "--bind", str(homes.root), str(home)], check=True)
        try:
            subprocess.run(plugin.command("create", IMAGE), capture_output=True, check=True)
            size, kept = _reserve(root), _reserve(home)
            fill_filesystem(small_xfs.root / "filler")
            plugin.start()
            assert plugin.output().splitlines()[0] == _warning(root, size), plugin.output()
            assert _reserve(home) == kept
            assert plugin.layers() == [IMAGE]
            assert plugin.stop() == 0
        finally:
            plugin.stop()
            subprocess.run(plugin.command("cleanup"), capture_output=True, check=False)
            subprocess.run(["umount", str(home)], check=True)
