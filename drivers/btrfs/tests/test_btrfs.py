"""What the btrfs driver promises beyond the suite: subvolumes, snapshots, qgroups."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import btrfsutil
import pytest

from graphdriver import CreateOpts, DriverUnavailable, InvalidOption, LayerStore, open_store
from graphdriver.testing import Backing, backing_or_skip
from graphdriver_btrfs import ioctl

MiB = 1 << 20


def _subvolumes(root: Path) -> list[str]:
    return sorted(str(p) for p, _info in btrfsutil.SubvolumeIterator(str(root), info=True))


def test_layers_are_subvolumes_and_children_snapshots(store: LayerStore, fs: Backing) -> None:
    store.create("base")
    with store.mounted("base") as root:
        (root / "f").write_text("base")
    store.create_rw("c", "base")
    base, child = (store.home / "subvolumes" / n for n in ("base", "c"))
    assert btrfsutil.is_subvolume(str(base)) and btrfsutil.is_subvolume(str(child))
    assert (
        btrfsutil.subvolume_info(str(child)).parent_uuid == btrfsutil.subvolume_info(str(base)).uuid
    )
    assert store.get("c") == child  # no mount: the subvolume is the root
    store.put("c")


def test_image_parent_read_only_until_its_last_child_goes(store: LayerStore) -> None:
    store.create("base")
    base = store.home / "subvolumes" / "base"
    assert not btrfsutil.get_subvolume_read_only(str(base))
    store.create("c1", "base")
    store.create("c2", "base")
    assert btrfsutil.get_subvolume_read_only(str(base))
    with pytest.raises(OSError) as info:
        (base / "x").write_text("no")
    assert info.value.errno == errno.EROFS
    store.remove("c1")
    assert btrfsutil.get_subvolume_read_only(str(base))  # c2 still stands on it
    store.remove("c2")
    assert not btrfsutil.get_subvolume_read_only(str(base))
    with store.mounted("base") as root:
        (root / "x").write_text("writable again")


def test_nested_subvolumes_are_removed_with_the_layer(store: LayerStore, fs: Backing) -> None:
    store.create("base")
    store.create_rw("c", "base")
    with store.mounted("c") as root:
        btrfsutil.create_subvolume(str(root / "nested"))
        btrfsutil.create_subvolume(str(root / "nested" / "deeper"))
        (root / "nested" / "deeper" / "f").write_text("inside")
        btrfsutil.create_snapshot(str(root / "nested"), str(root / "snap"))
    before = _subvolumes(fs.root)
    assert any(p.endswith("/c/nested/deeper") for p in before)
    store.remove("c")
    after = _subvolumes(fs.root)
    assert not any("/subvolumes/c" in p for p in after), after
    assert not (store.home / "subvolumes" / "c").exists()


def test_quota_qgroup_is_made_and_dropped(store: LayerStore) -> None:
    store.create("base")
    store.create_rw("limited", "base", CreateOpts(size=50 * MiB))
    path = store.home / "subvolumes" / "limited"
    qid = btrfsutil.subvolume_id(str(path))
    assert ioctl.quota_enabled(store.home)
    limit = Path(f"/sys/fs/btrfs/{ioctl.fsid(store.home)}/qgroups/0_{qid}/max_referenced")
    assert int(limit.read_text()) == 50 * MiB
    with store.mounted("limited") as root:
        with pytest.raises(OSError) as info, open(root / "big", "wb") as f:
            for _ in range(80):
                f.write(os.urandom(MiB))
                f.flush()
                os.fsync(f.fileno())
        assert info.value.errno == errno.EDQUOT
    store.remove("limited")
    assert qid not in ioctl.qgroups(store.home)


def test_existing_quota_settings_survive(store: LayerStore, fs: Backing) -> None:
    other = fs.root / "someone-elses"
    btrfsutil.create_subvolume(str(other))
    try:
        ioctl.enable_quota(fs.root)
        other_id = btrfsutil.subvolume_id(str(other))
        ioctl.limit_qgroup(fs.root, other_id, 7 * MiB)
        store.create_rw("limited", None, CreateOpts(size=20 * MiB))
        store.cleanup()
        store.remove("limited")
        assert ioctl.quota_enabled(fs.root)
        limit = Path(f"/sys/fs/btrfs/{ioctl.fsid(fs.root)}/qgroups/0_{other_id}/max_referenced")
        assert int(limit.read_text()) == 7 * MiB
    finally:
        btrfsutil.delete_subvolume(str(other))


def test_min_space(fs: Backing) -> None:
    with open_store(fs.root / "min-space", "btrfs", {"btrfs.min_space": "10M"}) as s:
        with pytest.raises(InvalidOption, match="min_space"):
            s.create_rw("tiny", None, CreateOpts(size=MiB))
        assert s.layers() == []


def test_status(store: LayerStore) -> None:
    status = dict(store.status())
    assert status["Build Version"].startswith("btrfsutil 6.")
    assert status["Library Version"].startswith("libbtrfsutil ")
    assert status["Quota Enabled"] in ("true", "false")
    for key in (
        "Data Space Used",
        "Data Space Total",
        "Metadata Space Used",
        "Metadata Space Total",
    ):
        assert int(status[key]) >= 0
    assert int(status["Data Space Total"]) > 0


def test_home_not_on_btrfs_is_refused() -> None:
    for backing in backing_or_skip("loop-ext4"):
        with pytest.raises(DriverUnavailable, match="is on extfs"):
            open_store(backing.root / "x", "btrfs")
