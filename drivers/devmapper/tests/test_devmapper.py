"""What the devmapper driver promises beyond the suite: crash rollback, a full pool, growing
layers, external pools. Needs device-mapper: `tox -e conformance-devmapper` runs these in a
qemu guest (vm/run) when this kernel has none."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graphdriver import (
    CreateOpts,
    DriverUnavailable,
    GraphDriverError,
    InvalidOption,
    LayerStore,
    open_store,
)
from graphdriver.linux import loop
from graphdriver.testing import host_lacks
from graphdriver.testing.backings import pool_on_loop_files
from graphdriver.toolkit import device_mapper_missing, unmount_all_under
from graphdriver_devmapper import DevmapperDriver, dmsetup
from graphdriver_devmapper.pool import ThinPool


@pytest.fixture(autouse=True)
def _device_mapper() -> None:
    missing = "not root" if os.geteuid() != 0 else device_mapper_missing()
    if missing is not None:
        host_lacks(
            f"device-mapper and root ({missing}); run under vm/run, "
            "as tox -e conformance-devmapper does",
            "thin-pool",
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


def _meta(root: Path, key: str) -> str | None:
    db = sqlite3.connect(root / "devmapper" / "devicemapper" / "devices.db")
    try:
        row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])
    finally:
        db.close()


def _tid(root: Path) -> int:
    return int(_meta(root, "transaction_id") or 0)


def _cli(root: Path, opts: dict[str, str], *args: str, fault: str | None = None) -> Any:
    cmd = [sys.executable, "-m", "graphdriver", "--root", str(root), "--driver", "devmapper"]
    for k, v in opts.items():
        cmd += ["--opt", f"{k}={v}"]
    env = {**os.environ, **({"GRAPHDRIVER_FAULT": fault} if fault else {})}
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True)


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


def test_construction_changes_nothing_and_recover_rolls_back(root: Path, pool: str) -> None:
    """The driver is constructed before the store's lock is taken: an open transaction may be
    another process's live one, so only recover() (under the lock) may roll it back."""
    with open_store(root, "devmapper", _opts(pool)) as s:
        s.create("base")
    killed = _cli(
        root,
        _opts(pool),
        "create",
        "--parent",
        "base",
        "victim",
        fault="devmapper.transaction.after-transaction-id",
    )
    assert killed.returncode == -9
    thin = ThinPool(pool)
    assert thin.status().transaction_id == _tid(root) + 1
    driver = DevmapperDriver(root / "devmapper", _opts(pool))
    try:
        assert thin.status().transaction_id == _tid(root) + 1
        assert _meta(root, "open_transaction") is not None
        driver.recover([])
        assert thin.status().transaction_id == _tid(root)
        assert _meta(root, "open_transaction") is None
    finally:
        driver.close()


def test_construction_of_a_loop_pool_driver_makes_no_pool(root: Path) -> None:
    opts = _opts(None, **{"dm.loopdatasize": "1G", "dm.loopmetadatasize": "64M"})
    driver = DevmapperDriver(root / "devmapper", opts)
    try:
        assert dmsetup.info(driver.pool.name) is None
        driver.recover([])
        assert dmsetup.info(driver.pool.name) is not None
        assert _meta(root, "base_size") == str(50 * MiB)
    finally:
        driver.cleanup()  # takes the loop pool down, even when the test failed
        driver.close()


def test_transaction_id_is_read_afresh_after_another_process_committed(
    root: Path, pool: str
) -> None:
    with open_store(root, "devmapper", _opts(pool)) as first:
        with open_store(root, "devmapper", _opts(pool)) as second:
            second.create("theirs")  # moves the pool's transaction id under first's feet
        first.create("ours")
        assert sorted(first.layers()) == ["ours", "theirs"]
        assert ThinPool(pool).status().transaction_id == _tid(root)
        first.cleanup()


