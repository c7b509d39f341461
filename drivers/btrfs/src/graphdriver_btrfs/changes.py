"""A layer's changes from btrfs generation numbers: compare only what was written since the
snapshot, not both trees.

A child layer is a snapshot of its parent taken in transaction T (the child's ``otransid``):
until then the two trees share every block, inode numbers included. Whatever the child changes
later is written in a later transaction: an inode item's ``transid`` moves on every change of
the inode (data, size, mode, owner, times, xattrs, links, a rename of it), a directory's on
every entry added or removed, and the tree search ioctl skips every tree block older than
T + 1 without reading it (``btrfs subvolume find-new``). So the inodes written since T, and
the directories above their names, are the only places where the two trees can differ; the
core's tree compare runs on those directories alone and finds there what the full walk would
find (:class:`_Pruned`), and a hardlinked file's other names come from the kernel
(``BTRFS_IOC_INO_PATHS``). An inode written only for its atime (a read) is left out by its
ctime. The search sees only the btree, so pending writes are committed first (``sync``: free
when there are none, a transaction commit when there are). A superset is harmless (it is
compared and found equal); a miss would not be, so whenever the relation is not plainly "a
snapshot of a parent unchanged since", the answer is None and the store walks both trees.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from graphdriver import Change
from graphdriver.toolkit import changes_within, mounts_under

from . import ioctl

log = logging.getLogger(__name__)

#: past this many inodes written since the snapshot, resolving their directories' names (one
#: ioctl each) and comparing those directories costs about what the walk of a small image does:
#: walk instead
MAX_CHANGED = 4096

#: the subvolume's root directory, and the last inode number (above: orphans, free-space items)
_ROOT_INO = 256
_LAST_INO = (1 << 64) - 256

_INODE_ITEM, _INODE_REF, _XATTR_ITEM, _DIR_ITEM, _DIR_INDEX, _EXTENT_DATA = 1, 12, 24, 84, 96, 108
#: where each item type keeps the transaction that wrote it
_TRANSID_AT = {_INODE_ITEM: 8, _XATTR_ITEM: 17, _DIR_ITEM: 17, _DIR_INDEX: 17, _EXTENT_DATA: 0}
#: what the search reads: those, and the inode refs (an inode's names: the key's offset is the
#: directory holding them) that lie in the same tree blocks
_READ = frozenset((*_TRANSID_AT, _INODE_REF))
_U64 = struct.Struct("=Q")
#: struct btrfs_inode_item: its link count and mode; its ctime (seconds, nanoseconds)
_NLINK_MODE = struct.Struct("=I8xI")  # (uid and gid between)
_NLINK_AT = 40
_CTIME = struct.Struct("=QI")
_CTIME_AT = 124


class _Written:
    """What the search found: the inodes written since the snapshot, and of each inode it
    read, its link count and mode and the directories its refs name."""

    def __init__(self) -> None:
        self.inodes: set[int] = set()
        self.kinds: dict[int, tuple[int, int]] = {}
        self.parents: dict[int, list[int]] = {}


def _written(fd: int, transid: int, otime_ns: int, limit: int) -> _Written | None:
    got = _Written()
    inodes, kinds, parents = got.inodes, got.kinds, got.parents
    header, step = ioctl.SEARCH_HEADER.unpack_from, ioctl.SEARCH_HEADER.size
    u64, nlink_mode, ctime = _U64.unpack_from, _NLINK_MODE.unpack_from, _CTIME.unpack_from
    over = False

    def read(raw: bytearray, count: int) -> ioctl.Key | None:
        """The items of one ioctl, read in place (a tuple and a copy of each, 16,000 where
        a container's reads moved the atimes of a hundred directories, cost twice as much)."""
        nonlocal over
        pos = ioctl.SEARCH_START
        for _ in range(count):
            _transid, ino, offset, kind, length = header(raw, pos)
            pos += step
            if ino >= _ROOT_INO and kind in _READ:
                if kind == _INODE_REF:
                    parents.setdefault(ino, []).append(offset)
                else:
                    if kind == _INODE_ITEM:
                        kinds[ino] = nlink_mode(raw, pos + _NLINK_AT)
                    if u64(raw, pos + _TRANSID_AT[kind])[0] > transid and (
                        kind != _INODE_ITEM or _ns(ctime(raw, pos + _CTIME_AT)) >= otime_ns
                    ):
                        inodes.add(ino)
                        if len(inodes) > limit:
                            over = True
                            return None
            pos += length
        return ino, kind, offset

    ioctl.scan(fd, read, transid + 1, (0, _LAST_INO))
    return None if over else got


def _ns(ctime: tuple[int, int]) -> int:
    return ctime[0] * 10**9 + ctime[1]


def written_since(fd: int, transid: int, otime_ns: int, limit: int) -> set[int] | None:
    """Inode numbers of the subvolume *fd* is in with an item written after transaction
    *transid* (an inode, xattr, directory entry or file extent); None past *limit*.

    An inode item rewritten only for its atime (a read) keeps a ctime from before the snapshot,
    made at *otime_ns*: it is left out. Every other change of an inode sets its ctime to the
    time of the change (the walk's boundary makes the same assumption of a clock that does not
    step back).
    """
    got = _written(fd, transid, otime_ns, limit)
    return None if got is None else got.inodes


def _names(fd: int, written: _Written) -> set[str]:
    """The directories (``/a/b``, ``""`` the root) that hold a name of a written inode or are
    one, and every directory above them. A file of one link whose ref the search read is in
    the directory the ref names: only directories' names are asked of the kernel, once each;
    any other inode's names are asked (all the names of a hardlinked file)."""
    wanted = {""}
    asked: dict[int, list[str]] = {_ROOT_INO: [""]}

    def names_of(ino: int) -> list[str]:
        if ino not in asked:
            asked[ino] = ioctl.ino_paths(fd, ino)
        return asked[ino]

    for ino in written.inodes:
        nlink, mode = written.kinds.get(ino, (0, 0))
        parents = written.parents.get(ino, [])
        one_place = nlink == 1 and not stat.S_ISDIR(mode) and len(parents) == 1
        for rel in names_of(parents[0]) if one_place else names_of(ino):
            path = ""
            for part in rel.split("/") if rel else []:
                path += "/" + part
                wanted.add(path)
    return wanted


def _nested(bu: Any, path: Path) -> bool:
    """Whether a subvolume lives inside *path* (a snapshot holds an empty stand-in for it)."""
    with contextlib.suppress(StopIteration):
        next(iter(bu.SubvolumeIterator(str(path))))
        return True
    return False


def _why_not(bu: Any, child: Path, parent: Path) -> str | None:
    """Why the generation numbers cannot tell the child's changes against *parent*, or None."""
    info, base = bu.subvolume_info(str(child)), bu.subvolume_info(str(parent))
    if info.parent_uuid != base.uuid:
        return "the layer is not a snapshot of its parent's subvolume"
    if any(m != os.path.realpath(p) for p in (child, parent) for m in mounts_under(p)):
        return "something is mounted inside the layer or its parent"
    if _nested(bu, child) or _nested(bu, parent):
        return "a subvolume is nested inside the layer or its parent"
    return None


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def snapshot_changes(bu: Any, child: Path, parent: Path) -> list[Change] | None:
    """The changes of subvolume *child* against *parent*, the subvolume it is a snapshot of,
    exactly as ``tree_changes`` finds them; None when only a walk can tell (then logged)."""
    try:
        why = _why_not(bu, child, parent)
        if why is None:
            bu.sync(str(child))  # see the module's docstring
            with _opened(child) as fd, _opened(parent) as parent_fd:
                since, otime_ns = ioctl.created(fd, bu.subvolume_id(str(child)))
                if written_since(parent_fd, since, otime_ns, limit=0) != set():
                    why = "the parent changed after the snapshot"
                elif (written := _written(fd, since, otime_ns, MAX_CHANGED)) is None:
                    why = f"more than {MAX_CHANGED} inodes changed"
                else:
                    return changes_within(
                        str(child),
                        str(parent),
                        _names(fd, written),
                        lambda i: ioctl.ino_paths(fd, i),
                        written.inodes,
                    )
    except OSError as exc:  # btrfsutil's errors too; a kernel refusing an ioctl, say
        why = f"the btrfs tree search failed: {exc}"
    log.debug("btrfs changes of %s: walking both trees: %s", child.name, why)
    return None
