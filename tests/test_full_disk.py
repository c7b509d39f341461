"""A layer that fills the disk: one line of error, the layer emptied again, the store usable.

Each case is a small loop filesystem of its own, with a store whose image layer is applied
and diffed first; then a layer bigger than the filesystem is applied from a pipe. On btrfs
this used to kill the command with SIGBUS (SQLite's shared-memory file, rewritten through a
memory map, needs free blocks on a copy-on-write filesystem), and every later command too,
``ls`` included, until space was freed by hand; and the rollback's lock note raised ENOSPC.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GD, Result

from graphdriver.testing import Backing, backing_or_skip, fill_filesystem
from graphdriver.toolkit import is_mountpoint

MiB = 1 << 20
#: the filesystem: big enough for every mkfs here (xfs wants 300 MiB), small enough to fill
FS_SIZE = 320 * MiB
#: the layer that does not fit: FILES files of one random MiB-block pattern each
FILES, FILE_SIZE = 48, 8 * MiB

CASES = [("btrfs", "btrfs"), ("btrfs", "vfs"), ("xfs", "overlay"), ("ext4", "vfs")]


@pytest.fixture(params=CASES, ids=[f"{d}-on-{fs}" for fs, d in CASES])
def small_fs(request: pytest.FixtureRequest) -> Iterator[tuple[Backing, str]]:
    fstype, driver = request.param
    for backing in backing_or_skip(f"loop-{fstype}", size=FS_SIZE):
        gd = GD(backing.root / "root", driver)
        try:
            yield backing, driver
        finally:
            subprocess.run(gd.argv("cleanup"), capture_output=True, timeout=120)


def _base_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("etc/hostname", b"base\n"), ("bin/tool", os.urandom(100_000))):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _apply_too_big(gd: GD, layer: str) -> Result:
    """apply-diff of a layer bigger than the filesystem, fed through a pipe as it is made."""
    block = os.urandom(MiB)
    proc = subprocess.Popen(
        gd.argv("apply-diff", layer, "-"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    try:
        with tarfile.open(fileobj=proc.stdin, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            for i in range(FILES):
                info = tarfile.TarInfo(f"big/{i:03d}.bin")
                info.size = FILE_SIZE
                tf.addfile(info, io.BytesIO(block[i:] + block[:i] + block * 7))
    except BrokenPipeError:  # it gave up once the disk was full
        pass
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()  # (a few lines: no pipe fills up)
    proc.wait(timeout=300)
    return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"), out)


def test_a_layer_that_fills_the_disk_is_rolled_back(small_fs: tuple[Backing, str]) -> None:
    backing, driver = small_fs
    gd = GD(backing.root / "root", driver)
    base = _base_tar()
    gd("create", "base")
    gd("apply-diff", "base", "-", input=base)
    gd("create", "big", "--parent", "base")

    res = _apply_too_big(gd, "big")
    assert res.code != -signal.SIGBUS, f"killed by SIGBUS: {res.err}"
    lines = res.err.strip().splitlines()
    assert res.code == 1 and len(lines) == 1, (res.code, res.err)
    assert lines[0].startswith("graphdriver: error: ") and "No space left" in lines[0], lines

    # the store is whole and usable: every command works, the layer is empty and ready again
    assert sorted(gd("ls").out.split()) == ["base", "big"]
    big = json.loads(gd("inspect", "big").out)
    assert big["diff_id"] is None and big["unpacked_size"] is None, big
    check = gd("check", check=False)
    assert (check.code, check.out, check.err) == (0, "", ""), check
    assert gd("diff", "base").raw == base  # nothing of the image layer was lost
    gd("rm", "big")
    gd("create", "again", "--parent", "base")
    gd("apply-diff", "again", "-", input=base)
    assert sorted(gd("ls").out.split()) == ["again", "base"]


#: a process that keeps the store open while the disk fills, then writes to the store
FILL_THEN_WRITE = """
import os, sys
from graphdriver import open_store
from graphdriver.errors import StoreError
store = open_store(sys.argv[1], sys.argv[2])
store.create("before")
with open(sys.argv[3], "wb") as f:
    try:
        while True:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        pass
os.sync()  # the database's pages are written back: the next write to one faults again
try:
    store.create("after")
    print("created")
except StoreError as exc:
    print("error:", exc)
store.close()
print("closed")
"""


@pytest.fixture
def small_btrfs() -> Iterator[Backing]:
    yield from backing_or_skip("loop-btrfs", size=FS_SIZE)


def _kernel() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@pytest.mark.parametrize("driver", ["btrfs", "vfs"])
def test_a_store_open_while_btrfs_fills_up_survives(small_btrfs: Backing, driver: str) -> None:
    if _kernel() < (6, 17):
        pytest.skip(
            f"kernel {os.uname().release}: btrfs lets a memory-mapped write into a "
            f"no-copy-on-write file go without free space from 6.17 on (sqlite.nocow_on_btrfs)"
        )
    gd = GD(small_btrfs.root / "root", driver)
    filler = small_btrfs.root / "filler"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", FILL_THEN_WRITE, str(gd.root), driver, str(filler)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
        assert proc.stdout.splitlines()[-1] == "closed", proc.stdout
        if "error:" in proc.stdout:
            assert "is full" in proc.stdout, proc.stdout
        assert "before" in gd("ls").out.split()  # readable while the disk is still full
        for args in (["check"], ["check", "--repair"]):  # a full disk is not damage
            check = gd(*args, check=False)
            assert (check.code, check.out) == (0, ""), (args, check)
        home = sorted(p.name for p in (gd.root / driver).iterdir())
        assert not [n for n in home if n.startswith(("metadata.db.corrupt", "metadata.db.re"))]
    finally:
        filler.unlink(missing_ok=True)
        subprocess.run(gd.argv("cleanup"), capture_output=True, timeout=120)
    gd("create", "later")
    check = gd("check", check=False)
    assert (check.code, check.out, check.err) == (0, "", ""), check


def test_a_rollback_that_fails_too_is_left_to_the_next_command(
    gd: GD, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The extraction's error is the one told, the rollback's failure a warning; the layer
    stays ``applying`` until the next command's recovery empties it."""
    base = _base_tar()
    gd("create", "x")
    monkeypatch.setenv("GRAPHDRIVER_FAULT", "store.apply.extracted=EIO,store.apply.rollback=ENOSPC")
    res = gd("apply-diff", "x", "-", input=base, check=False)
    assert res.code == 1, res
    warning, error = res.err.strip().splitlines()
    assert warning.startswith("graphdriver: WARNING: layer x: the rollback failed"), warning
    assert "the next command finishes it" in warning, warning
    assert error.startswith("graphdriver: error: ") and "injected at store.apply.extracted" in error
    monkeypatch.delenv("GRAPHDRIVER_FAULT")
    listed = gd("ls")
    assert "layer x was left applying" in listed.err and listed.out.split() == ["x"], listed
    assert json.loads(gd("inspect", "x").out)["diff_id"] is None
    gd("apply-diff", "x", "-", input=base)  # empty again: it takes the layer
    assert gd("diff", "x").raw == base


#: (filesystem, what is used up, whether a new file can be made): ext4 makes its inodes in
#: advance, so with its blocks gone SQLite makes ``-wal`` and the database is opened held
#: alone; with no inode (XFS with no block has none either) there is no ``-wal``, and it is
#: read as a file no one changes (``immutable``)
FULL = [("xfs", "blocks", False), ("ext4", "blocks", True), ("ext4", "inodes", False)]


