"""A generated diff's plain files in C (``_fastpath.plain_entry``, through
``TarWriter.add_plain``, and the next ones of the same directory, ``plain_run``): the same tar
bytes as the Python path (``fastpath.ENABLED`` False) for every kind of entry a layer holds,
the C calls taking exactly the plain files and leaving the rest to ``TarWriter.add_path``,
and the same errors."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from test_fastpath import _needs_the_c_loops

from graphdriver.archive import Change, ChangeKind, fastpath, tree_changes, write_changes_tar
from graphdriver.archive.tar_writer import KERNEL_COPY, TarWriter

#: a second after the epoch of the files' whole-second mtimes, and a sub-second one
WHOLE, FRACTION = 1_700_000_000 * 10**9, 1_700_000_000 * 10**9 + 120_000_000


def _file(
    root: Path, name: str, data: bytes, mtime_ns: int | None = WHOLE, mode: int = 0o644
) -> str:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return name


def _layer(root: Path) -> set[str]:
    """A tree of every kind of entry; the names of those the C call must take."""
    plain = {
        _file(root, "whole", b"a" * 10),
        _file(root, "fraction", b"b" * 700, FRACTION),
        _file(root, "fraction-trailing-zeros", b"c", WHOLE + 500_000_000),
        _file(root, "empty", b""),
        _file(root, "empty-fraction", b"", FRACTION),
        _file(root, "n" * 100, b"100-byte name"),
        _file(root, "setuid", b"\x7fELF", mode=0o4755),
        _file(root, "block", b"d" * 512),
        _file(root, "just-under", b"e" * (KERNEL_COPY - 1), FRACTION),
        _file(root, "now", b"f" * 3000, None),  # (its mtime the clock's)
        _file(root, "dir/inner", b"g"),
        _file(root, "overlay-own-xattr", b"h"),
    }
    os.setxattr(root / "overlay-own-xattr", "trusted.overlay.origin", b"x")
    _file(root, "n" * 101, b"a name longer than ustar's")
    _file(root, "dir/üñí", b"not ASCII")
    _file(root, "user-xattr", b"i")
    os.setxattr(root / "user-xattr", "user.note", b"kept")
    _file(root, "dir/empty-user-xattr", b"")  # (listed through the fd it opens in dir/)
    os.setxattr(root / "dir/empty-user-xattr", "user.note", b"kept")
    _file(root, "kernel-copy", b"j" * KERNEL_COPY)
    _file(root, "linked", b"k")
    os.link(root / "linked", root / "link")
    _file(root, "big-uid", b"l")
    os.chown(root / "big-uid", 0o10000000, 0)  # past ustar's 7 octal digits: PAX
    _file(root, "before-1970", b"m", -(10**9))
    os.symlink("whole", root / "symlink")
    os.mkfifo(root / "fifo")
    (root / "emptydir").mkdir()
    return plain


def _diff(root: Path, c_loops: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, set[str]]:
    """The tar of *root*'s changes against nothing, and the names the C call took."""
    monkeypatch.setattr(fastpath, "ENABLED", c_loops)
    taken: set[str] = set()
    real = fastpath.plain_entry
    assert real is not None

    def counting(path: str, arcname: str, *rest: object) -> int:
        got = real(path, arcname, *rest)  # type: ignore[arg-type]
        if got >= 0:
            taken.add(arcname)
        return got

    monkeypatch.setattr(fastpath, "plain_entry", counting)
    real_run = fastpath.plain_run
    assert real_run is not None

    def counting_run(changes: list[Change], i: int, *rest: object) -> tuple[int, int, bool]:
        got = real_run(changes, i, *rest)  # type: ignore[arg-type]
        taken.update(c.path.lstrip("/") for c in changes[i : got[0]])  # each one it took
        return got

    monkeypatch.setattr(fastpath, "plain_run", counting_run)
    out = io.BytesIO()
    write_changes_tar(TarWriter(write=out.write), str(root), tree_changes(str(root), None))
    return out.getvalue(), taken


def test_the_c_call_takes_the_plain_files_and_gives_the_same_tar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _needs_the_c_loops()
    root = tmp_path / "layer"
    root.mkdir()
    plain = _layer(root)
    in_c, taken = _diff(root, True, monkeypatch)
    in_python, none = _diff(root, False, monkeypatch)
    assert in_c == in_python
    assert taken == plain and not none
    with tarfile.open(fileobj=io.BytesIO(in_c)) as tf:  # and the tar says what the tree has
        got = {m.name: m for m in tf.getmembers()}
        assert tf.extractfile(got["fraction"]).read() == b"b" * 700  # type: ignore[union-attr]
    assert got["fraction"].pax_headers["mtime"] == "1700000000.12"
    assert got["setuid"].mode == 0o4755 and got["linked"].linkname == "link"  # (sorted first)
    assert got["user-xattr"].pax_headers["SCHILY.xattr.user.note"] == "kept"
    assert got["dir/empty-user-xattr"].pax_headers["SCHILY.xattr.user.note"] == "kept"
    assert "SCHILY.xattr.trusted.overlay.origin" not in got["overlay-own-xattr"].pax_headers


