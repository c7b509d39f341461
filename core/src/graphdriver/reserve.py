"""The root's reserve: a little space kept allocated, given back to let a full disk be freed.

A container that writes without end fills the filesystem that also holds the store's
databases. Then nothing could record the command that would free it: on a full XFS SQLite
cannot even make its ``-wal`` (no free inode), on ext4 and btrfs the first write fails, so
``umount`` and ``rm`` of that container's layer said "the filesystem ... is full" and the
user had to delete its files by hand.

So every store open that finds room keeps ``<root>/reserve``: an unnamed file given its blocks
by ``fallocate`` (never written: no I/O), on btrfs as much metadata too (xattrs), then linked
there whole; 1% of the filesystem, at most :data:`SIZE`. A command that frees space (``rm``,
``umount``, ``cleanup``, a container's ``rm`` and ``umount``, a volume's ``rm``, ``volume
prune``) first calls :func:`release_if_full`, before it opens the store, and so do the
library's ``put``, ``remove``, a container's unmount and a volume's ``remove`` and ``prune``
(an engine's server holds its databases open): on a disk with no room for a new file (the
test ``sqlite`` uses for "full": :data:`~graphdriver.sqlite.FULL_BELOW` bytes written into an
unnamed file), it unlinks the reserve, says so in one warning, and runs. An open makes the
reserve again only where :data:`AGAIN_TIMES` its size is free, so the command that gave the
room back does not take it straight back.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

#: the file under the root
NAME = "reserve"
#: its size at most; less on a filesystem under 100 times this (1% of it)
SIZE = 8 << 20
#: made (again) only where this many times its size is free
AGAIN_TIMES = 8
#: bytes of one of the reserve's xattrs on btrfs (metadata: a value fits one 16 KiB node),
#: and on a btrfs made with 4 KiB nodes
XATTR_CHUNK, SMALL_XATTR_CHUNK = 15_000, 3_500
#: statvfs's free bytes above which the disk is surely not full (no write to test it)
SURELY_ROOM = 256 << 20


def size_for(root: Path) -> int:
    """The reserve's size on the filesystem of *root*."""
    st = os.statvfs(root)
    return min(SIZE, st.f_blocks * st.f_frsize // 100) & ~0xFFFF  # whole 64 KiB


def keep(root: Path) -> None:
    """Make ``<root>/reserve`` if it is missing and there is room (at each store open: one
    lstat when it is there). Any failure leaves it for a later open: it is a help, never a
    condition."""
    path = root / NAME
    try:
        os.lstat(path)
        return
    except FileNotFoundError:
        pass
    except OSError:
        return
    try:
        size = size_for(root)
        st = os.statvfs(root)
        if size <= 0 or st.f_bavail * st.f_frsize < AGAIN_TIMES * size:
            return
        fd = os.open(root, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        log.debug("no reserve made under %s: %s", root, exc)
        return
    try:
        os.posix_fallocate(fd, 0, size)
        if _on_btrfs(root):
            _metadata(fd, size)
        # linkat(AT_SYMLINK_FOLLOW) of the unnamed file: whole or not there. A dir fd is what
        # makes os.link call linkat (plain link() links the /proc symlink itself: EXDEV); an
        # absolute source ignores it
        os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=fd, follow_symlinks=True)
    except OSError as exc:  # full, no fallocate here, another open made it first
        log.debug("no reserve made under %s: %s", root, exc)
    finally:
        os.close(fd)


def _on_btrfs(root: Path) -> bool:
    from .linux.fs import BTRFS_MAGIC, fs_magic

    return fs_magic(root) == BTRFS_MAGIC


def _metadata(fd: int, size: int) -> None:
    """Give the reserve *size* bytes of btrfs metadata too, as xattrs: a container that makes
    files until none more fit fills the metadata space, which the data the reserve frees
    does not refill (its block groups stay data), and SQLite could not make ``-shm``."""
    chunk = XATTR_CHUNK
    done = 0
    while done < size:
        try:
            os.setxattr(fd, f"user.graphdriver.reserve.{done // chunk}", bytes(chunk))
        except OSError as exc:
            if exc.errno not in (errno.E2BIG, errno.ERANGE) or chunk == SMALL_XATTR_CHUNK:
                raise
            chunk, done = SMALL_XATTR_CHUNK, 0  # a 4 KiB nodesize: start over, smaller
            continue
        done += chunk


def release_if_full(root: Path) -> bool:
    """Before a command that frees space: unlink ``<root>/reserve`` if the disk has no room
    left for the command to record what it frees; whether it did."""
    from .sqlite import _no_room

    path = root / NAME
    try:
        st = os.statvfs(root)
        free = st.f_bavail * st.f_frsize
        if free >= SURELY_ROOM:
            return False
        kept = os.lstat(path)
        size = kept.st_size
        # room for it many times over is room (no 1 MiB write to try it at each removal)
        if not stat.S_ISREG(kept.st_mode) or free >= AGAIN_TIMES * size or not _no_room(path):
            return False
        os.unlink(path)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EROFS, errno.EACCES, errno.EPERM):
            log.debug("reserve under %s not released: %s", root, exc)
        return False
    log.warning(
        "the filesystem of %s is full: its reserve (%d KiB) was given back so that this "
        "command can record what it frees; it is made again once there is room",
        root,
        size >> 10,
    )
    return True