def test_bad_mkfsarg_fails_in_one_line_and_a_good_open_then_works(root: Path, pool: str) -> None:
    bad = _cli(root, _opts(pool, **{"dm.mkfsarg": "--bogus-flag"}), "ls")
    assert bad.returncode == 1
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "dm.mkfsarg" in bad.stderr
    with open_store(root, "devmapper", _opts(pool)) as s:
        s.create("base")
        with s.mounted("base") as p:
            (p / "f").write_text("written")
        s.create("child", "base")
        with s.mounted("child") as p:
            assert (p / "f").read_text() == "written"
        s.cleanup()


def test_crash_between_base_device_and_mkfs_is_finished_at_next_open(root: Path, pool: str) -> None:
    killed = _cli(root, _opts(pool), "ls", fault="devmapper.base.before-mkfs")
    assert killed.returncode == -9, killed.stderr
    with open_store(root, "devmapper", _opts(pool)) as s:
        s.create("base")
        with s.mounted("base") as p:
            assert os.listdir(p) == []
            (p / "f").write_text("written")
        s.cleanup()


def _rw_device(s: LayerStore, layer: str) -> str:
    """Create the rw layer *layer*; the dm name of its thin device."""
    s.create_rw(layer)
    assert isinstance(s.driver, DevmapperDriver)
    device = s.driver._device(layer)
    assert device is not None
    return s.driver._name(device[0])