def test_many_files_fill_and_flush_the_buffer_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several buffers' worth: an entry that does not fit is put after a flush, in order."""
    _needs_the_c_loops()
    root = tmp_path / "layer"
    for i in range(400):
        _file(root, f"d{i % 7}/f{i:03d}", bytes([i % 251]) * (1000 + 37 * i), WHOLE + i)
    in_c, taken = _diff(root, True, monkeypatch)
    in_python, _ = _diff(root, False, monkeypatch)
    assert len(in_c) > 3 * (1 << 20) and len(taken) == 400
    assert in_c == in_python


def test_a_directory_run_stops_at_what_it_leaves_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against an old tree: in one directory, deletes, a hardlink, a big file, a name that
    is not ASCII and a long one between plain files; the same tar as the Python path, and
    every plain file taken in C."""
    _needs_the_c_loops()
    old, new = tmp_path / "old", tmp_path / "new"
    for name in ("d/a-gone", "d/m-gone", "d/z-gone", "e/gone"):
        _file(old, name, b"before")
    plain = {_file(new, f"d/{c}-file", c.encode() * 99, WHOLE) for c in "bcklnoy"}
    plain |= {_file(new, f"e/{c}", b"e", FRACTION) for c in "ab"}
    _file(new, "d/h-big", b"x" * KERNEL_COPY)
    _file(new, "d/j-linked", b"j")
    os.link(new / "d/j-linked", new / "d/j-second")
    _file(new, "d/p-ünï", b"not ASCII")
    _file(new, "d/q-" + "n" * 100, b"long")
    (new / "e").mkdir(exist_ok=True)

    def diff(c_loops: bool) -> tuple[bytes, set[str]]:
        monkeypatch.setattr(fastpath, "ENABLED", c_loops)
        taken: set[str] = set()
        out = io.BytesIO()
        changes = tree_changes(str(new), str(old))
        real = fastpath.plain_run
        assert real is not None

        def run(changes: list[Change], i: int, *rest: object) -> tuple[int, int, bool]:
            got = real(changes, i, *rest)  # type: ignore[arg-type]
            taken.update(c.path.lstrip("/") for c in changes[i : got[0]])
            return got

        monkeypatch.setattr(fastpath, "plain_run", run)
        write_changes_tar(TarWriter(write=out.write), str(new), changes)
        monkeypatch.setattr(fastpath, "plain_run", real)
        return out.getvalue(), taken

    in_c, taken = diff(True)
    in_python, none = diff(False)
    assert in_c == in_python and not none
    # a directory's first file, and the first after a delete, go through plain_entry; the
    # files after one the Python path wrote (big, linked, not ASCII, long), through plain_run
    assert taken == plain - {"d/b-file", "d/n-file", "e/a"}
    with tarfile.open(fileobj=io.BytesIO(in_c)) as tf:
        names = tf.getnames()
    assert "d/.wh.m-gone" in names and "e/.wh.gone" in names and "d/p-ünï" in names


def test_a_file_gone_from_a_run_is_named_whole(tmp_path: Path) -> None:
    """A file gone when a directory's run reaches it is the error os.lstat gives, naming
    its whole path; the diff stops there."""
    _needs_the_c_loops()
    _file(tmp_path, "d/a", b"a")
    _file(tmp_path, "d/b", b"b")
    changes = [Change(p, ChangeKind.ADD) for p in ("/d", "/d/a", "/d/b", "/d/c")]
    with pytest.raises(FileNotFoundError) as got:
        write_changes_tar(TarWriter(write=io.BytesIO().write), str(tmp_path), changes)
    assert got.value.filename == str(tmp_path / "d" / "c")


def test_a_file_gone_is_the_same_error(tmp_path: Path) -> None:
    _needs_the_c_loops()
    gone = str(tmp_path / "gone")
    with pytest.raises(FileNotFoundError) as in_c:
        TarWriter(write=io.BytesIO().write).add_plain(gone, "gone")
    with pytest.raises(FileNotFoundError) as in_python:
        os.lstat(gone)
    assert in_c.value.filename == in_python.value.filename == gone


def test_a_file_gone_from_its_directory_is_named_whole(tmp_path: Path) -> None:
    """Looked up by its name in its directory's descriptor, a file is named in an error by
    its whole path, as os.lstat names it."""
    _needs_the_c_loops()
    gone = str(tmp_path / "gone")
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(FileNotFoundError) as in_c:
            TarWriter(write=io.BytesIO().write).add_plain(gone, "gone", fd, "gone")
    finally:
        os.close(fd)
    assert in_c.value.filename == gone


def test_an_empty_file_with_many_xattrs_keeps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty file whose xattr names are more than the C call's list holds is left to the
    Python path, which writes them all (found in review: once they were dropped)."""
    _needs_the_c_loops()
    root = tmp_path / "layer"
    _file(root, "empty", b"")
    _file(root, "full", b"data")
    for name in ("empty", "full"):
        for i in range(6):
            os.setxattr(root / name, f"user.{i:03d}" + "x" * 200, b"v")
    in_c, taken = _diff(root, True, monkeypatch)
    in_python, _ = _diff(root, False, monkeypatch)
    assert in_c == in_python and not taken
    with tarfile.open(fileobj=io.BytesIO(in_c)) as tf:
        assert sum(k.startswith("SCHILY.xattr.") for k in tf.getmember("empty").pax_headers) == 6
