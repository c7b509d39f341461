"""The archive engine's loops in C (``graphdriver.archive._fastpath``): the apply sandbox's
runs of plain files and an exact diff's runs of raw parts and bodies. Built where the package
is installed with a C compiler, and held to the same layers, records and tars as the Python
paths, which run where it was not built (``fastpath.ENABLED`` False)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import stat
import struct
import subprocess
import sys
import tarfile
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest
from test_apply import _acl, replayed

from graphdriver.archive import ApplyResult, apply_layer, exact, fastpath, feed, tarsplit
from graphdriver.archive.tar_writer import TarWriter
from graphdriver.errors import ArchiveError
from graphdriver.testing import host_lacks


def _needs_the_c_loops() -> None:
    if not fastpath.ENABLED:
        host_lacks("the C fast path was not built (gcc, python3-dev at install)", "fastpath")


def test_the_c_loops_were_built() -> None:
    """scripts/setup installs gcc and python3-dev, with which the build hook compiles them."""
    _needs_the_c_loops()


def _file(
    name: str, body: bytes, mode: int = 0o644, **attrs: object
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime = tarfile.REGTYPE, mode, len(body), 1_700_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, body


def _dir(name: str, mode: int = 0o755, **attrs: object) -> tuple[tarfile.TarInfo, bytes]:
    info, _ = _file(name, b"", mode, **attrs)
    info.type = tarfile.DIRTYPE
    return info, b""


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _layer() -> bytes:
    """Plain files between every kind of entry the C loop leaves to Python: each of the
    checks of Extractor.plain_file, a body past the reader's buffer. (A name made twice
    keeps no record; test_apply.py has it.)"""
    rng = random.Random(7)
    owned = os.geteuid() == 0
    # g: setgid, with another group than its files'; acl: a parent layer's directory with a
    # default ACL (made by _apply); the kernel gives files made in either what the tar does not
    members = [_dir("d"), _dir("d/sub"), _dir("g", 0o2755, gid=50), _dir(".hidden")]
    for i in range(600):
        body = rng.randbytes(rng.randrange(0, 5000))
        members.append(_file(f"d/f{i}" if i % 3 else f"d/sub/f{i}", body, 0o600 + i % 64))
        if i % 97 == 5:  # a run of plain files broken by one entry the C loop leaves
            odd = [
                _file(f"d/setuid{i}", b"s", 0o4755),
                _file(f"d/owned{i}", b"o", uid=1000 if owned else 0, gid=5),
                _file(f"d/xattr{i}", b"x", pax_headers={"SCHILY.xattr.user.k": "v"}),
                _file(f"./d/dotted{i}", b"dot"),
                _file(f"d/.dotfile{i}", b"."),
                _file(f"g/sgid{i}", b"in a setgid directory"),
                _file(f"acl/f{i}", b"under a default ACL", 0o644),
                _file(f".hidden/f{i}", b"h"),
                _file(f"new{i}/deep/f", b"in directories the tar does not name"),
                _file(f"d/b\udcff{i}", b"a name that is not UTF-8"),
                _file(f"d/atime{i}", b"a", pax_headers={"atime": "1600000000.5"}),
                _file(f"d/old{i}", b"before 1970", mtime=-86_400),
                _file(f"d/huge{i}", rng.randbytes((3 << 20) + 11)) if i == 5 else _dir("d/e"),
            ]
            members += odd
    return _tar(members)


def _tree(root: Path) -> dict[str, tuple[object, ...]]:
    """What the layer holds, but the times of the directories the tar does not name."""
    got: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            body = b""
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    body = hashlib.sha256(f.read()).digest()
            xattrs = {k: os.getxattr(path, k, follow_symlinks=False) for k in os.listxattr(path)}
            rel = os.fsdecode(os.path.relpath(path, os.fsencode(root)))
            got[rel] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns
                if stat.S_ISREG(st.st_mode) or not rel.startswith(("new", "acl"))
                else None,
                st.st_atime_ns if stat.S_ISREG(st.st_mode) else None,
                body,
                xattrs,
            )
    return got


def _apply(target: Path, data: bytes, how: str, scratch: Path, acl: bool = True) -> ApplyResult:
    """Apply *data* (from a file, a pipe or gzip) to the new directory *target*, in which,
    with *acl*, a parent layer left a directory ``acl`` with a default ACL."""
    target.mkdir()
    if acl:
        (target / "acl").mkdir()
        os.setxattr(target / "acl", "system.posix_acl_default", _acl(7, 0, 0))
    if how == "file":
        scratch.write_bytes(data)
        with open(scratch, "rb") as f:
            return apply_layer(target, f, record=True)
    if how == "pipe":
        scratch.write_bytes(data)
        with subprocess.Popen(["cat", str(scratch)], stdout=PIPE) as cat:
            assert cat.stdout is not None
            return apply_layer(target, cat.stdout, record=True)
    return apply_layer(target, io.BytesIO(gzip.compress(data, 1)), record=True)


@pytest.mark.parametrize("writers", [1, 2, 3])
@pytest.mark.parametrize("how", ["file", "pipe", "gzip"])
def test_c_and_python_make_the_same_layer_and_record(
    tmp_path: Path, how: str, writers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a tar file (the sandbox reads the data at each offset) and from a pipe or a
    gzip stream (the data follows each frame), the C loop's runs written by one thread or
    several: the same files, owners, modes, times, bodies and xattrs either way, and a
    record whose replay is the tar byte for byte."""
    _needs_the_c_loops()
    monkeypatch.setattr(feed, "writers", lambda: writers)
    data = _layer()
    trees, sizes = [], []
    for fast in (True, False):
        monkeypatch.setattr(fastpath, "ENABLED", fast)  # the forked sandbox reads it
        target = tmp_path / f"layer-{fast}"
        result = _apply(target, data, how, tmp_path / "layer.tar")
        trees.append(_tree(target))  # first: reading the bodies moves their atimes
        assert replayed(result, target, tmp_path / "replayed.tar") == data, fast
        for replay_fast in (True, False):  # the replay's own C loop, and Python's
            monkeypatch.setattr(fastpath, "ENABLED", replay_fast)
            got = replayed(result, target, tmp_path / "replayed.tar", check=False)
            assert got == data, (fast, replay_fast)
        sizes.append(result.size)
    assert trees[0] == trees[1]
    assert sizes[0] == sizes[1]
    assert trees[0]["d/b\udcff5"][6] == hashlib.sha256(b"a name that is not UTF-8").digest()


