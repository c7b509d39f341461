"""``graphdriver check [--repair] [--digests]`` on real stores (loop-ext4, vfs and overlay): each
corruption is made for real (the database edited with SQLite, storage deleted or added, the db
truncated or overwritten, a layer's file tampered with), then reported, and repaired where
that is safe; and a damaged or full database is one clear error for every other command."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GD, Result

from graphdriver.linux.mount import is_mountpoint, mount, mounts_under, unmount, unmount_all_under
from graphdriver.testing import Backing


def _runner(backing: Backing, request: pytest.FixtureRequest, driver: str) -> Iterator[GD]:
    root = backing.root / re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:80]
    root.mkdir()
    runner = GD(root, driver)
    try:
        yield runner
    finally:
        subprocess.run(runner.argv("cleanup"), capture_output=True, timeout=120)
        leftover = mounts_under(root)
        unmount_all_under(root)  # a test that broke the database leaves cleanup unable
        shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"mounts left behind: {leftover}"


@pytest.fixture(params=["vfs", "overlay"])
def gd(loop_ext4: Backing, request: pytest.FixtureRequest) -> Iterator[GD]:
    yield from _runner(loop_ext4, request, request.param)


@pytest.fixture
def vfs(loop_ext4: Backing, request: pytest.FixtureRequest) -> Iterator[GD]:
    yield from _runner(loop_ext4, request, "vfs")


@pytest.fixture
def overlay(loop_ext4: Backing, request: pytest.FixtureRequest) -> Iterator[GD]:
    yield from _runner(loop_ext4, request, "overlay")


def _sql(gd: GD, *statements: str, db: str | None = None) -> None:
    """Edit a store's database behind graphdriver's back, as a damaged disk or a hand would."""
    path = Path(db) if db else gd.root / gd.driver / "metadata.db"
    conn = sqlite3.connect(path)
    try:
        for stmt in statements:
            conn.execute(stmt)
        conn.commit()
    finally:
        conn.close()


def _storage(gd: GD, layer: str) -> Path:
    return gd.root / gd.driver / ("dir" if gd.driver == "vfs" else "") / layer


def _check(gd: GD, *args: str) -> tuple[int, list[str]]:
    res = gd("check", *args, check=False)
    assert "Traceback" not in res.err and "internal error" not in res.err, res.err
    return res.code, res.out.splitlines()


def _assert_clean(gd: GD) -> None:
    code, lines = _check(gd)
    assert (code, lines) == (0, []), lines


def _image(gd: GD) -> None:
    """base <- child <- top, with a file in each."""
    parent = None
    for layer in ("base", "child", "top"):
        gd("create", layer, *(["--parent", parent] if parent else []))
        path = gd("mount", layer).out.strip()
        Path(path, f"{layer}.txt").write_text(layer)
        gd("umount", layer)
        parent = layer


def _one_line_error(res: Result) -> str:
    assert res.code == 1, (res.code, res.out, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphdriver: error: "), res.err
    assert "internal error" not in res.err
    return lines[0]


# ------------------------------------------------------------------------------------ healthy


def test_a_healthy_store_checks_clean(gd: GD) -> None:
    _image(gd)
    gd("container", "create", "web", "--image", "top", "-v", "site:/srv", "-v", "/cache")
    gd("container", "mount", "web")
    _assert_clean(gd)
    gd("container", "umount", "web")
    assert json.loads(gd("--json", "check").out) == []
    code, lines = _check(gd, "--repair")
    assert (code, lines) == (0, [])


# ---------------------------------------------------------------------------- parents


def test_a_parent_cycle_is_an_error_and_reported(vfs: GD) -> None:
    _image(vfs)
    _sql(vfs, "UPDATE layers SET parent='top' WHERE id='base'")
    res = vfs("mount", "top", check=False)  # used to spin forever holding the lock
    assert "form a cycle" in _one_line_error(res) and "check" in res.err
    code, lines = _check(vfs)
    assert code == 1
    assert [ln for ln in lines if ln.startswith("cycle ")] == [
        "cycle base: the parents loop: base -> top -> child -> base (not repairable)"
    ]
    code, _ = _check(vfs, "--repair")
    assert code == 1  # never guessed at


def test_a_dangling_parent_is_reported(vfs: GD) -> None:
    _image(vfs)
    _sql(vfs, "UPDATE layers SET parent='ghost' WHERE id='child'")
    code, lines = _check(vfs)
    assert code == 1
    assert "dangling-parent child: its parent ghost has no record (not repairable)" in lines


# ------------------------------------------------------------------------------ storage


def test_a_record_without_storage_is_reported_not_deleted(gd: GD) -> None:
    _image(gd)
    shutil.rmtree(_storage(gd, "top"))
    code, lines = _check(gd)
    assert code == 1
    assert lines == [
        f"no-storage top: has a record but the {gd.driver} driver has no storage for it (its "
        f"files are gone); drop the record with `graphdriver rm top` (not repairable)"
    ]
    code, lines = _check(gd, "--repair")
    assert code == 1 and gd("exists", "top", check=False).code == 0
    gd("rm", "top")
    _assert_clean(gd)


def test_storage_without_a_record_is_recorded_again_never_deleted(gd: GD) -> None:
    """A lost row (a restored or damaged database) must not cost the user the layer's files:
    --repair records the storage as a layer again, and `rm` is the user's choice."""
    _image(gd)
    if gd.driver == "vfs":
        orphan = _storage(gd, "orphan")
        orphan.mkdir()
        (orphan / "junk").write_text("the user's file")
    else:  # a whole overlay layer whose record is gone
        gd("create", "orphan", "--parent", "top")
        root = gd("mount", "orphan").out.strip()
        Path(root, "junk").write_text("the user's file")
        gd("umount", "orphan")
        _sql(gd, "DELETE FROM layers WHERE id='orphan'")
        orphan = _storage(gd, "orphan")
    code, lines = _check(gd)
    assert code == 1
    assert lines == [
        f"orphan-storage orphan: storage of {gd.driver} layer orphan under "
        f"{gd.root / gd.driver} has no record (--repair fixes this)"
    ]
    code, lines = _check(gd, "--repair")
    assert (code, lines) == (
        0,
        [
            "repaired: recorded the storage of orphan as a layer again (label "
            "graphdriver.check); `graphdriver rm orphan` deletes it"
        ],
    )
    assert orphan.exists()
    _assert_clean(gd)
    path = gd("mount", "orphan").out.strip()
    assert Path(path, "junk").read_text() == "the user's file"
    if gd.driver == "overlay":  # its parent chain came back from the storage
        assert sorted(os.listdir(path)) == ["base.txt", "child.txt", "junk", "top.txt"]
    gd("umount", "orphan")
    gd("rm", "orphan")
    assert not orphan.exists()
    _assert_clean(gd)


