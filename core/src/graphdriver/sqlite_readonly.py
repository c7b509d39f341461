"""Reading a database on a disk too full to share it.

Where SQLite cannot make ``-shm`` (a disk full from before), :func:`.sqlite.open_db` opens the
database held alone; where it cannot make ``-wal`` either (a full XFS has no inode for it, nor
an ext4 out of inodes) and none is left, a one-command process reads it as a file no one
changes (``immutable=1``: no ``-wal``, no ``-shm``, no lock; :func:`.sqlite.open_frozen`, and
:func:`connect_readonly` here for ``check``, whose errors stay ``sqlite3.Error``), if its
command only reads (:func:`.sqlite.reads_only`). Every commit is then in the database file
(the last close checkpointed it), and no other command can write it while the disk stays
full; were space freed and the database written meanwhile, such a read would go on seeing the
state at its start (SQLite never reads an immutable file again), or meet a page half written.
So an open that reads this way recovers nothing (:func:`is_frozen`: the store, containers and
volumes skip their recovery), and what it finds wrong is no proof of damage: a write, and
whatever it cannot read, is the one-line "full" error (:func:`.sqlite.frozen_error`), never
"damaged" nor "read-only or not root".
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from . import sqlite
from .sqlite import full_disk


def is_frozen(db: sqlite3.Connection) -> bool:
    """Whether *db* reads its database as no one changes it (:func:`.sqlite.open_frozen`,
    :func:`connect_readonly` on a disk with no room for ``-wal``)."""
    return isinstance(db, _FrozenReadonly) or getattr(db, "frozen", False)


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A plain read-only connection (``mode=ro``) whose errors stay ``sqlite3.Error``: for
    diagnosing and salvaging a database that may be damaged. On a full disk with no room for
    ``-shm``, in a :func:`.sqlite.one_command` process, a connection that holds the database alone
    (``locking_mode=EXCLUSIVE``, which a ``mode=ro`` one cannot lock), made ``query_only``;
    where not even ``-wal`` can be made and there is none, one that reads the file as no one
    changes it (``immutable=1``, :func:`.sqlite.open_frozen`); elsewhere SQLite's error comes at the
    first read, and :func:`full_disk` tells it apart from damage."""
    db = sqlite3.connect(sqlite.uri(path, "mode=ro"), uri=True)
    db.row_factory = sqlite3.Row
    alone, frozen = sqlite.when_full()
    if not alone or _readable(db, path):
        return db  # (damage: the caller's own read meets it)
    db.close()
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA locking_mode=EXCLUSIVE")
    db.execute("PRAGMA query_only=ON")
    if not frozen or _readable(db, path) or os.path.lexists(f"{path}-wal"):
        return db
    db.close()
    db = sqlite3.connect(sqlite.uri(path, "immutable=1"), uri=True, factory=_FrozenReadonly)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA query_only=ON")
    return db


class _FrozenReadonly(sqlite3.Connection):
    """:func:`connect_readonly`'s connection that reads the file as no one changes it: what
    it finds wrong is no proof of damage (:func:`is_frozen`)."""


def _readable(db: sqlite3.Connection, path: Path) -> bool:
    """Whether *db*'s first read (which maps ``-shm``, or makes ``-wal``) is no full disk's
    failure."""
    try:
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone()
    except sqlite3.Error as exc:
        return not full_disk(exc, path)
    return True
