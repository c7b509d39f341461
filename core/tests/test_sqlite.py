"""The one SQLite helper: migrations, refusals, the StoreError boundary, and databases made by
the code before it (schema, version and rows as they were) opening unchanged."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from graphdriver import StoreError, open_store
from graphdriver.containers import ContainerStore
from graphdriver.sqlite import Schema, close_checkpointed, open_db, transaction
from graphdriver.volumes import VolumeStore

# metadata.db as graphdriver wrote it before sqlite.py (schema 3, version in table meta),
# with one image layer, one container and its layer, taken from a store made by that code
OLD_METADATA = """
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
CREATE TABLE tar_split (
    layer   TEXT PRIMARY KEY REFERENCES layers(id) ON DELETE CASCADE,
    digest  TEXT NOT NULL,
    data    BLOB NOT NULL
);
INSERT INTO meta VALUES ('schema_version', '3'), ('driver', 'vfs');
INSERT INTO layers VALUES ('base', NULL, 'ready', 0, NULL, NULL, 1796027556.4, 1796027556405635999,
    0, NULL, 0, NULL, NULL, '{}', '[]');
INSERT INTO layers VALUES ('c1layer', 'base', 'ready', 1, NULL, NULL, 1796027556.5,
    1796027556522554473, 0, NULL, 1, NULL, NULL, '{"graphdriver.container": "c1"}', '[]');
INSERT INTO containers VALUES ('c1', 'c1layer', 'base', 'ready', 1796027556.51,
    '[{"destination": "/data", "type": "volume", "source": "named", "rw": true, "origin": "cli",
      "anonymous": false, "copy": true, "copied": true, "bound": false, "target": null}]',
    0, NULL, 0);