def test_storage_other_layers_are_built_on_is_never_removed(overlay: GD) -> None:
    _image(overlay)
    _sql(overlay, "DELETE FROM layers WHERE id='base'")
    code, lines = _check(overlay, "--repair")
    assert code == 1
    assert sorted(lines) == [
        "dangling-parent child: its parent base has no record (not repairable)",
        f"orphan-storage base: storage of overlay layer base under {overlay.root / 'overlay'} "
        f"has no record, but layers are built on it (child) (not repairable)",
    ]
    assert (_storage(overlay, "base") / "diff" / "base.txt").read_text() == "base"


# ------------------------------------------------------------------------------- mounts


def test_a_wrong_mount_count_is_fixed_by_repair(overlay: GD) -> None:
    _image(overlay)
    _sql(overlay, "UPDATE layers SET mount_count=3 WHERE id='child'")
    code, lines = _check(overlay)
    assert (code, lines) == (
        1,
        ["mount-count child: counted as mounted 3 time(s) but not mounted (--repair fixes this)"],
    )
    code, lines = _check(overlay, "--repair")
    assert code == 0 and lines[0].startswith("repaired: set the mount count of child"), lines
    _assert_clean(overlay)
    overlay("mount", "child")
    _assert_clean(overlay)  # a real mount, counted: nothing to say
    overlay("umount", "child")


def test_an_uncounted_mount_is_unmounted_by_repair(overlay: GD) -> None:
    """A kernel mount whose count was lost behind the store's back (no mark says it is being
    made) is not looked for by every open, but ``check`` finds it and ``--repair`` unmounts
    it."""
    _image(overlay)
    path = overlay("mount", "child").out.strip()
    _sql(overlay, "UPDATE layers SET mount_count=0, mount_path=NULL WHERE id='child'")
    overlay("ls")
    assert is_mountpoint(path)
    code, lines = _check(overlay)
    assert (code, lines) == (
        1,
        ["mount-count child: mounted but not counted (left by a process that died) "
         "(--repair fixes this)"],
    )  # fmt: skip
    code, lines = _check(overlay, "--repair")
    assert code == 0, lines
    assert not is_mountpoint(path)
    _assert_clean(overlay)


def test_an_in_flight_record_left_behind_is_rolled_back(vfs: GD) -> None:
    _image(vfs)
    _sql(
        vfs,
        "INSERT INTO layers (id, parent, state, rw, created) "
        "VALUES ('half', 'top', 'creating', 0, 1.0)",
    )
    _storage(vfs, "half").mkdir()
    code, lines = _check(vfs)
    assert code == 1 and lines == [
        "in-flight half: left creating by a process that died (--repair fixes this)"
    ]
    code, lines = _check(vfs, "--repair")
    assert code == 0 and lines == [
        "repaired: rolled back half, left creating by a process that died"
    ]
    assert not _storage(vfs, "half").exists()
    _assert_clean(vfs)


# --------------------------------------------------------------------- containers, volumes


def _container_layer(gd: GD, name: str) -> str:
    layer: str = json.loads(gd("container", "inspect", name).out)[0]["Layer"]
    return layer


def test_a_container_whose_layer_is_gone_is_dropped(gd: GD) -> None:
    _image(gd)
    gd("container", "create", "web", "--image", "top", "-v", "site:/srv")
    layer = _container_layer(gd, "web")
    _sql(gd, f"DELETE FROM layers WHERE id='{layer}'")
    shutil.rmtree(_storage(gd, layer))
    code, lines = _check(gd)
    assert code == 1 and lines == [
        f"container web: its read-write layer {layer} is gone (--repair fixes this)"
    ]
    code, lines = _check(gd, "--repair")
    assert (code, lines) == (
        0,
        [f"repaired: dropped container web: its read-write layer {layer} is gone"],
    )
    assert "web" not in gd("container", "ls").out
    assert json.loads(gd("volume", "inspect", "site").out)[0]["UsedBy"] == []
    _assert_clean(gd)


def test_a_volume_reference_to_a_missing_container_is_dropped(vfs: GD) -> None:
    _image(vfs)
    vfs("container", "create", "web", "--image", "top", "-v", "site:/srv")
    _sql(vfs, "DELETE FROM containers WHERE name='web'")
    code, lines = _check(vfs)
    assert code == 1 and lines == [
        "volume-ref site: is referenced by container web, which does not exist (--repair "
        "fixes this)"
    ]
    code, lines = _check(vfs, "--repair")
    assert (code, lines) == (
        0,
        ["repaired: dropped the reference to volume site from vfs:web, which does not exist"],
    )
    vfs("volume", "rm", "site")  # no longer counted as used
    _assert_clean(vfs)


def test_a_container_using_a_missing_volume_is_reported(vfs: GD) -> None:
    _image(vfs)
    vfs("container", "create", "web", "--image", "top", "-v", "site:/srv")
    vdb = str(vfs.root / "volumes" / ".metadata.db")
    _sql(vfs, "DELETE FROM refs", "DELETE FROM volumes WHERE name='site'", db=vdb)
    code, lines = _check(vfs, "--repair")
    assert code == 1 and lines == [
        "volume web: uses volume site at /srv, which does not exist; recreate it with "
        "`graphdriver volume create site` (not repairable)"
    ]