def test_the_c_loop_writes_the_files_and_leaves_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Called as the sandbox calls it: writes each plain file of the run with its mode,
    times and body and the record's row of it, and stops, having done nothing for it, at
    the first entry the general path must take."""
    _needs_the_c_loops()
    from graphdriver.archive._fastpath import write_plain_files

    monkeypatch.chdir(tmp_path)
    os.mkdir("d")
    body = b"0123456789abcdef"
    view = memoryview(bytearray(body))

    def fields(
        name: str, size: int, mode: int = 0o640, xattrs: object = None
    ) -> tuple[object, ...]:
        return (
            name,
            b"0",
            mode,
            0,
            0,
            size,
            1_600_000_000_123_456_789,
            None,
            "",
            "",
            0,
            xattrs,
            None,
        )

    batch = [
        (fields("d/a", 4), 4, 0),
        (fields("./d/b", 6, 0o600), 6, 4),
        (fields("d/c", 2, xattrs={"user.k": b"v"}), 2, 10),
        (fields("d/d", 2), 2, 12),
    ]
    touched: set[str] = {""}
    bodies: set[str] = set()
    written: dict[str, bytes] = {}
    created: set[str] = set()
    record = (touched, bodies, written)
    dirs = ({"", "d"}, set(), set())
    i, pos, size = write_plain_files(
        batch, 0, view, 0, len(body), 0, False, dirs, created, record, True
    )
    assert (i, pos, size) == (2, 10, 10)
    for name, mode, content in (("d/a", 0o640, b"0123"), ("d/b", 0o600, b"456789")):
        st = os.lstat(name)
        assert stat.S_IMODE(st.st_mode) == mode
        assert st.st_mtime_ns == st.st_atime_ns == 1_600_000_000_123_456_789
        assert written[name] == tarsplit._row(st)
        assert Path(name).read_bytes() == content
    assert not Path("d/c").exists()
    assert touched == {"", "d", "d/a", "d/b"} and bodies == {"d/a", "d/b"} == created
    # a name taken is left (the general path removes what is in the way); so is a
    # directory the extractor has not checked, and data not all in the buffer
    assert write_plain_files(batch, 0, view, 0, 16, 0, False, dirs, created, record, True)[0] == 0
    assert (
        write_plain_files(batch, 3, view, 0, 16, 0, False, ({""}, set(), set()), None, None, True)[
            0
        ]
        == 3
    )
    assert write_plain_files(batch, 3, view, 0, 13, 0, False, dirs, None, None, True)[0] == 3
    assert write_plain_files(batch, 3, view, 0, 16, 0, False, dirs, None, None, True) == (4, 14, 2)
    # a call that is not the sandbox's is an error, before anything is written
    with pytest.raises(ValueError, match="bad index"):
        write_plain_files(batch, -1, view, 0, 16, 0, False, dirs, None, None, True)
    with pytest.raises(TypeError, match="wrong types"):
        write_plain_files(batch, 0, view, 0, 16, 0, False, dirs, [], None, True)
    with pytest.raises(TypeError, match="wrong types"):
        write_plain_files(batch, 0, view, 0, 16, 0, False, dirs, None, ([], [], {}), True)
    os.unlink("d/d")
    far = [(fields("d/d", 2), 2, 2**63 - 1)]  # an offset no buffer holds: left
    assert write_plain_files(far, 0, view, 0, 16, -5, False, dirs, None, None, True)[0] == 0


def _run_of(n: int, names: dict[int, str] | None = None) -> tuple[list[Any], memoryview]:
    """A batch of *n* plain files d/fNN as the sandbox gets it (the data at offsets of a
    tar file, in the view), with modes umask 022 keeps; *names* renames some."""
    bodies = [bytes([65 + k % 26]) * (k * 37 % 300) for k in range(n)]
    offsets = [sum(map(len, bodies[:k])) for k in range(n)]
    batch = []
    for k in range(n):
        name = (names or {}).get(k, f"d/f{k:02}")
        mode = (0o600, 0o640, 0o644, 0o400, 0o755)[k % 5]
        fields = (name, b"0", mode, 0, 0, len(bodies[k]), _MTIME + k, None, "", "", 0, None, None)
        batch.append((fields, len(bodies[k]), offsets[k]))
    return batch, memoryview(bytearray(b"".join(bodies)))


_MTIME = 1_600_000_000_000_000_007


def test_writers_leave_the_run_as_one_writer_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of 80 files written by two threads, 40 each: where a name is taken, the call
    returns that entry's index, having taken (record, created set, bytes) only the files
    before it, and no file after it is left (one the other thread made is removed again), so
    that the general path takes that entry first and the next call the rest, in the tar's
    order; taken in the first half, then in the second; the run then completes with every
    file's own body, mode, times and row."""
    _needs_the_c_loops()
    from graphdriver.archive._fastpath import write_plain_files

    monkeypatch.chdir(tmp_path)
    os.mkdir("d")
    batch, view = _run_of(80)
    offsets = [sent[2] for sent in batch]
    for taken in ("d/f05", "d/f50"):
        Path(taken).write_bytes(b"in the way")
    rows: dict[str, bytes] = {}
    made: set[str] = set()
    record = ({""}, set[str](), rows)
    dirs = ({"", "d"}, set[str](), set[str]())

    def call(i: int) -> tuple[int, int, int]:
        return write_plain_files(
            batch, i, view, 0, len(view), 0, False, dirs, made, record, True, 2
        )

    assert call(0) == (5, offsets[5], offsets[5])
    assert sorted(os.listdir("d")) == [f"f{k:02}" for k in [*range(6), 50]]
    assert made == {f"d/f{k:02}" for k in range(5)} == set(rows) == record[1]
    os.unlink("d/f05")  # what the general path does first
    assert call(5) == (50, offsets[50], offsets[50] - offsets[5])
    assert sorted(os.listdir("d")) == [f"f{k:02}" for k in range(51)]
    os.unlink("d/f50")
    assert call(50) == (80, len(view), len(view) - offsets[50])
    for sent in batch:
        name, mode, mtime = sent[0][0], sent[0][2], sent[0][6]
        st = os.lstat(name)
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (mode, mtime)
        assert Path(name).read_bytes() == view[sent[2] : sent[2] + sent[1]]
        assert rows[name] == tarsplit._row(st)
    assert made == {sent[0][0] for sent in batch}
    # past the batch's end: nothing to do
    assert call(81) == (81, 0, 0)


