"""Extended attributes of one path, its own (a final symlink is not followed): the one reader
behind the tree compare, the tar writer, the tree copy and the suite's tree snapshots; and
whether a directory has a default ACL (the apply sandbox)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

#: the xattrs no layer tar carries, left out of every diff and ignored in every tar applied:
#: overlayfs's own bookkeeping (origin, impure, opaque, whiteouts), and XFS's on-disk POSIX
#: ACLs, which XFS lists to root beside ``system.posix_acl_*`` (the names tars carry them by):
#: a diff on XFS differed from one on ext4 or btrfs, and put them on another filesystem as
#: stray trusted xattrs
NOT_IN_TARS = ("trusted.overlay.", "trusted.SGI_ACL_")


#: the xattrs a directory loses when a tar names it without them: what the user and the
#: image set (a label, ``security.*``, and a filesystem's properties, ``btrfs.*``, stay)
DROPPED_ON_APPLY = ("user.", "trusted.", "system.posix_acl_")


def drop_xattrs_but(path: str, kept: Mapping[str, bytes]) -> None:
    """Remove the xattrs of the directory *path*, there before the extraction, that the tar
    entry naming it does not carry (*kept*): a directory made anew (overlay's upper) lacks
    them, so the drivers agree and a container's ``setfacl -k`` survives its diff's apply.
    Only :data:`DROPPED_ON_APPLY` go, never what no tar carries (overlayfs's marks)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return  # a filesystem without xattrs
    for key in names:
        if key in kept or not key.startswith(DROPPED_ON_APPLY) or key.startswith(NOT_IN_TARS):
            continue
        with contextlib.suppress(OSError):  # gone meanwhile, or one the kernel keeps
            os.removexattr(path, key, follow_symlinks=False)


def read(path: str | int, skip: tuple[str, ...] = ()) -> list[tuple[str, bytes]]:
    """(name, value) of every extended attribute of *path* (or of the open file *path*) whose
    name does not start with one of *skip*, in the order the filesystem lists them.

    A filesystem that has none or cannot list them (ENOTSUP) gives ``[]``; a name removed
    between the listing and the read is left out.
    """
    follow = isinstance(path, int)  # an fd is the file itself: no symlink to follow or not
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError:
        return []
    out = []
    for name in names:
        if skip and name.startswith(skip):
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=follow)))
        except OSError:
            continue
    return out


ACL_DEFAULT = "system.posix_acl_default"


def has_default_acl(path: str) -> bool:
    """Whether the directory *path* (relative; "" is "/", the layer's root in the apply
    sandbox) has a default ACL, which gives what is made in it the ACL's permissions
    instead of those asked for."""
    try:
        os.getxattr(path or "/", ACL_DEFAULT, follow_symlinks=False)
    except OSError:
        return False
    return True