@pytest.mark.parametrize(
    ("fstype", "used_up", "new_file"), FULL, ids=[f"{f}-{u}" for f, u, _ in FULL]
)
def test_a_full_disk_is_never_taken_for_a_damaged_database(
    fstype: str, used_up: str, new_file: bool
) -> None:
    """A store whose filesystem filled up: commands that read go on (``ls``, ``inspect``,
    ``check``, which never calls the database damaged, and ``--repair``, which never moves it
    aside), one that writes says in one line that it is full; once space is freed, all is as
    it was."""
    for backing in backing_or_skip(f"loop-{fstype}", size=FS_SIZE):
        gd = GD(backing.root / "root", "overlay")
        filler = backing.root / "filler"
        try:
            gd("create", "base")
            gd("apply-diff", "base", "-", input=_base_tar())
            fill_filesystem(filler, blocks=used_up == "blocks")
            for args in (["ls"], ["check"], ["check", "--repair"]):
                res = gd(*args, check=False)  # ls lists the layer; check finds nothing wrong
                if args[-1] == "--repair" and not new_file:  # a repair, which may write
                    assert "is full" in _one_line_error(res), res
                    continue
                listed = ["base"] if args == ["ls"] else []
                assert (res.code, res.out.split(), res.err) == (0, listed, ""), (args, res)
            assert json.loads(gd("inspect", "base").out)["id"] == "base"
            for args in (["create", "other"], ["create", "--rw", "--parent", "base", "rw"]):
                assert "is full" in _one_line_error(gd(*args, check=False)), args
            assert "is full" in _one_line_error(gd("mount", "base", check=False))  # a count
            if not new_file:  # read without its locks: what it finds wrong proves no damage
                db_file = gd.root / "overlay" / "metadata.db"
                with open(db_file, "r+b") as f:  # (in place: no block needed)
                    page = os.pread(f.fileno(), 4096, 4096)
                    os.pwrite(f.fileno(), b"\xff" * 4096, 4096)
                    try:
                        for args in (["check"], ["check", "--repair"], ["ls"]):
                            line = _one_line_error(gd(*args, check=False))
                            assert "is full (" in line, line  # (--repair: it writes)
                            assert ("read without its locks" in line) != ("--repair" in args)
                    finally:
                        os.pwrite(f.fileno(), page, 4096)
            if new_file:  # a command that holds the database alone keeps others out, briefly
                holder = subprocess.Popen(gd.argv("diff", "base"), stdout=subprocess.PIPE)
                assert holder.stdout is not None
                try:
                    assert holder.stdout.read(1)  # it has the database open, and waits on us
                    line = _one_line_error(gd("ls", check=False))  # (after SQLite's 60 s)
                    assert "stayed locked" in line and "is full, and a command reading" in line
                finally:
                    holder.stdout.read()
                    holder.wait(timeout=60)
            home = sorted(p.name for p in (gd.root / "overlay").iterdir())
            assert [n for n in home if n.startswith("metadata.db.")] == ["metadata.db.present"]
        finally:
            shutil.rmtree(filler, ignore_errors=True)
            subprocess.run(gd.argv("cleanup"), capture_output=True, timeout=120)
        assert gd("ls").out.split() == ["base"]
        check = gd("check", check=False)
        assert (check.code, check.out, check.err) == (0, "", ""), check


def test_a_read_on_a_disk_with_no_room_for_wal_recovers_nothing() -> None:
    """A database read as no one changes it (no room for ``-wal``) may be stale, were space
    freed and the store changed meanwhile: a command that reads it never acts on what it
    finds (a layer left half-made by a killed process stays as it is, its storage kept);
    the first command with room recovers it."""
    for backing in backing_or_skip("loop-xfs", size=FS_SIZE):
        gd = GD(backing.root / "root", "overlay")
        filler = backing.root / "filler"
        try:
            gd("create", "base")
            killed = _with_fault(gd, "store.create.after-driver", "create", "half")
            assert killed.code == -signal.SIGKILL, killed
            assert (gd.root / "overlay" / "half").is_dir()
            db_file = gd.root / "overlay" / "metadata.db"
            with contextlib.closing(sqlite3.connect(db_file)) as db:  # its -wal, not a killed
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # process's (held alone, safe)
            assert not Path(f"{db_file}-wal").exists()
            fill_filesystem(filler)
            for args in (["ls"], ["status"], ["container", "ls"], ["check"]):
                res = gd(*args, check=False)
                assert res.code in (0, 1) and "Traceback" not in res.err, (args, res)
                assert "is full" not in res.err, (args, res)
            status = gd("status").out  # (no recovery was tried: it says so)
            assert "half: left creating; not tried yet: no room on the disk" in status, status
            assert (gd.root / "overlay" / "half").is_dir()  # left for a command with room
            # (--digests mounts layers, and unmounts what no record counts: no read verb)
            assert "is full" in _one_line_error(gd("check", "--digests", check=False))
        finally:
            shutil.rmtree(filler, ignore_errors=True)
        assert gd("ls").out.split() == ["base"]  # room: recovered
        assert not (gd.root / "overlay" / "half").exists()
        check = gd("check", check=False)
        assert (check.code, check.out, check.err) == (0, "", ""), check


