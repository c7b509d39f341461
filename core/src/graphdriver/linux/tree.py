"""Removing a tree of any depth: one directory open at a time, going down by name and back up
by ``..``, never through a symlink. ``shutil.rmtree`` calls itself once a level (3.11), so a
layer about 1,000 directories deep could not be removed, nor rolled back after a failed apply,
and every later command warned of it again; and a path-based walk stops at PATH_MAX."""

from __future__ import annotations

import errno
import os
import stat

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
    """Remove whatever is at *path* (relative to *dir_fd* if given): a directory with all it
    holds, or anything else; nothing there is fine. A symlink is removed, never followed."""
    path = os.fspath(path)
    try:
        st = os.lstat(path, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path, dir_fd=dir_fd)
        return
    head, _, name = path.rstrip("/").rpartition("/")
    if name in ("", ".", ".."):
        raise OSError(errno.EINVAL, "not a directory that can be removed", path)
    parent = os.open(head or ("/" if path.startswith("/") else "."), _DIR, dir_fd=dir_fd)
    try:
        _remove_dir(parent, name, path)
    finally:
        os.close(parent)


def _remove_dir(parent: int, name: str, path: str) -> None:
    """Remove the directory *name* of the open directory *parent* and all below it."""
    fd = os.open(name, _DIR, dir_fd=parent)
    #: the directories entered, each with its name in the one above and its identity
    entered = [(name, _identity(os.fstat(fd)))]
    try:
        while True:
            sub = _empty_but_one(fd)
            if sub is not None:  # down into it
                child = os.open(sub, _DIR, dir_fd=fd)
                os.close(fd)
                fd = child
                entered.append((sub, _identity(os.fstat(fd))))
                continue
            done, _ = entered.pop()  # *fd* is empty: up, and remove it
            if not entered:
                os.close(fd)
                fd = -1
                os.rmdir(done, dir_fd=parent)
                return
            up = os.open("..", _DIR, dir_fd=fd)
            os.close(fd)
            fd = up
            if _identity(os.fstat(fd)) != entered[-1][1]:
                raise OSError(errno.ESTALE, "the tree moved while it was being removed", path)
            os.rmdir(done, dir_fd=fd)
    finally:
        if fd >= 0:
            os.close(fd)


def _empty_but_one(fd: int) -> str | None:
    """Remove every entry of the open directory *fd* that is not a directory, up to the first
    directory found: its name, or None when *fd* is empty."""
    with os.scandir(fd) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                return entry.name
            os.unlink(entry.name, dir_fd=fd)
    return None


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino
