"""The volume catalogue, ``<root>/volumes/.metadata.db``: the one module that runs its SQL.

Tables ``volumes`` (name, driver, state ``creating``/``ready``/``removing``, labels, options,
mount count) and ``refs`` (which container references which volume, and whether it has it
mounted; a container is ``<layer driver>:<name>``). :class:`~graphdriver.volumes.VolumeStore`
(with recovery and drivers) and ``check`` (without) read and write it through
:class:`VolumeCatalog`.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StoreError
from .locking import FileLock
from .sqlite import Schema, open_db, transaction, unreadable

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE volumes (
    name        TEXT PRIMARY KEY,
    driver      TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'removing')),
    anonymous   INTEGER NOT NULL,
    created     REAL NOT NULL,
    labels      TEXT NOT NULL,
    options     TEXT NOT NULL,
    mount_count INTEGER NOT NULL DEFAULT 0,
    mountpoint  TEXT
);
CREATE TABLE refs (
    volume    TEXT NOT NULL REFERENCES volumes(name),
    container TEXT NOT NULL,
    mounted   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (volume, container)
);
"""
SCHEMA_VERSION = 2
SCHEMA = Schema(
    version=SCHEMA_VERSION,
    create=_SCHEMA,
    migrations={2: "ALTER TABLE refs ADD COLUMN mounted INTEGER NOT NULL DEFAULT 0"},
    version_in="meta",
    label="volume metadata",
    unversioned=1,  # as before sqlite.py: a meta table without the row is version 1
)


@dataclass
class VolumeRecord:
    name: str
    driver: str
    state: str
    anonymous: bool
    created: float
    labels: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    mount_count: int = 0
    mountpoint: str | None = None


def _record(row: sqlite3.Row) -> VolumeRecord:
    return VolumeRecord(
        name=row["name"],
        driver=row["driver"],
        state=row["state"],
        anonymous=bool(row["anonymous"]),
        created=row["created"],
        labels=json.loads(row["labels"]),
        options=json.loads(row["options"]),
        mount_count=row["mount_count"],
        mountpoint=row["mountpoint"],
    )


def anonymous_name() -> str:
    """A random 64-hex name, like Docker's anonymous volumes."""
    return secrets.token_hex(32)


