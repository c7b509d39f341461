"""What the devmapper driver promises beyond the suite: crash rollback, a full pool, growing
layers, external pools. Needs device-mapper: `tox -e conformance-devmapper` runs these in a
qemu guest (vm/run) when this kernel has none."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver import CreateOpts, DriverUnavailable, GraphDriverError, InvalidOption, open_store
from graphdriver.linux.mount import unmount_all_under
from graphdriver.testing.backings import pool_on_loop_files
from graphdriver_devmapper import dmsetup
from graphdriver_devmapper.pool import ThinPool

pytestmark = pytest.mark.skipif(
    not Path("/dev/mapper/control").exists() or os.geteuid() != 0,
    reason="host lacks it: device-mapper (/dev/mapper/control) and root; run under vm/run, "
    "as tox -e conformance-devmapper does",
)
MiB = 1 << 20


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "root"
    unmount_all_under(tmp_path)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[str]:
    with pool_on_loop_files(tmp_path, data_size=1 << 30) as name:
        yield name
        unmount_all_under(tmp_path)
        for line in subprocess.run(
            ["dmsetup", "ls"], capture_output=True, text=True
        ).stdout.splitlines():
            dev = line.split()[0] if line.split() else ""
            if dev.startswith("graphdriver-"):
                dmsetup.remove(dev)


def _opts(pool: str | None, **extra: str) -> dict[str, str]:
    opts = {"dm.basesize": "50M", "dm.fs": "ext4", **extra}
    if pool:
        opts["dm.thinpooldev"] = pool
    return opts


def _tid(root: Path) -> int:
    db = sqlite3.connect(root / "devmapper" / "devicemapper" / "devices.db")
    try:
        return int(db.execute("SELECT value FROM meta WHERE key='transaction_id'").fetchone()[0])
    finally:
        db.close()


@pytest.mark.parametrize("point", ["after-pool-message", "after-transaction-id"])
def test_crash_inside_a_pool_transaction_is_rolled_back(root: Path, pool: str, point: str) -> None:
    with open_store(root, "devmapper", _opts(pool)) as s:
        s.create("base")
        with s.mounted("base") as p:
            (p / "kept").write_text("kept")
    cmd = [sys.executable, "-m", "graphdriver", "--root", str(root), "--driver", "devmapper"]
    for k, v in _opts(pool).items():
        cmd += ["--opt", f"{k}={v}"]
    proc = subprocess.run(
        [*cmd, "create", "--parent", "base", "victim"],
        env={**os.environ, "GRAPHDRIVER_FAULT": f"devmapper.transaction.{point}"},
    )
    assert proc.returncode == -9
    thin = ThinPool(pool)
    # the device is in the pool but not in the metadata; after the id moved, the pool is ahead
    ahead = 1 if point == "after-transaction-id" else 0
    assert thin.status().transaction_id == _tid(root) + ahead
    with open_store(root, "devmapper", _opts(pool)) as s:
        assert s.layers() == ["base"]
        assert thin.status().transaction_id == _tid(root)
        with pytest.raises(dmsetup.DmsetupError) as info:  # the victim's device is gone
            thin.message("delete 2")
        assert info.value.errno == errno.ENODATA
        s.create("again", "base")
        with s.mounted("again") as p:
            assert (p / "kept").read_text() == "kept"
        s.cleanup()


def test_full_pool_fails_writes_and_refuses_new_layers(root: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    with (
        pool_on_loop_files(small, data_size=160 * MiB) as name,
        open_store(root, "devmapper", _opts(name, **{"dm.basesize": "300M"})) as s,
    ):
        s.create_rw("c")
        with s.mounted("c") as p:
            with pytest.raises(OSError) as info, open(p / "fill", "wb") as f:
                for _ in range(400):
                    f.write(os.urandom(MiB))
                    f.flush()
                    os.fsync(f.fileno())
            assert info.value.errno in (errno.ENOSPC, errno.EIO)
        status = dict(s.status())
        assert int(status["Data Space Available"]) < 16 * MiB
        with pytest.raises(GraphDriverError, match=r"dm\.min_free_space"):
            s.create("more")
        assert s.layers() == ["c"]
        s.remove("c")  # the metadata stayed consistent: removal works and frees the space
        s.create("more")
        assert s.layers() == ["more"]
        s.cleanup()


def test_layer_larger_than_base_grows_its_filesystem(root: Path, pool: str) -> None:
    with open_store(root, "devmapper", _opts(pool)) as s:
        s.create("base")
        s.create_rw("big", "base", CreateOpts(size=200 * MiB))
        with s.mounted("big") as p:
            st = os.statvfs(p)
            assert st.f_blocks * st.f_frsize > 150 * MiB
        with s.mounted("base") as p:
            st = os.statvfs(p)
            assert st.f_blocks * st.f_frsize < 60 * MiB
        with pytest.raises(InvalidOption, match="smaller than the base"):
            s.create_rw("tiny", "base", CreateOpts(size=20 * MiB))
        s.cleanup()


def test_external_pool_must_be_empty_at_first_use(root: Path, pool: str) -> None:
    thin = ThinPool(pool)
    thin.create_thin(7)
    thin.set_transaction_id(0, 1)
    with pytest.raises(DriverUnavailable, match="not empty"):
        open_store(root, "devmapper", _opts(pool))


def test_status(root: Path, pool: str) -> None:
    with open_store(root, "devmapper", _opts(pool)) as s:
        status = dict(s.status())
        s.cleanup()
    for key in (
        "Pool Name",
        "Pool Blocksize",
        "Base Device Size",
        "Backing Filesystem",
        "Data file",
        "Metadata file",
        "Data Space Used",
        "Data Space Total",
        "Data Space Available",
        "Metadata Space Used",
        "Metadata Space Total",
        "Metadata Space Available",
        "Thin Pool Minimum Free Space",
        "Deferred Removal Enabled",
        "Library Version",
    ):
        assert key in status, key
    assert status["Pool Name"] == pool and status["Pool Blocksize"] == "65536"
    assert status["Base Device Size"] == str(50 * MiB)
    assert status["No Space Policy"] == "error_if_no_space"


def test_loop_pool_comes_back_after_cleanup(root: Path) -> None:
    opts = _opts(None, **{"dm.loopdatasize": "1G", "dm.loopmetadatasize": "64M"})
    with open_store(root, "devmapper", opts) as s:
        s.create("base")
        with s.mounted("base") as p:
            (p / "f").write_text("survives")
        assert dict(s.status())["Loop-backed (development only)"] == "true"
        s.cleanup()  # devices and the loop pool go down; the files stay
    names = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout
    assert "graphdriver-" not in names, names
    with open_store(root, "devmapper", opts) as s:
        with s.mounted("base") as p:
            assert (p / "f").read_text() == "survives"
        s.remove("base")
        s.cleanup()
