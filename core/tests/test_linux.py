"""The Linux wrappers on the real kernel: loop devices, mounts, statfs, d_type."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from graphdriver.linux import loop
from graphdriver.linux.fs import fs_name, supports_d_type
from graphdriver.linux.mount import is_mountpoint, mount, mountinfo, unmount, unmount_all_under
from graphdriver.testing import host_lacks


@pytest.fixture
def _root() -> None:
    if os.geteuid() != 0:
        host_lacks("needs root for loop devices and mounts", "root")


root_only = pytest.mark.usefixtures("_root")


@root_only
def test_loop_autoclear_detaches_after_unmount(tmp_path: Path) -> None:
    import subprocess

    image = tmp_path / "img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    target = tmp_path / "mnt"
    target.mkdir()
    with loop.attach(image) as dev:
        assert loop.backing_file(dev.path) == str(image)
        subprocess.run(["mkfs.ext4", "-q", "-F", dev.path], check=True)
        mount(dev.path, target, "ext4")
        path = dev.path
    try:
        assert is_mountpoint(target)
        assert fs_name(target) == "extfs"
        assert supports_d_type(target)
        assert loop.backing_file(path) == str(image)  # still attached: the mount holds it
    finally:
        unmount(target)
    for _ in range(100):
        if loop.backing_file(path) != str(image):
            break
        time.sleep(0.05)
    assert loop.backing_file(path) != str(image)


@root_only
def test_mountinfo_unescapes_and_unmount_all_under(tmp_path: Path) -> None:
    odd = tmp_path / "with space"
    inner = odd / "inner"
    odd.mkdir()
    mount("tmpfs", odd, "tmpfs", 0, "size=1m")
    try:
        inner.mkdir()
        mount("tmpfs", inner, "tmpfs", 0, "size=1m")
        points = {e.mountpoint for e in mountinfo()}
        assert str(odd) in points and str(inner) in points
    finally:
        unmount_all_under(tmp_path)
    assert not is_mountpoint(odd)
    unmount(odd)  # not mounted: not an error


def test_fs_name_of_proc() -> None:
    assert fs_name(Path("/proc")) == "proc"
