"""The btrfs ioctls btrfsutil does not wrap: quota, qgroup limits, space and fs info."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
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