def test_a_file_that_fails_beside_another_writer_fails_as_with_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of the first half that cannot be made while the second thread made files is
    written again by one writer (where that thread took the space or inodes it needed, that
    one then succeeds; a timing this test cannot force), after the second's files are
    removed: an error of the file's own (a name too long) is then raised as one writer
    raises it, the files before it written and none after it."""
    _needs_the_c_loops()
    from graphdriver.archive._fastpath import write_plain_files

    monkeypatch.chdir(tmp_path)
    os.mkdir("d")
    batch, view = _run_of(80, {5: "d/" + "n" * 300})
    dirs = ({"", "d"}, set[str](), set[str]())
    with pytest.raises(OSError, match="File name too long") as raised:
        write_plain_files(batch, 0, view, 0, len(view), 0, False, dirs, None, None, True, 2)
    assert raised.value.filename == "d/" + "n" * 300
    assert sorted(os.listdir("d")) == [f"f{k:02}" for k in range(5)]


def test_a_name_twice_in_a_run_of_several_writers_keeps_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same name in both halves of one run of plain files (123 of them): whichever thread
    makes it first, the layer holds the later entry's body and mode, as with one writer."""
    _needs_the_c_loops()
    members = [_dir("d")]
    members += [_file(f"d/f{k:02}", b"%d" % k) for k in range(40)]
    members += [_file("d/twice", b"first")]
    members += [_file(f"d/g{k:02}", b"%d" % k) for k in range(40)]
    members += [_file("d/twice", b"second", 0o640)]
    members += [_file(f"d/h{k:02}", b"%d" % k) for k in range(40)]
    data = _tar(members)
    trees = []
    for writers in (1, 2, 3):
        monkeypatch.setattr(feed, "writers", lambda n=writers: n)
        target = tmp_path / f"layer-{writers}"
        _apply(target, data, "file", tmp_path / "layer.tar", acl=False)
        trees.append(_tree(target))  # first: reading a body moves its atime
        assert (target / "d/twice").read_bytes() == b"second"
        assert stat.S_IMODE(os.lstat(target / "d/twice").st_mode) == 0o640
    assert trees[0] == trees[1] == trees[2]


