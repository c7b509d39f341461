"""Exact diffs: what an applied layer tar held besides the file bodies (moby and
containers/storage call it tar-split), so that ``diff`` of that layer, while it is unchanged,
gives back the very bytes that were applied.

A record is made in two halves. Where the tar is parsed (the parent of the apply sandbox,
:class:`SegmentRecorder`), every byte the reader consumes that does not land in a file (headers,
PAX and GNU extension data, padding, a sparse map, the end marker, anything after it, the body of
an entry that is not a regular file) is kept as is; a regular file's body is kept as a reference
(its path in the layer, its size and, for a sparse file, the regions the tar carried). Where it
is extracted (the sandbox, :class:`PathRecorder`), the paths the tar wrote, touched, deleted or
made opaque are noted, and after the extraction what the layer then held at each (type and
mode, mtime, ctime). :func:`join` makes the record of the two.

``diff`` uses a record only when the layer still is what apply left: every noted path has the
same type, mode, mtime and ctime, and every change the layer shows against its
parent is a path the tar touched (or a deletion it made). A ctime cannot be set back by a user,
so a file written, chmodded, relinked or swapped behind the store is caught before the first byte
is written. As a last guard each body's file is looked at again after it is copied (size, mtime,
ctime), which catches a write while the diff runs; where ctimes are coarse, the tar written is
hashed too and must be the layer's diffID (:func:`.exact.replay`). Otherwise the diff is
generated from the layer, and says why.

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
from . import fastpath

MAGIC = b"graphdriver-tar-split 3\n"
#: records before 3 carry each body's CRC-32, which nothing reads any more; otherwise the same
_MAGIC_2 = b"graphdriver-tar-split 2\n"
#: a record larger than this (compressed) is not kept: the diff is generated instead
MAX_RECORD = 256 << 20

_RAW, _BODY, _END = b"R", b"F", b"E"  # segments
_PRESENT, _GONE, _OPAQUE, _DONE = b"P", b"G", b"O", b"Z"  # check table
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_PRESENT_FIELDS = struct.Struct("<IqIqI")  # st_mode, mtime (s, ns), ctime (s, ns)
_REGION = struct.Struct("<QQ")
_BODY_FIELDS = struct.Struct("<QII")  # size, 0 (a CRC-32 before version 3), sparse regions
_FLUSH_RAW = 1 << 20
_BATCH = 1 << 18  # bytes handed to the compressor at a time (small calls cost more than bytes)
_LEVEL = 1  # zstd: tar headers compress ~47x at 1, faster and smaller than at 3 (43x)


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
        raw, pending = self._raw, self._pending
        if len(raw) <= _FLUSH_RAW:  # a header and padding: once per entry, kept cheap
            if raw:
                pending += _RAW
                pending += _U64.pack(len(raw))
                pending += raw
                raw.clear()
                if len(pending) >= _BATCH:
                    self._compress()
            return
        for start in range(0, len(raw), _FLUSH_RAW):  # parts the replay accepts
            part = raw[start : start + _FLUSH_RAW]
            pending += _RAW + _U64.pack(len(part))
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

    def body(self, path: str, size: int, regions: list[tuple[int, int]] | None) -> None:
        """The body of the regular file at *path* (*size* bytes of the tar, all of the file's
        data or, for a sparse file, its *regions*) is read back from the layer. Called after
        :meth:`start_body`, before or after the body passes (:meth:`file` calls it before), and
        before its padding goes to :meth:`raw` (raw parts are kept apart until the next body
        or the end, so padding already in :meth:`raw` still goes after the body)."""
        if self.failed is not None:
            return
        self.tar_size += size
        data = path.encode("utf-8", "surrogateescape")
        pending = self._pending
        pending += _BODY
        pending += _U32.pack(len(data))
        pending += data
        pending += _BODY_FIELDS.pack(size, 0, len(regions) if regions else 0)
        if regions:
            pending += b"".join(_REGION.pack(o, n) for o, n in regions)
        if len(pending) >= _BATCH:
            self._compress()

    def file(
        self, head: memoryview, path: str, size: int, regions: list[tuple[int, int]] | None
    ) -> None:
        """:meth:`raw` of *head*, :meth:`start_body` and :meth:`body` in one call: a regular
        file's entry whose header (and whatever else came since the last body) is *head*
        (once for each file of a layer: three calls cost more than their work)."""
        if self.failed is not None:
            return
        if self._raw or len(head) >= _FLUSH_RAW:  # raw parts before it, or a long header
            self.raw(head)
            self.start_body()
        elif head:  # the usual: the header alone, straight into its raw part
            self.tar_size += len(head)
            pending = self._pending
            pending += _RAW
            pending += _U64.pack(len(head))
            pending += head
        self.body(path, size, regions)

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
        #: a body's row of the table from its fstat once written (cheaper than a path's lstat
        #: at the end), dropped when the tar touches the path again
        self.written: dict[str, bytes] = {}
        self.touched: set[str] = {""}
        self.gone: set[str] = set()
        self.opaque: set[str] = set()

    def fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why

    def wrote(self, path: str, st: os.stat_result | None = None) -> None:
        """A regular file's body from the tar was written at *path*; *st*, if given, is the
        file's fstat after its last change (the table's entry, unless the tar touches it
        again)."""
        self.bodies.add(path)
        if st is not None:
            self.written[path] = _row(st)

    def touch(self, path: str) -> None:
        """*path* and the directories above it were made or changed by the tar."""
        self.written.pop(path, None)
        while path not in self.touched:
            self.touched.add(path)
            path = path.rpartition("/")[0]

    def made_file(self, path: str, st: os.stat_result) -> None:
        """:meth:`touch` and :meth:`wrote` of a regular file the tar made at *path* with its
        body, *st* its fstat once written, in one call (once for each file of a layer)."""
        head = path
        touched = self.touched
        while head not in touched:
            touched.add(head)
            head = head.rpartition("/")[0]
        self.bodies.add(path)
        self.written[path] = _row(st)

    def removed(self, path: str, was_dir: bool, *, empty: bool = False) -> None:
        """The extraction removed *path* (a whiteout, or an entry replacing it); *empty*: a
        directory that held nothing (no body of the tar below it to look for)."""
        self.gone.add(path)
        if self.failed is not None or empty:
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
        rows = self.written  # (this recorder's last use: the other paths' rows join them)
        for path in self.touched - rows.keys():  # directories, and files touched again
            try:
                rows[path] = _row(lstat(path))
            except (FileNotFoundError, NotADirectoryError):  # (a directory above replaced)
                self.gone.add(path)
        # every touched path the layer holds: one also gone (removed, then made again by
        # the tar) is both, as the checks expect
        present = sorted(self.touched & rows.keys())
        if fastpath.ENABLED:
            assert fastpath.check_rows is not None
            table = bytearray(fastpath.check_rows(present, rows, _PRESENT))
        else:
            table = bytearray().join(_PRESENT + _path_bytes(p) + rows[p] for p in present)
        for tag, paths in ((_GONE, self.gone), (_OPAQUE, self.opaque)):
            for path in sorted(paths):
                table += tag + _path_bytes(path)
        table += _DONE
        return zstandard.ZstdCompressor(level=_LEVEL).compress(bytes(table))


def _row(st: os.stat_result) -> bytes:
    """A present path's fields in the check table: type and mode, mtime, ctime."""
    mtime, ctime = divmod(st.st_mtime_ns, 10**9), divmod(st.st_ctime_ns, 10**9)
    return _PRESENT_FIELDS.pack(st.st_mode, *mtime, *ctime)


def join(segments: bytes, checks: bytes) -> bytes:
    """A record from its two parts."""
    return MAGIC + _U64.pack(len(segments)) + segments + checks


# ----------------------------------------------------------------------------- reading records


#: decompressed bytes read at a time: entries are parsed in place in a buffer this large
_PIECE = 1 << 20


class _Inflater:
    """Reads a zstd stream a bounded piece at a time, for parsers that unpack in place: the
    parser keeps the buffer and its position in locals and calls :meth:`more` only when an
    entry runs past the buffer's end (a call per entry cost more than the parsing)."""

    def __init__(self, data: memoryview) -> None:
        self._r = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)

    def more(self, buf: bytes, pos: int, n: int, exact: bool = True) -> bytes:
        """A buffer that starts with ``buf[pos:]`` and holds at least *n* bytes; with
        *exact* False, fewer when the stream ends sooner (a tag alone at the end)."""
        parts = [buf[pos:]]
        have = len(parts[0])
        while have < n:
            piece = self._r.read(max(n - have, _PIECE))
            if not piece:
                if exact:
                    raise RecordError("the record is cut short")
                break
            parts.append(piece)
            have += len(piece)
        return b"".join(parts)

    def next_entry(self, buf: bytes, pos: int, n: int) -> bytes:
        """:meth:`more` for the start of the next entry: up to *n* bytes (the stream may end
        with a tag alone), never none (the end tag is the record's last byte)."""
        out = self.more(buf, pos, n, exact=False)
        if not out:
            raise RecordError("the record is cut short")
        return out


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
    regions: list[tuple[int, int]] | None


