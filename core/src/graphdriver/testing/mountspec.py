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
    MS_NODEV,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    mount,
    mounts_under,
    unmount,
)

#: mount(8) option -> (flags it sets, flags it clears); anything else goes to the filesystem
_FLAGS = {
    "ro": (MS_RDONLY, 0),
    "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0),
    "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0),
    "dev": (0, MS_NODEV),
    "noexec": (0x8, 0),
    "exec": (0, 0x8),
    "noatime": (0x400, 0),
    "relatime": (1 << 21, 0),
    "bind": (MS_BIND, 0),
    "rbind": (MS_BIND | MS_REC, 0),
}


def _split(options: Sequence[str]) -> tuple[int, str]:
    flags, data = 0, []
    for word in options:
        if word in _FLAGS:
            on, off = _FLAGS[word]
            flags = (flags | on) & ~off
        else:
            data.append(word)
    return flags, ",".join(data)


def mount_entries(entries: Sequence[MountEntry], target: Path) -> None:
    """Mount *entries* on *target* one after the other (containerd's ``mount.All``)."""
    for entry in entries:
        flags, data = _split(entry.options)
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
