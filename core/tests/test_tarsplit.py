"""The exact-diff recorder alone (found in review, issue #13)."""

from __future__ import annotations

import os
import struct

import pytest
import zstandard
from test_fastpath import _needs_the_c_loops

from graphdriver.archive import fastpath
from graphdriver.archive.tarsplit import PathRecorder, Record, RecordError, SegmentRecorder, join


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


def _entry(tag: bytes, path: bytes, row: bytes = b"") -> bytes:
    return tag + struct.pack("<I", len(path)) + path + row


def _row(mode: int, mtime_s: int, ctime_s: int) -> bytes:
    return struct.pack("<IqIqI", mode, mtime_s, 7, ctime_s, 999_999_999)


def _read_both(table: bytes, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What the table reads as with the C loop and without: the checks, or the error."""
    got: list[object] = []
    for fast in (True, False):
        monkeypatch.setattr(fastpath, "ENABLED", fast)
        record = Record(join(b"", zstandard.ZstdCompressor().compress(table)))
        try:
            checks = record.checks()
            got.append((checks.present, checks.gone, checks.opaque))
        except RecordError as exc:
            got.append(str(exc))
    assert got[0] == got[1]
    return got


def test_the_check_table_reads_the_same_with_and_without_the_c_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exact diff reads its record's check table in C (``_fastpath.check_entries``) where
    it was built, each entry the Python loop would read alike: 60,000 of them, past the
    reader's 1 MiB pieces (entries cut at a piece's end), names not ASCII or not UTF-8, the
    three kinds, a time no long long of nanoseconds holds (the Python loop's), and tables
    that are corrupt (another tag, a path too long, cut short) fail with the same line."""
    _needs_the_c_loops()
    entries = []
    for i in range(60_000):
        name = f"usr/share/d{i % 97}/f{i}".encode() + (b"\xff\xfe" if i % 7 else "ü".encode())
        entries.append(_entry(b"P", name, _row(0o100644 if i % 5 else 0o40755, i, i + 1)))
    entries.append(_entry(b"P", b"far", _row(0o100600, 1 << 62, -(1 << 62))))
    entries += [_entry(b"G", b"etc/passwd"), _entry(b"O", b"var/cache")]
    entries.append(_entry(b"P", b"", _row(0o40755, 1, 1)))
    table = b"".join(entries)
    read = _read_both(table + b"Z", monkeypatch)[0]
    assert isinstance(read, tuple), read
    present, gone, opaque = read
    assert len(present) == 60_002 and gone == {"etc/passwd"} and opaque == {"var/cache"}
    assert present["far"] == (0o100600, (1 << 62) * 10**9 + 7, -(1 << 62) * 10**9 + 999_999_999)
    row = (0o100644, 3 * 10**9 + 7, 4 * 10**9 + 999_999_999)
    assert present["usr/share/d3/f3\udcff\udcfe"] == row
    at = len(b"".join(entries[:40_000]))  # an entry's start, past the first piece
    bad = [
        table[:at] + b"X" + table[at:] + b"Z",
        table + _entry(b"P", b"x" * ((1 << 20) + 1), _row(0, 0, 0)) + b"Z",
        table,
        table + b"P\x05",
    ]
    assert _read_both(bad[0], monkeypatch)[0] == "the record is corrupt (check tag b'X')"
    assert _read_both(bad[1], monkeypatch)[0] == "the record is corrupt (a path of 1048577 bytes)"
    assert _read_both(bad[2], monkeypatch)[0] == "the record is cut short"
    assert str(_read_both(bad[3], monkeypatch)[0]).startswith("the record is corrupt")
    # and the C loop does read them (not leaves them all to the Python one): it stops at the
    # end tag of a whole table, at the bad tag, at the time it cannot hold, at the long path
    assert fastpath.check_entries is not None
    whole = table[:at] + b"Z"
    present, gone, opaque = {}, set(), set()  # type: ignore[var-annotated]
    assert fastpath.check_entries(whole, 0, present, gone, opaque) == len(whole) - 1
    assert len(present) == 40_000
    assert fastpath.check_entries(bad[0], 0, {}, set(), set()) == at
    far = len(b"".join(entries[:60_000]))
    assert fastpath.check_entries(bad[1], 0, {}, set(), set()) == far
    after = far + len(entries[60_000])  # from there: the three others, then the long path
    assert fastpath.check_entries(bad[1], after, {}, set(), set()) == len(table)


def test_a_file_noted_in_one_call_makes_the_same_segments() -> None:
    """The apply parent notes a regular file's header and body in one call
    (``SegmentRecorder.file``) where it used three (``raw``, ``start_body``, ``body``): the
    same record, whether raw parts came before it or not, its header short or over the
    1 MiB of a raw part, or empty."""
    long_head = bytes(range(256)) * (5 << 10)  # 1.25 MiB: a PAX header with a long comment
    calls: list[tuple[bytes, bytes, str]] = [
        (b"", b"h1" * 256, "a"),
        (b"dir header" * 60, b"h2" * 256, "b/\udcff"),
        (b"", long_head, "c"),
        (b"padding", b"", "d"),
        (b"", b"", "e"),
    ]
    three, one = SegmentRecorder(), SegmentRecorder()
    for before, head, path in calls:
        for rec in (three, one):
            if before:
                rec.raw(memoryview(before))
        three.raw(memoryview(head))
        three.start_body()
        three.body(path, 3, [(0, 3)] if path == "c" else None)
        one.file(memoryview(head), path, 3, [(0, 3)] if path == "c" else None)
        for i in range(3000):  # past the 256 KiB batch that goes to the compressor
            three.raw(memoryview(head[:512]))
            three.start_body()
            three.body(f"{path}{i}", 100, None)
            one.file(memoryview(head[:512]), f"{path}{i}", 100, None)
    for rec in (three, one):
        rec.raw(memoryview(b"end"))
    assert three.tar_size == one.tar_size
    assert three.finish() == one.finish()