# ------------------------------------------------------------------------------ database


@pytest.mark.parametrize("damage", ["empty", "garbage"])
def test_a_damaged_database_is_refused_then_rebuilt(gd: GD, damage: str) -> None:
    _image(gd)
    gd("create", "--rw", "--parent", "top", "scratch")
    db = gd.root / gd.driver / "metadata.db"
    for side in ("-wal", "-shm"):
        Path(f"{db}{side}").unlink(missing_ok=True)
    if damage == "empty":
        db.write_bytes(b"")
        said = "is empty (0 bytes)"
    else:
        db.write_bytes(os.urandom(8192))
        said = "it is unreadable"
    for verb in (("ls",), ("create", "new"), ("cleanup",)):
        line = _one_line_error(gd(*verb, check=False))
        assert said in line and f"--driver {gd.driver} check" in line, line
    assert not _storage(gd, "new").exists()
    code, lines = _check(gd)
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith(f"database {db}: the database ")
    assert lines[0].endswith("the driver has storage for 4 layer(s) (--repair fixes this)")
    code, lines = _check(gd, "--repair")
    assert lines[0].startswith(f"repaired: moved the damaged database aside to {db}.corrupt-")
    assert lines[1].startswith("repaired: rebuilt the records of 4 layer(s)")
    assert code == 0, lines
    assert [p.name for p in db.parent.glob("metadata.db.corrupt-*")] != []
    _assert_clean(gd)
    assert sorted(gd("ls").out.split()) == ["base", "child", "scratch", "top"]
    top = json.loads(gd("inspect", "top").out)
    assert "graphdriver.check" in top["labels"]
    # overlay's files say which parent a layer needs; vfs copies need none
    assert top["parent"] == ("child" if gd.driver == "overlay" else None)
    path = gd("mount", "top").out.strip()
    assert sorted(os.listdir(path)) == ["base.txt", "child.txt", "top.txt"]
    gd("umount", "top")
    gd("create", "new", "--parent", "top")  # the store works again


def test_a_lost_database_whose_wal_is_left_is_rebuilt_without_it(vfs: GD) -> None:
    """A process killed before its close leaves a WAL; if the database is then lost, the
    rebuilt one must not read that WAL as its own."""
    _image(vfs)
    db = vfs.root / "vfs" / "metadata.db"
    killed = (
        "import os, sqlite3, sys; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
        "db.execute(\"INSERT OR REPLACE INTO meta VALUES ('stale', 'from the lost WAL')\"); "
        "os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", killed, str(db)], check=True)
    assert Path(f"{db}-wal").stat().st_size > 0
    db.unlink()
    line = _one_line_error(vfs("ls", check=False))
    assert "is missing although this store had one" in line
    code, lines = _check(vfs, "--repair")
    assert code == 0, lines
    aside = str(next(db.parent.glob("metadata.db.corrupt-*-wal")))[: -len("-wal")]
    assert (
        lines[0]
        == f"repaired: moved what the lost database left aside, as {aside}-wal, {aside}-shm"
    )
    assert lines[1].startswith("repaired: rebuilt the records of 3 layer(s)")
    assert sorted(p.name[-4:] for p in db.parent.glob("metadata.db.corrupt-*")) == ["-shm", "-wal"]
    _assert_clean(vfs)
    assert sorted(vfs("ls").out.split()) == ["base", "child", "top"]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key='stale'").fetchone() is None


def test_a_lost_database_is_refused(vfs: GD) -> None:
    _image(vfs)
    db = vfs.root / "vfs" / "metadata.db"
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        path.unlink(missing_ok=True)
    line = _one_line_error(vfs("ls", check=False))
    assert "is missing although this store had one" in line
    code, lines = _check(vfs, "--repair")
    assert code == 0 and lines[0].startswith("repaired: rebuilt the records of 3 layer(s)")
    assert sorted(vfs("ls").out.split()) == ["base", "child", "top"]