def _with_fault(gd: GD, point: str, *args: str) -> Result:
    os.environ["GRAPHDRIVER_FAULT"] = point
    try:
        return gd(*args, check=False)
    finally:
        del os.environ["GRAPHDRIVER_FAULT"]


def test_damage_on_a_nearly_full_disk_is_damage() -> None:
    """Blocks only root may still use (ext4's reserve) are room: a damaged database there is
    reported as damaged, not as a full disk."""
    for backing in backing_or_skip("loop-ext4", size=FS_SIZE):
        gd = GD(backing.root / "root", "vfs")
        gd("create", "base")
        os.chmod(backing.root.parent, 0o711)  # (a temporary directory of this test's)
        spare = backing.root / "users"
        spare.mkdir()
        spare.chmod(0o777)
        # as nobody: the blocks kept for root stay free (dd stops at ENOSPC)
        subprocess.run(["dd", "if=/dev/zero", f"of={spare / 'filler'}", "bs=1M"],
                       user=65534, capture_output=True)  # fmt: skip
        st = os.statvfs(backing.root)
        assert st.f_bavail * st.f_frsize < MiB  # full, to anyone but root
        with contextlib.closing(sqlite3.connect(gd.root / "vfs" / "metadata.db")) as db:
            db.execute("ALTER TABLE layers RENAME TO gone")
            db.commit()
        check = gd("check", check=False)
        assert check.code == 1 and "--repair fixes this" in check.out, check
        assert "is full" not in check.out + check.err, check


def _one_line_error(res: Result) -> str:
    lines = res.err.strip().splitlines()
    assert res.code == 1 and len(lines) == 1, (res.code, res.err)
    assert lines[0].startswith("graphdriver: error: "), lines
    return lines[0]


def test_an_unmount_on_a_full_disk_leaves_the_store_readable() -> None:
    """The last umount of a container layer on a full disk with no reserve left (given back
    before, and the disk filled again) unmounts it but cannot record the count, and says so
    in one line; reads go on while the disk is full (the next opens find the count without
    its mount and cannot reset it yet), and once there is room the count is reset and the
    layer mounts and unmounts as before."""
    for backing in backing_or_skip("loop-ext4", size=FS_SIZE):
        gd = GD(backing.root / "root", "overlay")
        filler = backing.root / "filler"
        try:
            gd("create", "base")
            gd("apply-diff", "base", "-", input=_base_tar())
            gd("create", "--rw", "--parent", "base", "ctr")
            merged = gd("mount", "ctr").out.strip()
            shutil.rmtree(gd.root / ".reserve")
            fill_filesystem(filler)
            line = _one_line_error(gd("umount", "ctr", check=False))
            assert "'ctr' is unmounted, but its count is not" in line and "is full" in line
            assert not is_mountpoint(merged)
            listed = gd("ls")
            assert listed.out.split() == ["base", "ctr"], listed
            assert "counted as mounted 1 times but is not mounted" in listed.err, listed
            assert json.loads(gd("inspect", "ctr").out)["mount_count"] == 1
        finally:
            shutil.rmtree(filler, ignore_errors=True)
        try:
            assert json.loads(gd("inspect", "ctr").out)["mount_count"] == 0
            assert is_mountpoint(gd("mount", "ctr").out.strip())
            gd("umount", "ctr")
            assert not is_mountpoint(merged)
            check = gd("check", check=False)
            assert (check.code, check.out, check.err) == (0, "", ""), check
        finally:
            subprocess.run(gd.argv("cleanup"), capture_output=True, timeout=120)


