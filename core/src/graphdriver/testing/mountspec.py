"""Mount what a driver's :class:`~graphdriver.MountSpec` returns, as containerd mounts what a
snapshotter returns: each entry on the target in turn, its options split into mount(2) flags and
the filesystem's data; a bind with ``ro`` is bound first and then remounted read-only (a bind
ignores MS_RDONLY when it is made)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..driver import MountEntry
from ..linux.mount import (
    MNT_DETACH,
    MS_BIND,
    MS_RDONLY,
    MS_REMOUNT,
    mount,
    mounts_under,
    unmount,
)
from ..volume_local import parse_mount_options


def mount_entries(entries: Sequence[MountEntry], target: Path) -> None:
    """Mount *entries* on *target* one after the other (containerd's ``mount.All``)."""
    for entry in entries:
        flags, data = parse_mount_options(",".join(entry.options))
        if entry.type == "bind":
            flags |= MS_BIND
        fstype = None if flags & MS_BIND else entry.type
        mount(entry.source, target, fstype, flags & ~MS_RDONLY if flags & MS_BIND else flags, data)
        if flags & MS_BIND and flags & MS_RDONLY:
            try:
                mount("none", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
            except OSError:
                unmount(target, MNT_DETACH)
                raise


@contextlib.contextmanager
def mounted_entries(entries: Sequence[MountEntry], target: Path) -> Iterator[Path]:
    """:func:`mount_entries` on *target* for the ``with`` block; everything mounted at or below
    *target* is unmounted at its end, whatever happened."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        mount_entries(entries, target)
        yield target
    finally:
        for where in mounts_under(target):
            try:
                unmount(where, retries=20)
            except OSError:
                unmount(where, MNT_DETACH)
