"""Exact diffs: what an applied layer tar held besides the file bodies (moby and
containers/storage call it tar-split), so that ``diff`` of that layer, while it is unchanged,
gives back the very bytes that were applied.

A record is made in two halves. Where the tar is parsed (the parent of the apply sandbox,
:class:`SegmentRecorder`), every byte the reader consumes that does not land in a file (headers,
PAX and GNU extension data, padding, a sparse map, the end marker, anything after it, the body of
an entry that is not a regular file) is kept as is; a regular file's body is kept as a reference
(its path in the layer, its size, its CRC-32 and, for a sparse file, the regions the tar
carried). Where it is extracted (the sandbox, :class:`PathRecorder`), the paths the tar wrote,
touched, deleted or made opaque are noted, and after the extraction what the layer then held at
each (type and mode, mtime, ctime). :func:`join` makes the record of the two.

``diff`` uses a record only when the layer still is what apply left: every noted path has the
same type, mode, mtime and ctime, and every change the layer shows against its
parent is a path the tar touched (or a deletion it made). A ctime cannot be set back by a user,
so a file written, chmodded, relinked or swapped behind the store is caught before the first byte
is written. As a last guard each body's file is looked at again after it is copied (size, mtime,
ctime), which catches a write while the diff runs. Otherwise the diff is generated from the
layer, and says why.

Layout of a record: ``MAGIC``, the length of the segments part, the segments (zstd), the check
table (zstd). Both parts are decompressed as streams; the record itself, and the sets of paths
the recorder and the checks hold, grow with the number of entries (about 100 bytes each).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import zstandard

from ..errors import ArchiveError

MAGIC = b"graphdriver-tar-split 2\n"
#: a record larger than this (compressed) is not kept: the diff is generated instead
MAX_RECORD = 256 << 20

_RAW, _BODY, _END = b"R", b"F", b"E"  # segments
_PRESENT, _GONE, _OPAQUE, _DONE = b"P", b"G", b"O", b"Z"  # check table
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_PRESENT_FIELDS = struct.Struct("<IqIqI")  # st_mode, mtime (s, ns), ctime (s, ns)
_REGION = struct.Struct("<QQ")
_BODY_FIELDS = struct.Struct("<QII")  # size, CRC-32, number of sparse regions
_FLUSH_RAW = 1 << 20
_BATCH = 1 << 18  # bytes handed to the compressor at a time (small calls cost more than bytes)
_LEVEL = 3  # zstd: headers compress ~40x, ten times faster than zlib's default


class RecordError(ArchiveError):
    """A record that cannot be used (corrupt, edited, or not this layer's any more)."""


def _path_bytes(path: str) -> bytes:
    data = path.encode("utf-8", "surrogateescape")
    return _U32.pack(len(data)) + data


# ------------------------------------------------------------------------------ making records


class SegmentRecorder:
    """The segments of a record, built where the tar is parsed (the parent of the apply
    sandbox): the reader feeds :meth:`raw`, and each regular file's body that the sandbox
    writes is noted with :meth:`body`."""

    def __init__(self) -> None:
        self._z = zstandard.ZstdCompressor(level=_LEVEL).compressobj()
        self._parts: list[bytes] = []
        self._stored = 0
        self._pending = bytearray()
        self._raw = bytearray()
        #: why no record can be kept (None while it can)
        self.failed: str | None = None
        #: bytes of the tar the record accounts for
        self.tar_size = 0

    def fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            self._parts.clear()
            self._pending.clear()
            self._raw.clear()

    def raw(self, data: bytes | memoryview) -> None:
        """Bytes of the tar kept as they are."""
        if self.failed is not None:
            return
        self.tar_size += len(data)
        self._raw += data
        if len(self._raw) >= _FLUSH_RAW:
            self._flush_raw()

    def _flush_raw(self) -> None:
        raw = self._raw
        for start in range(0, len(raw), _FLUSH_RAW):  # parts the replay accepts
            part = raw[start : start + _FLUSH_RAW]
            self._pending += _RAW + _U64.pack(len(part))
            self._put(part)
        raw.clear()

    def _put(self, data: bytes | bytearray) -> None:
        self._pending += data
        if len(self._pending) >= _BATCH:
            self._compress()

    def _compress(self) -> None:
        out = self._z.compress(bytes(self._pending))
        self._pending.clear()
        if out:
            self._parts.append(out)
            self._stored += len(out)
            if self._stored > MAX_RECORD:
                self.fail(f"its record would take more than {MAX_RECORD >> 20} MiB")

    def start_body(self) -> None:
        """A regular file's body comes next: what was read before it goes before it."""
        if self.failed is None:
            self._flush_raw()

    def body(self, path: str, size: int, crc: int, regions: list[tuple[int, int]] | None) -> None:
        """The body of the regular file at *path* (*size* bytes of the tar, all of the file's
        data or, for a sparse file, its *regions*) is read back from the layer. Called after
        :meth:`start_body` and the body, whose padding :meth:`raw` may already hold (it goes
        after the body)."""
        if self.failed is not None:
            return
        self.tar_size += size
        data = path.encode("utf-8", "surrogateescape")
        self._pending += _BODY + _U32.pack(len(data)) + data
        if regions:
            self._pending += _BODY_FIELDS.pack(size, crc, len(regions))
            self._put(b"".join(_REGION.pack(o, n) for o, n in regions))
        else:
            self._put(_BODY_FIELDS.pack(size, crc, 0))

    def finish(self) -> bytes | None:
        """The segments part of the record (None if none can be kept), once the tar is read."""
        if self.failed is not None:
            return None
        self._flush_raw()
        self._put(_END)
        self._compress()
        if self.failed is not None:
            return None
        return b"".join(self._parts) + self._z.flush()


class PathRecorder:
    """The check table of a record, built where the tar is extracted (the apply sandbox):
    which paths the tar wrote, touched, removed or made opaque, and then what the layer holds
    at each of them."""

    def __init__(self) -> None:
        #: why no record can be kept (None while it can)
        self.failed: str | None = None
        self.bodies: set[str] = set()
        self.touched: set[str] = {""}
        self.gone: set[str] = set()
        self.opaque: set[str] = set()

    def fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why

    def wrote(self, path: str) -> None:
        """A regular file's body from the tar was written at *path*."""
        self.bodies.add(path)

    def touch(self, path: str) -> None:
        """*path* and the directories above it were made or changed by the tar."""
        while path not in self.touched:
            self.touched.add(path)
            path = path.rpartition("/")[0]

    def removed(self, path: str, was_dir: bool) -> None:
        """The extraction removed *path* (a whiteout, or an entry replacing it)."""
        self.gone.add(path)
        if self.failed is not None:
            return
        prefix = path + "/"  # a body under *path* touched it: one the tar never named has none
        if path in self.bodies or (
            was_dir and path in self.touched and any(b.startswith(prefix) for b in self.bodies)
        ):
            self.fail(f"a file of the tar under {path!r} is replaced later in the same tar")

    def made_opaque(self, path: str) -> None:
        self.opaque.add(path)

    def finish(self, lstat: Callable[[str], os.stat_result]) -> bytes | None:
        """The check table (None if no record can be kept), once the extraction is complete;
        *lstat* reads what the layer holds at a path relative to its root."""
        if self.failed is not None:
            return None
        table = bytearray()
        for path in sorted(self.touched):
            try:
                st = lstat(path)
            except FileNotFoundError:
                self.gone.add(path)
                continue
            table += _PRESENT + _path_bytes(path)
            mtime, ctime = divmod(st.st_mtime_ns, 10**9), divmod(st.st_ctime_ns, 10**9)
            table += _PRESENT_FIELDS.pack(st.st_mode, *mtime, *ctime)
        for tag, paths in ((_GONE, self.gone), (_OPAQUE, self.opaque)):
            for path in sorted(paths):
                table += tag + _path_bytes(path)
        table += _DONE
        return zstandard.ZstdCompressor(level=_LEVEL).compress(bytes(table))


def join(segments: bytes, checks: bytes) -> bytes:
    """A record from its two parts."""
    return MAGIC + _U64.pack(len(segments)) + segments + checks


# ----------------------------------------------------------------------------- reading records


class _Inflater:
    """Reads a zstd stream a bounded piece at a time, for parsers that unpack in place."""

    def __init__(self, data: memoryview) -> None:
        self._r = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        self._buf = b""
        self._pos = 0

    def _fill(self, n: int) -> None:
        rest = self._buf[self._pos :]
        parts = [rest]
        have = len(rest)
        while have < n:
            more = self._r.read(max(n - have, 1 << 20))
            if not more:
                break
            parts.append(more)
            have += len(more)
        self._buf, self._pos = b"".join(parts), 0

    def peek(self, n: int) -> tuple[bytes, int]:
        """The buffer and where the next bytes start in it, at least *n* of them unless the
        stream ends sooner; nothing is consumed."""
        if len(self._buf) - self._pos < n:
            self._fill(n)
        return self._buf, self._pos

    def take(self, n: int) -> tuple[bytes, int]:
        """Consume *n* bytes: the buffer that holds them and where they start in it (for
        ``unpack_from``, which then copies nothing)."""
        if len(self._buf) - self._pos < n:
            self._fill(n)
            if len(self._buf) < n:
                raise RecordError("the record is cut short")
        pos = self._pos
        self._pos = pos + n
        return self._buf, pos


def _tagged(z: _Inflater) -> tuple[bytes, int, bytes, int]:
    """The next entry's tag, and, unless it is a tag alone at the end, the buffer and the
    position of what follows its 4- or 8-byte length, and that length (an entry is peeked,
    then taken whole)."""
    buf, pos = z.peek(9)
    tag = buf[pos : pos + 1]
    if not tag:
        raise RecordError("the record is cut short")
    if tag in (_END, _DONE):
        return tag, 0, b"", 0
    if tag == _RAW:
        (n,) = _U64.unpack_from(buf, pos + 1)
        if n > _FLUSH_RAW * 2:
            raise RecordError(f"the record is corrupt (a raw part of {n} bytes)")
        return tag, n, *z.take(9 + n)
    (n,) = _U32.unpack_from(buf, pos + 1)
    if n > 1 << 20:
        raise RecordError(f"the record is corrupt (a path of {n} bytes)")
    return tag, n, buf, pos


@dataclass
class Checks:
    """What the layer held after the apply, by path relative to its root."""

    present: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    opaque: set[str] = field(default_factory=set)


class Body(NamedTuple):
    """A regular file's body: read back from the layer at *path*."""

    path: str
    size: int
    crc: int
    regions: list[tuple[int, int]] | None


class Record:
    """A stored record, checked for its form; :meth:`segments` streams it."""

    def __init__(self, blob: bytes) -> None:
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 8:
            raise RecordError("the record is not a graphdriver tar-split record")
        (seg_len,) = _U64.unpack_from(blob, len(MAGIC))
        start = len(MAGIC) + 8
        if start + seg_len > len(blob):
            raise RecordError("the record is cut short")
        view = memoryview(blob)
        self._segments = view[start : start + seg_len]
        self._checks = view[start + seg_len :]
        self._parsed: Checks | None = None

    def checks(self) -> Checks:
        """The check table (parsed once)."""
        if self._parsed is None:
            self._parsed = self._read_checks()
        return self._parsed

    def _read_checks(self) -> Checks:
        out = Checks()
        z = _Inflater(self._checks)
        fields = _PRESENT_FIELDS.size
        try:
            while (tagged := _tagged(z))[0] != _DONE:
                tag, n, buf, pos = tagged
                if tag == _PRESENT:
                    buf, pos = z.take(5 + n + fields)
                    path = buf[pos + 5 : pos + 5 + n].decode("utf-8", "surrogateescape")
                    mode, ms, mns, cs, cns = _PRESENT_FIELDS.unpack_from(buf, pos + 5 + n)
                    out.present[path] = (mode, ms * 10**9 + mns, cs * 10**9 + cns)
                elif tag in (_GONE, _OPAQUE):
                    buf, pos = z.take(5 + n)
                    path = buf[pos + 5 : pos + 5 + n].decode("utf-8", "surrogateescape")
                    (out.gone if tag == _GONE else out.opaque).add(path)
                else:
                    raise RecordError(f"the record is corrupt (check tag {tag!r})")
        except (zstandard.ZstdError, struct.error) as exc:
            raise RecordError(f"the record is corrupt ({exc})") from None
        return out

    def segments(self) -> Iterator[bytes | Body]:
        """The record's parts in tar order: raw bytes, and bodies to read from the layer."""
        z = _Inflater(self._segments)
        try:
            while (tagged := _tagged(z))[0] != _END:
                tag, n, buf, pos = tagged
                if tag == _RAW:
                    yield buf[pos + 9 : pos + 9 + n]
                elif tag == _BODY:
                    yield _body(z, n)
                else:
                    raise RecordError(f"the record is corrupt (segment tag {tag!r})")
        except (zstandard.ZstdError, struct.error) as exc:
            raise RecordError(f"the record is corrupt ({exc})") from None


def _body(z: _Inflater, n: int) -> Body:
    """A body entry whose path has *n* bytes (tag and length peeked, not taken)."""
    buf, pos = z.take(5 + n + _BODY_FIELDS.size)
    pos += 5
    path = buf[pos : pos + n].decode("utf-8", "surrogateescape")
    slashed = f"/{path}/"
    if "//" in slashed or "/./" in slashed or "/../" in slashed:  # none leaves the layer
        raise RecordError(f"the record is corrupt (a body at {path!r})")
    size, crc, count = _BODY_FIELDS.unpack_from(buf, pos + n)
    regions = None
    if count:
        if count > 1 << 20:
            raise RecordError(f"the record is corrupt ({count} sparse regions)")
        regions = [_REGION.unpack_from(*z.take(_REGION.size)) for _ in range(count)]
    return Body(path, size, crc, regions)


def digest(blob: bytes) -> str:
    """What the store keeps next to a record, to refuse one edited behind it."""
    return "sha256:" + hashlib.sha256(blob).hexdigest()


# ------------------------------------------------------------------------ checking and replaying