def test_a_full_filesystem_in_the_c_loop_is_one_line(tmp_path: Path) -> None:
    """ENOSPC while the C loop writes a file: the apply fails with the sandbox's one line for
    a full filesystem (the store then removes the half-made layer: tests/test_bad_input.py)."""
    _needs_the_c_loops()
    if os.geteuid() != 0:
        host_lacks("needs root to mount a small tmpfs", "root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        data = _tar([_dir("d")] + [_file(f"d/f{i}", b"x" * 4000) for i in range(600)])
        (small / "layer").mkdir()
        with pytest.raises(ArchiveError) as err:
            apply_layer(small / "layer", io.BytesIO(data))
        assert "No space left on device" in str(err.value)
        assert "\n" not in str(err.value)
    finally:
        subprocess.run(["umount", str(small)], check=True)


def _applied(tmp_path: Path, data: bytes | None = None) -> tuple[ApplyResult, Path, bytes]:
    data = _layer() if data is None else data
    target = tmp_path / "layer"
    return _apply(target, data, "file", tmp_path / "layer.tar", acl=False), target, data


def _by_directory() -> bytes:
    """Small files, directory by directory, as real layers come."""
    rng = random.Random(3)
    members = []
    for d in ("a", "a/b", "c"):
        members.append(_dir(d))
        members += [_file(f"{d}/f{i}", rng.randbytes(rng.randrange(1, 3000))) for i in range(300)]
    return _tar(members)


def _replay_to_file(result: ApplyResult, target: Path, out: Path) -> bytes:
    assert result.record is not None
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        writer = TarWriter(fd=fd)
        exact.replay(tarsplit.Record(result.record), str(target), writer, check=False)
        writer.flush()
    finally:
        os.close(fd)
    return out.read_bytes()


def test_the_c_replay_copies_the_common_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nearly all of a tar of small files, directory by directory, comes out of the C loop
    (what it leaves: each directory's first body, whose directory the replay opens); a
    writer to a callable takes the Python path: the same bytes."""
    _needs_the_c_loops()
    result, target, data = _applied(tmp_path, _by_directory())
    counted: list[int] = []
    real = fastpath.replay_run
    assert real is not None

    def counting(*args: object) -> tuple[int, int, int, int]:
        got = real(*args)  # type: ignore[arg-type]
        counted.append(got[3])
        return got

    monkeypatch.setattr(fastpath, "replay_run", counting)
    assert _replay_to_file(result, target, tmp_path / "out.tar") == data
    assert sum(counted) > 0.98 * len(data), (sum(counted), len(data))
    counted.clear()
    out = io.BytesIO()
    writer = TarWriter(write=out.write)
    exact.replay(tarsplit.Record(result.record or b""), str(target), writer, check=False)
    writer.flush()
    assert out.getvalue() == data and not counted


@pytest.mark.parametrize("how", ["rewritten", "shorter", "symlink", "gone"])
def test_the_c_replay_leaves_a_changed_file_to_the_checks(tmp_path: Path, how: str) -> None:
    """A small file changed behind the store after the checks (same size, mtime set back;
    cut short; replaced by a symlink; removed): the C loop leaves it, and the replay stops
    with the Python path's error for it."""
    _needs_the_c_loops()
    result, target, _ = _applied(tmp_path, _by_directory())
    victim = target / "a/b/f150"
    st = victim.stat()
    if how == "rewritten":
        victim.write_bytes(bytes(st.st_size))
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif how == "shorter":
        os.truncate(victim, 1)
    elif how == "symlink":
        victim.unlink()
        victim.symlink_to("f1")
    else:
        victim.unlink()
    errors = {
        "rewritten": "a/b/f150 differs from the file that was applied",
        "shorter": "a/b/f150 is shorter than when it was applied",
        "symlink": "Too many levels of symbolic links",
        "gone": "No such file or directory",
    }
    with pytest.raises((ArchiveError, OSError), match=errors[how]):
        _replay_to_file(result, target, tmp_path / "out.tar")


def test_a_streamed_diff_of_many_small_files_does_not_stall(tmp_path: Path) -> None:
    """LayerStore.diff streams the tar through a pipe that this process's own thread fills:
    the C replay writes into it with the GIL released (found in review: holding it, a
    replay of more than the pipe and the buffer, ~2 MiB, hung forever). In a child, so that
    a hang fails the test."""
    _needs_the_c_loops()
    rng = random.Random(5)
    members = [_dir("d")]
    members += [_file(f"d/f{i}", rng.randbytes(100_000)) for i in range(60)]
    (tmp_path / "layer.tar").write_bytes(_tar(members))
    script = """
import hashlib, sys
from graphdriver import open_store
with open_store(sys.argv[1], "vfs") as store, open(sys.argv[2], "rb") as tar:
    store.create("L", None)
    store.apply_diff("L", tar)
    with store.diff("L") as stream:
        print(hashlib.sha256(stream.read()).hexdigest())
"""
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "store"), str(tmp_path / "layer.tar")],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the streamed diff hung")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == hashlib.sha256((tmp_path / "layer.tar").read_bytes()).hexdigest()


