"""LayerStore behaviour that the conformance suite does not reach: recovery, schema, options."""

from __future__ import annotations

import io
import os
import sqlite3
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from graphdriver import (
    ArchiveError,
    InvalidOption,
    LayerExists,
    LayerInfo,
    LayerInUse,
    LayerStore,
    StoreError,
    open_store,
)
from graphdriver.driver import parse_size
from graphdriver.metadata import LayerRecord, Metadata
from graphdriver.plugins import hooks
from graphdriver_vfs import VfsDriver


def test_driver_recover_is_given_every_layer(tmp_path: Path) -> None:
    """``Driver.recover`` sees every layer the store knows, in every state, oldest first,
    although the open itself reads only the records in flight or counted as mounted."""
    seen: list[list[tuple[str, str | None, bool]]] = []

    class Seeing(VfsDriver):
        def recover(self, layers: Sequence[LayerInfo]) -> None:
            seen.append([(info.id, info.parent, info.rw) for info in layers])
            assert len(layers) == len(seen[-1]) and list(layers[1:]) == list(layers)[1:]

    with LayerStore(tmp_path, Seeing, {}, hooks()) as store:
        assert seen == [[]]
        store.create("base")
        store.create("img", "base")
        store.create_rw("c", "img")
        store.get("c")
    with LayerStore(tmp_path, Seeing, {}, hooks()) as store:
        assert seen[-1] == [("base", None, False), ("img", "base", False), ("c", "img", True)]
        store.put("c")
    kept: list[Sequence[LayerInfo]] = []

    class Keeping(VfsDriver):
        def recover(self, layers: Sequence[LayerInfo]) -> None:
            kept.append(layers)  # read later, outside the lock: refused, never stale

    with LayerStore(tmp_path, Keeping, {}, hooks()), pytest.raises(RuntimeError, match="call"):
        len(kept[0])


def test_in_flight_layers_are_recovered_at_open(tmp_path: Path) -> None:
    """A half-made or half-removed layer goes; a half-applied one is emptied, never deleted
    (the user created it with an earlier command)."""
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
        assert store.layers() == ["ok", "half-applying"]
        assert store.changes("half-applying") == []
        assert store.metadata("half-applying")["diff_id"] is None
    assert sorted(p.name for p in (tmp_path / "vfs" / "dir").iterdir()) == ["half-applying", "ok"]


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
        assert store.meta.get_meta("schema_version") == "3"
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


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_store_root_and_home_are_private(tmp_path: Path) -> None:
    """A layer may hold a hostile tar's device nodes and setuid files: no other local user
    may reach them (CVE-2021-41091)."""
    open_store(tmp_path / "new", "vfs").close()
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new" / "vfs").stat().st_mode) == 0o700
    old = tmp_path / "old"
    (old / "vfs").mkdir(parents=True, mode=0o755)
    os.chmod(old, 0o755)
    os.chmod(old / "vfs", 0o755)
    open_store(old, "vfs").close()
    assert stat.S_IMODE(old.stat().st_mode) == 0o700
    assert stat.S_IMODE((old / "vfs").stat().st_mode) == 0o700


def test_writes_through_mounted_make_apply_refuse(tmp_path: Path) -> None:
    """A file written through ``mounted`` is content: apply-diff refuses the layer instead of
    wiping the file when the apply fails."""
    with open_store(tmp_path, "vfs") as store:
        store.create("x")
        with store.mounted("x") as root:
            (root / "mine").write_text("user data")
        with pytest.raises(LayerInUse, match="already has content"):
            store.apply_diff("x", io.BytesIO(b"not a tar" * 100))
        with store.mounted("x") as root:
            assert (root / "mine").read_text() == "user data"


def test_apply_onto_a_layer_mounted_but_never_written(tmp_path: Path) -> None:
    """moby graphtest DiffApply: get and put a fresh layer, then apply a diff onto it."""
    with open_store(tmp_path, "vfs") as store:
        store.create("base")
        store.apply_diff("base", io.BytesIO(_tar({"a": b"a"})))
        store.create("x", "base")
        store.get("x")
        store.put("x")
        assert store.apply_diff("x", io.BytesIO(_tar({"b": b"bb"}))) == 2
        assert [c.path for c in store.changes("x")] == ["/b"]
        store.create("y", "base")
        with store.mounted("y") as root:
            (root / "a").write_text("changed")
        with pytest.raises(LayerInUse, match="already has content"):
            store.apply_diff("y", io.BytesIO(_tar({"b": b"bb"})))


def test_a_failed_apply_empties_the_layer_and_keeps_it(tmp_path: Path) -> None:
    with open_store(tmp_path, "vfs") as store:
        store.create("x")
        with pytest.raises(ArchiveError):
            store.apply_diff("x", io.BytesIO(_tar({"f": b"data"})[:700]))
        assert store.layers() == ["x"]
        assert store.changes("x") == []
        assert store.apply_diff("x", io.BytesIO(_tar({"f": b"data"}))) == 4