#: (filesystem, driver, blocks filled too) of a container that fills the disk: blocks then
#: inodes, or (ext4, whose inodes are made in advance) inodes alone, with blocks free
FILLED = [("xfs", "overlay", True), ("ext4", "vfs", True), ("btrfs", "btrfs", True)]
FILLED += [("ext4", "overlay", False)]
#: and (ext4, vfs) with ``--root`` a symlink to the filesystem's directory
CASES_FILLED = [(*case, False) for case in FILLED] + [("ext4", "vfs", True, True)]


@pytest.mark.parametrize(
    ("fstype", "driver", "blocks", "linked"),
    CASES_FILLED,
    ids=[
        f"{d}-on-{f}" + ("" if b else "-inodes") + ("-linked-root" if ln else "")
        for f, d, b, ln in CASES_FILLED
    ],
)
def test_a_disk_a_container_filled_is_freed_by_removing_it(
    fstype: str, driver: str, blocks: bool, linked: bool, tmp_path: Path
) -> None:
    """A container writes until its filesystem, the store's too, is full. Its work can be
    saved first (``changes``, ``diff-size``, ``diff`` to another disk) without taking the
    reserve: a read needs no room (on XFS they were the "full" line, no inode for SQLite's
    ``-wal`` or the layer's lock file). Its
    ``umount`` and ``rm`` give back the reserve and work, with one warning saying so; nothing
    else was lost, and the next command with room makes the reserve again. Without the
    reserve both were the one-line "full" error (XFS: no inode for SQLite's ``-wal``; ext4
    and btrfs: no block for the write; ext4 out of inodes: no file at all), and the user had
    to delete the container's files by hand."""
    for backing in backing_or_skip(f"loop-{fstype}", size=FS_SIZE):
        gd = GD(backing.root / "root", driver)
        if linked:  # (the reserve was not given back through a symlink: ENOTDIR)
            (backing.root / "real").mkdir()
            (backing.root / "root").symlink_to("real")
        reserve = gd.root / ".reserve"
        try:
            base = _base_tar()
            gd("create", "base")
            gd("apply-diff", "base", "-", input=base)
            gd("create", "--rw", "--parent", "base", "ctr")
            size = (reserve / "space").stat().st_blocks * 512
            assert 0 < size <= FS_SIZE // 100, size
            assert len(os.listdir(reserve)) == 17
            merged = Path(gd("mount", "ctr").out.strip())
            fill_filesystem(merged / "filler", blocks=blocks)
            assert "is full" in _one_line_error(
                gd("create", "--parent", "base", "more", check=False)
            )
            _save_the_work(gd, tmp_path / "ctr.tar", merged)
            assert len(os.listdir(reserve)) == 17  # (nothing given back)
            umount = gd("umount", "ctr", check=False)
            assert (umount.code, umount.out) == (0, ""), umount
            assert umount.err.splitlines() == [
                f"graphdriver: WARNING: the filesystem of {gd.root} is full: its reserve "
                f"({size >> 10} KiB, 16 inodes) was given back so that this command's records "
                f"can be written; it is made again once there is room"
            ], umount
            assert not reserve.exists() and not is_mountpoint(merged)
            removed = gd("rm", "ctr", check=False)
            assert (removed.code, removed.out, removed.err) == (0, "ctr\n", ""), removed
        finally:
            subprocess.run(gd.argv("cleanup"), capture_output=True, timeout=120)
        listed = gd("ls")
        assert (listed.out.split(), listed.err) == (["base"], ""), listed
        assert (reserve / "space").stat().st_blocks * 512 == size
        assert gd("diff", "base").raw == base
        check = gd("check", check=False)
        assert (check.code, check.out, check.err) == (0, "", ""), check


