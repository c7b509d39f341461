"""The btrfs ioctls btrfsutil does not wrap: quota, qgroup limits, space and fs info."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Callable
from pathlib import Path

_BTRFS = 0x94


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_BTRFS << 8) | nr


_W, _R = 1, 2
BTRFS_IOC_SPACE_INFO = _ioc(_W | _R, 20, 16)
BTRFS_IOC_FS_INFO = _ioc(_R, 31, 1024)
BTRFS_IOC_QUOTA_CTL = _ioc(_W | _R, 40, 16)
BTRFS_IOC_QGROUP_CREATE = _ioc(_W, 42, 16)
BTRFS_IOC_QGROUP_LIMIT = _ioc(_R, 43, 48)

BTRFS_QUOTA_CTL_ENABLE = 1
BTRFS_QGROUP_LIMIT_MAX_RFER = 1
BLOCK_GROUP_DATA = 1
BLOCK_GROUP_METADATA = 4


def _ioctl(path: Path, request: int, arg: bytes) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return bytes(fcntl.ioctl(fd, request, arg))
    finally:
        os.close(fd)


def fsid(path: Path) -> str:
    """The filesystem's UUID, as in /sys/fs/btrfs/<uuid>."""
    raw = _ioctl(path, BTRFS_IOC_FS_INFO, bytes(1024))
    u = raw[16:32].hex()
    return f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"


def quota_enabled(path: Path) -> bool:
    return Path(f"/sys/fs/btrfs/{fsid(path)}/qgroups").is_dir()


def enable_quota(path: Path) -> None:
    _ioctl(path, BTRFS_IOC_QUOTA_CTL, struct.pack("=QQ", BTRFS_QUOTA_CTL_ENABLE, 0))


def limit_qgroup(path: Path, qgroupid: int, max_referenced: int) -> None:
    """Cap what the qgroup *qgroupid* (a subvolume id at level 0) may reference."""
    args = struct.pack("=Q QQQQQ", qgroupid, BTRFS_QGROUP_LIMIT_MAX_RFER, max_referenced, 0, 0, 0)
    _ioctl(path, BTRFS_IOC_QGROUP_LIMIT, args)


def destroy_qgroup(path: Path, qgroupid: int) -> None:
    """Remove a qgroup; gone already (newer kernels drop a deleted subvolume's) is fine."""
    try:
        _ioctl(path, BTRFS_IOC_QGROUP_CREATE, struct.pack("=QQ", 0, qgroupid))
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EINVAL):
            raise


def qgroups(path: Path) -> list[int]:
    """Level-0 qgroup ids of the filesystem (from sysfs; empty when quota is off)."""
    base = Path(f"/sys/fs/btrfs/{fsid(path)}/qgroups")
    if not base.is_dir():
        return []
    out = []
    for entry in base.iterdir():
        level, _, qid = entry.name.partition("_")
        if level == "0" and qid.isdigit():
            out.append(int(qid))
    return sorted(out)


def space_info(path: Path) -> dict[str, tuple[int, int]]:
    """{"data": (used, total), "metadata": (used, total)} in bytes."""
    head = _ioctl(path, BTRFS_IOC_SPACE_INFO, struct.pack("=QQ", 0, 0))
    count = struct.unpack_from("=QQ", head)[1]
    raw = _ioctl(path, BTRFS_IOC_SPACE_INFO, struct.pack("=QQ", count, 0) + bytes(24 * count))
    out = {"data": (0, 0), "metadata": (0, 0)}
    for i in range(count):
        flags, total, used = struct.unpack_from("=QQQ", raw, 16 + 24 * i)
        for name, bit in (("data", BLOCK_GROUP_DATA), ("metadata", BLOCK_GROUP_METADATA)):
            if flags & bit:
                u, t = out[name]
                out[name] = (u + used, t + total)
    return out


# ---------------------------------------------------------------- tree search and backrefs

#: struct btrfs_ioctl_search_args_v2: a 104-byte key, the buffer's size, then the buffer
_SEARCH_KEY = struct.Struct("=7Q4I4QQ")
_SEARCH_HEADER = struct.Struct("=3Q2I")
_SEARCH_BUFFER = 1 << 18
BTRFS_IOC_TREE_SEARCH_V2 = _ioc(_W | _R, 17, _SEARCH_KEY.size)
BTRFS_IOC_INO_PATHS = _ioc(_W | _R, 35, 56)
#: struct btrfs_data_container's head (bytes left, bytes missing, count, count missed), and
#: the most the kernel fills (it takes no larger size)
_INO_PATHS_HEAD = struct.Struct("=4I")
_INO_PATHS_MAX = 4096
_U64 = struct.Struct("=Q")
_MAX_U64 = (1 << 64) - 1

#: (objectid, type, offset, data) of one item of a btrfs tree
Item = tuple[int, int, int, bytes]
#: a key of a btrfs tree: (objectid, type, offset)
Key = tuple[int, int, int]
#: where the items start in the buffer :func:`scan` hands out, and each item's header there
#: (transid, objectid, offset, type, length of the data that follows it)
SEARCH_START = _SEARCH_KEY.size
SEARCH_HEADER = _SEARCH_HEADER


