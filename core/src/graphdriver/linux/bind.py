"""Paths resolved inside a root filesystem, and bind mounts onto them.

A container's volume goes at a path *inside* its root filesystem, and that filesystem comes from
an image: a symlink in it (``data -> /etc``, ``data -> ../../..``) must not send the mount, or
the copy of the image's content, anywhere on the host. :func:`open_in_root` resolves the path
with openat2(2) and ``RESOLVE_IN_ROOT`` (Linux 5.6), so the kernel treats the root filesystem as
``/`` for every symlink and ``..`` on the way, and hands back an ``O_PATH`` descriptor: the
mount then goes onto that descriptor (move_mount(2) or ``/proc/self/fd/N``), never onto a path
that could be swapped in between.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from pathlib import PurePosixPath

from ..ids import container_path
from .libc import AT_FDCWD, SYS_MOUNT_SETATTR, SYS_OPEN_TREE, SYS_OPENAT2, syscall
from .mount import (
    MNT_DETACH,
    MS_BIND,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    MountEntry,
    mount,
    mountinfo,
    move_mount,
    unmount,
)
from .mount import fd_path as fd_path

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1

#: GRAPHDRIVER_BIND_API=classic: mount(2) binds even where open_tree/move_mount work (tests);
#: read at each bind, as a command server's worker gets its client's environment after import
BIND_API_ENV = "GRAPHDRIVER_BIND_API"


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def open_beneath(dirfd: int, path: str, flags: int) -> int:
    """openat2(2) of *path* below *dirfd* following no symlink at all and never leaving it
    (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS): one call for what a walk of O_NOFOLLOW opens does."""
    return _openat2(dirfd, path, flags, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)


def _openat2(
    dirfd: int, path: str, flags: int, resolve: int = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    return syscall(
        SYS_OPENAT2,
        ctypes.c_int(dirfd),
        os.fsencode(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
        path=path,
    )


def open_in_root(root: str, path: str, *, create: str | None = None) -> int | None:
    """An ``O_PATH`` fd of *path* resolved with *root* as ``/``, or None when it is missing.

    With *create* ``"dir"`` or ``"file"``, missing components are made (directories 0755, the
    last one of that kind), as Docker does for a volume's mountpoint.
    """
    parts = PurePosixPath(container_path(path)).parts[1:]
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            try:
                fd = _openat2(root_fd, sub, os.O_PATH)
            except FileNotFoundError:
                if create is None:
                    return None
                _make(root_fd, parts[:i], "dir" if i < len(parts) else create)
                fd = _openat2(root_fd, sub, os.O_PATH)
            if i == len(parts):
                return fd
            os.close(fd)
        raise AssertionError("unreachable")
    finally:
        os.close(root_fd)


def _make(root_fd: int, parts: tuple[str, ...], kind: str) -> None:
    parent_fd = _openat2(root_fd, "/".join(parts[:-1]) or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise OSError(
                errno.ENOENT,
                f"/{'/'.join(parts)} is a symlink to a missing path inside the image",
            )
        if kind == "dir":
            os.mkdir(name, 0o755, dir_fd=parent_fd)
        else:
            os.close(
                os.open(
                    name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                    0o644,
                    dir_fd=parent_fd,
                )
            )
    finally:
        os.close(parent_fd)


def bind(source: str | int, target_fd: int, *, readonly: bool = False) -> None:
    """Bind *source* (a path, or an fd open on it) recursively and private onto the file or
    directory open as *target_fd*; *readonly* makes the whole tree read-only, submounts
    included where the kernel can."""
    if os.environ.get(BIND_API_ENV, "new") != "classic":
        try:
            _bind_new(source, target_fd, readonly)
            return
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
    _bind_classic(source, target_fd, readonly)


def _bind_new(source: str | int, target_fd: int, readonly: bool) -> None:
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE
    if isinstance(source, str):
        where, dirfd, name = source, AT_FDCWD, os.fsencode(source)
    else:
        where, dirfd, name, flags = fd_path(source), source, b"", flags | AT_EMPTY_PATH
    tree = syscall(SYS_OPEN_TREE, ctypes.c_int(dirfd), name, ctypes.c_uint(flags), path=where)
    try:
        attr = _MountAttr(MOUNT_ATTR_RDONLY if readonly else 0, 0, MS_PRIVATE, 0)
        syscall(
            SYS_MOUNT_SETATTR,
            ctypes.c_int(tree),
            b"",
            ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
            path=where,
        )
        move_mount(tree, target_fd)
    finally:
        os.close(tree)


def detached_copy(path: str) -> int | None:
    """An fd on a private copy of the mount at *path* (or of the tree below *path*) without
    what is mounted under it, attached nowhere (open_tree's clone, not recursive): read
    through ``/proc/self/fd/<fd>``, it goes with its last fd, so a process killed while it
    reads leaves no mount behind. None where the kernel has no open_tree (before 5.2) or
    ``GRAPHDRIVER_BIND_API=classic``."""
    if os.environ.get(BIND_API_ENV, "new") == "classic":
        return None
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
    try:
        fd: int = syscall(
            SYS_OPEN_TREE, ctypes.c_int(AT_FDCWD), os.fsencode(path), ctypes.c_uint(flags),
            path=path,
        )  # fmt: skip
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        return None
    return fd


def _bind_classic(source: str | int, target_fd: int, readonly: bool) -> None:
    where = f"/proc/self/fd/{target_fd}"
    real = fd_path(target_fd)
    src = source if isinstance(source, str) else f"/proc/self/fd/{source}"
    mount(src, where, None, MS_BIND | MS_REC)
    try:
        mount("none", real, None, MS_PRIVATE | MS_REC)
        if readonly:
            # the new mount now sits on the path; only its top is made read-only here
            fd = os.open(real, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                mount("none", f"/proc/self/fd/{fd}", None, MS_REMOUNT | MS_BIND | MS_RDONLY)
            finally:
                os.close(fd)
    except OSError:
        unmount(real, MNT_DETACH)
        raise


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _ancestors(dir_fd: int) -> list[tuple[int, int]]:
    """(device, inode) of the directory open as *dir_fd* and of each directory above it, up to
    this process's ``/``, following ``..`` from the fd (so across bind mounts, never by name)."""
    out = [_identity(dir_fd)]
    fd = os.dup(dir_fd)
    try:
        for _ in range(4096):
            up = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = up
            ident = _identity(fd)
            if ident == out[-1]:
                return out
            out.append(ident)
        raise OSError(errno.ELOOP, "too many directories above", fd_path(dir_fd))
    finally:
        os.close(fd)


def _parent_of(fd: int) -> int:
    """An ``O_PATH`` fd of the directory holding the non-directory open as *fd*, checked to
    hold that very inode (a file has no ``..``, so its name is looked up, then verified)."""
    path = fd_path(fd)
    parent = os.open(os.path.dirname(path) or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.stat(os.path.basename(path), dir_fd=parent, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != _identity(fd):
            raise OSError(errno.ESTALE, "the file moved while it was being checked", path)
    except BaseException:
        os.close(parent)
        raise
    return parent


def reaches_root(source_fd: int, root: str) -> str | None:
    """How the file or directory open as *source_fd* would expose the directory *root* if it
    were bound into a container: ``"is"``, ``"is inside"``, ``"contains"``, or None.

    Compared by identity (device and inode) on the fd, walking ``..`` from it, so a symlink, a
    second path through a bind mount of the root, or a rename cannot hide the relation.
    """
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        above_root = _ancestors(root_fd)
    finally:
        os.close(root_fd)
    root_id = above_root[0]
    if stat.S_ISDIR(os.fstat(source_fd).st_mode):
        chain = _ancestors(source_fd)
    else:
        parent = _parent_of(source_fd)
        try:
            chain = [_identity(source_fd), *_ancestors(parent)]
        finally:
            os.close(parent)
    if chain[0] == root_id:
        return "is"
    if root_id in chain:
        return "is inside"
    if chain[0] in above_root:
        return "contains"
    return None


def root_devices(root: str) -> set[int]:
    """The block devices (``st_rdev``) that hold the store under the directory *root*: those
    of the filesystem holding *root* and of each directory in it (a driver's home or
    ``volumes`` on a filesystem of its own, or a symlink to one): each one's ``st_dev``, the
    device its mount was made from and, on btrfs (whose ``st_dev`` is an anonymous one),
    every device of that filesystem. A volume that mounts one of them exposes the store."""
    real = os.path.realpath(root)
    devices = {os.stat(root).st_dev}
    with contextlib.suppress(OSError), os.scandir(root) as children:
        for child in children:
            with contextlib.suppress(OSError):
                if child.is_dir():  # (through a symlink too)
                    devices.add(child.stat().st_dev)
    holding = None
    found = set(devices)
    for entry in mountinfo():
        where = entry.mountpoint
        inside = real == where or real.startswith(where.rstrip("/") + "/")
        if inside and (holding is None or len(where) >= len(holding.mountpoint)):
            holding = entry  # the innermost; of those stacked, the last one
        major, _, minor = entry.major_minor.partition(":")
        if major.isdigit() and minor.isdigit() and os.makedev(int(major), int(minor)) in devices:
            found |= _source_devices(entry)
    return found | (_source_devices(holding) if holding is not None else set())


def _source_devices(entry: MountEntry) -> set[int]:
    """The device a mount was made from, and the others of its btrfs."""
    try:
        source = os.stat(entry.source) if entry.source.startswith("/") else None
    except OSError:
        source = None
    if source is None or not stat.S_ISBLK(source.st_mode):
        return set()
    return {source.st_rdev} | (_btrfs_devices(source.st_rdev) if entry.fstype == "btrfs" else set())


def _btrfs_devices(one: int) -> set[int]:
    """Every device of the btrfs filesystem that *one* belongs to (sysfs), or none."""
    try:
        fsids = os.listdir("/sys/fs/btrfs")
    except OSError:
        return set()
    for fsid in fsids:
        devs = set()
        with contextlib.suppress(OSError):
            for name in os.listdir(f"/sys/fs/btrfs/{fsid}/devices"):
                with open(f"/sys/fs/btrfs/{fsid}/devices/{name}/dev") as f:
                    major, minor = f.read().strip().split(":")
                devs.add(os.makedev(int(major), int(minor)))
        if one in devs:
            return devs
    return set()