def _save_the_work(gd: GD, out: Path, merged: Path) -> None:
    """What a user does before removing the container that filled the disk: look at what it
    changed, and save that to another disk; all of it is there."""
    files = sorted(p.relative_to(merged).as_posix() for p in (merged / "filler").iterdir())
    changed = gd("changes", "ctr")
    assert changed.err == ""
    assert changed.out.splitlines() == ["A /filler", *(f"A /{f}" for f in files)]
    size = gd("diff-size", "ctr")
    assert (size.err, int(size.out)) == ("", sum((merged / f).stat().st_size for f in files))
    saved = gd("diff", "ctr", "-o", str(out))
    assert (saved.out, saved.err) == ("", ""), saved
    with tarfile.open(out) as tar:
        assert sorted(m.name for m in tar if m.isfile()) == files


#: an engine's server: one store held open while its container fills the disk, then removed
HELD_THEN_REMOVED = """
import contextlib, os, sys
from pathlib import Path
from graphdriver import open_store
store = open_store(sys.argv[1], sys.argv[2])
store.create("base")
store.create("ctr", "base", rw=True)
where = Path(store.get("ctr"), "filler")
where.mkdir()
with contextlib.suppress(OSError), open(where / "blocks", "wb") as f:
    while True:
        f.write(bytes(1 << 20))
        f.flush()
with contextlib.suppress(OSError):
    for i in range(1_000_000):
        (where / str(i)).touch()
store.put("ctr")
store.remove("ctr")
print(store.layers())
store.close()
"""


HELD = [(fstype, driver) for fstype, driver, blocks in FILLED if blocks]


@pytest.mark.parametrize(("fstype", "driver"), HELD, ids=[f"{d}-on-{f}" for f, d in HELD])
def test_an_engine_holding_the_store_frees_a_full_disk_too(fstype: str, driver: str) -> None:
    """The library gives the reserve back too (``put``, ``remove``, a container's unmount, a
    volume's removal): an engine's server holds its database open for its life, and its
    removal of the container that filled the disk (kubelet's garbage collection under disk
    pressure, through containerd) was the "full" error."""
    for backing in backing_or_skip(f"loop-{fstype}", size=FS_SIZE):
        gd = GD(backing.root / "root", driver)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", HELD_THEN_REMOVED, str(gd.root), driver],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert (proc.returncode, proc.stdout) == (0, "['base']\n"), proc
            assert "its reserve" in proc.stderr and "was given back" in proc.stderr, proc
        finally:
            subprocess.run(gd.argv("cleanup"), capture_output=True, timeout=120)
        check = gd("check", check=False)
        assert (check.code, check.out, check.err) == (0, "", ""), check
        assert (gd.root / ".reserve" / "space").is_file()


def test_a_home_on_its_own_filesystem_has_its_own_reserve() -> None:
    """A driver's home mounted apart from the root (an XFS with project quota for overlay's
    ``--size``, say): the container fills the home's filesystem while the root's has room,
    so the root's reserve would free nothing there. The home keeps one of its own, and the
    container's ``umount`` and ``rm`` give that one back."""
    for roots in backing_or_skip("loop-ext4", size=FS_SIZE):
        for homes in backing_or_skip("loop-xfs", size=FS_SIZE):
            gd = GD(roots.root / "root", "vfs")
            home = gd.root / "vfs"
            home.mkdir(parents=True)
            subprocess.run(["mount", "--bind", str(homes.root), str(home)], check=True)
            try:
                gd("create", "base")
                gd("create", "--rw", "--parent", "base", "ctr")
                assert (gd.root / ".reserve" / "space").is_file()
                assert (home / ".reserve" / "space").is_file()
                assert gd("ls").out.split() == ["base", "ctr"]  # (not a layer: a dot first)
                merged = Path(gd("mount", "ctr").out.strip())
                fill_filesystem(merged / "filler")
                umount = gd("umount", "ctr", check=False)
                assert umount.code == 0, umount
                assert f"the filesystem of {home} is full" in umount.err, umount
                assert (gd.root / ".reserve").is_dir() and not (home / ".reserve").exists()
                gd("rm", "ctr")
                assert gd("ls").out.split() == ["base"]
                assert (home / ".reserve" / "space").is_file()  # made again: there is room
            finally:
                subprocess.run(gd.argv("cleanup"), capture_output=True, timeout=120)
                subprocess.run(["umount", str(home)], check=True)