def _segments(*parts: bytes | tuple[str, int]) -> bytes:
    """A record's decompressed segments: raw parts (bytes) and bodies ((path, size))."""
    out = b""
    for part in parts:
        if isinstance(part, bytes):
            out += b"R" + struct.pack("<Q", len(part)) + part
        else:
            path, size = part
            name = path.encode()
            out += b"F" + struct.pack("<I", len(name)) + name + struct.pack("<QII", size, 0, 0)
    return out + b"E" + bytes(8)


def test_the_c_replay_copies_what_matches_and_leaves_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Called as TarWriter.replay_run calls it: copies raw parts and the bodies whose file
    is in the open directory and matches its noted row (mode, mtime, ctime) and size, and
    stops, having consumed nothing of it, at one that does not; what it writes out when its
    buffer fills is counted."""
    _needs_the_c_loops()
    from graphdriver.archive._fastpath import replay_run

    (tmp_path / "a").mkdir()
    (tmp_path / "a/x").write_bytes(b"body of x")
    (tmp_path / "y").write_bytes(b"body of y")
    os.link(tmp_path / "y", tmp_path / "a/y")  # the same file, in the open directory too
    dir_fd = os.open(tmp_path / "a", os.O_PATH | os.O_DIRECTORY)
    out_fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:

        def row(path: str) -> tuple[int, int, int]:
            st = os.lstat(tmp_path / path)
            return st.st_mode, st.st_mtime_ns, st.st_ctime_ns

        def run(segs: bytes, noted: dict[str, tuple[int, int, int]], wbuf: int = 64) -> tuple:
            buf = memoryview(bytearray(wbuf))
            got = replay_run(segs, 0, buf, 0, out_fd, b"a", dir_fd, noted, 1 << 17)
            return got, bytes(buf[: got[1]])

        good = {"a/x": row("a/x"), "y": row("y")}
        segs = _segments(b"head", ("a/x", 9), b"pad")
        assert run(segs, good) == ((len(segs) - 9, 16, 0, 16), b"headbody of xpad")
        first = 9 + 4  # the raw part before the body
        mode, mtime, ctime = good["a/x"]
        for noted in (
            {"a/x": (mode + 1, mtime, ctime)},
            {"a/x": (mode, mtime + 1, ctime)},
            {"a/x": (mode, mtime, ctime + 1)},
            {"a/x": good["y"]},  # another file's row
            {},
        ):
            assert run(segs, noted)[0] == (first, 4, 0, 4), noted
        shorter = _segments(b"head", ("a/x", 8))  # the file grew since
        longer = _segments(b"head", ("a/x", 10))  # or was cut short
        other_dir = _segments(b"head", ("y", 9))  # not in the open directory (a/y is it too)
        for segs in (shorter, longer, other_dir):
            assert run(segs, good)[0] == (first, 4, 0, 4)
        # a buffer that fills: what went out to the fd is counted
        segs = _segments(b"h" * 40, ("a/x", 9), b"p" * 40)
        (pos, _, flushed, total), kept = run(segs, good, wbuf=64)
        assert (pos, flushed, total) == (len(segs) - 9, 49, 89) and kept == b"p" * 40
        assert (tmp_path / "out").read_bytes() == b"h" * 40 + b"body of x"
    finally:
        os.close(dir_fd)
        os.close(out_fd)


@pytest.mark.parametrize("how", ["as-applied", "chmod", "touched", "rewritten", "gone", "swapped"])
def test_the_noted_paths_are_checked_alike(
    tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before a replay every noted path is looked at (exact.stale, unchanged_alone): with the
    C loop and without, the same answer and the same reason, whatever changed."""
    _needs_the_c_loops()
    result, target, _ = _applied(tmp_path, _by_directory())
    victim = target / "a/b/f150"
    if how == "chmod":
        victim.chmod(0o600)
    elif how == "touched":
        os.utime(victim, ns=(0, 5))
    elif how == "rewritten":
        st = victim.stat()
        victim.write_bytes(bytes(st.st_size))
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif how == "gone":
        victim.unlink()
    elif how == "swapped":
        victim.unlink()
        victim.mkdir()
    assert result.record is not None
    checks = tarsplit.Record(result.record).checks()
    got = []
    for fast in (True, False):
        monkeypatch.setattr(fastpath, "ENABLED", fast)
        got.append(
            (exact.stale(checks, str(target), []), exact.unchanged_alone(checks, str(target)))
        )
    assert got[0] == got[1]
    why = {
        "as-applied": None,
        "chmod": "/a/b/f150 changed type or mode after apply-diff",
        "touched": "/a/b/f150 changed after apply-diff",
        "rewritten": "/a/b/f150 changed after apply-diff",
        "gone": "/a/b/f150 was removed after apply-diff",
        "swapped": "/a/b/f150 changed type or mode after apply-diff",
    }
    assert got[0] == (why[how], how == "as-applied")
