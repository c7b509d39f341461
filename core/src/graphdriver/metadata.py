"""The SQLite catalogue of a store's layers.

One database per store home (``metadata.db``, WAL journal), a versioned schema, and one
transaction per operation. Layer rows carry a state: ``creating``, ``applying`` and ``removing``
are in-flight states that :meth:`LayerStore.open` finishes or rolls back after a crash. The
database also holds the store's containers (their rows belong to :mod:`.container_records`)
and the exact-diff records (``tar_split``).

It is opened through :mod:`.sqlite`, the one boundary where SQLite's errors become
:class:`StoreError` (one line that says what to do, whoever ran the statement). A database
that is empty, damaged, or missing while the store had one is refused at open with a pointer
to ``graphdriver check``, never silently made anew (that would orphan every layer's storage).
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from .container_records import SCHEMA as containers_schema
from .container_records import ContainerRecords
from .errors import StoreError

# the SQLite boundary, where it was first written: devmapper and older callers import it here
from .sqlite import BUSY_TIMEOUT as BUSY_TIMEOUT
from .sqlite import FULL_BELOW as FULL_BELOW
from .sqlite import Schema, open_db, unreadable
from .sqlite import check_hint as check_hint
from .sqlite import connect as connect
from .sqlite import sqlite_error as sqlite_error
from .sqlite import transaction as transaction

SCHEMA_VERSION = 3

#: per applied layer, what an exact diff needs (``archive.tarsplit``), with its sha256 so that a
#: record edited behind the store is refused; gone with the layer
_TAR_SPLIT = """
CREATE TABLE tar_split (
    layer   TEXT PRIMARY KEY REFERENCES layers(id) ON DELETE CASCADE,
    digest  TEXT NOT NULL,
    data    BLOB NOT NULL
);
"""

_LAYERS = """
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

#: the database's schema; each migration is what a version adds to the one before (the
#: version is the ``meta`` row ``schema_version``, as since version 1)
SCHEMA = Schema(
    version=SCHEMA_VERSION,
    create=_LAYERS + containers_schema + _TAR_SPLIT,
    migrations={
        2: "ALTER TABLE layers ADD COLUMN volumes TEXT NOT NULL DEFAULT '[]';" + containers_schema,
        3: _TAR_SPLIT,
    },
    version_in="meta",
    label="metadata",
)

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


def _present_marker(path: Path) -> Path:
    return path.with_name(path.name + ".present")


_MARKER_TEXT = (
    "This store has a metadata database next to this file. If that file is missing or empty, "
    "the layers' records were lost: run `graphdriver check` (see --help) before anything else.\n"
)


def refuse_reason(path: Path) -> str | None:
    """Why the database at *path* must not be opened (and silently made anew), or None.

    A missing or 0-byte file is a brand-new store unless :func:`_present_marker` says this
    store had a database (written at every successful open).
    """
    had_one = _present_marker(path).exists()
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing although this store had one" if had_one else None
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if size == 0 and had_one:
        return "is empty (0 bytes)"
    return None


