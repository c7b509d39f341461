"""What filesystem a path is on (statfs magic), whether it returns d_type, and the two
directory chores every driver has: finding where a path-to-be would live, and folders only root
may enter."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from pathlib import Path

from .libc import LIBC, errno_error

BTRFS_MAGIC = 0x9123683E
MAGIC_NAMES = {
    BTRFS_MAGIC: "btrfs",
    0xEF53: "extfs",
    0x58465342: "xfs",
    0x01021994: "tmpfs",
    0x794C7630: "overlayfs",
    0x6969: "nfs",
    0x2FC12FC1: "zfs",
    0x65735546: "fuse",
    0xF15F: "ecryptfs",
    0x61756673: "aufs",
    0x858458F6: "ramfs",
    0x73717368: "squashfs",
    0xE0F5E1E2: "erofs",
    0x01021997: "v9fs",
    0x9FA0: "proc",
}


#: chattr's flags (FS_IOC_GETFLAGS / FS_IOC_SETFLAGS: _IOR/_IOW('f', 1/2, long) in the
#: asm-generic encoding of x86_64 and arm64; the kernel copies an int), its C flag (no
#: copy-on-write) and c flag (compress), which btrfs refuses alongside C
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_NOCOW_FL = 0x00800000
FS_COMPR_FL = 0x00000004


class _Statfs(ctypes.Structure):
    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong),
        ("f_bfree", ctypes.c_ulong),
        ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong),
        ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


LIBC.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]


def fs_magic(path: Path) -> int:
    """The f_type of statfs(2) for *path*."""
    buf = _Statfs()
    if LIBC.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        raise errno_error(path)
    return int(buf.f_type) & 0xFFFFFFFF


def fs_name(path: Path) -> str:
    """A human name for the filesystem *path* is on ("xfs", "extfs", "unknown(0x...)")."""
    magic = fs_magic(path)
    return MAGIC_NAMES.get(magic, f"unknown(0x{magic:x})")


def create_nocow(path: Path, mode: int = 0o644) -> bool:
    """Create *path* as an empty file with the no-copy-on-write flag (``chattr +C``; btrfs
    takes it only while a file is empty): its blocks, once written, are rewritten in place, so
    a rewrite needs no free space. Compression it inherited from its directory (``chattr
    +c``, or btrfs's ``compression`` property) is dropped, as btrfs takes one or the other.
    False if *path* exists (left as it is); OSError if the filesystem refuses the flag (the
    file is removed again)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        return False
    try:
        try:
            os.removexattr(fd, "btrfs.compression")
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise
        got = fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0))
        flags = struct.unpack("i", got)[0] & ~FS_COMPR_FL | FS_NOCOW_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))
    except OSError:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return True


def nearest_existing(path: Path) -> Path:
    """*path*, or the nearest directory above it that exists: where a home not made yet would
    live, to probe that filesystem before anything is written."""
    while not path.exists():
        path = path.parent
    return path


def private_dir(*paths: Path) -> None:
    """Make each of *paths*, in order, a directory only root may enter (0700); an existing one
    is tightened. Layer content lives below such folders, out of other users' reach (a hostile
    layer's setuid file or world-writable device node: CVE-2021-41091). Name a home before
    the folders inside it: parents made on the way get the umask's mode."""
    for path in paths:
        path.mkdir(0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)


#: entries of a directory :func:`supports_d_type` reads at most
_DTYPE_ENTRIES = 32


def supports_d_type(path: Path) -> bool:
    """Whether readdir on *path*'s filesystem fills in d_type (xfs with ftype=0 does not): read
    from the entries of the directory *path* where it has some (no write: a full disk has no
    room for a file), else from a file made in a temporary directory there."""
    known = _dtype_known(str(path))
    if known is not None:
        return known
    import tempfile  # only here: it imports shutil and random

    with tempfile.TemporaryDirectory(dir=path, prefix=".d_type-") as tmp:
        Path(tmp, "f").touch()
        return bool(_dtype_known(tmp, "f"))


def _dtype_known(directory: str, name: str | None = None) -> bool | None:
    """Whether readdir fills in the d_type of *name* in *directory*, or (*name* None) of any
    of its first entries but ``.`` and ``..`` (an ext4 given ``filetype`` by tune2fs types
    only its new entries); None where there is no such entry."""

    class _Dirent(ctypes.Structure):
        _fields_ = [
            ("d_ino", ctypes.c_ulong),
            ("d_off", ctypes.c_long),
            ("d_reclen", ctypes.c_ushort),
            ("d_type", ctypes.c_ubyte),
            ("d_name", ctypes.c_char * 256),
        ]

    LIBC.opendir.restype = ctypes.c_void_p
    LIBC.opendir.argtypes = [ctypes.c_char_p]
    LIBC.readdir.restype = ctypes.POINTER(_Dirent)
    LIBC.readdir.argtypes = [ctypes.c_void_p]
    LIBC.closedir.argtypes = [ctypes.c_void_p]
    d = LIBC.opendir(os.fsencode(directory))
    if not d:
        raise errno_error(directory)
    wanted = None if name is None else os.fsencode(name)
    seen = 0
    try:
        while seen < _DTYPE_ENTRIES:
            ent = LIBC.readdir(d)
            if not ent:
                break
            found = ent.contents.d_name
            if found == wanted or (wanted is None and found not in (b".", b"..")):
                if ent.contents.d_type != 0:  # 0 is DT_UNKNOWN
                    return True
                if wanted is not None:
                    return False
                seen += 1
        return False if seen else None
    finally:
        LIBC.closedir(d)