class Record:
    """A stored record, checked for its form; :meth:`segments` streams it."""

    def __init__(self, blob: bytes) -> None:
        if not blob.startswith((MAGIC, _MAGIC_2)) or len(blob) < len(MAGIC) + 8:
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
        present, gone, opaque = out.present, out.gone, out.opaque
        z = _Inflater(self._checks)
        tags = {_PRESENT[0]: _PRESENT_FIELDS.size, _GONE[0]: 0, _OPAQUE[0]: 0}
        u32, fields, billion = _U32.unpack_from, _PRESENT_FIELDS.unpack_from, 1_000_000_000
        whole = fastpath.check_entries if fastpath.ENABLED else None
        buf, pos, have = b"", 0, 0
        try:
            while True:
                if whole is not None:  # the entries whole in buf, in C; the one it left, here
                    pos = whole(buf, pos, present, gone, opaque)
                if have - pos < 5:
                    buf, pos = z.next_entry(buf, pos, 5), 0
                    have = len(buf)
                tag = buf[pos]
                extra = tags.get(tag)
                if extra is None:
                    if tag == _DONE[0]:
                        return out
                    raise RecordError(f"the record is corrupt (check tag {bytes([tag])!r})")
                (n,) = u32(buf, pos + 1)
                if n > 1 << 20:
                    raise RecordError(f"the record is corrupt (a path of {n} bytes)")
                if have - pos < 5 + n + extra:
                    buf, pos = z.more(buf, pos, 5 + n + extra), 0
                    have = len(buf)
                path = buf[pos + 5 : pos + 5 + n].decode("utf-8", "surrogateescape")
                if extra:
                    mode, ms, mns, cs, cns = fields(buf, pos + 5 + n)
                    present[path] = (mode, ms * billion + mns, cs * billion + cns)
                else:
                    (gone if tag == _GONE[0] else opaque).add(path)
                pos += 5 + n + extra
        except (zstandard.ZstdError, struct.error) as exc:
            raise RecordError(f"the record is corrupt ({exc})") from None

    def segments(self) -> Iterator[bytes | Body]:
        """The record's parts in tar order: raw bytes, and bodies to read from the layer."""
        reader = self.segment_reader()
        while (seg := reader.next()) is not None:
            yield seg

    def segment_reader(self) -> Segments:
        """:meth:`segments` as a reader whose buffer a caller may also parse itself."""
        return Segments(self._segments)


