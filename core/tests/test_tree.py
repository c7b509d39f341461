"""remove_tree on real directories: any depth, never through a symlink."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from graphdriver.linux.tree import remove_tree

DEPTH = 2100  # deeper than Python's recursion (shutil.rmtree of 3.11 fails) and PATH_MAX


def _deep(top: Path, outside: Path) -> None:
    """A tree DEPTH directories deep, with a file, a fifo and symlinks (one to *outside*,
    one to a directory of its own) at some levels; made through fds, as its deepest paths
    are longer than PATH_MAX."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(DEPTH):
            if level % 100 == 0:
                with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
                    f.write(b"x")
                os.mkfifo("p", dir_fd=fd)
                os.symlink(str(outside), "out", dir_fd=fd)
                os.mkdir("side", dir_fd=fd)
                os.symlink("side", "to-side", dir_fd=fd)
            os.mkdir("d", dir_fd=fd)
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
    finally:
        os.close(fd)


def test_a_tree_deeper_than_python_and_path_max_goes_and_links_are_not_followed(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kept").write_text("kept")
    _deep(tmp_path / "tree", outside)
    remove_tree(tmp_path / "tree")
    assert sorted(os.listdir(tmp_path)) == ["outside"]
    assert (outside / "kept").read_text() == "kept"


def test_what_is_not_a_directory_is_unlinked_and_nothing_is_fine(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("f")
    os.symlink(tmp_path / "dir", tmp_path / "link")
    remove_tree(tmp_path / "link")  # the link, not the directory it names
    assert (tmp_path / "dir").is_dir() and not os.path.lexists(tmp_path / "link")
    remove_tree(tmp_path / "file")
    remove_tree(tmp_path / "missing")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_tree("dir", dir_fd=fd)
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == []
    with pytest.raises(OSError):
        remove_tree(".")
