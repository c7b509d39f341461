"""XFS project quota: a directory tree gets a project id and a hard limit on its blocks.

Project ids are set with FS_IOC_FSSETXATTR (with PROJINHERIT, so everything created below
inherits them) and limits with quotactl_fd(Q_XSETQLIM), which needs no block device path.
Needs an XFS filesystem mounted with ``prjquota`` (and a kernel built with XFS quota).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from pathlib import Path

from .libc import SYS_QUOTACTL_FD, syscall

FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_PROJINHERIT = 0x200
_FSXATTR = struct.Struct("=IIII I8s")

PRJQUOTA = 2
Q_XSETQLIM = (ord("X") << 8) + 4
Q_XGETQSTAT = (ord("X") << 8) + 5
FS_DQUOT_VERSION = 1
FS_PROJ_QUOTA = 2
FS_DQ_BSOFT = 1 << 2
FS_DQ_BHARD = 1 << 3
FS_QUOTA_PDQ_ENFD = 1 << 5  # project quota limits enforced

# struct fs_disk_quota (linux/dqblk_xfs.h), 112 bytes
_DISK_QUOTA = struct.Struct("=bbHI QQQQQQ ii HH bbbb QQQ iHh 8s")
# struct fs_quota_stat: the head is enough to read the flags
_QUOTA_STAT = struct.Struct("bHb")  # native alignment, as the kernel lays it out


def _qcmd(cmd: int, kind: int) -> int:
    return (cmd << 8) | (kind & 0xFF)


def _quotactl_fd(path: Path, cmd: int, qid: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        syscall(
            SYS_QUOTACTL_FD,
            fd,
            ctypes.c_uint(_qcmd(cmd, PRJQUOTA)),
            ctypes.c_int(qid),
            buf,
            path=path,
        )
    finally:
        os.close(fd)


def project_quota_enforced(path: Path) -> bool:
    """Whether the filesystem holding *path* enforces project quota limits."""
    buf = ctypes.create_string_buffer(256)
    try:
        _quotactl_fd(path, Q_XGETQSTAT, 0, buf)
    except OSError:
        return False
    _version, flags, _pad = _QUOTA_STAT.unpack_from(buf.raw)
    return bool(flags & FS_QUOTA_PDQ_ENFD)


def get_project(path: Path) -> int:
    """The project id of the file or directory at *path*."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(_FSXATTR.size))
    finally:
        os.close(fd)
    return int(_FSXATTR.unpack(raw)[3])


def set_project(path: Path, project: int) -> None:
    """Give the directory *path* the project id *project*, inherited by what it will hold."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        raw = fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(_FSXATTR.size))
        xflags, extsize, nextents, _old, cowextsize, pad = _FSXATTR.unpack(raw)
        new = _FSXATTR.pack(
            xflags | FS_XFLAG_PROJINHERIT, extsize, nextents, project, cowextsize, pad
        )
        fcntl.ioctl(fd, FS_IOC_FSSETXATTR, new)
    finally:
        os.close(fd)


def set_limit(path: Path, project: int, size: int) -> None:
    """Limit *project* on the filesystem holding *path* to *size* bytes (0: no limit)."""
    blocks = (size + 511) // 512
    fields: list[int | bytes] = [0] * 25
    fields[0] = FS_DQUOT_VERSION
    fields[1] = FS_PROJ_QUOTA
    fields[2] = FS_DQ_BSOFT | FS_DQ_BHARD
    fields[3] = project
    fields[4] = blocks  # d_blk_softlimit
    fields[5] = blocks  # d_blk_hardlimit
    fields[24] = b""  # d_padding4
    buf = ctypes.create_string_buffer(_DISK_QUOTA.pack(*fields), _DISK_QUOTA.size)
    try:
        _quotactl_fd(path, Q_XSETQLIM, project, buf)
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            raise OSError(exc.errno, "quotactl_fd needs Linux 5.14 or later", str(path)) from exc
        raise
