"""The tar reader and writer against GNU tar and Python's tarfile, and on broken input."""

from __future__ import annotations

import io
import os
import random
import subprocess
import tarfile
from pathlib import Path

import pytest

from graphdriver.archive import sparse
from graphdriver.archive.tar import (
    DIRTYPE,
    REGTYPE,
    _general_header,
    _pax_record,
    byte_sum,
    encode_header,
    number,
)
from graphdriver.archive.tar_reader import TarReader
from graphdriver.archive.tar_writer import TarWriter
from graphdriver.errors import ArchiveError
from graphdriver.testing.base import hostile_tars
from graphdriver.testing.trees import make_rich


def _read_all(data: bytes) -> list[tuple[str, bytes, bytes]]:
    r, w = os.pipe()
    try:
        # small inputs fit in the pipe; larger ones are fed by a thread
        import threading

        def feed() -> None:
            try:
                os.write(w, data)
            finally:
                os.close(w)

        t = threading.Thread(target=feed)
        t.start()
        reader = TarReader(r)
        out = []
        for entry in reader:
            body = b"".join(bytes(p) for p in reader.data()) if entry.is_file else b""
            out.append((entry.name, entry.type, body))
        reader.drain()
        t.join()
        return out
    finally:
        os.close(r)


def _write_tree(root: Path) -> bytes:
    chunks: list[bytes] = []
    w = TarWriter(write=chunks.append)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            w.add_path(full, os.path.relpath(full, root))
    w.close()
    return b"".join(chunks)


def test_writer_output_reads_back_in_gnu_tar_and_tarfile(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_rich(src)
    data = _write_tree(src)
    listing = subprocess.run(["tar", "-tvf", "-"], input=data, capture_output=True, check=True)
    assert b"long-" + b"n" * 150 in listing.stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = {m.name: m for m in tf}
    assert members["long-target-link"].linkname == "t" * 200
    # the walk meets hard1 (top level) before etc/hard2, so the second is the link
    assert members["etc/hard2"].islnk() and members["etc/hard2"].linkname == "hard1"
    assert members["xattr-file"].pax_headers["SCHILY.xattr.user.comment"] == "hello"
    null = members["null"]
    assert null.ischr() and (null.devmajor, null.devminor) == (1, 3)
    assert members["suid"].mode == 0o4755
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "-C", str(out), "-xf", "-"],
        input=data,
        check=True,
    )
    assert (out / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert os.getxattr(out / "xattr-file", "trusted.graphdriver") == b"\x00\x01binary"


def test_an_xattr_no_tar_can_name_is_left_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A PAX record's key ends at its first ``=``: an xattr ``user.a=b`` with value ``c``
    came back from the tar as ``user.a`` with value ``b=c``. It is left out, and said."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f")
    os.setxattr(src / "f", "user.a=b", b"c")
    os.setxattr(src / "f", "user.kept", b"k")
    with caplog.at_level("WARNING"):
        data = _write_tree(src)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        headers = {m.name: m.pax_headers for m in tf}
    assert {k: v for k, v in headers["f"].items() if k.startswith("SCHILY")} == {
        "SCHILY.xattr.user.kept": "k"
    }
    assert caplog.messages == ["xattr 'user.a=b' of f is left out: a PAX key ends at '='"]


