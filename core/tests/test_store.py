"""LayerStore behaviour that the conformance suite does not reach: recovery, schema, options."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from graphdriver import InvalidOption, StoreError, open_store
from graphdriver.driver import parse_size
from graphdriver.metadata import LayerRecord, Metadata


def test_in_flight_layers_are_rolled_back_at_open(tmp_path: Path) -> None:
    with open_store(tmp_path, "vfs") as store:
        store.create("ok")
    meta = Metadata(tmp_path / "vfs" / "metadata.db")
    with meta.transaction():
        for state in ("creating", "applying", "removing"):
            meta.insert(
                LayerRecord(
                    id=f"half-{state}",
                    parent="ok",
                    state=state,
                    rw=False,
                    size_limit=None,
                    mount_label=None,
                    created=time.time(),
                )
            )
    meta.close()
    for state in ("creating", "applying", "removing"):
        d = tmp_path / "vfs" / "dir" / f"half-{state}"
        d.mkdir()
        (d / "partial").write_text("x")
    with open_store(tmp_path, "vfs") as store:
        assert store.layers() == ["ok"]
    assert sorted(p.name for p in (tmp_path / "vfs" / "dir").iterdir()) == ["ok"]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    open_store(tmp_path, "vfs").close()
    db = sqlite3.connect(tmp_path / "vfs" / "metadata.db")
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        open_store(tmp_path, "vfs")


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE layers (
    id TEXT PRIMARY KEY, parent TEXT REFERENCES layers(id), state TEXT NOT NULL,
    rw INTEGER NOT NULL,
    size_limit INTEGER, mount_label TEXT, created REAL NOT NULL, boundary_ns INTEGER,
    mount_count INTEGER NOT NULL DEFAULT 0, mount_path TEXT, dirty INTEGER NOT NULL DEFAULT 0,
    diff_id TEXT, unpacked_size INTEGER, labels TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX layers_parent ON layers(parent);
INSERT INTO meta VALUES ('schema_version', '1'), ('driver', 'vfs');
INSERT INTO layers (id, state, rw, created, labels) VALUES ('old', 'ready', 0, 1.0, '{"k": "v"}');
"""


def test_a_version_1_store_is_upgraded_in_place(tmp_path: Path) -> None:
    (tmp_path / "vfs" / "dir" / "old").mkdir(parents=True)
    db = sqlite3.connect(tmp_path / "vfs" / "metadata.db")
    db.executescript(V1_SCHEMA)
    db.close()
    with open_store(tmp_path, "vfs") as store:
        assert store.layers() == ["old"]
        info = store.metadata("old")
        assert info["labels"] == {"k": "v"} and info["volumes"] == []
        store.create("new", "old", volumes=["/data"])
        assert store.metadata("new")["volumes"] == ["/data"]
        assert store.meta.get_meta("schema_version") == "2"
        assert store.meta.db.execute("SELECT count(*) FROM containers").fetchone()[0] == 0


def test_corrupt_database_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "vfs").mkdir()
    (tmp_path / "vfs" / "metadata.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot be used"):
        open_store(tmp_path, "vfs")


def test_several_drivers_under_one_root_need_a_choice(tmp_path: Path) -> None:
    from graphdriver import GraphDriverError
    from graphdriver.plugins import choose_driver

    open_store(tmp_path, "vfs").close()
    assert choose_driver(tmp_path) == "vfs"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metadata.db").write_bytes(b"")
    with pytest.raises(GraphDriverError, match="several drivers"):
        choose_driver(tmp_path)


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("50M", 50 << 20), ("1.5G", 3 << 29), ("10GiB", 10 << 30), ("2k", 2048)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "lots", "-5M", "5X"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(InvalidOption):
        parse_size(text)
