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
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from graphdriver import Change
from graphdriver.toolkit import changes_within, mounts_under

from . import ioctl

log = logging.getLogger(__name__)

#: past this many inodes written since the snapshot, resolving their names (one ioctl each) and
#: comparing their directories costs about what the walk of a small image does: walk instead
MAX_CHANGED = 4096

#: the subvolume's root directory, and the last inode number (above: orphans, free-space items)
_ROOT_INO = 256
_LAST_INO = (1 << 64) - 256

_INODE_ITEM, _XATTR_ITEM, _DIR_ITEM, _DIR_INDEX, _EXTENT_DATA = 1, 24, 84, 96, 108
#: where each item type keeps the transaction that wrote it
_TRANSID_AT = {_INODE_ITEM: 8, _XATTR_ITEM: 17, _DIR_ITEM: 17, _DIR_INDEX: 17, _EXTENT_DATA: 0}
_U64 = struct.Struct("=Q")
#: struct btrfs_inode_item: its ctime (seconds, nanoseconds)
_CTIME = struct.Struct("=QI")
_CTIME_AT = 124


def written_since(fd: int, transid: int, otime_ns: int, limit: int) -> set[int] | None:
    """Inode numbers of the subvolume *fd* is in with an item written after transaction
    *transid* (an inode, xattr, directory entry or file extent); None past *limit*.

    An inode item rewritten only for its atime (a read) keeps a ctime from before the snapshot,
    made at *otime_ns*: it is left out. Every other change of an inode sets its ctime to the
    time of the change (the walk's boundary makes the same assumption of a clock that does not
    step back).
    """
    found: set[int] = set()
    for ino, kind, _offset, data in ioctl.search(fd, transid + 1, (0, _LAST_INO)):
        at = _TRANSID_AT.get(kind)
        if at is None or ino < _ROOT_INO or _U64.unpack_from(data, at)[0] <= transid:
            continue
        if kind == _INODE_ITEM:
            seconds, nanoseconds = _CTIME.unpack_from(data, _CTIME_AT)
            if seconds * 10**9 + nanoseconds < otime_ns:
                continue
        found.add(ino)
        if len(found) > limit:
            return None
    return found


def _names(fd: int, inodes: set[int]) -> set[str]:
    """Every path (``/a/b``) of *inodes*, and every directory above one (``""`` the root)."""
    wanted = {""}
    for ino in inodes:
        for rel in [""] if ino == _ROOT_INO else ioctl.ino_paths(fd, ino):
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
                elif (inodes := written_since(fd, since, otime_ns, MAX_CHANGED)) is None:
                    why = f"more than {MAX_CHANGED} inodes changed"
                else:
                    return changes_within(
                        str(child),
                        str(parent),
                        _names(fd, inodes),
                        lambda i: ioctl.ino_paths(fd, i),
                    )
    except OSError as exc:  # btrfsutil's errors too; a kernel refusing an ioctl, say
        why = f"the btrfs tree search failed: {exc}"
    log.debug("btrfs changes of %s: walking both trees: %s", child.name, why)
    return None