def test_failed_mount_deactivates_the_device(
    root: Path, pool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_store(root, "devmapper", _opts(pool)) as s:
        name = _rw_device(s, "c")
        monkeypatch.setenv("GRAPHDRIVER_FAULT", "devmapper.mount.after-activate=EIO")
        with pytest.raises(GraphDriverError):
            s.get("c")
        assert dmsetup.info(name) is None
        monkeypatch.delenv("GRAPHDRIVER_FAULT")
        with s.mounted("c") as p:
            (p / "f").write_text("works")
        s.cleanup()


def test_a_mount_killed_after_the_activation_leaves_no_device(root: Path, pool: str) -> None:
    # killed between activating the thin device and mounting it, before get counts it: the
    # next open has the driver deactivate it (its mark says a mount was begun), as a failed
    # mount does itself
    with open_store(root, "devmapper", _opts(pool)) as s:
        name = _rw_device(s, "c")
    killed = _cli(root, _opts(pool), "mount", "c", fault="devmapper.mount.after-activate")
    assert killed.returncode == -9, killed.stderr
    assert dmsetup.info(name) is not None
    with open_store(root, "devmapper", _opts(pool)) as s:
        assert dmsetup.info(name) is None
        assert s.metadata("c")["mount_count"] == 0
        with s.mounted("c") as p:
            (p / "f").write_text("works")
        s.cleanup()


def test_a_device_left_without_a_table_is_made_again(root: Path, pool: str) -> None:
    # a dmsetup create killed between making the device and loading its table (a timeout)
    # leaves /dev/mapper/NAME with no table: neither a mount nor a snapshot of it may take it
    # for active (a snapshot would suspend it, and its resume fail)
    with open_store(root, "devmapper", _opts(pool)) as s:
        s.create("img")
        with s.mounted("img") as p:
            (p / "f").write_text("kept")
        assert isinstance(s.driver, DevmapperDriver)
        for layer in ("img", "child"):
            device = s.driver._device(layer)
            assert device is not None
            name = s.driver._name(device[0])
            assert dmsetup.info(name) is None
            _without_table(name)
            if layer == "img":
                s.create("child", "img")
            with s.mounted(layer) as p:
                assert (p / "f").read_text() == "kept"
        s.cleanup()


def test_a_loop_pool_left_without_a_table_is_made_again(root: Path) -> None:
    opts = _opts(None, **{"dm.loopdatasize": "1G", "dm.loopmetadatasize": "64M"})
    with open_store(root, "devmapper", opts) as s:
        s.create("base")
        with s.mounted("base") as p:
            (p / "f").write_text("survives")
        assert isinstance(s.driver, DevmapperDriver)
        name = s.driver.pool.name
        s.cleanup()
    _without_table(name)
    with open_store(root, "devmapper", opts) as s:
        with s.mounted("base") as p:
            assert (p / "f").read_text() == "survives"
        s.cleanup()
    assert dmsetup.info(name) is None


def _without_table(name: str) -> None:
    subprocess.run(["dmsetup", "create", name, "--notable", "--noudevsync"], check=True)
    info = dmsetup.info(name)
    assert info is not None and not info.live and info.segments == 0


@pytest.mark.parametrize("release", [3.5, 9.0], ids=["within-the-kill-wait", "after-it"])
def test_a_suspend_that_timed_out_is_resumed_once_the_kernel_carried_it_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, release: float
) -> None:
    # ext4 on "up", a device over "low": with low suspended, suspending up (which flushes the
    # filesystem) waits in the kernel; its dmsetup times out (2 s) and is killed, but the
    # kernel finishes that suspend once low comes back (*release* s), even after the 5 s that
    # _run waits for the killed dmsetup. suspended() resumes up after it, as create_snap and
    # resize use it: the layer is not left frozen.
    monkeypatch.setattr(dmsetup, "TIMEOUT", 2)
    backing = tmp_path / "disk"
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    low, up = f"gd-test-low-{os.getpid()}", f"gd-test-up-{os.getpid()}"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop.attach(backing) as dev:
        sectors = 64 * MiB // 512
        dmsetup.create(low, f"0 {sectors} linear {dev.path} 0")
        try:
            dmsetup.create(up, f"0 {sectors} linear /dev/mapper/{low} 0")
            # no lazy init: its writes would block the file's write below on suspended low
            mkfs = ["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
            subprocess.run([*mkfs, f"/dev/mapper/{up}"], check=True)
            subprocess.run(["mount", f"/dev/mapper/{up}", str(mnt)], check=True)
            try:
                (mnt / "dirty").write_bytes(b"x" * MiB)  # for the suspend's flush to write
                dmsetup.suspend(low)
                timer = threading.Timer(release, dmsetup.resume, (low,))
                timer.start()
                try:
                    with pytest.raises(dmsetup.DmsetupError) as info, dmsetup.suspended(up):
                        pytest.fail("the suspend went through")
                finally:
                    timer.join()
                assert info.value.errno == errno.ETIMEDOUT
                assert info.value.strerror.startswith(f"dmsetup suspend {up}: no answer in 2 s")
                assert "freeze" in info.value.strerror  # where the kernel held it
                state = dmsetup.info(up)
                assert state is not None and not state.suspended
                (mnt / "after").write_text("written")
                os.sync()
            finally:  # nothing left frozen, even when the test failed
                for name in (low, up):
                    dmsetup.resume(name)
                subprocess.run(["umount", str(mnt)], check=True)
        finally:
            for name in (up, low):
                dmsetup.remove(name)


def test_a_stuck_dmsetup_call_fails_in_one_line_saying_where_it_waits() -> None:
    # `dmsetup wait NAME N` blocks in the kernel until the device's event number moves off N,
    # as a create did once in CI (120 s, then a bare TimeoutExpired): the caller gets a
    # DmsetupError naming the kernel function it sleeps in, and no dmsetup is left behind
    name = f"graphdriver-test-wait-{os.getpid()}"
    dmsetup.create(name, "0 8 error")
    try:
        events = int(dmsetup._run("info", "--columns", "--noheadings", "-o", "events", name))
        with pytest.raises(dmsetup.DmsetupError) as info:
            dmsetup._run("wait", name, str(events), timeout=2)
        assert info.value.errno == errno.ETIMEDOUT
        message = info.value.strerror
        assert "\n" not in message
        assert message.startswith(f"dmsetup wait {name}: no answer in 2 s; waiting in ")
        assert "dm_wait_event" in message
        left = [
            pid
            for pid in os.listdir("/proc")
            if pid.isdigit() and name.encode() in _cmdline(int(pid))
        ]
        assert left == []
    finally:
        dmsetup.remove(name)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""