class VolumeCatalog:
    """The rows of one root's volume database (made or migrated at open). Callers hold the
    volumes' lock (``<root>/volumes/.lock``) around what must not interleave."""

    def __init__(self, path: Path) -> None:
        self.path = path
        hint = f"graphdriver --root {path.parent.parent} check"
        try:
            self.db, _ = open_db(path, SCHEMA, hint=hint)
        except StoreError as exc:
            if unreadable(exc):
                raise StoreError(
                    f"volume metadata {path} cannot be used: {exc.__cause__}; move it aside "
                    f"and run `{hint}`"
                ) from exc.__cause__
            raise

    def close(self) -> None:
        self.db.close()

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.db)

    # ------------------------------------------------------------------------ volumes

    def all(self, *, include_in_flight: bool = False) -> list[VolumeRecord]:
        rows = self.db.execute("SELECT * FROM volumes ORDER BY created, name")
        recs = [_record(r) for r in rows]
        return recs if include_in_flight else [r for r in recs if r.state == "ready"]

    def find(self, name: str, *, any_state: bool = False) -> VolumeRecord | None:
        """The ready volume *name* (in any state with *any_state*), or None."""
        row = self.db.execute("SELECT * FROM volumes WHERE name=?", (name,)).fetchone()
        if row is None or (row["state"] != "ready" and not any_state):
            return None
        return _record(row)

    def insert(self, rec: VolumeRecord) -> None:
        with transaction(self.db):
            self.db.execute(
                "INSERT INTO volumes (name, driver, state, anonymous, created, labels, "
                "options) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.name,
                    rec.driver,
                    rec.state,
                    int(rec.anonymous),
                    rec.created,
                    json.dumps(rec.labels, sort_keys=True),
                    json.dumps(rec.options, sort_keys=True),
                ),
            )

    def set_state(self, name: str, state: str) -> None:
        with transaction(self.db):
            self.db.execute("UPDATE volumes SET state=? WHERE name=?", (state, name))

    def set_ready_unmounted(self, name: str) -> None:
        """A removal the driver refused: the volume is ready again, mounted nowhere."""
        with transaction(self.db):
            self.db.execute(
                "UPDATE volumes SET state='ready', mount_count=0, mountpoint=NULL WHERE name=?",
                (name,),
            )

    def delete(self, name: str) -> None:
        """Forget the volume and every reference to it."""
        with transaction(self.db):
            self.db.execute("DELETE FROM refs WHERE volume=?", (name,))
            self.db.execute("DELETE FROM volumes WHERE name=?", (name,))

    # ----------------------------------------------------------------- references, mounts

    def users(self, name: str) -> list[str]:
        """Containers (``<driver>:<name>``) that reference the volume."""
        rows = self.db.execute(
            "SELECT container FROM refs WHERE volume=? ORDER BY container", (name,)
        )
        return [str(r[0]) for r in rows]

    def refs(self) -> list[tuple[str, str]]:
        """Every (volume, container) reference."""
        return [(r[0], r[1]) for r in self.db.execute("SELECT volume, container FROM refs")]

    def add_ref(self, name: str, container: str) -> None:
        with transaction(self.db):
            self.db.execute(
                "INSERT OR IGNORE INTO refs (volume, container) VALUES (?, ?)", (name, container)
            )

    def drop_refs(self, container: str, volume: str | None = None) -> list[str]:
        """Forget *container*'s references (to *volume* only, when given); return the
        volumes it referenced."""
        where, args = "container=?", [container]
        if volume is not None:
            where, args = "container=? AND volume=?", [container, volume]
        names = [r[0] for r in self.db.execute(f"SELECT volume FROM refs WHERE {where}", args)]  # noqa: S608
        with transaction(self.db):
            self.db.execute(f"DELETE FROM refs WHERE {where}", args)  # noqa: S608
        return names

    def ref_mounted(self, name: str, container: str) -> bool:
        row = self.db.execute(
            "SELECT mounted FROM refs WHERE volume=? AND container=?", (name, container)
        ).fetchone()
        return bool(row and row[0])

    def set_mounted(
        self, name: str, container: str, mounted: bool, count: int, path: str | None
    ) -> None:
        """*container* has *name* mounted (or no longer); the volume's mount count and mount
        point become *count* and *path*, in the same transaction."""
        with transaction(self.db):
            if mounted:
                self.db.execute(
                    "INSERT OR REPLACE INTO refs (volume, container, mounted) VALUES (?, ?, 1)",
                    (name, container),
                )
            else:
                self.db.execute(
                    "UPDATE refs SET mounted=0 WHERE volume=? AND container=?", (name, container)
                )
            self.db.execute(
                "UPDATE volumes SET mount_count=?, mountpoint=? WHERE name=?",
                (count, path, name),
            )

    def mounted_refs(self, prefix: str) -> list[tuple[str, str]]:
        """Every (volume, holder) mount of a holder whose name starts with *prefix*."""
        rows = self.db.execute(
            "SELECT volume, container FROM refs WHERE mounted AND substr(container, 1, ?) = ?",
            (len(prefix), prefix),
        )
        return [(r[0], r[1]) for r in rows]


def labels_match(rec: VolumeRecord, labels: Mapping[str, str] | None) -> bool:
    """Whether the volume carries every label in *labels*."""
    return all(rec.labels.get(k) == v for k, v in (labels or {}).items())


@contextlib.contextmanager
def held_catalog(root: Path) -> Iterator[VolumeCatalog | None]:
    """The volume catalogue of *root* with the volumes' lock held, or None when the root has
    none; no recovery and no volume driver (``check`` looks at what is recorded)."""
    folder = root / "volumes"
    if not (folder / ".metadata.db").exists():
        yield None
        return
    lock = FileLock(folder / ".lock")
    try:
        with lock.held("check the volumes"):
            catalog = VolumeCatalog(folder / ".metadata.db")
            try:
                yield catalog
            finally:
                catalog.close()
    finally:
        lock.close()
