"""Exact diffs from the command line, and exact-diff records that no longer match (edited in
the database, swapped, a file changed behind the store): the diff is generated, never wrong."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import struct
import subprocess
import tarfile
from pathlib import Path

import zstandard
from conftest import GD

from graphdriver.archive import tarsplit


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_650_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _db(gd: GD) -> sqlite3.Connection:
    return sqlite3.connect(gd.root / gd.driver / "metadata.db")


def _diff(gd: GD, layer: str, tmp_path: Path) -> tuple[bytes, dict[str, object], str]:
    out = tmp_path / f"{layer}.tar"
    res = gd("diff", "--json", layer, "-o", str(out))
    return out.read_bytes(), json.loads(res.out), res.err


def _applied(gd: GD, layer: str, files: dict[str, bytes]) -> bytes:
    data = _tar(files)
    gd("create", layer)
    gd("apply-diff", layer, input=data)
    return data


def test_cli_diff_is_the_applied_tar(gd: GD, tmp_path: Path) -> None:
    applied = _applied(gd, "L", {"a": b"alpha", "dir/b": b"beta" * 300})
    data, report, _err = _diff(gd, "L", tmp_path)
    assert data == applied
    assert report == {
        "id": "L",
        "exact": True,
        "reason": None,
        "diff_id": _sha(applied),
        "tar_size": len(applied),
        "compression": "none",
    }
    assert gd("diff", "L").raw == applied  # to stdout as well
    inspect = json.loads(gd("inspect", "L").out)
    assert inspect["diff_id"] == _sha(applied)
    assert 0 < inspect["exact_diff_record"] < len(applied)
    assert "Reproduces Exact Diffs: true" in gd("status").out


def test_a_child_that_writes_over_its_parents_files_diffs_exactly(gd: GD, tmp_path: Path) -> None:
    """A child layer whose tar writes files of its parent again (dpkg's status, /etc/passwd:
    the everyday case), adds one and whites one out: its diff is still the applied tar (found
    in review: a record that noted such a file gone alone made every such diff generated)."""
    _applied(gd, "base", {"etc/passwd": b"root\n", "etc/group": b"root\n", "usr/bin/x": b"x"})
    data = _tar({"etc/passwd": b"root\nuser\n", "etc/new": b"new", "usr/bin/.wh.x": b""})
    gd("create", "--parent", "base", "child")
    gd("apply-diff", "child", input=data)
    got, report, _err = _diff(gd, "child", tmp_path)
    assert report["exact"] is True, report
    assert got == data


def test_a_record_edited_in_the_database_is_not_used(gd: GD, tmp_path: Path) -> None:
    applied = _applied(gd, "L", {"a": b"alpha"})
    with _db(gd) as db:
        db.execute("UPDATE tar_split SET data = X'00' || data WHERE layer = 'L'")
    data, report, err = _diff(gd, "L", tmp_path)
    assert report["exact"] is False
    assert "changed behind the store" in str(report["reason"])
    assert "exact-diff record is unusable" in err and "Traceback" not in err
    assert data != applied
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.extractfile("a").read() == b"alpha"  # type: ignore[union-attr]
    # a garbage record whose digest was made to match is refused for its form
    blob = b"not a record"
    with _db(gd) as db:
        db.execute(
            "UPDATE tar_split SET data = ?, digest = ? WHERE layer = 'L'",
            (blob, _sha(blob)),
        )
    _data, report, _err = _diff(gd, "L", tmp_path)
    assert report["exact"] is False
    assert "unusable" in str(report["reason"])


def test_a_record_of_another_layer_is_not_used(gd: GD, tmp_path: Path) -> None:
    _applied(gd, "one", {"a": b"alpha"})
    _applied(gd, "two", {"b": b"beta"})
    with _db(gd) as db:
        db.execute(
            "UPDATE tar_split SET data = (SELECT data FROM tar_split WHERE layer = 'one'), "
            "digest = (SELECT digest FROM tar_split WHERE layer = 'one') WHERE layer = 'two'"
        )
    data, report, _err = _diff(gd, "two", tmp_path)
    assert report["exact"] is False, "a record that is not the layer's was replayed"
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.getnames() == ["b"]


def test_a_file_changed_behind_the_store(gd: GD, tmp_path: Path) -> None:
    applied = _applied(gd, "L", {"a": b"alpha", "b": b"beta"})
    layer_dir = gd.root / "vfs" / "dir" / "L"
    (layer_dir / "b").write_bytes(b"BETA")
    data, report, _err = _diff(gd, "L", tmp_path)
    assert report["exact"] is False and "/b" in str(report["reason"])
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.extractfile("b").read() == b"BETA"  # type: ignore[union-attr]
    assert data != applied


def test_records_can_be_turned_off(gd: GD, tmp_path: Path) -> None:
    data = _tar({"a": b"alpha"})
    gd("create", "L")
    env = {**os.environ, "GRAPHDRIVER_TAR_SPLIT": "off"}
    subprocess.run(gd.argv("apply-diff", "L"), input=data, check=True, env=env)
    _out, report, _err = _diff(gd, "L", tmp_path)
    assert report["exact"] is False
    assert report["reason"] == "no record of the applied tar was kept"
    assert json.loads(gd("inspect", "L").out)["exact_diff_record"] is None


def test_a_record_naming_a_file_outside_the_layer_is_not_replayed(gd: GD, tmp_path: Path) -> None:
    """Found in review (#13): a body path is opened component by component below the layer's
    root, but ``..`` is not refused, so a record edited behind the store (its digest and the
    layer's diff_id made to match) made ``diff`` copy a file from outside the layer into the
    tar. It must be refused (a generated diff or one clear error), never read."""
    secret = b"host secret, not in any layer\n"
    (gd.root / "secret").write_bytes(secret)
    _applied(gd, "L", {"x": b"a" * len(secret)})
    layer_dir = gd.root / "vfs" / "dir" / "L"
    header = tarfile.TarInfo("x")
    header.size, header.mtime = len(secret), 1_650_000_000
    head = header.tobuf(tarfile.GNU_FORMAT)
    tail = b"\0" * (-len(secret) % 512) + b"\0" * 1024
    rec = tarsplit.SegmentRecorder()
    rec.raw(head)
    rec.start_body()
    rec.body("../../../secret", len(secret), None)
    rec.raw(tail)
    paths = tarsplit.PathRecorder()
    paths.touch("x")
    segments, table = rec.finish(), paths.finish(lambda p: os.lstat(layer_dir / p))
    assert segments is not None and table is not None
    blob = tarsplit.join(segments, table)
    forged = head + secret + tail
    with _db(gd) as db:
        db.execute(
            "UPDATE tar_split SET data = ?, digest = ? WHERE layer = 'L'",
            (blob, tarsplit.digest(blob)),
        )
        db.execute("UPDATE layers SET diff_id = ? WHERE id = 'L'", (_sha(forged),))
    res = gd("diff", "L", check=False)
    assert secret not in res.raw, "diff read a file outside the layer"
    assert "Traceback" not in res.err


def test_a_record_corrupt_past_its_checks_is_a_clear_error(gd: GD, tmp_path: Path) -> None:
    """Found in review (#13): a record whose digest matches and whose check table reads but
    whose segments are corrupt raised ``RecordError`` (not a GraphDriverError) in the middle
    of the replay: ``diff`` said "internal error" and ``check --digests`` stopped there."""
    _applied(gd, "L", {"x": b"abc"})
    with _db(gd) as db:
        (blob,) = db.execute("SELECT data FROM tar_split WHERE layer = 'L'").fetchone()
        start = len(tarsplit.MAGIC) + 8
        (seg_len,) = struct.unpack_from("<Q", blob, len(tarsplit.MAGIC))
        segments = (
            zstandard.ZstdDecompressor().decompressobj().decompress(blob[start : start + seg_len])
        )
        bad = zstandard.ZstdCompressor().compress(segments[:-1] + b"Q")  # end tag: unknown
        forged = tarsplit.MAGIC + struct.pack("<Q", len(bad)) + bad + blob[start + seg_len :]
        db.execute(
            "UPDATE tar_split SET data = ?, digest = ? WHERE layer = 'L'",
            (forged, tarsplit.digest(forged)),
        )
    res = gd("diff", "L", "-o", str(tmp_path / "out.tar"), check=False)
    assert res.code != 0
    assert "internal error" not in res.err and "Traceback" not in res.err, res.err
    assert "corrupt" in res.err
    check = gd("check", "--digests", check=False)
    assert check.code == 1 and "internal error" not in check.err, check.err
    assert "L" in check.out
