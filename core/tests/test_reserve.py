"""The store's reserve (graphdriver.reserve) where there is room: made whole, made again when
it is not whole, left when it is not ours, kept when the disk has room. Giving it back on a
full disk is tests/test_full_disk.py's."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver import reserve
from graphdriver.linux.fs import fs_magic


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A directory on a disk filesystem (/var/tmp): pytest's may be in a tmpfs /tmp, where
    the store keeps no reserve (pinned RAM)."""
    path = Path(tempfile.mkdtemp(prefix="reserve-test-", dir="/var/tmp"))
    assert fs_magic(path) not in reserve.IN_MEMORY, "/var/tmp is in memory here"
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _whole(root: Path) -> bool:
    at = root / reserve.NAME
    names = sorted(os.listdir(at))
    space = os.lstat(at / reserve.SPACE)
    return names == sorted([reserve.SPACE, *(f"inode-{i:02d}" for i in range(16))]) and (
        space.st_blocks * 512 >= space.st_size > 0
    )


def test_made_whole_and_kept_where_there_is_room(tmp_path: Path) -> None:
    reserve.keep(tmp_path)
    assert _whole(tmp_path)
    inode = os.lstat(tmp_path / reserve.NAME).st_ino
    reserve.keep(tmp_path)
    assert os.lstat(tmp_path / reserve.NAME).st_ino == inode  # one lstat, nothing made
    assert not reserve.release_if_full(tmp_path)  # room: kept
    assert _whole(tmp_path)
    assert [n for n in os.listdir(tmp_path) if n != reserve.NAME] == []


def test_one_not_whole_is_made_again(tmp_path: Path) -> None:
    """A removal cut short (its space file gone first), or a copy that dropped the file's
    blocks (``cp --sparse=always``): a reserve in name only, made again."""
    reserve.keep(tmp_path)
    (tmp_path / reserve.NAME / reserve.SPACE).unlink()
    reserve.keep(tmp_path)
    assert _whole(tmp_path)
    space = tmp_path / reserve.NAME / reserve.SPACE
    size = space.stat().st_size
    space.unlink()
    with open(space, "wb") as f:
        f.truncate(size)  # a hole: no blocks
    reserve.keep(tmp_path)
    assert _whole(tmp_path)


def test_what_is_not_its_own_is_left_alone(tmp_path: Path) -> None:
    """A file of its name is not touched; a build a killed process left is removed once it
    is a minute old, a fresh one (another process building) is not."""
    (tmp_path / reserve.NAME).write_text("not ours")
    reserve.keep(tmp_path)
    assert not reserve.release_if_full(tmp_path)
    assert (tmp_path / reserve.NAME).read_text() == "not ours"
    (tmp_path / reserve.NAME).unlink()
    old, fresh = tmp_path / ".reserve.new.1.aa", tmp_path / ".reserve.new.2.bb"
    for d in (old, fresh):
        d.mkdir()
        (d / reserve.SPACE).write_bytes(b"x")
    os.utime(old, (1, 1))
    reserve.keep(tmp_path)
    assert _whole(tmp_path) and not old.exists() and fresh.exists()


def test_through_a_symlinked_root(tmp_path: Path) -> None:
    """``--root`` may be a symlink to a bigger disk: made and removed through it."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    reserve.keep(tmp_path / "link")
    assert _whole(tmp_path / "real")
    reserve._remove(tmp_path / "link")
    assert not (tmp_path / "real" / reserve.NAME).exists()
    assert (tmp_path / "link").is_symlink()


def test_none_in_memory() -> None:
    """tmpfs and ramfs get none: a reserve there is RAM held for nothing."""
    path = Path(tempfile.mkdtemp(prefix="reserve-test-", dir="/dev/shm"))
    try:
        assert fs_magic(path) in reserve.IN_MEMORY
        reserve.keep(path)
        assert os.listdir(path) == []
    finally:
        shutil.rmtree(path)
