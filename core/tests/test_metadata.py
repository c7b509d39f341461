"""The metadata catalogue's own guarantees: damaged or lost databases are refused, never made
anew; a parent cycle is an error, never an endless walk; a failed COMMIT rolls back; SQLite's
errors are one-line StoreErrors."""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver import StoreError
from graphdriver.metadata import LayerRecord, Metadata


def _rec(layer_id: str, parent: str | None = None) -> LayerRecord:
    return LayerRecord(
        id=layer_id,
        parent=parent,
        state="ready",
        rw=False,
        size_limit=None,
        mount_label=None,
        created=time.time(),
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "vfs" / "metadata.db"
    path.parent.mkdir()
    meta = Metadata(path)
    with meta.transaction():
        for layer_id, parent in (("a", None), ("b", "a"), ("c", "b")):
            meta.insert(_rec(layer_id, parent))
    meta.close()
    yield path


def test_a_parent_cycle_is_an_error_naming_the_layers(db: Path) -> None:
    raw = sqlite3.connect(db)
    raw.execute("UPDATE layers SET parent='c' WHERE id='a'")
    raw.commit()
    raw.close()
    meta = Metadata(db)
    signal.alarm(30)  # the recursive query used to loop forever
    try:
        with pytest.raises(StoreError, match=r"form a cycle \(c -> b -> a -> c\).*check"):
            meta.chain("c")
    finally:
        signal.alarm(0)
        meta.close()


def test_chain_is_nearest_parent_first(db: Path) -> None:
    meta = Metadata(db)
    assert [r.id for r in meta.chain("c")] == ["b", "a"]
    assert meta.chain("a") == []
    meta.close()


def test_an_emptied_database_is_refused(db: Path) -> None:
    for side in ("-wal", "-shm"):
        Path(f"{db}{side}").unlink(missing_ok=True)
    db.write_bytes(b"")
    with pytest.raises(StoreError, match=r"is empty \(0 bytes\).*--driver vfs check"):
        Metadata(db)
    assert db.stat().st_size == 0  # nothing was made anew over it


def test_a_lost_database_is_refused(db: Path) -> None:
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        path.unlink(missing_ok=True)
    with pytest.raises(StoreError, match="is missing although this store had one"):
        Metadata(db)
    assert not db.exists()


def test_garbage_is_refused_with_a_pointer_to_check(db: Path) -> None:
    db.write_bytes(b"garbage" * 2000)
    with pytest.raises(StoreError, match=r"it is unreadable \(file is not a database\).*check"):
        Metadata(db)


def test_a_new_store_and_a_first_open_killed_early_open_empty(tmp_path: Path) -> None:
    Metadata(tmp_path / "new.db").close()
    half = tmp_path / "half.db"
    half.write_bytes(b"")  # connect() made the file, the kill came before the schema
    meta = Metadata(half)
    assert meta.all() == []
    meta.close()


def test_a_failed_commit_rolls_back(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meta = Metadata(db)
    monkeypatch.setenv("GRAPHDRIVER_FAULT", "metadata.commit=ENOSPC")
    with pytest.raises(StoreError, match=r"is full.*nothing was recorded"), meta.transaction():
        meta.insert(_rec("d", "c"))
    monkeypatch.delenv("GRAPHDRIVER_FAULT")
    assert not meta.db.in_transaction
    assert meta.get("d") is None
    with meta.transaction():  # the connection is usable again
        meta.insert(_rec("d", "c"))
    assert meta.get("d") is not None
    meta.close()


def test_sqlite_errors_are_store_errors(db: Path) -> None:
    meta = Metadata(db)
    with pytest.raises(StoreError, match=r"metadata database .*no such table"):
        meta.db.execute("SELECT * FROM nowhere")
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    meta.db.execute("PRAGMA busy_timeout=100")
    try:
        with pytest.raises(StoreError, match="stayed locked by another process"):
            meta.set_meta("x", "y")
    finally:
        other.execute("ROLLBACK")
        other.close()
        meta.close()