@pytest.mark.parametrize("fmt", ["gnu", "posix", "ustar", "oldgnu"])
def test_reader_takes_gnu_tar_formats(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    (src / ("d" * 90)).mkdir(parents=True)
    (src / ("d" * 90) / ("f" * 90)).write_bytes(b"deep name")
    (src / "plain").write_bytes(os.urandom(70_000))
    if fmt == "ustar":
        (src / ("d" * 90) / ("f" * 90)).unlink()
        (src / ("d" * 90) / "short").write_bytes(b"deep name")
    data = subprocess.run(
        ["tar", f"--format={fmt}", "-C", str(src), "-cf", "-", "."], capture_output=True, check=True
    ).stdout
    got = {name.lstrip("./").rstrip("/"): body for name, _t, body in _read_all(data)}
    assert got["plain"] == (src / "plain").read_bytes()
    deep = [k for k in got if k.startswith("d" * 90 + "/")]
    assert len(deep) == 1 and got[deep[0]] == b"deep name"


def test_pax_for_big_ids_and_base256_read() -> None:
    hdr = encode_header("f", b"0", uid=3_000_000, gid=5, size=0, mode=0o644)
    data = hdr + b"\0" * 1024
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.getmembers()[0].uid == 3_000_000
    # GNU base-256 numbers (as GNU tar writes for uids past 8^7); one no uid_t holds (32
    # bits, and (uid_t)-1 is chown's "unchanged") is refused in one line
    for uid in (4_000_000_000, (1 << 32) - 1, 1 << 33):
        info = tarfile.TarInfo("g")
        info.uid = uid
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
            tf.addfile(info, io.BytesIO(b""))
        assert buf.getvalue()[108] == 0x80  # base-256
        r, w = os.pipe()
        os.write(w, buf.getvalue())
        os.close(w)
        try:
            if uid < (1 << 32) - 1:
                assert next(iter(TarReader(r))).uid == uid
            else:
                with pytest.raises(ArchiveError, match=f"uid {uid} is out of range"):
                    list(TarReader(r))
        finally:
            os.close(r)


def _good() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(3):
            info = tarfile.TarInfo(f"file{i}" + "x" * 120)
            payload = os.urandom(700 + i)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_every_truncation_is_an_archive_error() -> None:
    data = _good()
    end = len(data.rstrip(b"\0"))
    for cut in range(1, end, 37):  # 0 bytes is an empty layer
        with pytest.raises(ArchiveError):
            _read_all(data[:cut])


def test_corrupt_header_and_not_a_tar() -> None:
    data = bytearray(_good())
    data[1024 + 10] ^= 0xFF  # inside the first ustar header (after a PAX header and its data)
    with pytest.raises(ArchiveError):
        _read_all(bytes(data))
    with pytest.raises(ArchiveError, match="not a tar"):
        _read_all(b"hello world, this is not a tar" * 40)


def test_header_checksums() -> None:
    """byte_sum is sum(); a header with any byte changed is refused, and one whose checksum
    was summed over signed chars (as some old tars wrote it) is taken."""
    rng = random.Random(7)
    for n in (0, 1, 255, 256, 257, 511, 512, 1500):
        data = rng.randbytes(n)
        assert byte_sum(data) == sum(data), n
    assert byte_sum(b"\xff" * 512) == 512 * 255
    assert byte_sum(b"\xff" * 256) == 256 * 255  # the largest sum one adler32 takes whole
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("caf\u00e9-\u00ff")  # bytes over 127 in the name
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    good = buf.getvalue()
    assert _read_all(good) == [("caf\u00e9-\u00ff", b"0", b"abc")]
    for at in [*range(148), *range(156, 512)]:
        data = bytearray(good)
        data[at] ^= 0x5A
        with pytest.raises(ArchiveError, match="bad header checksum"):
            _read_all(bytes(data))
    header = bytearray(good[:512])
    header[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in header)
    assert signed != sum(header)
    header[148:156] = b"%06o\0 " % signed
    assert _read_all(bytes(header) + good[512:]) == [("caf\u00e9-\u00ff", b"0", b"abc")]


def test_common_headers_are_the_general_paths_bytes() -> None:
    """encode_header's one-pack path for the common entry gives the bytes the general,
    block-by-block path gives, at every edge it guards: name lengths, the largest ids, sizes
    and times a ustar field holds, whole and sub-second mtimes (trailing zeros dropped) and
    the mtime of the 1970 epoch; entries past an edge go the general way."""
    rng = random.Random(11)
    names = ["f", "dir/file.txt", "a" * 99, "b" * 100, "c" * 101, "d/" * 60 + "e", "caf\u00e9"]
    names += ["".join(rng.choice("abc/._-") for _ in range(rng.randint(1, 120))) for _ in range(50)]
    mtimes: list[tuple[int, int | None]] = [(0, None), (1, None), (0o77777777777, None)]
    mtimes += [(0, ns) for ns in (0, 1, 10**9, 1_796_102_114_142_124_280, 1_796_102_114_1 * 10**8)]
    mtimes += [(0, 0o77777777777 * 10**9 + 5), (0, 0o100000000000 * 10**9), (0, -1), (-5, None)]
    mtimes += [(0, rng.randrange(10**19)) for _ in range(30)]
    numbers = [(0o644, 0, 0, 0), (0o7777 | 0o170000, 0o7777777, 0o7777777, 0o77777777777)]
    numbers += [(0o755, 0o10000000, 5, 1), (0o600, 7, 0o10000000, 2), (0o644, 0, 0, 1 << 34)]
    for name in names:
        for typeflag in (REGTYPE, DIRTYPE):
            for mtime, mtime_ns in mtimes:
                for mode, uid, gid, size in numbers:
                    got = encode_header(
                        name, typeflag, mode=mode, uid=uid, gid=gid, size=size, mtime=mtime,
                        mtime_ns=mtime_ns,
                    )  # fmt: skip
                    want = _general_header(
                        name.encode(), typeflag, mode, uid, gid, size, mtime, mtime_ns, "", 0, 0,
                        (),
                    )  # fmt: skip
                    assert got == want, (name, typeflag, mtime, mtime_ns, mode, uid, gid, size)


def test_empty_archives_and_the_end_marker() -> None:
    # the empty layer, a 0-byte layer.tar (old `docker save`, moby#18170) and one zero block
    # at the end of input (Go's archive/tar) are all empty archives
    for data in (b"\0" * 1024, b"", b"\0" * 512):
        assert _read_all(data) == []
    # after the end marker anything may follow, as Docker ignores it
    assert len(_read_all(_good() + b"trailing bytes")) == 3
    # a lone zero block followed by more entries is not an end: refused, not cut short
    with pytest.raises(ArchiveError, match="lone zero block at byte 0"):
        _read_all(b"\0" * 512 + _good())


def test_writer_is_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_rich(src)
    assert _write_tree(src) == _write_tree(src)


def test_pax_record_lengths_count_their_own_digits() -> None:
    """Each record's length is its whole size, digits included, and the shortest that is (as
    Go and GNU tar write it): after " path=" and the newline, a value of 90 bytes makes a
    body of 97, a record of 99 (100 would count itself too); one of 91 a body of 98, which
    takes 101."""
    assert _pax_record("path", b"x" * 90).startswith(b"99 path=")
    assert _pax_record("path", b"x" * 91).startswith(b"101 path=")
    for n in range(10_010):
        record = _pax_record("path", b"x" * n)
        length, _, rest = record.partition(b" ")
        assert rest == b"path=" + b"x" * n + b"\n"
        body = len(rest) + 1  # the space after the length
        shortest = next(size for size in range(body, body + 12) if size == body + len(str(size)))
        assert int(length) == len(record) == shortest, n


@pytest.mark.parametrize(
    ("mtime_ns", "pax_mtime"),
    [
        (1_796_102_114_142_124_280, "1796102114.14212428"),  # trailing zeros dropped
        (1_796_102_114_000_000_001, "1796102114.000000001"),
        (1_796_102_114_000_000_000, None),  # whole seconds: the ustar field alone
        (1, "0.000000001"),
        (-1, "-0.000000001"),
        (-1_500_000_000, "-1.5"),
    ],
)
def test_sub_second_mtimes_as_go_writes_them(mtime_ns: int, pax_mtime: str | None) -> None:
    header = encode_header("f", REGTYPE, mode=0o644, mtime_ns=mtime_ns)
    with tarfile.open(fileobj=io.BytesIO(header + bytes(1024))) as tf:
        (member,) = tf.getmembers()
    assert member.pax_headers.get("mtime") == pax_mtime
    if pax_mtime is None:
        assert member.mtime == mtime_ns // 10**9


@pytest.mark.parametrize(
    "case",
    ["size-base256-huge", "size-base256-negative", "uid-base256-negative", "pax-size-huge",
     "pax-uid-huge", "pax-mtime-huge", "pax-path-nul"],
)  # fmt: skip
def test_numbers_no_file_can_have_are_refused_for_what_they_are(case: str) -> None:
    """The hostile tars of numbers out of range are refused as such (a huge size was also
    refused before, as a truncated tar, which said nothing of why)."""
    data, _error = hostile_tars()[case]
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    try:
        with pytest.raises(ArchiveError, match=r"out of range|holds a NUL byte"):
            list(TarReader(r))
    finally:
        os.close(r)


@pytest.mark.parametrize("field", [b"-5", b"+7", b"1_0", b"89", b"12 3", b"0x1f"])
def test_a_number_field_is_octal_digits_alone(field: bytes) -> None:
    """int() takes a sign and "_": a header field with them (or anything but octal digits,
    padding and a NUL) is refused, as the C header path refuses it too."""
    with pytest.raises(ArchiveError, match="corrupt tar header: size field"):
        number(field.ljust(12, b"\0"), "size")
    assert number(b"0000644 \0", "mode") == 0o644 and number(b"17\0junk", "x") == 0o17


@pytest.mark.parametrize("regions", [[(0, -5), (10, 13)], [(-4, 4), (0, 4)]])
def test_a_sparse_map_with_a_negative_number_is_refused(regions: list[tuple[int, int]]) -> None:
    """A signed base-256 offset or length made a map that passed the checks: with records
    kept, "internal error"; without, write_regions looped for ever on the negative length."""
    with pytest.raises(ArchiveError, match="negative"):
        sparse.check_map(regions, 100, 8, "f")


def test_the_end_of_input_at_a_header_ends_the_archive_but_not_after_an_extension() -> None:
    """A tar without its end-of-archive marker is read to its last entry, as Go's archive/tar
    (dockerd) reads it; the input ending inside an entry, or after an extended header that
    has no entry yet, is still truncated."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("a", "b" * 120):  # b's long name: a PAX header before its entry
            info = tarfile.TarInfo(name)
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
    data = buf.getvalue()
    end = len(data.rstrip(b"\0"))
    end += -end % 512
    assert [(n, body) for n, _t, body in _read_all(data[:end])] == [
        ("a", b"abc"),
        ("b" * 120, b"abc"),
    ]
    with pytest.raises(ArchiveError, match="truncated tar: input ended inside"):
        _read_all(data[: end - 100])
    after_pax = 1024 + 1024  # a's header and data, then b's PAX header and its data
    with pytest.raises(ArchiveError, match="ended after an extended header"):
        _read_all(data[:after_pax])
