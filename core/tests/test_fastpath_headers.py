"""The tar reader's plain headers in C (``_fastpath.ustar_entry``): every header, with the
one PAX header before it, that it reads gives the entry the Python reader gives, and every one
it would read otherwise (GNU extensions, GNU sparse, base-256 and odd numbers, unknown types,
PAX records it does not know to be well formed) is left to the Python reader, which gives the
same entry or the same error as without the C."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
from test_fastpath import _needs_the_c_loops

from graphdriver.archive import fastpath
from graphdriver.archive.tar import TarEntry
from graphdriver.archive.tar_reader import TarReader
from graphdriver.errors import ArchiveError

MTIME = 1_700_000_000


def _info(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, 0o644, MTIME
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def _blocks(info: tarfile.TarInfo, fmt: int) -> bytes:
    return info.tobuf(fmt, "utf-8", "surrogateescape")


def _with_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _edit(info: tarfile.TarInfo, at: int, field: bytes) -> bytes:
    block = bytearray(_blocks(info, tarfile.USTAR_FORMAT))
    block[at : at + len(field)] = field
    return _with_checksum(block)


def _record(key: bytes, value: bytes) -> bytes:
    body = b" %s=%s\n" % (key, value)
    n = len(body) + len(str(len(body)))
    return b"%d%s" % (n + (len(str(n)) > len(str(len(body)))), body)


def _pax(records: bytes, info: tarfile.TarInfo) -> bytes:
    """A PAX header holding *records* (as they are), then *info*'s header."""
    head = _blocks(_info("PaxHeaders/x", tarfile.XHDTYPE, size=len(records)), 1)
    return head + records.ljust(-(-len(records) // 512) * 512, b"\0") + _blocks(info, 1)


def _c_reads(blocks: bytes) -> bool:
    """Whether the C reads the entry at the start of *blocks*, by ``ustar_entry`` and by
    ``next_entry`` alike (the reader's buffer: the same fields, its header bytes consumed, and
    nothing of an entry whose headers are not all in the buffer)."""
    assert fastpath.ustar_entry is not None and fastpath.next_entry is not None
    if blocks[156:157] != tarfile.XHDTYPE:
        entry, fields = 0, fastpath.ustar_entry(blocks[:512], None)
    else:
        size = int(blocks[124:136].strip(b" \0"), 8)
        entry = 512 + -(-size // 512) * 512
        fields = fastpath.ustar_entry(blocks[entry : entry + 512], blocks[512 : 512 + size])
    buf = memoryview(bytearray(b"junk" * 128 + blocks + b"\0" * 1024))
    found = fastpath.next_entry(buf, 512, len(buf))
    assert found == (None if fields is None else (fields, entry + 512))
    assert fastpath.next_entry(buf, 512, 512 + entry + 511) is None  # a header cut short
    return fields is not None


def _read(data: bytes, fast: bool, monkeypatch: pytest.MonkeyPatch) -> list[TarEntry]:
    monkeypatch.setattr(fastpath, "ENABLED", fast)
    r, w = os.pipe()
    os.close(w)
    entries = []
    with io.BytesIO(data) as src:
        reader = TarReader(r, readinto=src.readinto)
        for entry in reader:
            reader.skip()
            entries.append(entry)
    os.close(r)
    return entries


# (header blocks, whether the C reads it)
CASES: dict[str, tuple[bytes, bool]] = {
    "file": (_blocks(_info("etc/passwd", size=0), tarfile.USTAR_FORMAT), True),
    # v7's type: a directory where the name ends in '/', which the Python reader makes
    "old-style regular (typeflag NUL)": (_blocks(_info("a", tarfile.AREGTYPE), 1), True),
    "old-style directory (typeflag NUL, a '/' last)": (
        _blocks(_info("d/", tarfile.AREGTYPE), 1),
        False,
    ),
    "contiguous": (_blocks(_info("c", tarfile.CONTTYPE), tarfile.USTAR_FORMAT), True),
    "directory": (_blocks(_info("usr/lib/", tarfile.DIRTYPE), tarfile.USTAR_FORMAT), True),
    "symlink": (
        _blocks(_info("bin", tarfile.SYMTYPE, linkname="usr/bin"), tarfile.USTAR_FORMAT),
        True,
    ),
    "hard link": (_blocks(_info("b", tarfile.LNKTYPE, linkname="a"), tarfile.USTAR_FORMAT), True),
    "char device": (
        _blocks(_info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), 1),
        True,
    ),
    "block device": (_blocks(_info("sda", tarfile.BLKTYPE, devmajor=8, devminor=0), 1), True),
    "fifo": (_blocks(_info("p", tarfile.FIFOTYPE, uid=1000, gid=1000), 1), True),
    "file type bits in the mode field": (_edit(_info("s"), 100, b"0106755\0"), True),
    "ustar prefix": (_blocks(_info("d" * 120 + "/" + "f" * 90), tarfile.USTAR_FORMAT), True),
    "GNU magic keeps the prefix out": (
        _edit(_info("gnu-file"), 257, b"ustar  \0" + b"\0" * 80 + b"pre\0"),
        True,
    ),
    "invalid UTF-8 name": (_blocks(_info("caf\udce9"), tarfile.USTAR_FORMAT), True),
    "non-ASCII name": (_blocks(_info("café"), tarfile.USTAR_FORMAT), True),
    "spaces around the digits": (_edit(_info("sp"), 100, b" 644   \0"), True),
    "an empty size field": (_edit(_info("e"), 124, b"\0" * 12), False),
    "a digit 8": (_edit(_info("eight"), 100, b"0000648\0"), False),
    "base-256 uid": (_blocks(_info("big", uid=1 << 30), tarfile.GNU_FORMAT), False),
    "a time past 2255": (_edit(_info("late"), 136, b"777777777777"), False),
    "a negative time": (_blocks(_info("early", mtime=-1), tarfile.GNU_FORMAT), False),
    "GNU long name": (_blocks(_info("l" * 120), tarfile.GNU_FORMAT), False),
    "PAX path and times, as tarfile writes them": (
        _blocks(_info("p" * 120, pax_headers={"atime": "1.25"}), tarfile.PAX_FORMAT),
        True,
    ),
    "PAX records as GNU tar --format=posix writes them": (
        _pax(
            _record(b"mtime", b"1700000000.123456789")
            + _record(b"atime", b"1700000001.5")
            + _record(b"ctime", b"1700000002")
            + _record(b"uid", b"4294967294")
            + _record(b"gid", b"65534"),
            _info("usr/bin/x", uid=0o7777777),
        ),
        True,
    ),
    "PAX linkpath, size and a time before 1970": (
        _pax(
            _record(b"linkpath", b"t" * 200) + _record(b"size", b"0") + _record(b"mtime", b"-1.5"),
            _info("l", tarfile.SYMTYPE, linkname="short"),
        ),
        True,
    ),
    "PAX xattrs with any bytes": (
        _pax(
            _record(b"SCHILY.xattr.user.a", b"x=\n\0\xff")
            + _record(b"SCHILY.xattr.security.capability", b"\x01\x00\x00\x02")
            + _record(b"SCHILY.xattr.", b"empty name"),
            _info("f"),
        ),
        True,
    ),
    "PAX records given twice, the last one counts": (
        _pax(_record(b"uid", b"5") + _record(b"path", b"a") + _record(b"uid", b"6"), _info("f")),
        True,
    ),
    "PAX records read by nobody": (
        _pax(_record(b"hdrcharset", b"BINARY") + _record(b"comment", b"hi"), _info("f")),
        True,
    ),
    "PAX non-UTF-8 path": (_pax(_record(b"path", b"caf\xe9"), _info("f")), True),
    "PAX time with a fraction longer than nanoseconds": (
        _pax(_record(b"mtime", b"1.1234567891234"), _info("f")),
        True,
    ),
    "PAX time of a fraction alone": (_pax(_record(b"mtime", b".5"), _info("f")), True),
    "a corrupt PAX header and then the end": (
        _pax(b"30 path=short\n", _info("f"))[:-512] + b"\0" * 1024,
        False,
    ),
    "a corrupt PAX header and then the end of input": (
        _pax(b"30 path=short\n", _info("f"))[:-512],
        False,
    ),
    "a corrupt PAX header and then a cut header": (
        _pax(b"30 path=short\n", _info("f"))[:-412],
        False,
    ),
    "a corrupt PAX header and then a bad checksum": (
        _pax(b"30 path=short\n", _info("f"))[:-512] + b"g" + _blocks(_info("f"), 1)[1:],
        False,
    ),
    "a corrupt PAX header and then a lone zero block": (
        _pax(b"30 path=short\n", _info("f"))[:-512] + b"\0" * 512 + _blocks(_info("f"), 1),
        False,
    ),
    "PAX bad uid": (_pax(_record(b"uid", b"12a"), _info("f")), False),
    "PAX empty gid": (_pax(_record(b"gid", b""), _info("f")), False),
    "PAX bad time": (_pax(_record(b"mtime", b"1.2.3"), _info("f")), False),
    "PAX time past 2255": (_pax(_record(b"mtime", b"99999999999"), _info("f")), False),
    "PAX record of a wrong length": (_pax(b"30 path=short\n", _info("f")), False),
    "PAX record without =": (_pax(b"9 pathx\n\n", _info("f")), False),
    "PAX length with a plus sign": (_pax(b"+11 path=a\n", _info("f")), False),
    "PAX GNU sparse 1.0": (
        _pax(
            _record(b"GNU.sparse.major", b"1")
            + _record(b"GNU.sparse.minor", b"0")
            + _record(b"GNU.sparse.name", b"sparse")
            + _record(b"GNU.sparse.realsize", b"1024"),
            _info("GNUSparseFile.0/sparse", size=512),
        )
        + b"1\n0\n1024\n".ljust(512, b"\0")
        + b"\0" * 512,
        False,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_header_gives_the_entry_the_python_reader_gives(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _needs_the_c_loops()
    blocks, in_c = CASES[case]
    assert _c_reads(blocks) is in_c
    # alone (its headers read by the Python path: the reader's buffer is empty at the first),
    # and after a plain entry (then in the buffer: next_entry's)
    for data in (blocks + b"\0" * 1024, _PLAIN + blocks + b"\0" * 1024):
        slow = _outcome(data, False, monkeypatch)
        assert _outcome(data, True, monkeypatch) == slow


_PLAIN = _blocks(_info("before", size=0), tarfile.USTAR_FORMAT)


def _outcome(data: bytes, fast: bool, monkeypatch: pytest.MonkeyPatch) -> object:
    """The entries read, or the error the reader gave."""
    try:
        return _read(data, fast, monkeypatch)
    except ArchiveError as exc:
        return str(exc)


def test_a_run_of_entries_reads_alike_with_extensions_between(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # plain entries around PAX and GNU extensions and a global PAX header: each extension
    # applies to its next entry only, and the globals to every entry after them
    _needs_the_c_loops()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(3):
            tf.addfile(_info(f"plain{i}", size=3), io.BytesIO(b"abc"))
            tf.addfile(_info("x" * (110 + i), size=1), io.BytesIO(b"x"))
            tf.addfile(_info(f"after{i}", pax_headers={"mtime": "1.5"}))
    plain = buf.getvalue()
    record = b"8 uid=7\n"
    globals_ = _blocks(_info("pax_global_header", tarfile.XGLTYPE, size=len(record)), 1)
    globals_ += record.ljust(512, b"\0")
    data = plain[:1024] + globals_ + plain[1024:]
    slow = _read(data, False, monkeypatch)
    fast = _read(data, True, monkeypatch)
    assert fast == slow
    assert [e.uid for e in fast][:1] == [0] and {e.uid for e in fast[1:]} == {7}
    assert fast[2].mtime_ns == 1_500_000_000 and fast[3].name == "plain1"


def test_a_bad_checksum_is_still_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _needs_the_c_loops()
    block = bytearray(_blocks(_info("f"), tarfile.USTAR_FORMAT))
    block[0:1] = b"g"
    monkeypatch.setattr(fastpath, "ENABLED", True)
    with pytest.raises(ArchiveError, match="bad header checksum"):
        _read(bytes(block) + b"\0" * 1024, True, monkeypatch)


def _checksummed(block: bytearray, field: bytes) -> bytes:
    block[148:156] = field.ljust(8, b"\0")
    return bytes(block)


def test_checksums_the_c_leaves_to_the_reader_read_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """``next_entry`` checks a header's checksum as the reader does first (the field's digits,
    the unsigned sum); any other form it leaves to the reader, which takes a signed sum (old
    tars) or a field with junk after its NUL, and refuses a wrong one: the same entries or the
    same error either way."""
    _needs_the_c_loops()
    assert fastpath.next_entry is not None
    block = bytearray(_blocks(_info("caf\udce9\udcff/\udc80x"), tarfile.USTAR_FORMAT))
    block[148:156] = b" " * 8
    unsigned = sum(block)
    signed = sum(b - 256 if b > 127 else b for b in block)
    cases = {
        b"%08o" % unsigned: True,  # eight digits, no NUL
        b"%07o\0" % unsigned: True,
        b" %06o " % unsigned: True,
        b"%06o\0x" % unsigned: False,  # junk after the NUL: the reader takes it
        b"%06o\0 " % signed: False,  # a signed sum: the reader takes it
        b"%06o\0 " % (unsigned + 1): False,  # wrong: the reader refuses it
    }
    for field, in_c in cases.items():
        data = _checksummed(bytearray(block), field) + b"\0" * 1024
        found = fastpath.next_entry(memoryview(bytearray(data)), 0, len(data))
        assert (found is not None) is in_c, field
        slow = _outcome(data, False, monkeypatch)
        assert _outcome(data, True, monkeypatch) == slow, field
        assert isinstance(slow, list) or field.startswith(b"%06o" % (unsigned + 1)), slow


def test_the_header_after_a_pax_header_has_its_checksum_checked_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A PAX header whose entry's header has a bad checksum: refused alike, at that header,
    whether the C reads the two from the buffer or the Python reader does (found in review: a
    C that checked the first header alone read it as a good entry)."""
    _needs_the_c_loops()
    assert fastpath.next_entry is not None
    entry = bytearray(_pax(_record(b"mtime", b"1.5"), _info("f")))
    entry[-512] ^= 1  # the name's first byte: the checksum no longer matches
    data = _PLAIN + bytes(entry) + b"\0" * 1024
    assert fastpath.next_entry(data, 512, len(data)) is None
    slow = _outcome(data, False, monkeypatch)
    assert slow == f"corrupt tar: bad header checksum at byte {len(_PLAIN) + len(entry) - 512}"
    assert _outcome(data, True, monkeypatch) == slow


def test_a_pax_header_over_16_mib_is_refused_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader refuses an extension header over 16 MiB; the C leaves one to it, even where
    it is all in the buffer (one long PAX header before it grew the buffer)."""
    _needs_the_c_loops()
    assert fastpath.next_entry is not None
    for size, refused in ((16 << 20, False), ((16 << 20) + 1, True)):
        records = _record(b"comment", b"c" * (size - 18))
        assert len(records) == size
        blocks = _pax(records, _info("f"))
        buf = _PLAIN + blocks + b"\0" * 1024
        found = fastpath.next_entry(buf, 512, len(buf))
        assert (found is None) is refused
        data = _PLAIN + _pax(records, _info("g")) + blocks + b"\0" * 1024
        slow = _outcome(data, False, monkeypatch)
        assert _outcome(data, True, monkeypatch) == slow
        assert (slow == "tar extension header of 16777217 bytes is too large") is refused
