"""The ``containers`` table of a store's ``metadata.db``: the one module that reads and writes it.

A row is a container: its read-write layer, its image, a state (``creating``, ``ready``,
``removing``: the last two in flight are finished at open by :mod:`.containers`), its mount
points (JSON of :class:`~graphdriver.mount_points.MountPoint`) and its mount count. The table
is made and migrated with the rest of the database by :mod:`.metadata` (:data:`SCHEMA`);
:class:`~graphdriver.containers.ContainerStore`, ``check`` and ``check --repair``'s rebuild
use the rows only through :class:`ContainerRecords`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from .mount_points import MountPoint
from .sqlite import transaction

SCHEMA = """
CREATE TABLE containers (
    name           TEXT PRIMARY KEY,
    layer          TEXT NOT NULL UNIQUE,
    image          TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'removing')),
    created        REAL NOT NULL,
    mounts         TEXT NOT NULL,
    mount_count    INTEGER NOT NULL DEFAULT 0,
    root           TEXT,
    remove_volumes INTEGER NOT NULL DEFAULT 0
);
"""

#: the columns :meth:`ContainerRecords.update` may set
_FIELDS = frozenset({"state", "mounts", "mount_count", "root", "remove_volumes"})


def _parse(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["mounts"] = [MountPoint(**m) for m in json.loads(row["mounts"])]
    return out


def _mounts_json(mounts: Sequence[MountPoint]) -> str:
    return json.dumps([asdict(m) for m in mounts])


class ContainerRecords:
    """The container rows of one ``metadata.db`` connection. A row is a dict of its columns,
    with ``mounts`` a list of :class:`MountPoint`. Each write is its own transaction, or
    joins the caller's."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def get(self, name: str) -> dict[str, Any] | None:
        """The row of *name* in any state, or None."""
        row = self.db.execute("SELECT * FROM containers WHERE name=?", (name,)).fetchone()
        return None if row is None else _parse(row)

    def all(self) -> list[dict[str, Any]]:
        """Every row, in any state, oldest first."""
        rows = self.db.execute("SELECT * FROM containers ORDER BY created, name").fetchall()
        return [_parse(r) for r in rows]

    def names(self) -> list[str]:
        """Names of the ready containers, oldest first."""
        rows = self.db.execute(
            "SELECT name FROM containers WHERE state='ready' ORDER BY created, name"
        )
        return [str(r[0]) for r in rows]

    def owner_of(self, layer_id: str, mounted: bool = False) -> str | None:
        """The container whose read-write layer this is (once made, until it is removed);
        with *mounted*, only while that container is mounted."""
        sql = "SELECT name FROM containers WHERE layer=? AND state='ready'"
        row = self.db.execute(sql + " AND mount_count>0" if mounted else sql, (layer_id,))
        found = row.fetchone()
        return None if found is None else str(found[0])

    def insert(self, name: str, layer: str, image: str, mounts: Sequence[MountPoint]) -> None:
        """Record a container being created (state ``creating``)."""
        with transaction(self.db):
            self.db.execute(
                "INSERT INTO containers (name, layer, image, state, created, mounts) "
                "VALUES (?, ?, ?, 'creating', ?, ?)",
                (name, layer, image, time.time(), _mounts_json(mounts)),
            )

    def update(self, name: str, **fields: Any) -> None:
        """Set columns of *name*'s row (``mounts`` as MountPoints)."""
        unknown = set(fields) - _FIELDS
        if unknown:
            raise ValueError(f"not a container column: {', '.join(sorted(unknown))}")
        if "mounts" in fields:
            fields["mounts"] = _mounts_json(fields["mounts"])
        cols = ", ".join(f"{k}=?" for k in fields)
        with transaction(self.db):
            self.db.execute(
                f"UPDATE containers SET {cols} WHERE name=?",  # noqa: S608
                [*fields.values(), name],
            )

    def delete(self, name: str) -> None:
        with transaction(self.db):
            self.db.execute("DELETE FROM containers WHERE name=?", (name,))

    def restore(self, row: sqlite3.Row) -> None:
        """Insert a row salvaged from a damaged database (``check --repair``), unmounted."""
        cols = [k for k in row.keys() if k not in ("mount_count", "root")]  # noqa: SIM118
        with transaction(self.db):
            self.db.execute(
                f"INSERT INTO containers ({', '.join(cols)}) "  # noqa: S608
                f"VALUES ({', '.join('?' * len(cols))})",
                [row[k] for k in cols],
            )
