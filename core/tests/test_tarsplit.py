"""The exact-diff recorder alone (found in review, issue #13)."""

from __future__ import annotations

import os

import pytest
from test_fastpath import _needs_the_c_loops

from graphdriver.archive import fastpath
from graphdriver.archive.tarsplit import PathRecorder, Record, SegmentRecorder, join


def test_removing_the_parents_directories_keeps_the_record() -> None:
    """A child layer on a full-copy driver (vfs, btrfs, devmapper) that whiteouts K
    directories of its parent and adds N files keeps its record (the whiteouts delete none of
    its own bodies). Here the extractor's calls are made directly (touch, then body). Once
    ``removed`` scanned all N bodies for each of the K directories (2,000 dirs and
    20,000 files took 40 s to apply): the cost is bench/'s to watch, not a timing assert."""
    rec = PathRecorder()
    for i in range(10_000):
        path = f"usr/share/f{i}"
        rec.touch(path)
        rec.wrote(path)
    for i in range(1_000):
        rec.removed(f"var/lib/d{i}", was_dir=True)  # the parent's directories, whited out
    assert rec.failed is None  # how long it takes is bench/'s to measure, not a test's


def test_a_long_extension_header_replays() -> None:
    """A PAX header of several MiB (a long comment record) reaches the recorder in one run
    of raw bytes; the record keeps it in parts the replay accepts, byte for byte."""
    rec = SegmentRecorder()
    head = bytes(range(256)) * (12 << 10)  # 3 MiB
    rec.raw(memoryview(head))
    rec.start_body()
    rec.body("f", 5, None)
    rec.raw(b"tail")
    segments = rec.finish()
    table = PathRecorder().finish(lambda p: os.lstat("/"))
    assert segments is not None and table is not None
    blob = join(segments, table)
    parts = list(Record(blob).segments())
    assert b"".join(p for p in parts if isinstance(p, bytes)) == head + b"tail"
    assert [p.path for p in parts if not isinstance(p, bytes)] == ["f"]


def test_the_check_table_is_the_same_with_and_without_the_c_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``PathRecorder.finish`` builds the table's rows in C (``_fastpath.check_rows``) where
    it was built: the bytes the Python loop gives, for names that are not ASCII or not UTF-8,
    a file touched again after its body (its row read again), and a path gone since."""
    _needs_the_c_loops()
    st = os.stat("/")

    def lstat(path: str) -> os.stat_result:
        if path == "d/gone":
            raise FileNotFoundError(path)
        return st

    tables = []
    for fast in (True, False):
        monkeypatch.setattr(fastpath, "ENABLED", fast)
        rec = PathRecorder()
        for name in ("d/a", "d/üñí", "d/b\udcff", "e/f/g", "d/gone"):
            rec.made_file(name, st)
        for name in ("d/a", "d/gone"):  # rows no longer the fstat of their bodies: read again
            rec.touch(name)
        tables.append(rec.finish(lstat))
        assert rec.gone == {"d/gone"}
    assert tables[0] is not None and tables[0] == tables[1]
    checks = Record(join(b"", tables[0])).checks()
    assert set(checks.present) == {"", "d", "d/a", "d/üñí", "d/b\udcff", "e", "e/f", "e/f/g"}


@pytest.mark.parametrize("fast", [True, False])
def test_a_path_removed_and_made_again_is_present_and_gone(
    fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of the parent that the tar writes again (dpkg's status, /etc/passwd: the
    everyday child layer) is removed, then made: the table holds it as both, which is what
    the checks of a child layer's diff expect (found in review: once it was gone alone, and
    every such layer's diff was generated)."""
    monkeypatch.setattr(fastpath, "ENABLED", fast and fastpath.ENABLED)
    st = os.stat("/")
    rec = PathRecorder()
    rec.touch("etc")
    rec.removed("etc/passwd", was_dir=False)
    rec.touch("etc/passwd")
    rec.wrote("etc/passwd", st)
    rec.made_file("etc/new", st)
    table = rec.finish(lambda p: st)
    assert table is not None
    checks = Record(join(b"", table)).checks()
    assert set(checks.present) == {"", "etc", "etc/passwd", "etc/new"}
    assert checks.gone == {"etc/passwd"}
