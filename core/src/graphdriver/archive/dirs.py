"""Directories read through their descriptors, for the tree compare (:mod:`.changes`): an
entry stat'ed or looked up by its name in its open directory, not by a whole path deep in a
store, with errors that still name the whole path."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

#: a directory read by os.scandir(fd), and one only looked in (fstatat: no read permission
#: needed); below the compare's top, where it lstat'ed each as a directory, none is followed
#: if it became a symlink since, and one of the new side must still be the inode it listed
#: (a container writing its upper while it is diffed)
_READ_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_LOOK_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_BELOW_TOP = os.O_NOFOLLOW
#: directories of the old side open at once at most: a name new at one level is looked for
#: in every lower (an overlay of 500 layers); the others are looked in by path, as are all
#: when the process has no descriptor left
_MAX_OPEN = 8


#: set on an error once it names its whole path (an enclosing listing leaves it)
_WHOLE = "graphdriver_whole_path"


def named(exc: OSError, directory: str) -> None:
    """*exc* of a call at a name in *directory*'s descriptor, naming the whole path as the
    call by path would have."""
    if getattr(exc, _WHOLE, False):
        return
    if isinstance(exc.filename, str) and "/" not in exc.filename:
        exc.filename = directory + "/" + exc.filename
    setattr(exc, _WHOLE, True)


def name_whole(exc: OSError, path: str) -> None:
    """*exc* names the whole *path* (of a directory whose read failed, say)."""
    exc.filename = path
    setattr(exc, _WHOLE, True)


def _open(path: str, flags: int, was: os.stat_result | None) -> int:
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        setattr(exc, _WHOLE, True)
        raise
    if was is not None:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (was.st_dev, was.st_ino):
            os.close(fd)
            raise OSError(errno.ESTALE, "replaced while the layer was compared", path)
    return fd


def open_dir(path: str, top: bool, was: os.stat_result | None = None) -> int:
    """A descriptor of the directory *path* to read (the caller closes it): below the top
    not through a symlink; *was*: the directory's lstat when the compare listed it, which it
    must still be."""
    return _open(path, _READ_DIR if top else _READ_DIR | _BELOW_TOP, was)


@contextlib.contextmanager
def listing(
    path: str, top: bool, was: os.stat_result | None = None
) -> Iterator[Iterator[os.DirEntry[str]]]:
    """os.scandir of the directory *path* through its descriptor (:func:`open_dir`): its
    entries are stat'ed there, one path component each, where the whole path (deep in a
    store) cost as much again to resolve; an error of a call at one of them names its whole
    path."""
    fd = open_dir(path, top, was)
    try:
        with os.scandir(fd) as it:
            yield it
    except OSError as exc:
        named(exc, path)
        raise
    finally:
        os.close(fd)


def scan(path: str, top: bool, was: os.stat_result | None = None) -> dict[str, os.stat_result]:
    with listing(path, top, was) as it:
        return {entry.name: entry.stat(follow_symlinks=False) for entry in it}


class Stack:
    """The directories of the old side at one directory of the new (nearest first), the
    first :data:`_MAX_OPEN` opened on their first lookup and all closed by :meth:`close`,
    before the compare goes down: however deep the tree and however many the layers, it
    holds a few descriptors."""

    __slots__ = ("fds", "paths", "top")

    #: not opened yet, and looked in by path
    UNOPENED, BY_PATH = -1, -2

    def __init__(self, paths: list[str], top: bool) -> None:
        self.paths = paths
        self.top = top
        self.fds: list[int] = [self.UNOPENED] * len(paths)

    def fd(self, i: int) -> int:
        """The descriptor of directory *i*, or :attr:`BY_PATH`."""
        fd = self.fds[i]
        if fd == self.UNOPENED:
            fd = self.BY_PATH
            if i < _MAX_OPEN:
                flags = _LOOK_DIR if self.top else _LOOK_DIR | _BELOW_TOP
                try:
                    fd = os.open(self.paths[i], flags)
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE):
                        raise
            self.fds[i] = fd
        return fd

    def known_fds(self) -> tuple[int, ...]:
        """For the compare's C loop (``_fastpath.compare_dir``): the descriptors of the
        directories, nearest first, -1 for one no longer there, and ending at the first that
        only a lookup by path reaches (:attr:`BY_PATH`, or an error to raise in its place)."""
        fds: list[int] = []
        for i in range(len(self.paths)):
            try:
                fd = self.fd(i)
            except (FileNotFoundError, NotADirectoryError):
                fd = self.UNOPENED  # as lookup skips it
            except OSError:
                fd = self.BY_PATH  # the lookup by path raises it, naming it
            fds.append(fd)
            if fd == self.BY_PATH:
                break
        return tuple(fds)

    def close(self) -> None:
        for fd in self.fds:
            if fd >= 0:
                os.close(fd)
        self.fds = [self.UNOPENED] * len(self.paths)
