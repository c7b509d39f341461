"""OCI whiteouts and their overlayfs equivalents.

OCI (image-spec layer.md): ``<dir>/.wh.<name>`` deletes ``<name>`` from the layers below;
``<dir>/.wh..wh..opq`` makes ``<dir>`` opaque (hides everything below it). overlayfs spells the
same things as a character device 0/0 named ``<name>`` and the xattr ``trusted.overlay.opaque=y``.
"""

from __future__ import annotations

import errno
import os
import stat

PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
#: aufs bookkeeping names (``.wh..wh.plnk``, ``.wh..wh.aufs``) that OCI tars may carry
META_PREFIX = ".wh..wh."
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_ORIGIN_XATTR = "trusted.overlay.origin"
#: xattrs that only make sense to overlayfs itself; never taken from a tar
OVERLAY_XATTR_PREFIX = "trusted.overlay."


def whiteout_name(name: str) -> str:
    """The OCI whiteout entry name that deletes *name*."""
    return PREFIX + name


def is_overlay_whiteout(st: os.stat_result) -> bool:
    """Whether *st* is overlayfs's whiteout: a character device with device number 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_overlay_opaque(path: str) -> bool:
    """Whether the directory at *path* carries overlayfs's opaque xattr."""
    try:
        return os.getxattr(path, OVERLAY_OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def make_overlay_whiteout(path: str) -> None:
    """Write overlayfs's whiteout for *path* (char device 0/0)."""
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def make_overlay_opaque(path: str) -> None:
    """Mark the directory at *path* opaque for overlayfs."""
    os.setxattr(path, OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)


def mark_overlay_merged(target: str | int) -> None:
    """Mark the upper directory *target* (a path relative to the working directory, or an
    fd) that merges with a lower's as overlayfs marks a copy-up whose origin it cannot name:
    an empty origin xattr. Without one, the first lookup of it through a mount of this upper
    writes the lower's file handle there and ``impure`` on its parent: the ctimes of both
    change, and with them the layer that an exact diff's record describes."""
    try:
        if isinstance(target, int):
            os.setxattr(target, OVERLAY_ORIGIN_XATTR, b"")
        else:
            os.setxattr(target, OVERLAY_ORIGIN_XATTR, b"", follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EPERM):  # no trusted xattrs: nor the kernel's
            raise
