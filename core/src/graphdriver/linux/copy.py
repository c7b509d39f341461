"""Copying trees with everything a layer can hold: owners, modes, times, xattrs, hardlinks,
symlinks, devices and fifos. File data moves with FICLONE where the filesystem shares extents
and copy_file_range elsewhere, so it stays in the kernel."""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from . import xattr

FICLONE = 0x40049409
#: bytes per read and write where the kernel cannot copy by itself
_COPY_CHUNK = 1 << 20


def _copy_data(src: str, dst: str, size: int) -> None:
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if size == 0:
                return
            try:
                fcntl.ioctl(dfd, FICLONE, sfd)
                return
            except OSError as exc:
                if exc.errno not in (
                    errno.EOPNOTSUPP,
                    errno.EXDEV,
                    errno.EINVAL,
                    errno.ENOTTY,
                    errno.ETXTBSY,
                ):
                    raise
            copy_data(sfd, dfd, size)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def copy_data(src: int, dst: int, size: int) -> None:
    """Copy the *size* bytes of *src* into the empty *dst*: its data regions, its holes left
    as holes (as overlayfs's copy-up does: a sparse ``lastlog`` stays sparse)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            break  # only a hole is left
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        _copy_range(src, dst, start, end)
        pos = end
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    try:
        while start < end and (n := os.copy_file_range(src, dst, end - start, start, start)):
            start += n
        return
    except OSError as exc:
        # copy_file_range only works within one filesystem type (Linux 5.19+)
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    while start < end and (chunk := os.pread(src, min(_COPY_CHUNK, end - start), start)):
        start += os.pwrite(dst, chunk, start)  # where the kernel cannot copy by itself


def _copy_meta(src: str, dst: str, st: os.stat_result, *, link: bool = False) -> None:
    if os.geteuid() == 0:
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not link:
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    for key, value in xattr.read(src, xattr.NOT_IN_TARS):  # (as a diff and its apply would)
        try:
            os.setxattr(dst, key, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def copy_tree(src: str, dst: str, *, into: bool = False) -> None:
    """Copy the tree at *src* to the new path *dst*, keeping everything a layer can hold (no
    xattr that no layer tar carries: ``xattr.NOT_IN_TARS``, overlayfs's and XFS's raw ACLs,
    which ``system.posix_acl_*`` carry; holes stay holes); with *into*, *dst* is an existing
    directory that gets *src*'s entries and metadata.

    The directories still to copy are kept on a list, not Python's stack (a tree of any
    depth), and each one's metadata is set once everything is copied, deepest first: its
    mtime after its entries are made, a read-only one after it was written."""
    links: dict[tuple[int, int], str] = {}
    todo = [(src, dst, os.stat(src) if into else os.lstat(src), into)]
    made: list[tuple[str, str, os.stat_result]] = []
    while todo:
        s, d, st, exists = todo.pop()
        if not exists:
            os.mkdir(d, 0o700)
        made.append((s, d, st))
        with os.scandir(s) as it:
            entries = list(it)
        down = []
        for entry in entries:
            sp, dp = entry.path, d + "/" + entry.name
            est = entry.stat(follow_symlinks=False)
            mode = est.st_mode
            if stat.S_ISDIR(mode):
                down.append((sp, dp, est, False))
                continue
            if est.st_nlink > 1:
                key = (est.st_dev, est.st_ino)
                first = links.get(key)
                if first is not None:
                    os.link(first, dp, follow_symlinks=False)
                    continue
                links[key] = dp
            if stat.S_ISREG(mode):
                _copy_data(sp, dp, est.st_size)
                _copy_meta(sp, dp, est)
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(sp), dp)
                _copy_meta(sp, dp, est, link=True)
            else:  # char/block devices, fifos, sockets
                os.mknod(dp, stat.S_IFMT(mode) | 0o600, est.st_rdev)
                _copy_meta(sp, dp, est)
        todo += reversed(down)
    for s, d, st in reversed(made):  # a directory comes after everything below it
        _copy_meta(s, d, st)