def test_apply_from_a_diff_of_the_same_store_in_one_process(tmp_path: Path) -> None:
    """The diff streams without the store lock, so apply_diff can read it (no deadlock); run
    in a child process, so that a deadlock fails the test instead of hanging it."""
    script = """
import sys
from graphdriver import open_store
from graphdriver.testing.trees import random_content
with open_store(sys.argv[1], "vfs") as store:
    store.create("a")
    with store.mounted("a") as root:
        for i in range(8):
            (root / f"f{i}").write_bytes(random_content(1 << 20, i))
    store.create("b")
    print(store.apply_diff("b", store.diff("a")))
    print(" ".join(c.path for c in store.changes("b")))
"""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("apply_diff(b, diff(a)) in one process deadlocked")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(8 << 20), " ".join(f"/f{i}" for i in range(8))]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs inside a layer")
def test_remove_that_fails_does_not_wedge_the_store(tmp_path: Path) -> None:
    """rm of a layer whose files cannot be deleted (an immutable file inside it; something
    mounted inside is unmounted first): the layer is gone from the store at once, its files
    are deleted at a later open, and the failure is listed by status without blocking
    commands on other layers."""
    with open_store(tmp_path, "vfs") as store:
        store.create("keep")
        store.create("busy")
        busy_dir = tmp_path / "vfs" / "dir" / "busy"
        (busy_dir / "file").write_text("x")
        _immutable(busy_dir / "file", True)
        try:
            with pytest.raises(StoreError, match="retried at the next open"):
                store.remove("busy")
            assert store.layers() == ["keep"]
            assert not store.exists("busy")
        except BaseException:
            _immutable(busy_dir / "file", False)
            raise
    try:
        with open_store(tmp_path, "vfs") as store:  # recovery fails again: logged, not fatal
            failed = [v for k, v in store.status() if k == "Recovery Failed"]
            assert len(failed) == 1 and failed[0].startswith("busy: remove layer busy")
            store.create("other", "keep")
            store.remove("other")
            with pytest.raises(LayerExists, match="still being removed"):
                store.create("busy")
    finally:
        _immutable(busy_dir / "file", False)
    with open_store(tmp_path, "vfs") as store:
        assert not busy_dir.exists()
        assert not [kv for kv in store.status() if kv[0] == "Recovery Failed"]
        store.create("busy")  # the id is free again
        assert store.layers() == ["keep", "busy"]


def _immutable(path: Path, on: bool) -> None:
    subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)


def test_remove_fault_ebusy_then_finished_at_next_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_store(tmp_path, "vfs") as store:
        store.create("keep")
        store.create("x")
        monkeypatch.setenv("GRAPHDRIVER_FAULT", "store.remove.driver=EBUSY")
        with pytest.raises(StoreError, match="busy"):
            store.remove("x")
        assert store.layers() == ["keep"]
        monkeypatch.delenv("GRAPHDRIVER_FAULT")
    with open_store(tmp_path, "vfs") as store:
        assert store.layers() == ["keep"]
        assert not (tmp_path / "vfs" / "dir" / "x").exists()
        store.create("x")


def test_refused_remove_commits_nothing(tmp_path: Path) -> None:
    with open_store(tmp_path, "vfs") as store:
        store.create("base")
        store.create("child", "base")
        store.get("child")
        for layer in ("base", "child"):
            with pytest.raises(LayerInUse):
                store.remove(layer)
        assert store.layers() == ["base", "child"]
        assert store.meta.get("child").state == "ready"  # type: ignore[union-attr]
        store.put("child")
        store.remove("child")
        store.remove("base")


def test_a_layer_lock_file_lives_as_long_as_its_layer(tmp_path: Path) -> None:
    """The create makes the layer's lock file and it stays through an apply, a failed one and
    a reopen (a reader on a disk with no room for a new file takes its share there); the
    removal takes it away, and a create refused for an id in use leaves it."""
    store = open_store(tmp_path, "vfs")
    locks = store.home / "inflight"
    store.create("base")
    with pytest.raises(ArchiveError):
        store.apply_diff("base", io.BytesIO(_tar({"a": b"1"})[:700]))
    store.apply_diff("base", io.BytesIO(_tar({"a": b"1"})))
    store.create("ctr", "base", rw=True)
    store.close()
    store = open_store(tmp_path, "vfs")
    assert sorted(os.listdir(locks)) == ["base.lock", "ctr.lock"]
    assert [c.path for c in store.changes("ctr")] == []
    store.remove("ctr")
    with pytest.raises(LayerExists):
        store.create("base")
    assert sorted(os.listdir(locks)) == ["base.lock"]
    store.close()
