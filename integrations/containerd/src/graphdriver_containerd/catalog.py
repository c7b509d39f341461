"""The proxy's own catalogue: containerd's snapshot keys and the layers that hold them.

containerd names a snapshot with any string (``default/12/extract-331 sha256:...``, a path in
the test suite); a layer id is ``[A-Za-z0-9][A-Za-z0-9_.-]*``. So each snapshot gets a layer of
its own, ``ctd-<random>``, and this SQLite database (``<root>/containerd/<driver>/snapshots.db``,
WAL) maps keys to layers with what containerd asks about: kind, parent, times, labels, the
mounts handed out, and the usage of a committed snapshot.

A row's ``state`` says where a change stands, so that a proxy killed half-way finishes or undoes
it when it starts again (:meth:`Snapshotter.recover`):

- ``preparing``: the row is written before the layer is made; if the proxy dies, the layer
  (made or not) is removed and the row dropped;
- ``committing``: the row already carries the committed name; the layer's commit and usage are
  finished at the next start;
- ``ready``: done.

A removed snapshot leaves its layer in table ``removals`` until the layer is gone.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from graphdriver import MountEntry
from graphdriver.toolkit import SqliteSchema, sqlite_open, sqlite_transaction

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    key        TEXT PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('active', 'view', 'committed')),
    parent     TEXT,
    layer      TEXT NOT NULL UNIQUE,
    state      TEXT NOT NULL CHECK (state IN ('preparing', 'committing', 'ready')),
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels     TEXT NOT NULL,
    mounts     TEXT,
    held       INTEGER NOT NULL DEFAULT 0,
    size       INTEGER,
    inodes     INTEGER,
    active_key TEXT
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots (parent);
CREATE TABLE IF NOT EXISTS removals (
    layer TEXT PRIMARY KEY,
    held  INTEGER NOT NULL
);
"""
_CATALOG = SqliteSchema(SCHEMA_VERSION, _SCHEMA, label="containerd snapshots.db")


@dataclass
class Snapshot:
    """One row of ``snapshots``."""

    key: str
    kind: str
    parent: str | None
    layer: str
    state: str
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    mounts: list[MountEntry] = field(default_factory=list)
    #: the proxy holds a store mount (``LayerStore.get``) that ``mounts`` binds
    held: bool = False
    size: int | None = None
    inodes: int | None = None
    #: while committing: the active key the snapshot had
    active_key: str | None = None


def _row(row: sqlite3.Row) -> Snapshot:
    mounts = [MountEntry(t, s, tuple(o)) for t, s, o in json.loads(row["mounts"] or "[]")]
    return Snapshot(
        key=row["key"],
        kind=row["kind"],
        parent=row["parent"],
        layer=row["layer"],
        state=row["state"],
        created_ns=row["created_ns"],
        updated_ns=row["updated_ns"],
        labels=json.loads(row["labels"]),
        mounts=mounts,
        held=bool(row["held"]),
        size=row["size"],
        inodes=row["inodes"],
        active_key=row["active_key"],
    )


def mounts_json(mounts: list[MountEntry]) -> str:
    return json.dumps([[m.type, m.source, list(m.options)] for m in mounts])


class Catalog:
    """The snapshots database; one connection shared by the server's threads under a lock
    (each call is a short query or one transaction)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # WAL + synchronous=NORMAL as the store's own metadata.db: survives a killed process;
        # a power cut may lose the last changes, and Cleanup removes a layer no row names
        self.db, _ = sqlite_open(path, _CATALOG, timeout=10)
        self.lock = threading.RLock()

    def close(self) -> None:
        with self.lock:
            self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction under the lock (re-entrant: a nested call
        joins the outer one)."""
        with self.lock, sqlite_transaction(self.db) as db:
            yield db

    # ---------------------------------------------------------------------------- reads

    def get(self, key: str) -> Snapshot | None:
        with self.lock:
            row = self.db.execute("SELECT * FROM snapshots WHERE key=?", (key,)).fetchone()
        return None if row is None else _row(row)

    def all(self, state: str | None = "ready") -> list[Snapshot]:
        """Every snapshot (in ``state``, or any with None), oldest first."""
        with self.lock:
            if state is None:
                rows = self.db.execute("SELECT * FROM snapshots ORDER BY created_ns, key")
            else:
                rows = self.db.execute(
                    "SELECT * FROM snapshots WHERE state=? ORDER BY created_ns, key", (state,)
                )
            return [_row(r) for r in rows.fetchall()]

    def taken(self, key: str) -> bool:
        """Whether *key* names a snapshot, or the active snapshot a commit under way renames."""
        with self.lock:
            row = self.db.execute(
                "SELECT 1 FROM snapshots WHERE key=? OR active_key=?", (key, key)
            ).fetchone()
        return row is not None

    def children(self, key: str) -> list[str]:
        with self.lock:
            rows = self.db.execute("SELECT key FROM snapshots WHERE parent=? ORDER BY key", (key,))
            return [r[0] for r in rows.fetchall()]

    def layers(self) -> set[str]:
        """Every layer a snapshot or a pending removal names."""
        with self.lock:
            rows = self.db.execute("SELECT layer FROM snapshots UNION SELECT layer FROM removals")
            return {r[0] for r in rows.fetchall()}

    def removals(self) -> list[tuple[str, bool]]:
        with self.lock:
            rows = self.db.execute("SELECT layer, held FROM removals ORDER BY layer")
            return [(r[0], bool(r[1])) for r in rows.fetchall()]

    # ---------------------------------------------------------------------------- writes

    def insert(self, snap: Snapshot) -> None:
        self.db.execute(
            "INSERT INTO snapshots (key, kind, parent, layer, state, created_ns, updated_ns, "
            "labels, mounts, held) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                snap.key,
                snap.kind,
                snap.parent,
                snap.layer,
                snap.state,
                snap.created_ns,
                snap.updated_ns,
                json.dumps(snap.labels, sort_keys=True),
                mounts_json(snap.mounts),
                int(snap.held),
            ),
        )

    def update(self, where: str, /, **fields: object) -> None:
        """Set *fields* of the snapshot keyed *where* (``key=`` renames it)."""
        if "labels" in fields:
            fields["labels"] = json.dumps(fields["labels"], sort_keys=True)
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.lock:
            self.db.execute(
                f"UPDATE snapshots SET {cols} WHERE key=?",  # noqa: S608
                [*fields.values(), where],
            )

    def delete(self, key: str) -> None:
        with self.lock:
            self.db.execute("DELETE FROM snapshots WHERE key=?", (key,))

    def add_removal(self, layer: str, held: bool) -> None:
        self.db.execute("INSERT OR REPLACE INTO removals VALUES (?, ?)", (layer, int(held)))

    def drop_removal(self, layer: str) -> None:
        with self.lock:
            self.db.execute("DELETE FROM removals WHERE layer=?", (layer,))