"""

OLD_VOLUMES = """
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
    {mounted}
    PRIMARY KEY (volume, container)
);
INSERT INTO meta VALUES ('schema_version', '{version}');
INSERT INTO volumes VALUES ('named', 'local', 'ready', 0, 1796027556.5, '{{}}', '{{}}', 0, NULL);
INSERT INTO refs (volume, container) VALUES ('named', 'vfs:c1');
"""


def _make(path: Path, script: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(script)
    db.close()


def _schema(path: Path) -> tuple[int, list[tuple[str, str]], list[tuple[str, str]]]:
    db = sqlite3.connect(path)
    try:
        return (
            db.execute("PRAGMA user_version").fetchone()[0],
            db.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall(),
            db.execute("SELECT key, value FROM meta ORDER BY key").fetchall(),
        )
    finally:
        db.close()


def _old_root(root: Path, volumes_version: int = 2) -> None:
    _make(root / "vfs" / "metadata.db", OLD_METADATA)
    (root / "vfs" / "dir" / "base").mkdir(parents=True)
    (root / "vfs" / "dir" / "c1layer").mkdir()
    mounted = "mounted INTEGER NOT NULL DEFAULT 0," if volumes_version == 2 else ""
    script = OLD_VOLUMES.format(mounted=mounted, version=volumes_version)
    _make(root / "volumes" / ".metadata.db", script)
    (root / "volumes" / "named" / "_data").mkdir(parents=True)


def test_databases_made_before_open_unchanged(tmp_path: Path) -> None:
    _old_root(tmp_path)
    layers_db, volumes_db = tmp_path / "vfs" / "metadata.db", tmp_path / "volumes" / ".metadata.db"
    before = _schema(layers_db), _schema(volumes_db)
    with open_store(tmp_path, "vfs") as store:
        containers = ContainerStore(store)
        try:
            assert containers.names() == ["c1"]
            assert containers.inspect("c1")["Mounts"][0]["Name"] == "named"
            assert containers.volumes.users("named") == ["vfs:c1"]
            root = containers.mount("c1")
            assert (root / "data").is_dir()
            containers.unmount("c1")
            with pytest.raises(Exception, match="read-write layer of container 'c1'"):
                store.remove("c1layer")
        finally:
            containers.close()
    assert (_schema(layers_db), _schema(volumes_db)) == before


def test_a_version_1_volume_database_is_upgraded(tmp_path: Path) -> None:
    _old_root(tmp_path, volumes_version=1)
    volumes = VolumeStore(tmp_path)
    try:
        assert volumes.users("named") == ["vfs:c1"]
        assert volumes.mount("named", "vfs:c1").is_dir()
        assert volumes.inspect("named")["MountCount"] == 1
        volumes.unmount("named", "vfs:c1")
    finally:
        volumes.close()
    version, tables, meta = _schema(tmp_path / "volumes" / ".metadata.db")
    assert version == 0 and meta == [("schema_version", "2")]
    assert "mounted INTEGER" in dict(tables)["refs"]


def test_newer_volume_database_is_refused(tmp_path: Path) -> None:
    _old_root(tmp_path)
    db = sqlite3.connect(tmp_path / "volumes" / ".metadata.db")
    db.execute("UPDATE meta SET value='9' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match=r"volume metadata .* schema version 9, newer"):
        VolumeStore(tmp_path)


def test_a_damaged_volume_database_is_one_store_error(tmp_path: Path) -> None:
    (tmp_path / "volumes").mkdir()
    (tmp_path / "volumes" / ".metadata.db").write_bytes(b"not a database" * 300)
    with pytest.raises(StoreError, match=r"volume metadata .* cannot be used") as info:
        VolumeStore(tmp_path)
    assert "\n" not in str(info.value)


V1 = Schema(version=1, create="CREATE TABLE snapshots (key TEXT PRIMARY KEY);")
V2 = Schema(
    version=2,
    create="CREATE TABLE snapshots (key TEXT PRIMARY KEY, kind TEXT NOT NULL DEFAULT 'view');",
    migrations={2: "ALTER TABLE snapshots ADD COLUMN kind TEXT NOT NULL DEFAULT 'view'"},
)


def test_user_version_migrations(tmp_path: Path) -> None:
    """What devmapper's devices.db or the containerd proxy's snapshots.db would use."""
    path = tmp_path / "snapshots.db"
    db, created = open_db(path, V1)
    assert created
    with transaction(db):
        db.execute("INSERT INTO snapshots VALUES ('a')")
    db.close()
    db, created = open_db(path, V2)
    assert not created
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [tuple(r) for r in db.execute("SELECT * FROM snapshots")] == [("a", "view")]
    db.close()
    with pytest.raises(StoreError, match="schema version 2, newer than this graphdriver"):
        open_db(path, V1)


def test_sqlite_errors_through_the_helper_are_one_line(tmp_path: Path) -> None:
    db, _ = open_db(tmp_path / "x.db", V1)
    with pytest.raises(StoreError, match="no such table") as info, transaction(db):
        db.execute("INSERT INTO missing VALUES (1)")
    assert "\n" not in str(info.value)
    assert not db.in_transaction
    db.close()


def test_tables_without_a_version_are_refused_or_adopted(tmp_path: Path) -> None:
    """A database made before its code kept a version: refused, unless the schema says what
    version such a database is (as devmapper's devices.db would)."""
    path = tmp_path / "devices.db"
    _make(path, "CREATE TABLE snapshots (key TEXT PRIMARY KEY);")
    with pytest.raises(StoreError, match="no schema version"):
        open_db(path, V2)
    db, created = open_db(path, Schema(V2.version, V2.create, V2.migrations, unversioned=1))
    assert not created
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()


def test_a_close_leaves_one_durable_file(tmp_path: Path) -> None:
    """The last close checkpoints: every commit is in the database file, synced, when a
    command ends (what makes a command that exited 0 survive a power cut), and that file
    alone holds them."""
    path = tmp_path / "x.db"
    db, _ = open_db(path, V1)
    for n in range(50):
        with transaction(db):
            db.execute("INSERT INTO snapshots VALUES (?)", (f"key-{n:03d}-" + "x" * 200,))
    db.close()
    assert not Path(f"{path}-wal").exists()
    moved = tmp_path / "moved.db"
    path.rename(moved)  # the database file alone
    db, created = open_db(moved, V1)
    assert not created
    assert db.execute("SELECT count(*) FROM snapshots").fetchone()[0] == 50
    db.close()


def test_a_checkpointed_close_empties_the_wal_another_connection_keeps(tmp_path: Path) -> None:
    """What check --repair renames into place holds every row even while another connection
    has the database open (a plain close leaves the WAL to it); a reader that keeps the
    checkpoint from finishing is an error, not a file renamed without its rows."""
    path = tmp_path / "x.db"
    db, _ = open_db(path, V1, timeout=0.1)  # (a busy checkpoint waits out the timeout)
    other = sqlite3.connect(path)
    other.execute("SELECT count(*) FROM snapshots").fetchone()
    with transaction(db):
        db.executemany("INSERT INTO snapshots VALUES (?)", [(f"k{n}",) for n in range(20)])
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM snapshots").fetchone()  # holds a read snapshot
    with pytest.raises(StoreError, match="its WAL could not be emptied"):
        close_checkpointed(db)
    reader.execute("COMMIT")
    close_checkpointed(db)
    assert Path(f"{path}-wal").stat().st_size == 0  # (other keeps it open)
    moved = tmp_path / "moved.db"
    path.rename(moved)
    db2 = sqlite3.connect(moved)
    assert db2.execute("SELECT count(*) FROM snapshots").fetchone()[0] == 20
    for conn in (db2, other, reader):
        conn.close()
