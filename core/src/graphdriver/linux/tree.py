"""Removing a tree of any depth: one directory open at a time, going down by name and back up
by ``..``, never through a symlink. ``shutil.rmtree`` calls itself once a level (3.11), so a
layer about 1,000 directories deep could not be removed, nor rolled back after a failed apply,
and every later command warned of it; and a path-based walk stops at PATH_MAX."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
    """Remove whatever is at *path* (relative to *dir_fd* if given): a directory with all it
    holds, or anything else; nothing there is fine. A symlink is removed, never followed; a
    mount inside is entered like any directory (:func:`~.mount.unmount_all_under` first).
    Each directory is listed once (its subdirectories kept, not read again: on ext4 a
    listing walks the emptied blocks of what was removed from it)."""
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


@dataclass
class _Level:
    """A directory entered: its name in the one above, its identity, and its subdirectories
    still to remove (its other entries are gone once it is entered)."""

    name: str
    identity: tuple[int, int]
    subdirs: list[str] = field(default_factory=list)


def _remove_dir(parent: int, name: str, path: str) -> None:
    """Remove the directory *name* of the open directory *parent* and all below it."""
    fd = os.open(name, _DIR, dir_fd=parent)
    levels: list[_Level] = []
    try:
        levels.append(_enter(fd, name, path))
        while True:
            level = levels[-1]
            if level.subdirs:  # down into the next one
                sub = level.subdirs.pop()
                child = os.open(sub, _DIR, dir_fd=fd)
                os.close(fd)
                fd = child
                levels.append(_enter(fd, sub, _where(path, levels, sub)))
                continue
            done = levels.pop()  # *fd* is empty: up, and remove it
            if not levels:
                os.close(fd)
                fd = -1
                os.rmdir(done.name, dir_fd=parent)
                return
            up = os.open("..", _DIR, dir_fd=fd)
            os.close(fd)
            fd = up
            if _identity(os.fstat(fd)) != levels[-1].identity:
                raise OSError(errno.ESTALE, "the tree moved while it was being removed", path)
            os.rmdir(done.name, dir_fd=fd)
    except OSError as exc:
        if exc.filename is None or not str(exc.filename).startswith(path):
            raise OSError(exc.errno, exc.strerror, _where(path, levels)) from None
        raise
    finally:
        if fd >= 0:
            os.close(fd)


def _enter(fd: int, name: str, where: str) -> _Level:
    """The level of the directory *fd* (named *name*, at *where*), its entries but the
    subdirectories removed."""
    level = _Level(name, _identity(os.fstat(fd)))
    with os.scandir(fd) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                level.subdirs.append(entry.name)
                continue
            try:
                os.unlink(entry.name, dir_fd=fd)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, f"{where}/{entry.name}") from None
    return level


def _where(path: str, levels: list[_Level], *more: str) -> str:
    """The path of the directory the removal is in (*path* and the names below it)."""
    return "/".join([path.rstrip("/"), *(level.name for level in levels[1:]), *more])


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino
