"""The SQLite catalogue of a store's layers.

One database per store home (``metadata.db``, WAL journal), a versioned schema, and one
transaction per operation. Layer rows carry a state: ``creating``, ``applying`` and ``removing``
are in-flight states that :meth:`LayerStore.open` finishes or rolls back after a crash.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StoreError

SCHEMA_VERSION = 2

_CONTAINERS = """
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

_SCHEMA = (
    """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE layers (
    id            TEXT PRIMARY KEY,
    parent        TEXT REFERENCES layers(id),
    state         TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'applying', 'removing')),
    rw            INTEGER NOT NULL,
    size_limit    INTEGER,
    mount_label   TEXT,
    created       REAL NOT NULL,
    boundary_ns   INTEGER,
    mount_count   INTEGER NOT NULL DEFAULT 0,
    mount_path    TEXT,
    dirty         INTEGER NOT NULL DEFAULT 0,
    diff_id       TEXT,
    unpacked_size INTEGER,
    labels        TEXT NOT NULL DEFAULT '{}',
    volumes       TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX layers_parent ON layers(parent);
"""
    + _CONTAINERS
)

#: what each schema version adds to the one before
_MIGRATIONS = {
    2: "ALTER TABLE layers ADD COLUMN volumes TEXT NOT NULL DEFAULT '[]';" + _CONTAINERS,
}

IN_FLIGHT = ("creating", "applying", "removing")


@dataclass
class LayerRecord:
    """A row of the ``layers`` table."""

    id: str
    parent: str | None
    state: str
    rw: bool
    size_limit: int | None
    mount_label: str | None
    created: float
    boundary_ns: int | None = None
    mount_count: int = 0
    mount_path: str | None = None
    dirty: bool = False
    diff_id: str | None = None
    unpacked_size: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    #: paths an image layer declares as volumes (``create --volume``)
    volumes: list[str] = field(default_factory=list)


_COLUMNS = (
    "id",
    "parent",
    "state",
    "rw",
    "size_limit",
    "mount_label",
    "created",
    "boundary_ns",
    "mount_count",
    "mount_path",
    "dirty",
    "diff_id",
    "unpacked_size",
    "labels",
    "volumes",
)


def _record(row: sqlite3.Row) -> LayerRecord:
    return LayerRecord(
        id=row["id"],
        parent=row["parent"],
        state=row["state"],
        rw=bool(row["rw"]),
        size_limit=row["size_limit"],
        mount_label=row["mount_label"],
        created=row["created"],
        boundary_ns=row["boundary_ns"],
        mount_count=row["mount_count"],
        mount_path=row["mount_path"],
        dirty=bool(row["dirty"]),
        diff_id=row["diff_id"],
        unpacked_size=row["unpacked_size"],
        labels=json.loads(row["labels"]) if row["labels"] != "{}" else {},
        volumes=json.loads(row["volumes"]) if row["volumes"] != "[]" else [],
    )


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on an autocommit connection (``isolation_level=None``),
    rolled back on any exception; inside an open transaction it only yields."""
    if db.in_transaction:
        yield db
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class Metadata:
    """The layer catalogue of one store home."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = sqlite3.connect(
                path, isolation_level=None, timeout=60, check_same_thread=False
            )
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"metadata database {path} cannot be used: {exc}") from exc

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        with self.transaction():
            have = self.db.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name='meta'"
            ).fetchone()
            if have is None:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                self.db.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
                return
            version = int(self.get_meta("schema_version") or 0)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"metadata {self.path} has schema version {version}, newer than this "
                    f"graphdriver ({SCHEMA_VERSION}); upgrade graphdriver"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for stmt in _MIGRATIONS[step].split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                self.set_meta("schema_version", str(step))

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception; nests as a no-op."""
        return transaction(self.db)

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def get(self, layer_id: str) -> LayerRecord | None:
        row = self.db.execute("SELECT * FROM layers WHERE id=?", (layer_id,)).fetchone()
        return None if row is None else _record(row)

    def all(self) -> list[LayerRecord]:
        return [_record(r) for r in self.db.execute("SELECT * FROM layers ORDER BY created, id")]

    def children(self, layer_id: str) -> list[str]:
        return [
            r[0]
            for r in self.db.execute(
                "SELECT id FROM layers WHERE parent=? ORDER BY id", (layer_id,)
            )
        ]

    def insert(self, rec: LayerRecord) -> None:
        values = [getattr(rec, c) for c in _COLUMNS]
        values[_COLUMNS.index("labels")] = json.dumps(rec.labels, sort_keys=True)
        values[_COLUMNS.index("volumes")] = json.dumps(rec.volumes)
        self.db.execute(
            f"INSERT INTO layers ({', '.join(_COLUMNS)}) "  # noqa: S608
            f"VALUES ({', '.join('?' * len(_COLUMNS))})",
            values,
        )

    def update(self, layer_id: str, **fields: object) -> None:
        if "labels" in fields:
            fields["labels"] = json.dumps(fields["labels"], sort_keys=True)
        cols = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(
            f"UPDATE layers SET {cols} WHERE id=?",  # noqa: S608
            [*fields.values(), layer_id],
        )

    def delete(self, layer_id: str) -> None:
        self.db.execute("DELETE FROM layers WHERE id=?", (layer_id,))

    def container_of(self, layer_id: str) -> str | None:
        """The container whose read-write layer this is (once made, until it is removed)."""
        row = self.db.execute(
            "SELECT name FROM containers WHERE layer=? AND state='ready'", (layer_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    def chain(self, layer_id: str) -> list[LayerRecord]:
        """The layer's ancestors, nearest parent first (one query, however deep)."""
        rows = self.db.execute(
            """
            WITH RECURSIVE up(id, parent, n) AS (
                SELECT id, parent, 0 FROM layers WHERE id = ?
                UNION ALL
                SELECT l.id, l.parent, up.n + 1 FROM layers l JOIN up ON l.id = up.parent
            )
            SELECT layers.* FROM up JOIN layers ON layers.id = up.id WHERE up.n > 0
            ORDER BY up.n
            """,
            (layer_id,),
        )
        return [_record(r) for r in rows]

    def meta_items(self, prefix: str) -> dict[str, str]:
        """The ``meta`` rows whose key starts with *prefix*, keyed without it."""
        rows = self.db.execute(
            "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?", (len(prefix), prefix)
        )
        return {str(k)[len(prefix) :]: str(v) for k, v in rows}

    def delete_meta(self, key: str) -> None:
        self.db.execute("DELETE FROM meta WHERE key=?", (key,))
