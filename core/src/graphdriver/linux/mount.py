"""mount(2) and umount2(2) through ctypes, and a reader of /proc/self/mountinfo."""

from __future__ import annotations

import ctypes
import errno
import os
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from .libc import (
    AT_FDCWD,
    LIBC,
    SYS_FSCONFIG,
    SYS_FSMOUNT,
    SYS_FSOPEN,
    SYS_MOVE_MOUNT,
    errno_error,
    syscall,
)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

MNT_FORCE = 0x1
MNT_DETACH = 0x2

LIBC.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
LIBC.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(
    source: str,
    target: str | os.PathLike[str],
    fstype: str | None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """Call mount(2); raise OSError with the target as filename on failure."""
    rc = LIBC.mount(
        source.encode(),
        os.fsencode(target),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data is not None else None,
    )
    if rc != 0:
        raise errno_error(target)


def unmount(
    target: str | os.PathLike[str], flags: int = 0, *, retries: int = 50, delay: float = 0.1
) -> None:
    """Call umount2(2), retrying EBUSY *retries* times; not mounted (EINVAL/ENOENT) is fine."""
    path = os.fsencode(target)
    for attempt in range(retries + 1):
        if LIBC.umount2(path, flags) == 0:
            return
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOENT):
            return
        if code != errno.EBUSY or attempt == retries:
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        time.sleep(delay)


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    major_minor: str
    root: str
    mountpoint: str
    options: str
    fstype: str
    source: str
    super_options: str


def _escaped(path: str) -> bytes:
    """*path* as mountinfo writes it (space, tab, newline and backslash in octal)."""
    raw = path.encode(errors="surrogateescape")
    for byte in b"\\ \t\n":
        raw = raw.replace(bytes([byte]), b"\\%03o" % byte)
    return raw


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal
    if "\\" not in field:
        return field
    out = bytearray()
    raw = field.encode(errors="surrogateescape")  # (read with it: a name not UTF-8)
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) + 1 and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode(errors="surrogateescape")


def mountinfo(pid: str = "self", fstypes: Collection[str] = ()) -> list[MountEntry]:
    """Parse /proc/<pid>/mountinfo; with *fstypes*, only the mounts of those types."""
    path = f"/proc/{pid}/mountinfo"
    # lines end at "\n" alone: the kernel escapes that in paths, not "\r" (which Python's
    # universal newlines and splitlines() take for a line end too)
    with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        return _parse(f, fstypes)


def _parse(lines: Iterable[str], fstypes: Collection[str] = ()) -> list[MountEntry]:
    entries = []
    for line in lines:
        left, _, right = line.rstrip("\n").partition(" - ")
        b = right.split(" ")
        if fstypes and b[0] not in fstypes:
            continue
        a = left.split(" ")
        entries.append(
            MountEntry(
                mount_id=int(a[0]),
                parent_id=int(a[1]),
                major_minor=a[2],
                root=_unescape(a[3]),
                mountpoint=_unescape(a[4]),
                options=a[5],
                fstype=b[0],
                source=_unescape(b[1]) if len(b) > 1 else "",
                super_options=b[2] if len(b) > 2 else "",
            )
        )
    return entries


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    """Whether *path* is the mountpoint of some mount in this namespace."""
    target = os.path.realpath(path)
    return any(e.mountpoint == target for e in mountinfo())


def mounts_under(path: str | os.PathLike[str]) -> list[str]:
    """Mountpoints at or below *path*, deepest first (the order to unmount them in), each as
    often as something is mounted there (mounts stacked on one path: each unmount takes the
    top one). The table is parsed only if *path* is in it at all (a node with thousands of
    containers' mounts: each layer removal looks)."""
    base = os.path.realpath(path)
    with open("/proc/self/mountinfo", "rb") as f:
        table = f.read()
    if _escaped(base) not in table:
        return []
    prefix = base.rstrip("/") + "/"
    lines = table.decode(errors="surrogateescape").split("\n")[:-1]  # as in mountinfo()
    found = [p for p in (e.mountpoint for e in _parse(lines)) if p == base or p.startswith(prefix)]
    return sorted(found, key=lambda p: (p.count("/"), p), reverse=True)


def unmount_all_under(path: str | os.PathLike[str]) -> list[str]:
    """Unmount everything mounted at or below *path*, deepest first (lazily where busy);
    what it unmounted. Before a tree is removed: :func:`~.tree.remove_tree` goes into a
    mount as into any directory, and would delete another filesystem's files."""
    found = mounts_under(path)
    for mp in found:
        try:
            unmount(mp, retries=20)
        except OSError:
            unmount(mp, MNT_DETACH)
    return found


# ------------------------------------------------------------------------- the new mount API
# fsopen/fsconfig/fsmount/move_mount (Linux 5.2+): options go in one at a time, so no option
# string has to fit in a page; overlayfs takes "lowerdir+" one layer per call from Linux 6.8.

FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40


def fd_path(fd: int) -> str:
    """The path the kernel has for an open fd (``/proc/self/fd/N``'s target)."""
    return os.readlink(f"/proc/self/fd/{fd}")


def move_mount(mount_fd: int, target: str | os.PathLike[str] | int) -> None:
    """Attach the detached mount open as *mount_fd* (from fsmount or open_tree) at *target*:
    a path, or an fd open on the file or directory to mount on."""
    if isinstance(target, int):
        to_fd, to_path, flags = target, b"", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
        where = fd_path(target)
    else:
        to_fd, to_path, flags = AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH
        where = os.fspath(target)
    syscall(
        SYS_MOVE_MOUNT,
        ctypes.c_int(mount_fd),
        b"",
        ctypes.c_int(to_fd),
        to_path,
        ctypes.c_uint(flags),
        path=where,
    )


def _fs_error(fs_fd: int) -> str:
    """The kernel's own message for a failed fsconfig (read from the fs context fd)."""
    try:
        return os.read(fs_fd, 4096).decode(errors="replace").strip()
    except OSError:
        return ""


def fsmount(
    fstype: str,
    target: str | os.PathLike[str],
    config: list[tuple[str, str | None]],
) -> None:
    """Mount a new *fstype* at *target*; *config* is (key, value) pairs, None for a flag."""
    fs_fd = syscall(SYS_FSOPEN, fstype.encode(), FSOPEN_CLOEXEC)
    try:
        for key, value in config:
            try:
                if value is None:
                    syscall(SYS_FSCONFIG, fs_fd, FSCONFIG_SET_FLAG, key.encode(), None, 0)
                else:
                    syscall(
                        SYS_FSCONFIG,
                        fs_fd,
                        FSCONFIG_SET_STRING,
                        key.encode(),
                        os.fsencode(value),
                        0,
                    )
            except OSError as exc:
                why = _fs_error(fs_fd) or exc.strerror
                raise OSError(exc.errno, f"{key}={value}: {why}", os.fspath(target)) from None
        try:
            syscall(SYS_FSCONFIG, fs_fd, FSCONFIG_CMD_CREATE, None, None, 0)
        except OSError as exc:
            why = _fs_error(fs_fd) or exc.strerror
            raise OSError(exc.errno, why, os.fspath(target)) from None
        mnt_fd = syscall(SYS_FSMOUNT, fs_fd, FSMOUNT_CLOEXEC, 0)
        try:
            move_mount(mnt_fd, target)
        finally:
            os.close(mnt_fd)
    finally:
        os.close(fs_fd)
