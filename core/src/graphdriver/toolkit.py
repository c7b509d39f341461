"""The toolkit for driver authors: the stable helpers a :class:`graphdriver.Driver` may use.

A driver package imports ``graphdriver`` (the contract: ``Driver``, ``Capabilities``,
``CreateOpts``, ``LayerInfo``, the errors), this module, and ``graphdriver.testing`` for its
tests; every other module of the core is internal and may change. The built-in drivers keep to
that rule (``tests/test_driver_imports.py`` reads their imports). Each name below is the core's
own implementation, re-exported; its docstring says what it does.

Layer ids and options
    :func:`is_layer_id` (a directory name that may be a layer's), :func:`parse_size` (``50M``).
Copying and removing trees
    :func:`copy_tree`: owners, modes, times, xattrs, hardlinks, devices; data by reflink
    (FICLONE) where the filesystem shares extents, else in the kernel (copy_file_range).
    :func:`remove_tree`: a tree of any depth, never through a symlink.
Filesystems and folders
    :func:`fs_name`, :func:`fs_magic` (statfs), :func:`supports_d_type`,
    :func:`nearest_existing` (where a home not made yet will live, to probe it),
    :func:`private_dir` (a 0700 folder for layer content, tightened if it exists).
Mounts
    :func:`mount` / :func:`unmount` (mount(2), umount2(2) retrying EBUSY; ``MS_*`` and
    ``MNT_*`` flags), :func:`fsmount` (the new mount API, options one by one: no page limit),
    :func:`bind` (a recursive private bind onto an fd, read-only before it is attached),
    :func:`mountinfo`, :func:`is_mountpoint`, :func:`mounts_under`, :func:`unmount_all_under`.
Processes
    :func:`fork_holding_signals` (``os.fork()`` with the signals that have a Python handler
    blocked until each process calls :func:`release_signals`: no interrupt is lost in an
    at-fork hook; a child that execs releases them first, or its program starts with them
    blocked).
Device-mapper
    :func:`device_mapper_missing`: None when the kernel's device-mapper answers on
    ``/dev/mapper/control``, else why not (the node alone proves nothing: libdevmapper makes it).
Loop devices
    :func:`attach_loop` (LOOP_CONFIGURE with autoclear: the device goes with its last user),
    :class:`LoopDevice`, :func:`loop_backing_file`.
Quota (XFS project quota)
    :func:`project_quota_enforced`, :func:`get_quota_project`, :func:`set_quota_project`,
    :func:`set_quota_limit`.
Overlay whiteouts
    OCI ``.wh.`` names (:data:`WHITEOUT_PREFIX`, :data:`WHITEOUT_OPAQUE`,
    :func:`whiteout_name`) and overlayfs's spelling of them (:func:`is_overlay_whiteout`,
    :func:`is_overlay_opaque`, :func:`make_overlay_whiteout`, :func:`make_overlay_opaque`);
    :func:`overlay_changes`: what an upper directory changes over its lower directories;
    :func:`changes_within`: the tree compare entering only the directories a driver knows
    were written since a snapshot (btrfs).
SQLite
    :func:`sqlite_open` opens a database the way every graphdriver database is opened (WAL,
    ``synchronous=NORMAL``, a busy timeout, errors as one-line :class:`StoreError`) and makes or
    migrates the schema a :class:`SqliteSchema` describes, version by version;
    :func:`sqlite_transaction`: ``BEGIN IMMEDIATE`` ... ``COMMIT`` on an autocommit
    connection, rolled back on any exception, a no-op when nested;
    :func:`release_reserve_if_full`: before a server that frees space (an engine's removal)
    writes its own database, give back the store's reserve where the disk has no room left
    for the record (the store's own removals do it for theirs).
Crash points for tests
    :func:`fault_point` marks an instant a test may interrupt; the environment variable
    :data:`FAULT_ENV` (``GRAPHDRIVER_FAULT=point[=kill|term|int|EIO|...]``) picks the point and
    what happens there (see :mod:`graphdriver.faults`).

Names are loaded on first use, so a driver that needs one helper does not import them all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .archive.changes import overlay_changes as overlay_changes
    from .archive.changes_within import changes_within as changes_within
    from .archive.whiteout import OPAQUE as WHITEOUT_OPAQUE
    from .archive.whiteout import PREFIX as WHITEOUT_PREFIX
    from .archive.whiteout import is_overlay_opaque as is_overlay_opaque
    from .archive.whiteout import is_overlay_whiteout as is_overlay_whiteout
    from .archive.whiteout import make_overlay_opaque as make_overlay_opaque
    from .archive.whiteout import make_overlay_whiteout as make_overlay_whiteout
    from .archive.whiteout import whiteout_name as whiteout_name
    from .driver import is_layer_id as is_layer_id
    from .driver import parse_size as parse_size
    from .faults import ENV as FAULT_ENV
    from .faults import point as fault_point
    from .linux.bind import bind as bind
    from .linux.copy import copy_tree as copy_tree
    from .linux.dm import device_mapper_missing as device_mapper_missing
    from .linux.fs import fs_magic as fs_magic
    from .linux.fs import fs_name as fs_name
    from .linux.fs import nearest_existing as nearest_existing
    from .linux.fs import private_dir as private_dir
    from .linux.fs import supports_d_type as supports_d_type
    from .linux.loop import LoopDevice as LoopDevice
    from .linux.loop import attach as attach_loop
    from .linux.loop import backing_file as loop_backing_file
    from .linux.mount import MNT_DETACH as MNT_DETACH
    from .linux.mount import MNT_FORCE as MNT_FORCE
    from .linux.mount import MS_BIND as MS_BIND
    from .linux.mount import MS_NODEV as MS_NODEV
    from .linux.mount import MS_NOSUID as MS_NOSUID
    from .linux.mount import MS_PRIVATE as MS_PRIVATE
    from .linux.mount import MS_RDONLY as MS_RDONLY
    from .linux.mount import MS_REC as MS_REC
    from .linux.mount import MS_REMOUNT as MS_REMOUNT
    from .linux.mount import fsmount as fsmount
    from .linux.mount import is_mountpoint as is_mountpoint
    from .linux.mount import mount as mount
    from .linux.mount import mountinfo as mountinfo
    from .linux.mount import mounts_under as mounts_under
    from .linux.mount import unmount as unmount
    from .linux.mount import unmount_all_under as unmount_all_under
    from .linux.quota import get_project as get_quota_project
    from .linux.quota import project_quota_enforced as project_quota_enforced
    from .linux.quota import set_limit as set_quota_limit
    from .linux.quota import set_project as set_quota_project
    from .linux.signals import fork_holding_signals as fork_holding_signals
    from .linux.signals import release_signals as release_signals
    from .linux.tree import remove_tree as remove_tree
    from .reserve import release_if_full as release_reserve_if_full
    from .sqlite import Schema as SqliteSchema
    from .sqlite import open_db as sqlite_open
    from .sqlite import transaction as sqlite_transaction

#: where each name of ``__all__`` comes from: (the core module that implements it, its name
#: there); the imports above say the same to type checkers
SOURCES: dict[str, tuple[str, str]] = {
    "changes_within": ("archive.changes_within", "changes_within"),
    "overlay_changes": ("archive.changes", "overlay_changes"),
    "WHITEOUT_OPAQUE": ("archive.whiteout", "OPAQUE"),
    "WHITEOUT_PREFIX": ("archive.whiteout", "PREFIX"),
    "is_overlay_opaque": ("archive.whiteout", "is_overlay_opaque"),
    "is_overlay_whiteout": ("archive.whiteout", "is_overlay_whiteout"),
    "make_overlay_opaque": ("archive.whiteout", "make_overlay_opaque"),
    "make_overlay_whiteout": ("archive.whiteout", "make_overlay_whiteout"),
    "whiteout_name": ("archive.whiteout", "whiteout_name"),
    "is_layer_id": ("driver", "is_layer_id"),
    "parse_size": ("driver", "parse_size"),
    "FAULT_ENV": ("faults", "ENV"),
    "fault_point": ("faults", "point"),
    "bind": ("linux.bind", "bind"),
    "copy_tree": ("linux.copy", "copy_tree"),
    "remove_tree": ("linux.tree", "remove_tree"),
    "fork_holding_signals": ("linux.signals", "fork_holding_signals"),
    "release_signals": ("linux.signals", "release_signals"),
    "device_mapper_missing": ("linux.dm", "device_mapper_missing"),
    "fs_magic": ("linux.fs", "fs_magic"),
    "fs_name": ("linux.fs", "fs_name"),
    "nearest_existing": ("linux.fs", "nearest_existing"),
    "private_dir": ("linux.fs", "private_dir"),
    "supports_d_type": ("linux.fs", "supports_d_type"),
    "LoopDevice": ("linux.loop", "LoopDevice"),
    "attach_loop": ("linux.loop", "attach"),
    "loop_backing_file": ("linux.loop", "backing_file"),
    "MNT_DETACH": ("linux.mount", "MNT_DETACH"),
    "MNT_FORCE": ("linux.mount", "MNT_FORCE"),
    "MS_BIND": ("linux.mount", "MS_BIND"),
    "MS_NODEV": ("linux.mount", "MS_NODEV"),
    "MS_NOSUID": ("linux.mount", "MS_NOSUID"),
    "MS_PRIVATE": ("linux.mount", "MS_PRIVATE"),
    "MS_RDONLY": ("linux.mount", "MS_RDONLY"),
    "MS_REC": ("linux.mount", "MS_REC"),
    "MS_REMOUNT": ("linux.mount", "MS_REMOUNT"),
    "fsmount": ("linux.mount", "fsmount"),
    "is_mountpoint": ("linux.mount", "is_mountpoint"),
    "mount": ("linux.mount", "mount"),
    "mountinfo": ("linux.mount", "mountinfo"),
    "mounts_under": ("linux.mount", "mounts_under"),
    "unmount": ("linux.mount", "unmount"),
    "unmount_all_under": ("linux.mount", "unmount_all_under"),
    "get_quota_project": ("linux.quota", "get_project"),
    "project_quota_enforced": ("linux.quota", "project_quota_enforced"),
    "set_quota_limit": ("linux.quota", "set_limit"),
    "set_quota_project": ("linux.quota", "set_project"),
    "release_reserve_if_full": ("reserve", "release_if_full"),
    "SqliteSchema": ("sqlite", "Schema"),
    "sqlite_open": ("sqlite", "open_db"),
    "sqlite_transaction": ("sqlite", "transaction"),
}

__all__ = [
    "FAULT_ENV",
    "MNT_DETACH",
    "MNT_FORCE",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "WHITEOUT_OPAQUE",
    "WHITEOUT_PREFIX",
    "LoopDevice",
    "SqliteSchema",
    "attach_loop",
    "bind",
    "changes_within",
    "copy_tree",
    "device_mapper_missing",
    "fault_point",
    "fork_holding_signals",
    "fs_magic",
    "fs_name",
    "fsmount",
    "get_quota_project",
    "is_layer_id",
    "is_mountpoint",
    "is_overlay_opaque",
    "is_overlay_whiteout",
    "loop_backing_file",
    "make_overlay_opaque",
    "make_overlay_whiteout",
    "mount",
    "mountinfo",
    "mounts_under",
    "nearest_existing",
    "overlay_changes",
    "parse_size",
    "private_dir",
    "project_quota_enforced",
    "release_reserve_if_full",
    "release_signals",
    "remove_tree",
    "set_quota_limit",
    "set_quota_project",
    "sqlite_open",
    "sqlite_transaction",
    "supports_d_type",
    "unmount",
    "unmount_all_under",
    "whiteout_name",
]


if not TYPE_CHECKING:  # type checkers see the imports above, so a misspelt name is an error

    def __getattr__(name: str) -> object:
        """Import the module that implements *name* on first use, and keep the name here."""
        try:
            module, attr = SOURCES[name]
        except KeyError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(f"graphdriver.{module}"), attr)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(__all__)
