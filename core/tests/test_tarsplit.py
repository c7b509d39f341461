"""The exact-diff recorder alone (found in review, issue #13)."""

from __future__ import annotations

import os

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
