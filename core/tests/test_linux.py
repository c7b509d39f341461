"""The Linux wrappers on the real kernel: loop devices, mounts, statfs, d_type."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

from graphdriver.linux import loop
from graphdriver.linux.bind import root_devices
from graphdriver.linux.fs import fs_name, supports_d_type
from graphdriver.linux.mount import (
    MS_BIND,
    MS_RDONLY,
    MS_REMOUNT,
    is_mountpoint,
    mount,
    mountinfo,
    mounts_under,
    unmount,
    unmount_all_under,
)
from graphdriver.testing import Backing, host_lacks
from graphdriver.testing.backings import loop_filesystem


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
@pytest.mark.parametrize("filetype", [True, False], ids=["filetype", "no-filetype"])
def test_d_type_is_read_from_an_entry_where_there_is_one(tmp_path: Path, filetype: bool) -> None:
    """An ext4 made without ``filetype`` returns no d_type, as an XFS V4 does. Where the
    directory has an entry its d_type says, with nothing written (a full disk has no room for
    a file: overlay's probe after a reboot); an empty one gets a file in a temporary
    directory, which goes again."""
    import subprocess

    image = tmp_path / "img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    target = tmp_path / "mnt"
    target.mkdir()
    features = [] if filetype else ["-O", "^filetype"]
    subprocess.run(["mkfs.ext4", "-q", "-F", *features, str(image)], check=True)
    with loop.attach(image) as dev:
        mount(dev.path, target, "ext4")
    try:
        (target / "empty").mkdir()
        (target / "full").mkdir()
        (target / "full" / "entry").write_text("x")
        mount("none", target, "", MS_REMOUNT | MS_RDONLY)  # a write would be EROFS
        assert supports_d_type(target / "full") is filetype
        mount("none", target, "", MS_REMOUNT)
        assert supports_d_type(target / "empty") is filetype
        assert os.listdir(target / "empty") == [] and os.listdir(target / "full") == ["entry"]
    finally:
        unmount(target)


@root_only
def test_mountinfo_unescapes_and_unmount_all_under(tmp_path: Path) -> None:
    odd = tmp_path / "with space"
    inner = odd / "in\rner\x0bvt\\bs"  # CR and VT: line ends to Python, not to mountinfo
    odd.mkdir()
    mount("tmpfs", odd, "tmpfs", 0, "size=1m")
    try:
        inner.mkdir()
        mount("tmpfs", inner, "tmpfs", 0, "size=1m")
        points = {e.mountpoint for e in mountinfo()}
        assert str(odd) in points and str(inner) in points
        assert mounts_under(tmp_path) == [str(inner), str(odd)]
    finally:
        unmount_all_under(tmp_path)
    assert not is_mountpoint(odd)
    unmount(odd)  # not mounted: not an error


def test_fs_name_of_proc() -> None:
    assert fs_name(Path("/proc")) == "proc"


def _misc_names() -> set[str]:
    with open("/proc/misc") as misc:
        return {line.split()[1] for line in misc if len(line.split()) == 2}


def test_device_mapper_is_what_the_kernel_registered() -> None:
    """The answer is the kernel's (its misc devices, read after the probe, which loads dm-mod
    where it is a module), not whether the node exists: the CI host has the node and no
    device-mapper behind it, the guest has both."""
    from graphdriver.linux.dm import device_mapper_missing

    missing = device_mapper_missing()
    has = "device-mapper" in _misc_names()
    assert (missing is None) == has, missing
    if missing is not None:
        assert missing.startswith("this kernel has no device-mapper (")
        assert "\n" not in missing


@root_only
def test_device_mapper_probe_as_another_user() -> None:
    """Without the right to open the node, the probe reads the kernel's list instead."""
    from graphdriver.linux.dm import device_mapper_missing

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nobody, one line back, no return into pytest
        try:
            os.close(read)
            os.setresuid(65534, 65534, 65534)
            os.write(write, str(device_mapper_missing()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    assert (out == "None") == ("device-mapper" in _misc_names()), out
    assert out == "None" or "none in /proc/misc" in out, out


@root_only
def test_root_devices_are_those_of_the_store_s_own_filesystems(tmp_path: Path) -> None:
    """The block devices a ``local`` volume may not mount: the one holding the root, and
    those of a driver's home or ``volumes`` mounted directly in it (overlay's ``--size`` on
    an XFS of its own) or linked from it, every one of a btrfs; not another filesystem's."""
    with contextlib.ExitStack() as stack:
        outer, home, fs2, other, linked = (
            stack.enter_context(loop_filesystem(kind, 300 << 20, tmp_path))
            for kind in ("ext4", "xfs", "btrfs", "ext4", "ext4")
        )
        root = outer.root / "root"
        (root / "overlay").mkdir(parents=True)
        (root / "vfs").symlink_to(linked.root)
        (root / "volumes").mkdir()
        (root / "volumes" / "deep").mkdir()
        mount(str(home.root), root / "overlay", None, MS_BIND)
        stack.callback(unmount, root / "overlay")
        mount(str(fs2.root), root / "volumes" / "deep", None, MS_BIND)  # (a volume's own)
        stack.callback(unmount, root / "volumes" / "deep")

        def rdev(backing: Backing) -> int:
            return os.stat(str(backing.device)).st_rdev

        found = root_devices(str(root))
        assert rdev(outer) in found and rdev(home) in found and rdev(linked) in found
        assert rdev(other) not in found and rdev(fs2) not in found
        assert rdev(fs2) in root_devices(str(fs2.root))  # (btrfs: by its source)
