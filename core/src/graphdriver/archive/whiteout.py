"""OCI whiteouts and their overlayfs equivalents.

OCI (image-spec layer.md): ``<dir>/.wh.<name>`` deletes ``<name>`` from the layers below;
``<dir>/.wh..wh..opq`` makes ``<dir>`` opaque (hides everything below it). overlayfs spells the
same things as a character device 0/0 named ``<name>`` and the xattr ``trusted.overlay.opaque=y``.
"""

from __future__ import annotations

import os
import stat

PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
#: aufs bookkeeping names (``.wh..wh.plnk``, ``.wh..wh.aufs``) that OCI tars may carry
META_PREFIX = ".wh..wh."
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
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