def test_btrfs_out_of_metadata_with_data_free_gives_its_reserve_back() -> None:
    """btrfs's free space is data: with its data block groups half empty and its metadata
    full, statvfs shows room and an unnamed file fits, but no named one (SQLite's
    ``-shm``). The removal tries a named file and gives the reserve (its metadata, as xattrs)
    back; the line was "cannot write ...: mounted read-only, or are you not root?"."""
    for backing in backing_or_skip("loop-btrfs", size=FS_SIZE):
        gd = GD(backing.root / "root", "btrfs")
        try:
            gd("create", "base")
            gd("create", "--rw", "--parent", "base", "ctr")
            merged = Path(gd("mount", "ctr").out.strip())
            data = merged / "data"
            data.mkdir()
            with contextlib.suppress(OSError):
                for i in range(10_000):
                    (data / str(i)).write_bytes(bytes(MiB))
            for i in range(0, 10_000, 2):
                (data / str(i)).unlink(missing_ok=True)
            subprocess.run(["sync"], check=True)
            fill_filesystem(merged / "filler", blocks=False)
            st = os.statvfs(gd.root)
            assert st.f_bavail * st.f_frsize > 32 * MiB  # data room, metadata none
            umount = gd("umount", "ctr", check=False)
            assert umount.code == 0 and "its reserve" in umount.err, umount
            removed = gd("rm", "ctr", check=False)
            assert (removed.code, removed.out) == (0, "ctr\n"), removed
        finally:
            subprocess.run(gd.argv("cleanup"), capture_output=True, timeout=120)
        assert gd("ls").out.split() == ["base"]


def test_reads_after_a_reboot_on_a_full_disk_trust_the_earlier_probe() -> None:
    """overlay probes its filesystem once per boot, by making files and mounting a test
    overlay. After a reboot on a full disk it could not, and every command failed, ``ls``
    included. Now the probe of an earlier boot of the same kernel on the same filesystem
    holds, with one warning; another kernel's is no proof and the line is the "full" one. A
    command that frees space gives the reserve back first, and with that room the probe runs
    again."""
    for backing in backing_or_skip("loop-xfs", size=FS_SIZE):
        gd = GD(backing.root / "root", "overlay")
        marker = gd.root / "overlay" / "probed"
        try:
            gd("create", "base")
            gd("apply-diff", "base", "-", input=_base_tar())
            gd("create", "--rw", "--parent", "base", "ctr")
            fill_filesystem(Path(gd("mount", "ctr").out.strip()) / "filler")
            stamp = marker.read_text()
            boot, kernel, dev = stamp.split(" ")
            marker.write_text(f"{boot[::-1]} {kernel} {dev}")  # in place: the same length
            listed = gd("ls", check=False)
            assert (listed.code, listed.out.split()) == (0, ["base", "ctr"]), listed
            assert listed.err.splitlines() == [
                f"graphdriver: WARNING: no room under {gd.root / 'overlay'} for overlay's test "
                "mount after a reboot: the one of an earlier boot of this kernel on this "
                "filesystem holds until there is room"
            ], listed
            assert json.loads(gd("inspect", "base").out)["diff_id"] is not None
            marker.write_text(f"{boot[::-1]} {kernel[::-1]} {dev}")
            assert "is full" in _one_line_error(gd("ls", check=False))
            marker.write_text(f"{boot[::-1]} {kernel} {dev}")
            gd("umount", "ctr")
            assert marker.read_text() == stamp  # probed again, in the reserve's room
            gd("rm", "ctr")
        finally:
            subprocess.run(gd.argv("cleanup"), capture_output=True, timeout=120)
        assert gd("ls").out.split() == ["base"]