class Metadata:
    """The layer catalogue of one store home."""

    def __init__(self, path: Path) -> None:
        self.path = path
        why = refuse_reason(path)
        if why is not None:
            raise StoreError(
                f"metadata database {path} {why}: the layers' records are lost, so the "
                f"store is not opened; run `{check_hint(path)}` to see what is left "
                f"(--repair rebuilds what can be known)"
            )
        try:
            self.db, created = open_db(path, SCHEMA, hint=check_hint(path))
        except StoreError as exc:
            if unreadable(exc):
                raise StoreError(
                    f"metadata database {path} cannot be used, it is unreadable "
                    f"({exc.__cause__}): the store is not opened; run `{check_hint(path)}` to "
                    f"diagnose it (--repair moves it aside and rebuilds what can be known)"
                ) from exc.__cause__
            raise
        #: this open made the database (a new store, or a lost one: the store decides)
        self.created = created
        #: the containers recorded with the layers (table ``containers``)
        self.containers = ContainerRecords(self.db)
        marker = _present_marker(path)
        if not marker.exists():
            marker.write_text(_MARKER_TEXT)

    def close(self) -> None:
        self.db.close()

    def discard(self) -> None:
        """Close and delete a database this open made (with its marker), so that a refused
        first open leaves the home as it found it."""
        assert self.created
        self.db.close()
        for path in (self.path, *(Path(f"{self.path}{s}") for s in ("-wal", "-shm", ".present"))):
            path.unlink(missing_ok=True)

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
        rows = self.db.execute("SELECT * FROM layers ORDER BY created, id").fetchall()
        return [_record(r) for r in rows]

    def unsettled(self) -> list[LayerRecord]:
        """The records an open looks at (:func:`.recovery.recover`): in flight, or counted as
        mounted; every other one is left unread (their labels' JSON made the read of all
        500 records of a store half of its open)."""
        rows = self.db.execute(
            "SELECT * FROM layers WHERE state IN (?, ?, ?) OR mount_count > 0 ORDER BY created, id",
            IN_FLIGHT,
        ).fetchall()
        return [_record(r) for r in rows]

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
        return self.containers.owner_of(layer_id)

    def chain(self, layer_id: str) -> list[LayerRecord]:
        """The layer's ancestors, nearest parent first (one query, however deep).

        A parent cycle (only a damaged or hand-edited database has one) is a StoreError
        naming the layers in it, never an endless walk.
        """
        rows = self.db.execute(
            """
            WITH RECURSIVE up(id, parent, n) AS (
                SELECT id, parent, 0 FROM layers WHERE id = ?
                UNION ALL
                SELECT l.id, l.parent, up.n + 1 FROM layers l JOIN up ON l.id = up.parent
                WHERE up.n <= (SELECT count(*) FROM layers)
            )
            SELECT layers.*, up.n AS n FROM up JOIN layers ON layers.id = up.id
            ORDER BY up.n
            """,
            (layer_id,),
        ).fetchall()
        seen: dict[str, int] = {}
        for row in rows:
            if row["id"] in seen:
                loop = [r["id"] for r in rows[seen[row["id"]] : row["n"] + 1]]
                raise StoreError(
                    f"the parents of layer {layer_id!r} form a cycle "
                    f"({' -> '.join(loop)}): the metadata is damaged; run "
                    f"`{check_hint(self.path)}`"
                )
            seen[row["id"]] = row["n"]
        return [_record(r) for r in rows[1:]]

    def set_tar_split(self, layer_id: str, digest: str, data: bytes) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO tar_split VALUES (?, ?, ?)", (layer_id, digest, data)
        )

    def tar_split(self, layer_id: str) -> tuple[str, bytes] | None:
        """(digest, record) of the layer's exact-diff record, or None."""
        row = self.db.execute(
            "SELECT CAST(digest AS TEXT), CAST(data AS BLOB) FROM tar_split WHERE layer=?",
            (layer_id,),
        ).fetchone()
        return None if row is None else (str(row[0]), bytes(row[1]))

    def tar_split_size(self, layer_id: str) -> int | None:
        row = self.db.execute(
            "SELECT length(data) FROM tar_split WHERE layer=?", (layer_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    def delete_tar_split(self, layer_id: str) -> None:
        self.db.execute("DELETE FROM tar_split WHERE layer=?", (layer_id,))

    def meta_items(self, prefix: str) -> dict[str, str]:
        """The ``meta`` rows whose key starts with *prefix*, keyed without it."""
        rows = self.db.execute(
            "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?", (len(prefix), prefix)
        )
        return {str(k)[len(prefix) :]: str(v) for k, v in rows}

    def delete_meta(self, key: str) -> None:
        self.db.execute("DELETE FROM meta WHERE key=?", (key,))
