"""Tar headers, parsed: numbers in octal or base-256, the header checksum, PAX records (with
GNU sparse 0.0's repeated ones gathered), and the entry a header block and the extension
headers before it describe. The streaming reader (:mod:`.tar_reader`) calls these."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ArchiveError
from . import sparse
from .tar import AREGTYPE, BLKTYPE, CHRTYPE, DIRTYPE, MAX_SIZE, TarEntry, byte_sum, number


def checksum_ok(block: bytes) -> bool:
    stored = block[148:156].split(b"\0", 1)[0].strip(b" ")
    if not stored:
        return False
    try:
        want = int(stored, 8)
    except ValueError:
        return False
    # the checksum counts its own field as eight spaces
    unsigned = byte_sum(block) - sum(block[148:156]) + 256
    if want == unsigned:
        return True
    signed = sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 256
    return want == signed


@dataclass(slots=True)
class Extensions:
    """What PAX and GNU long-name headers say about the entry that follows them."""

    pax: dict[str, bytes] = field(default_factory=dict)
    longname: bytes | None = None
    longlink: bytes | None = None


def pax_int(value: bytes, what: str) -> int:
    if not value.isdigit():
        raise ArchiveError(f"corrupt PAX {what} record {value[:40]!r}")
    return int(value)


def pax_time(value: bytes) -> int:
    """Nanoseconds of a PAX time ("1700000000.123456789", maybe negative)."""
    whole, _, frac = value.partition(b".")
    negative = whole.startswith(b"-")
    digits = whole[1:] if negative else whole
    if not (digits + frac).isdigit():  # also refuses "", "-" and "."
        raise ArchiveError(f"corrupt PAX time {value[:40]!r}")
    ns = int(digits or b"0") * 10**9 + int(frac[:9].ljust(9, b"0") or b"0")
    return -ns if negative else ns


def parse_pax(data: bytes) -> dict[str, bytes]:
    """The records of a PAX header; sparse format 0.0's repeated offset/numbytes records are
    gathered, in order, into one ``GNU.sparse.map`` as format 0.1 writes it."""
    out: dict[str, bytes] = {}
    sparse_numbers: list[bytes] = []
    pos, size = 0, len(data)
    while pos < size and data[pos]:
        space = data.find(b" ", pos)
        if space < 0:
            raise ArchiveError("corrupt PAX header")
        try:
            end = pos + int(data[pos:space])
        except ValueError:
            raise ArchiveError("corrupt PAX header length") from None
        equals = data.find(b"=", space + 1, end)
        if end <= pos or end > size or data[end - 1] != 10 or equals < 0:
            raise ArchiveError("corrupt PAX header record")
        name = data[space + 1 : equals].decode("utf-8", "surrogateescape")
        if name in SPARSE_00:
            sparse_numbers.append(data[equals + 1 : end - 1])
            sparse.check_count(len(sparse_numbers) // 2, None)
        else:
            out[name] = data[equals + 1 : end - 1]
        pos = end
    if sparse_numbers:
        out["GNU.sparse.map"] = b",".join(sparse_numbers)
    return out


SPARSE_00 = frozenset(("GNU.sparse.offset", "GNU.sparse.numbytes"))


def header_entry(
    block: bytes, typeflag: bytes, size: int, ext: Extensions, pax: dict[str, bytes]
) -> TarEntry:
    """The entry of a header block and the PAX records and GNU long names before it."""
    name = block[0:100].split(b"\0", 1)[0]
    if block[345] != 0 and block[257:263] == b"ustar\0":
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    link = ext.longlink or block[157:257].split(b"\0", 1)[0]
    name = ext.longname or name
    entry = TarEntry(
        name="",
        type=typeflag,
        mode=number(block[100:108], "mode") & 0o7777,
        uid=0,
        gid=0,
        size=size,
        mtime_ns=0,
    )
    if pax:
        name = pax.get("GNU.sparse.name", pax.get("path", name))
        link = pax.get("linkpath", link)
        pax_fields(entry, block, pax)
    else:
        entry.uid = number(block[108:116], "uid")
        entry.gid = number(block[116:124], "gid")
        entry.mtime_ns = number(block[136:148], "mtime") * 10**9
    if typeflag == AREGTYPE and name.endswith(b"/"):  # v7 wrote directories so (Go, tarfile)
        entry.type = DIRTYPE
    entry.name = name.decode("utf-8", "surrogateescape")
    if link:
        entry.linkname = link.decode("utf-8", "surrogateescape")
    if typeflag in (CHRTYPE, BLKTYPE):
        entry.devmajor = number(block[329:337], "devmajor")
        entry.devminor = number(block[337:345], "devminor")
    _in_range(entry, name, link)
    return entry


#: the largest file (MAX_SIZE: off_t), owner id (uid_t, but for -1: "unchanged" to chown) and device
#: number part (dev_t's major and minor) a Linux filesystem takes; a time's seconds fit
#: time_t (64 bits), and the kernel clamps them to the filesystem's own range
_MAX_ID = (1 << 32) - 2
_MAX_DEV = (1 << 32) - 1
_TIME_T = 1 << 63


def size_field(block: bytes) -> int:
    """The header's size field, refused when negative or past what a file can hold."""
    size = number(block[124:136], "size")
    if not 0 <= size <= MAX_SIZE:
        raise ArchiveError(f"corrupt tar header: size {size} is out of range")
    return size


def _in_range(entry: TarEntry, name: bytes, link: bytes) -> None:
    """Refuse numbers no file can have and names with a NUL in them (a PAX record's), in one
    line, before anything is made of them."""
    checks = (
        ("size", entry.size, 0, MAX_SIZE),
        ("uid", entry.uid, 0, _MAX_ID),
        ("gid", entry.gid, 0, _MAX_ID),
        ("mtime", entry.mtime_ns // 10**9, -_TIME_T, _TIME_T - 1),
        ("atime", (entry.atime_ns or 0) // 10**9, -_TIME_T, _TIME_T - 1),
        ("devmajor", entry.devmajor, 0, _MAX_DEV),
        ("devminor", entry.devminor, 0, _MAX_DEV),
    )
    for what, value, low, high in checks:
        if not low <= value <= high:
            unit = " s" if what.endswith("time") else ""
            raise ArchiveError(f"tar entry {entry.name!r}: {what} {value}{unit} is out of range")
    if b"\0" in name or b"\0" in link:
        raise ArchiveError(f"tar entry {entry.name!r}: its name or link target holds a NUL byte")


def pax_fields(entry: TarEntry, block: bytes, pax: dict[str, bytes]) -> None:
    """Owner, size, times and xattrs from PAX records, or the header where they have none."""
    get = pax.get
    value = get("uid")
    entry.uid = number(block[108:116], "uid") if value is None else pax_int(value, "uid")
    value = get("gid")
    entry.gid = number(block[116:124], "gid") if value is None else pax_int(value, "gid")
    value = get("size")
    if value is not None:
        entry.size = pax_int(value, "size")
    value = get("mtime")
    if value is None:
        entry.mtime_ns = number(block[136:148], "mtime") * 10**9
    else:
        entry.mtime_ns = pax_time(value)
    value = get("atime")
    if value is not None:
        entry.atime_ns = pax_time(value)
    xattrs = {k[13:]: v for k, v in pax.items() if k.startswith("SCHILY.xattr.")}
    if xattrs:
        entry.xattrs = xattrs
