"""Replaying an exact-diff record onto the outputs a diff writes to, and the guards: a file
changed behind the store is an error, never a wrong tar."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from graphdriver.archive import exact, tarsplit
from graphdriver.archive.tar import BLOCK, REGTYPE, encode_header
from graphdriver.archive.tar_writer import KERNEL_COPY, TarWriter
from graphdriver.errors import ArchiveError

#: a small body (goes through the buffer) and a large one (sendfile when the output is an fd)
FILES = {"etc/small": b"small body\n", "usr/big": os.urandom(KERNEL_COPY * 3 + 17)}


def _record(root: Path) -> tuple[bytes, bytes]:
    """The files of FILES under *root*, the record an apply of their tar keeps, and the tar."""
    rec, paths = tarsplit.SegmentRecorder(), tarsplit.PathRecorder()
    tar = b""
    for path, data in FILES.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        header = encode_header(path, REGTYPE, mode=0o644, size=len(data), mtime=1)
        paths.touch(path)
        rec.raw(header)
        rec.start_body()
        rec.body(path, len(data), None)
        padding = b"\0" * (-len(data) % BLOCK)
        rec.raw(padding)
        tar += header + data + padding
    rec.raw(b"\0" * 2 * BLOCK)
    tar += b"\0" * 2 * BLOCK
    segments = rec.finish()
    table = paths.finish(lambda p: os.lstat(root / p) if p else os.lstat(root))
    assert segments is not None and table is not None
    return tarsplit.join(segments, table), tar


def _diff_id(tar: bytes) -> str:
    return "sha256:" + hashlib.sha256(tar).hexdigest()


def _replay(
    blob: bytes, root: Path, out: Path, diff_id: str, flags: int = 0, check: bool | None = None
) -> bytes:
    record = tarsplit.Record(blob)
    assert exact.stale(record.checks(), str(root), []) is None
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o600)
    try:
        writer = TarWriter(fd=fd)
        exact.replay(record, str(root), writer, diff_id, check=check)
        writer.flush()
    finally:
        os.close(fd)
    return out.read_bytes()


@pytest.mark.parametrize("check", [None, True], ids=["as-the-host-needs", "hashed"])
@pytest.mark.parametrize("flags", [0, os.O_APPEND], ids=["file", "append"])
def test_replay_writes_the_applied_tar_to_a_file(
    tmp_path: Path, flags: int, check: bool | None
) -> None:
    """A plain file takes the large body by sendfile; an O_APPEND one (``diff >> f``) refuses
    sendfile and gets it through the buffer; a hashed body goes through the buffer too: the
    same bytes every way."""
    root = tmp_path / "layer"
    blob, tar = _record(root)
    assert _replay(blob, root, tmp_path / "out.tar", _diff_id(tar), flags, check) == tar


def test_a_tar_that_is_not_the_diff_id_is_an_error_where_ctimes_are_coarse(tmp_path: Path) -> None:
    """Before Linux 6.13 (no multigrain timestamps), or on a filesystem without them, a write
    within one timer tick of apply's stat can leave size, mtime and ctime as recorded; there
    the tar written is hashed and must be the layer's diffID (``check=None`` decides by the
    host: ``exact.fine_ctimes``). No test can time such a write, so the layer here is as
    applied and the diffID is another tar's: the same mismatch, found once the tar is written.
    """
    root = tmp_path / "layer"
    blob, tar = _record(root)
    other = _diff_id(tar.replace(b"small body", b"small BODY"))
    with pytest.raises(ArchiveError, match="the tar written is not the layer's"):
        _replay(blob, root, tmp_path / "out.tar", other, check=True)
    with pytest.raises(ArchiveError, match="no diffID"):
        _replay(blob, root, tmp_path / "out2.tar", "", check=True)


def test_a_record_of_version_2_still_replays(tmp_path: Path) -> None:
    """Records kept before version 3 carry a CRC-32 per body, which is not read: the layers
    applied then still diff exactly."""
    root = tmp_path / "layer"
    blob, tar = _record(root)
    old = b"graphdriver-tar-split 2\n" + blob[len(tarsplit.MAGIC) :]
    assert _replay(old, root, tmp_path / "out.tar", _diff_id(tar), check=True) == tar


def test_replay_writes_the_applied_tar_to_a_stream(tmp_path: Path) -> None:
    root = tmp_path / "layer"
    blob, tar = _record(root)
    out = io.BytesIO()
    writer = TarWriter(write=out.write)
    exact.replay(tarsplit.Record(blob), str(root), writer, _diff_id(tar))
    writer.flush()
    assert out.getvalue() == tar


@pytest.mark.parametrize("path", list(FILES))
def test_a_body_rewritten_after_the_checks_is_an_error(tmp_path: Path, path: str) -> None:
    """Same size, mtime set back: only the ctime tells, and the replay looks at it after the
    copy, so a write between the checks and the read (or during it) stops the diff."""
    root = tmp_path / "layer"
    blob, _ = _record(root)
    record = tarsplit.Record(blob)
    assert exact.stale(record.checks(), str(root), []) is None
    target = root / path
    st = target.stat()
    target.write_bytes(bytes(len(FILES[path])))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    out = io.BytesIO()
    with pytest.raises(ArchiveError, match=f"/{path} differs from the file that was applied"):
        exact.replay(record, str(root), TarWriter(write=out.write))


@pytest.mark.parametrize("path", ["usr/big", "etc/small"])
def test_a_body_cut_short_is_an_error(tmp_path: Path, path: str) -> None:
    root = tmp_path / "layer"
    blob, _ = _record(root)
    os.truncate(root / path, 5)
    fd = os.open(tmp_path / "out.tar", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(ArchiveError, match=f"/{path} is shorter than when it was applied"):
            exact.replay(tarsplit.Record(blob), str(root), TarWriter(fd=fd))
    finally:
        os.close(fd)