class Segments:
    """A record's segments, one for each :meth:`next`. The decompressed bytes not parsed yet
    are ``buf[pos:]``, whole segments in place, where a faster parser may go on (and move
    *pos*): ``_fastpath.replay_run`` (raw parts and bodies ``R``/``F``, their tags a byte,
    their lengths little-endian: ``R`` u64 n, n bytes; ``F`` u32 n, n bytes of path, u64
    size, u32 0 (a CRC-32 before version 3, not read), u32 sparse regions, each u64 offset
    and u64 length; ``E`` the end)."""

    def __init__(self, data: memoryview) -> None:
        self._z = _Inflater(data)
        self.buf = b""
        self.pos = 0

    def next(self) -> bytes | Body | None:
        """The next segment, None at the record's end."""
        buf, pos = self.buf, self.pos
        z = self._z
        try:
            if len(buf) - pos < 9:
                buf, pos = z.next_entry(buf, pos, 9), 0
            tag = buf[pos]
            if tag == _RAW[0]:
                (n,) = _U64.unpack_from(buf, pos + 1)
                if n > _FLUSH_RAW * 2:
                    raise RecordError(f"the record is corrupt (a raw part of {n} bytes)")
                if len(buf) - pos < 9 + n:
                    buf, pos = z.more(buf, pos, 9 + n), 0
                self.buf, self.pos = buf, pos + 9 + n
                return buf[pos + 9 : pos + 9 + n]
            if tag == _BODY[0]:
                (n,) = _U32.unpack_from(buf, pos + 1)
                if n > 1 << 20:
                    raise RecordError(f"the record is corrupt (a path of {n} bytes)")
                head = 5 + _BODY_FIELDS.size  # a body's tag, path length and fields
                if len(buf) - pos < head + n:
                    buf, pos = z.more(buf, pos, head + n), 0
                path = buf[pos + 5 : pos + 5 + n].decode("utf-8", "surrogateescape")
                size, _crc, count = _BODY_FIELDS.unpack_from(buf, pos + 5 + n)  # CRC-32 < v3
                pos += head + n
                regions = None
                if count:
                    buf, pos, regions = _regions(z, buf, pos, count)
                self.buf, self.pos = buf, pos
                return _body(path, size, regions)
            if tag == _END[0]:
                self.buf, self.pos = buf, pos
                return None
            raise RecordError(f"the record is corrupt (segment tag {bytes([tag])!r})")
        except (zstandard.ZstdError, struct.error) as exc:
            raise RecordError(f"the record is corrupt ({exc})") from None


def _regions(
    z: _Inflater, buf: bytes, pos: int, count: int
) -> tuple[bytes, int, list[tuple[int, int]]]:
    """A sparse body's *count* regions at *pos*: (buffer, position after them, regions)."""
    if count > 1 << 20:
        raise RecordError(f"the record is corrupt ({count} sparse regions)")
    size = count * _REGION.size
    if len(buf) - pos < size:
        buf, pos = z.more(buf, pos, size), 0
    regions: list[tuple[int, int]] = list(_REGION.iter_unpack(buf[pos : pos + size]))
    return buf, pos + size, regions


def _body(path: str, size: int, regions: list[tuple[int, int]] | None) -> Body:
    slashed = f"/{path}/"
    if "//" in slashed or ("/." in slashed and ("/./" in slashed or "/../" in slashed)):
        raise RecordError(f"the record is corrupt (a body at {path!r})")  # none leaves the layer
    return _new_body(Body, (path, size, regions))


#: a Body made without NamedTuple's Python-level __new__ (a call per body)
_new_body = tuple.__new__


def digest(blob: bytes) -> str:
    """What the store keeps next to a record, to refuse one edited behind it."""
    return "sha256:" + hashlib.sha256(blob).hexdigest()


# ------------------------------------------------------------------------ checking and replaying