def scan(
    fd: int,
    read: Callable[[bytearray, int], Key | None],
    min_transid: int = 0,
    objectids: tuple[int, int] = (0, _MAX_U64),
    types: tuple[int, int] = (0, 255),
    tree: int = 0,
) -> None:
    """Hand *read* the items of the key range from (*objectids*[0], *types*[0], 0) to
    (*objectids*[1], *types*[1], max) of *tree* (0: the subvolume *fd* is in) that lie in a
    tree block written in transaction *min_transid* or later, as ``btrfs subvolume find-new``
    reads them: the kernel skips older blocks whole, so the cost follows what changed, not the
    tree. Each call of *read* gets the buffer one ioctl filled and how many items it holds,
    from :data:`SEARCH_START` on (each a :data:`SEARCH_HEADER` and its data), reads them in
    place and returns the key of the last one, the next ioctl starting right after it (None:
    enough). In place, not an item at a time: a tuple and a copy of each item cost more than
    the kernel's part."""
    (objectid, max_objectid), (type_, max_type), offset = objectids, types, 0
    raw = bytearray(_SEARCH_KEY.size + _SEARCH_BUFFER)
    while True:
        # the kernel returns the items of the key range from (objectid, type, offset) on
        _SEARCH_KEY.pack_into(
            raw, 0, tree, objectid, max_objectid, offset, _MAX_U64, min_transid, _MAX_U64,
            type_, max_type, 0xFFFFFFFF, 0, 0, 0, 0, 0, _SEARCH_BUFFER,
        )  # fmt: skip
        fcntl.ioctl(fd, BTRFS_IOC_TREE_SEARCH_V2, raw)
        count = _SEARCH_KEY.unpack_from(raw)[9]
        if count == 0 or (last := read(raw, count)) is None:
            return
        # go on right after the last key returned
        objectid, type_, offset = last
        if offset < _MAX_U64:
            offset += 1
        elif type_ < 255:
            type_, offset = type_ + 1, 0
        elif objectid < max_objectid:
            objectid, type_, offset = objectid + 1, 0, 0
        else:
            return


def search(
    fd: int,
    min_transid: int = 0,
    objectids: tuple[int, int] = (0, _MAX_U64),
    types: tuple[int, int] = (0, 255),
    tree: int = 0,
) -> list[Item]:
    """The items :func:`scan` reads, each a tuple (for a few: a root item, a test)."""
    items: list[Item] = []

    def read(raw: bytearray, count: int) -> Key:
        pos = SEARCH_START
        for _ in range(count):
            _transid, objectid, offset, type_, length = _SEARCH_HEADER.unpack_from(raw, pos)
            pos += _SEARCH_HEADER.size
            items.append((objectid, type_, offset, bytes(raw[pos : pos + length])))
            pos += length
        return objectid, type_, offset

    scan(fd, read, min_transid, objectids, types, tree)
    return items


#: struct btrfs_root_item: its otransid, and its otime (seconds, nanoseconds)
_ROOT_OTRANSID = struct.Struct("=Q")
_ROOT_OTIME = struct.Struct("=QI")
_ROOT_ITEM = 132


def created(fd: int, subvolume: int) -> tuple[int, int]:
    """(transaction, time in ns) in which *subvolume* was made, read from its root item (the
    time to the nanosecond, which btrfsutil rounds to the second)."""
    for _oid, _type, _offset, data in search(fd, 0, (subvolume, subvolume), (_ROOT_ITEM,) * 2, 1):
        (otransid,) = _ROOT_OTRANSID.unpack_from(data, 303)
        seconds, nanoseconds = _ROOT_OTIME.unpack_from(data, 339)
        return otransid, seconds * 10**9 + nanoseconds
    raise FileNotFoundError(errno.ENOENT, f"no root item for subvolume {subvolume}")


def ino_paths(fd: int, ino: int) -> list[str]:
    """Every name of inode *ino* in the subvolume *fd* is in, relative to its root (all the
    names of a hardlinked file); empty for an inode no directory names. OSError
    (ENAMETOOLONG) when they take more than the kernel gives back at once (4 KiB: many links
    of long names, or a path that long), where asking again would get no more."""
    # read in place: a ctypes buffer's .raw is a copy of all of it at each use
    container = bytearray(_INO_PATHS_MAX)
    address = ctypes.addressof((ctypes.c_char * _INO_PATHS_MAX).from_buffer(container))
    args = struct.pack("=QQ4QQ", ino, _INO_PATHS_MAX, 0, 0, 0, 0, address)
    try:
        fcntl.ioctl(fd, BTRFS_IOC_INO_PATHS, bytearray(args))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return []
        raise
    _left, missing, count, _missed = _INO_PATHS_HEAD.unpack_from(container)
    if missing:
        raise OSError(errno.ENAMETOOLONG, f"the names of inode {ino} take over 4 KiB")
    base = _INO_PATHS_HEAD.size
    out = []
    for i in range(count):
        (at,) = _U64.unpack_from(container, base + 8 * i)
        start = base + at
        out.append(os.fsdecode(bytes(container[start : container.index(b"\0", start)])))
    return out
