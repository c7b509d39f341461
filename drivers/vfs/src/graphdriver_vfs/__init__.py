"""vfs: the reference driver. A layer is a directory holding a full copy of its parent.

It runs on any filesystem and needs no kernel feature. File data is copied with FICLONE where
the filesystem shares extents (btrfs, xfs with reflink) and copy_file_range elsewhere, so the
copy stays in the kernel. Owners, modes, times, xattrs, hardlinks, symlinks, devices and fifos
are kept exactly.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from graphdriver import Capabilities, CreateOpts, Driver, LayerInfo

FICLONE = 0x40049409


class VfsDriver(Driver):
    """Every layer a plain directory under ``<home>/dir/<id>``, children by full copy."""

    name = "vfs"
    options = {}
    capabilities = Capabilities(quota=False, native_diff=False, real_mounts=False)

    def _dir(self, layer: LayerInfo) -> Path:
        return self.home / "dir" / layer.id

    def create(self, layer: LayerInfo, parent: LayerInfo | None, opts: CreateOpts) -> None:
        target = self._dir(layer)
        target.parent.mkdir(parents=True, exist_ok=True)
        if parent is None:
            target.mkdir(0o755)
            os.chmod(target, 0o755)
            os.chown(target, 0, 0) if os.geteuid() == 0 else None
            return
        copy_tree(str(self._dir(parent)), str(target))

    def remove(self, layer: LayerInfo) -> None:
        target = self._dir(layer)
        if target.exists() or target.is_symlink():
            shutil.rmtree(target)

    def mount(self, layer: LayerInfo, chain: Sequence[LayerInfo]) -> Path:
        return self._dir(layer)

    def unmount(self, layer: LayerInfo) -> None:
        return None

    def status(self) -> list[tuple[str, str]]:
        return [("Copy", "reflink (FICLONE) where possible, else copy_file_range")]


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
            left = size
            while left > 0:
                n = os.copy_file_range(sfd, dfd, min(left, 1 << 30))
                if n == 0:
                    break
                left -= n
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _copy_meta(src: str, dst: str, st: os.stat_result, *, link: bool = False) -> None:
    if os.geteuid() == 0:
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not link:
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError:
        names = []
    for key in names:
        try:
            os.setxattr(
                dst, key, os.getxattr(src, key, follow_symlinks=False), follow_symlinks=False
            )
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def copy_tree(src: str, dst: str) -> None:
    """Copy the tree at *src* to the new path *dst*, keeping everything a layer can hold."""
    links: dict[tuple[int, int], str] = {}

    def copy_dir(s: str, d: str, st: os.stat_result) -> None:
        os.mkdir(d, 0o700)
        with os.scandir(s) as it:
            entries = list(it)
        for entry in entries:
            sp, dp = entry.path, d + "/" + entry.name
            est = entry.stat(follow_symlinks=False)
            mode = est.st_mode
            if stat.S_ISDIR(mode):
                copy_dir(sp, dp, est)
                continue
            if est.st_nlink > 1 and not stat.S_ISDIR(mode):
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
        _copy_meta(s, d, st)

    copy_dir(src, dst, os.lstat(src))