def test_a_database_lost_with_its_marker_is_refused_by_the_layers_left(vfs: GD) -> None:
    """A store from before ``metadata.db.present`` existed: the layers on disk tell."""
    _image(vfs)
    home = vfs.root / "vfs"
    for path in home.glob("metadata.db*"):
        path.unlink()
    line = _one_line_error(vfs("ls", check=False))
    assert "is new but" in line and "holds 3 layer(s)" in line and "check" in line
    assert not list(home.glob("metadata.db*")), "a refused open must not leave a new database"
    code, lines = _check(vfs, "--repair")
    assert code == 0, lines
    assert sorted(vfs("ls").out.split()) == ["base", "child", "top"]


def test_a_brand_new_store_is_no_lost_database(vfs: GD) -> None:
    vfs("ls")
    _assert_clean(vfs)


# ------------------------------------------------------------------------------- digests


def test_digests_find_a_layer_changed_after_apply(gd: GD, tmp_path: Path) -> None:
    _image(gd)
    tar = tmp_path / "top.tar"
    gd("diff", "top", "-o", str(tar))
    gd("create", "copy", "--parent", "child")
    gd("apply-diff", "copy", str(tar))
    # a tar graphdriver did not write (GNU tar's) re-diffs to its own bytes: exact diffs
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"foreign")
    foreign = subprocess.run(
        ["tar", "--format=gnu", "-C", str(src), "-cf", "-", "."], capture_output=True, check=True
    ).stdout
    gd("create", "foreign")
    gd("apply-diff", "foreign", input=foreign)
    code, lines = _check(gd, "--digests")
    assert (code, lines) == (0, []), lines
    diff_id = json.loads(gd("inspect", "copy").out)["diff_id"]
    upper = _storage(gd, "copy") / ("diff" if gd.driver == "overlay" else "")
    (upper / "top.txt").write_text("tampered")
    code, lines = _check(gd, "--digests")
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("digest copy: its diff is sha256:")
    assert f"not the recorded diff_id {diff_id}" in lines[0]
    assert lines[0].endswith("(not repairable)")
    _assert_clean(gd)  # without --digests nothing is read


# ---------------------------------------------------------------------- sqlite failures


@contextlib.contextmanager
def _small_tmpfs(size: str) -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="gd-full-"))
    mount("tmpfs", where, "tmpfs", 0, f"size={size},mode=0700")
    try:
        yield where
    finally:
        unmount_all_under(where)
        if os.path.ismount(where):
            unmount(where)
        where.rmdir()


def test_a_full_disk_is_one_clear_error(request: pytest.FixtureRequest) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    with _small_tmpfs("4m") as where:
        gd = GD(where / "root", "vfs")
        _image(gd)
        with open(where / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        for i in range(8):  # until the catalogue itself runs out of room
            res = gd("create", f"more{i}", "--label", "k=" + "x" * 4000, check=False)
            if res.code:
                break
        line = _one_line_error(res)
        assert f"the filesystem holding {where}/root/vfs/metadata.db is full" in line, line
        assert "free space there" in line
        (where / "filler").unlink()
        gd("create", "after")
        _assert_clean(gd)
        assert "after" in gd("ls").out.split()


def test_an_io_error_on_commit_is_one_clear_error(vfs: GD, monkeypatch: pytest.MonkeyPatch) -> None:
    _image(vfs)
    monkeypatch.setenv("GRAPHDRIVER_FAULT", "metadata.commit=EIO")
    line = _one_line_error(vfs("create", "x", check=False))
    assert "I/O error on " in line and "dmesg" in line and "check" in line, line
    monkeypatch.delenv("GRAPHDRIVER_FAULT")
    assert vfs("exists", "x", check=False).code == 1
    _assert_clean(vfs)
