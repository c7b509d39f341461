"""The store's reserve: a little space and a few inodes kept, given back to free a full disk.

A container that writes without end fills the filesystem that also holds the store's
databases. Then nothing could record the command that would free it: on a full XFS SQLite
cannot even make its ``-wal`` (no free inode), on ext4 and btrfs the first write fails, and an
ext4 out of inodes with blocks free ("No space left on device" while ``df`` shows room) makes
no file at all; ``umount`` and ``rm`` of that container's layer said "the filesystem ... is
full" and the user had to delete its files by hand.

So every store open that finds room keeps a ``.reserve`` directory: a ``space`` file given its
blocks by ``fallocate`` (never written; on btrfs as much metadata too, as xattrs), 1% of the
filesystem and at most :data:`SIZE`, and :data:`INODES` empty files. It is built aside and
renamed into place, so it is whole or not there. There is one per filesystem: ``<root>/.reserve``,
and one in the driver's home or ``<root>/volumes`` where that is another mount (an XFS with
project quota for overlay's ``--size``, say). A command that frees space calls
:func:`release_if_full` (the CLI's ``rm``, ``umount``, ``cleanup``, a container's ``rm`` and
``umount``, a volume's ``rm``, ``volume prune``, before it opens the store; the library's
``put``, ``remove``, a container's unmount and a volume's ``remove`` and ``prune``, once they
know they will act, for an engine's server, which holds its databases open; and such a server
as it starts, which could not open them otherwise): where the disk has
no room for a new file (the test ``sqlite`` uses for "full": :data:`~graphdriver.sqlite.FULL_BELOW`
bytes written into a named file) or fewer than :data:`INODES` free inodes, it removes the
reserve, says so in one warning, and the command runs. An open, and a ``create`` (a server
opens once), make the reserve again only where :data:`AGAIN_TIMES` its size and inodes are
free, so the command that gave the room back does not take it straight back; one that is not
whole is made again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path

from .linux.tree import remove_tree

log = logging.getLogger(__name__)

#: the directory, in the root (and in a home or ``volumes`` on another filesystem): a name
#: no layer id, volume or container name can have (they start with a letter or digit)
NAME = ".reserve"
#: the file in it that holds the blocks
SPACE = "space"
#: empty files in it: the inodes it holds
INODES = 16
#: its size at most (a removal's records need tens of KiB on ext4 and XFS, btrfs's
#: reservations some MiB of metadata: the xattrs); less on a filesystem under 100 times this
#: (1% of it)
SIZE = 4 << 20
#: filesystems that get none: memory (tmpfs, ramfs), where a reserve is pinned RAM
IN_MEMORY = {0x01021994, 0x858458F6}
#: made (again) only where this many times its size and its inodes are free
AGAIN_TIMES = 8
#: bytes of one of the reserve's xattrs on btrfs (metadata: a value fits one 16 KiB node),
#: and on a btrfs made with 4 KiB nodes
XATTR_CHUNK, SMALL_XATTR_CHUNK = 15_000, 3_500
#: statvfs's free bytes above which the disk is surely not full (no write to test it)
SURELY_ROOM = 256 << 20


def keep(root: Path, *dirs: Path) -> None:
    """Make the reserve of *root*'s filesystem, and of each of *dirs* on another one, where it
    is missing and there is room (at each open: an lstat each when they are there). Any
    failure leaves it to a later open: it is a help, never a condition."""
    seen: set[int] = set()
    for where in (root, *dirs):
        try:
            dev = os.stat(where).st_dev
        except OSError:
            continue
        if dev not in seen:
            seen.add(dev)
            _keep(where)


def _keep(where: Path) -> None:
    path = where / NAME
    try:
        if os.lstat(path / SPACE).st_blocks:
            return
        broken = True  # not whole: a removal cut short, a copy that dropped its blocks
    except FileNotFoundError:
        broken = os.path.lexists(path)
    except OSError:  # (a file of that name: not ours to touch)
        return
    try:
        if _magic(where) in IN_MEMORY:
            return
        st = os.statvfs(where)
        size = min(SIZE, st.f_blocks * st.f_frsize // 100) & ~0xFFFF  # whole 64 KiB
        if size <= 0 or st.f_bavail * st.f_frsize < AGAIN_TIMES * size:
            return
        if st.f_files and st.f_favail < AGAIN_TIMES * INODES:
            return
        if broken:
            _remove(where)
        _remove_leftovers(where)
    except OSError as exc:
        log.debug("no reserve made in %s: %s", where, exc)
        return
    new = where / f"{NAME}.new.{os.getpid()}.{os.urandom(4).hex()}"
    try:
        os.mkdir(new, 0o700)
        fd = os.open(new / SPACE, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            if _on_btrfs(where):
                _metadata(fd, size)
            if os.fstat(fd).st_blocks * 512 < size:  # glibc's emulation on a compressing fs
                raise OSError(errno.EOPNOTSUPP, "fallocate kept no blocks")
        finally:
            os.close(fd)
        for i in range(INODES):
            os.close(os.open(new / f"inode-{i:02d}", os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        os.rename(new, path)  # whole or not there; another open's made first: ENOTEMPTY
    except OSError as exc:  # full, no fallocate here, another open made it first
        log.debug("no reserve made in %s: %s", where, exc)
        with contextlib.suppress(OSError):
            remove_tree(str(new))


def _remove_leftovers(where: Path) -> None:
    """Reserves a process began to build and never finished (killed meanwhile): older than
    a minute (a build takes milliseconds; a pid says nothing across PID namespaces)."""
    now = time.time()
    for entry in os.scandir(where):
        if (
            entry.name.startswith(f"{NAME}.new.")
            and entry.is_dir(follow_symlinks=False)
            and now - entry.stat(follow_symlinks=False).st_mtime > 60
        ):
            remove_tree(entry.path)


def _remove(at: Path) -> None:
    """Remove ``<at>/.reserve``, *at* reached as the caller named it (symlinks too:
    ``--root`` may be one; remove_tree refuses them on the way to what it removes)."""
    fd = os.open(at, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_tree(NAME, dir_fd=fd)
    finally:
        os.close(fd)


def _magic(root: Path) -> int:
    from .linux.fs import fs_magic

    return fs_magic(root)


def _on_btrfs(root: Path) -> bool:
    from .linux.fs import BTRFS_MAGIC

    return _magic(root) == BTRFS_MAGIC


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


def _serving(root: Path, where: Path) -> Path:
    """The directory whose reserve serves the databases in *where*: *root* on its
    filesystem, else *where* itself."""
    try:
        return root if os.stat(where).st_dev == os.stat(root).st_dev else where
    except OSError:
        return root


def release_all_if_full(root: Path, dirs: Sequence[Path] = ()) -> bool:
    """:func:`release_if_full` for the databases in *dirs* of the store under *root* (a
    server's), or for every database there (the CLI, which does not know yet which driver a
    command will open)."""
    if not dirs:
        dirs = [root, root / "volumes", *(p.parent for p in root.glob("*/metadata.db"))]
    done: set[Path] = set()
    released = False
    for where in dirs:
        serving = _serving(root, where)
        if serving not in done:
            done.add(serving)
            released |= release_if_full(serving)
    return released


def release_if_full(root: Path, where: Path | None = None) -> bool:
    """Before a command that frees space records it in a database in *where* (default: the
    root): remove the reserve that serves it if the disk has no room left for the record;
    whether it did."""
    from .sqlite import _no_room

    at = root if where is None else _serving(root, where)
    path = at / NAME
    try:
        st = os.statvfs(at)
        free = st.f_bavail * st.f_frsize
        no_inodes = bool(st.f_files) and st.f_favail < INODES
        # btrfs counts free data only: its metadata may be full with data free
        data_only = _on_btrfs(at)
        if free >= SURELY_ROOM and not no_inodes and not data_only:
            return False
        space = os.lstat(path / SPACE)  # (through a symlink: refused below)
        if not stat.S_ISDIR(os.lstat(path).st_mode) or not stat.S_ISREG(space.st_mode):
            return False
        held = space.st_blocks * 512
        if no_inodes:
            full = True
        elif free >= SURELY_ROOM:  # (btrfs) data room: is there metadata room?
            full = _no_room(path, 0)  # a name alone: an empty file made and unlinked
        else:  # room for it many times over is room (no 1 MiB write at each removal)
            full = (free < AGAIN_TIMES * held or data_only) and _no_room(path)
        if not full:
            return False
        # removed where it is: a rename needs metadata room, which a full btrfs lacks (an
        # unlink takes its global reserve); another open sees it whole or going, never made
        _remove(at)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EROFS, errno.EACCES, errno.EPERM):
            log.debug("reserve in %s not released: %s", at, exc)
        return False
    log.warning(
        "the filesystem of %s is full: its reserve (%d KiB, %d inodes) was given back so "
        "that this command's records can be written; it is made again once there is room",
        at,
        held >> 10,
        INODES,
    )
    return True
