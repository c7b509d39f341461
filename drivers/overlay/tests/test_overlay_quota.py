"""overlay's size-limited rw layers (XFS project quota) as a user makes them, from the CLI.

They need XFS mounted with prjquota, which a kernel without CONFIG_XFS_QUOTA refuses (this
project's CI host): `tox -e conformance-devmapper` also runs the ``--size`` case, and the suite's
quota case, in the qemu guest (Debian's kernel has XFS quota) with GRAPHDRIVER_REQUIRE naming
xfs-quota, so that there they fail rather than skip.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver import open_store
from graphdriver.testing import Backing, backing_or_skip, quota_or_skip
from graphdriver.toolkit import unmount_all_under

MiB = 1 << 20


@pytest.fixture(scope="module")
def xfs() -> Iterator[Backing]:
    yield from backing_or_skip("loop-xfs")


@pytest.fixture
def root(xfs: Backing, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh overlay root on XFS that enforces project quota (skip or fail as the host is)."""
    path = xfs.root / request.node.name
    try:
        with open_store(path, "overlay") as store:
            quota_or_skip(store, "loop-xfs")
        yield path
    finally:
        unmount_all_under(path)


def _fill(path: Path, mib: int) -> None:
    """Write *mib* MiB to *path*, synced each MiB so the limit bites at the write past it."""
    chunk = b"\xa5" * MiB  # the content does not matter to a quota; making it costs in the guest
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(chunk)
            f.flush()
            os.fsync(f.fileno())


def test_size_limits_each_rw_layer_on_its_own(root: Path) -> None:
    with open_store(root, "overlay") as store:
        store.create("base")
    # the user's way in; two commands only, as each costs seconds in the emulated guest
    for name, size in (("small", "8M"), ("large", "24M")):
        subprocess.run(
            [sys.executable, "-m", "graphdriver", "--root", str(root), "--driver", "overlay",
             "create", "--rw", "--parent", "base", "--size", size, name],
            check=True,
            timeout=300,
        )  # fmt: skip
    with open_store(root, "overlay") as store:
        with store.mounted("small") as small, store.mounted("large") as large:
            with pytest.raises(OSError) as info:
                _fill(small / "too-big", 16)
            assert info.value.errno in (errno.EDQUOT, errno.ENOSPC)
            _fill(large / "fits", 16)  # the other layer's limit is its own
            assert (large / "fits").stat().st_size == 16 * MiB
            (small / "too-big").unlink()
            _fill(small / "fits-again", 4)  # freed space counts again
        for layer in ("small", "large", "base"):
            store.remove(layer)
        assert store.layers() == []


GENERATED = """
import subprocess

from graphdriver import open_store
from graphdriver.testing import quota_or_skip


def test_quota(tmp_path):
    image, target = tmp_path / "image", tmp_path / "mnt"
    target.mkdir()
    with open(image, "wb") as f:
        f.truncate(320 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-f", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(target)], check=True)  # no prjquota
    try:
        with open_store(target / "root", "overlay") as store:
            quota_or_skip(store, "loop-xfs")
    finally:
        subprocess.run(["umount", str(target)], check=True)
"""


@pytest.mark.parametrize("require", ["", "root,xfs-quota"])
def test_xfs_without_quota_skips_unless_required(
    xfs: Backing, tmp_path: Path, require: str
) -> None:
    (tmp_path / "test_generated.py").write_text(GENERATED)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-rsf", "-p", "no:cacheprovider", "test_generated.py"],
        cwd=tmp_path,
        env={**os.environ, "GRAPHDRIVER_REQUIRE": require},
        capture_output=True,
        text=True,
        timeout=300,
    )
    reason = "host lacks it: XFS here does not enforce project quota"
    if require:
        assert proc.returncode == 1 and "1 failed" in proc.stdout, proc.stdout
        assert reason in proc.stdout and "GRAPHDRIVER_REQUIRE requires xfs-quota" in proc.stdout
    else:
        assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout
        assert reason in proc.stdout
