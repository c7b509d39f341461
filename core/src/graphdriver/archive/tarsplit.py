"""Exact diffs: what an applied layer tar held besides the file bodies (moby and
containers/storage call it tar-split), so that ``diff`` of that layer, while it is unchanged,
gives back the very bytes that were applied.

A record is made in the apply sandbox as the tar is read: every byte the reader consumes that
does not land in a file (headers, PAX and GNU extension data, padding, a sparse map, the end
marker, anything after it, the body of an entry that is not a regular file) is kept as is; a
regular file's body is kept as a reference (its path in the layer, its size, its CRC-32 and, for
a sparse file, the regions the tar carried). After the extraction the sandbox notes, for every
path the tar touched, what the layer then held (type and mode, mtime, ctime), and which paths it
deleted or made opaque.

``diff`` uses a record only when the layer still is what apply left: every noted path has the
same type, mode, mtime and ctime, and every change the layer shows against its
parent is a path the tar touched (or a deletion it made). A ctime cannot be set back by a user,
so a file written, chmodded, relinked or swapped behind the store is caught before the first byte
is written. As a last guard each body's CRC-32 is checked while it is written. Otherwise the
diff is generated from the layer, and says why.

Layout of a record: ``MAGIC``, the length of the segments part, the segments (zstd), the check
table (zstd). Both parts are decompressed as streams; the record itself, and the sets of paths
the recorder and the checks hold, grow with the number of entries (about 100 bytes each).
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import zstandard

from ..errors import ArchiveError
from ..linux.bind import open_beneath

MAGIC = b"graphdriver-tar-split 2\n"
#: a record larger than this (compressed) is not kept: the diff is generated instead
MAX_RECORD = 256 << 20

_RAW, _BODY, _END = b"R", b"F", b"E"  # segments
_PRESENT, _GONE, _OPAQUE, _DONE = b"P", b"G", b"O", b"Z"  # check table
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_PRESENT_FIELDS = struct.Struct("<IqIqI")  # st_mode, mtime (s, ns), ctime (s, ns)
_REGION = struct.Struct("<QQ")
_BODY_FIELDS = _U32  # the path's length, then the path
_BODY_SIZES = struct.Struct("<QII")  # size, CRC-32, number of regions
_FLUSH_RAW = 1 << 20
_BATCH = 1 << 18  # bytes handed to the compressor at a time (small calls cost more than bytes)
_LEVEL = 3  # zstd: headers compress ~40x, ten times faster than zlib's default


class RecordError(ArchiveError):
    """A record that cannot be used (corrupt, edited, or not this layer's any more)."""


def _path_bytes(path: str) -> bytes:
    data = path.encode("utf-8", "surrogateescape")
    return _U32.pack(len(data)) + data


# ------------------------------------------------------------------------------ making records


class Recorder:
    """Builds a record while the sandbox extracts; the reader feeds :meth:`raw`, the extractor
    says which body went to which file, what it touched and what it removed."""

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
        self.bodies: set[str] = set()
        self.touched: set[str] = {""}
        self.gone: set[str] = set()
        self.opaque: set[str] = set()

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
        self.bodies.add(path)
        data = path.encode("utf-8", "surrogateescape")
        self._pending += _BODY + _BODY_FIELDS.pack(len(data)) + data
        if regions:
            self._pending += _BODY_SIZES.pack(size, crc, len(regions))
            self._put(b"".join(_REGION.pack(o, n) for o, n in regions))
        else:
            self._put(_BODY_SIZES.pack(size, crc, 0))

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
        """The record (None if none can be kept), once the extraction is complete; *lstat*
        reads what the layer holds at a path relative to its root."""
        if self.failed is not None:
            return None
        self._flush_raw()
        self._put(_END)
        self._compress()
        if self.failed is not None:
            return None
        segments = b"".join(self._parts) + self._z.flush()
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
        checks = zstandard.ZstdCompressor(level=_LEVEL).compress(bytes(table))
        return MAGIC + _U64.pack(len(segments)) + segments + checks


# ----------------------------------------------------------------------------- reading records


class _Inflater:
    """Reads exact byte counts from a zstd stream, a bounded piece at a time."""

    def __init__(self, data: memoryview) -> None:
        self._r = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        self._buf = b""
        self._pos = 0

    def read(self, n: int) -> bytes:
        if len(self._buf) - self._pos < n:
            rest = self._buf[self._pos :]
            parts = [rest]
            have = len(rest)
            while have < n:
                more = self._r.read(max(n - have, 1 << 16))
                if not more:
                    raise RecordError("the record is cut short")
                parts.append(more)
                have += len(more)
            self._buf, self._pos = b"".join(parts), 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def path(self) -> str:
        (n,) = _U32.unpack(self.read(4))
        if n > 1 << 20:
            raise RecordError(f"the record is corrupt (a path of {n} bytes)")
        return self.read(n).decode("utf-8", "surrogateescape")


@dataclass
class Checks:
    """What the layer held after the apply, by path relative to its root."""

    present: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    opaque: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Body:
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

    def checks(self) -> Checks:
        out = Checks()
        z = _Inflater(self._checks)
        try:
            while (tag := z.read(1)) != _DONE:
                path = z.path()
                if tag == _PRESENT:
                    mode, ms, mns, cs, cns = _PRESENT_FIELDS.unpack(z.read(_PRESENT_FIELDS.size))
                    out.present[path] = (mode, ms * 10**9 + mns, cs * 10**9 + cns)
                elif tag == _GONE:
                    out.gone.add(path)
                elif tag == _OPAQUE:
                    out.opaque.add(path)
                else:
                    raise RecordError(f"the record is corrupt (check tag {tag!r})")
        except (zstandard.ZstdError, struct.error) as exc:
            raise RecordError(f"the record is corrupt ({exc})") from None
        return out

    def segments(self) -> Iterator[bytes | Body]:
        z = _Inflater(self._segments)
        try:
            while (tag := z.read(1)) != _END:
                if tag == _RAW:
                    (n,) = _U64.unpack(z.read(8))
                    if n > _FLUSH_RAW * 2:
                        raise RecordError(f"the record is corrupt (a raw part of {n} bytes)")
                    yield z.read(n)
                elif tag == _BODY:
                    path = z.path()
                    if {"", ".", ".."} & set(path.split("/")):  # none leaves the layer
                        raise RecordError(f"the record is corrupt (a body at {path!r})")
                    (size,) = _U64.unpack(z.read(8))
                    (crc,) = _U32.unpack(z.read(4))
                    (count,) = _U32.unpack(z.read(4))
                    if count > 1 << 20:
                        raise RecordError(f"the record is corrupt ({count} sparse regions)")
                    regions = [_REGION.unpack(z.read(16)) for _ in range(count)] or None
                    yield Body(path, size, crc, regions)
                else:
                    raise RecordError(f"the record is corrupt (segment tag {tag!r})")
        except (zstandard.ZstdError, struct.error) as exc:
            raise RecordError(f"the record is corrupt ({exc})") from None


def digest(blob: bytes) -> str:
    """What the store keeps next to a record, to refuse one edited behind it."""
    return "sha256:" + hashlib.sha256(blob).hexdigest()


# ------------------------------------------------------------------------ checking and replaying


def stale(checks: Checks, root: str, changes: list[tuple[str, bool]]) -> str | None:
    """Why the layer at *root* is no longer what the record describes, or None.

    *changes* are the layer's changes against its parent: (absolute path, is a deletion).
    """
    # files first: a deleted or rewritten file is named, not the directory that holds it
    ordered = sorted(checks.present.items(), key=lambda item: stat.S_ISDIR(item[1][0]))
    for path, (mode, mtime, ctime) in ordered:
        try:
            st = os.lstat(os.path.join(root, path) if path else root)
        except FileNotFoundError:
            return f"/{path} was removed after apply-diff"
        if st.st_mode != mode:
            return f"/{path} changed type or mode after apply-diff"
        if st.st_mtime_ns != mtime or st.st_ctime_ns != ctime:  # owner, xattrs, links, data
            what = "the directory /" if stat.S_ISDIR(mode) else "/"
            return f"{what}{path} changed after apply-diff"
    for path, deleted in changes:
        rel = path.lstrip("/")
        if not deleted:
            if rel not in checks.present:
                return f"{path} changed after apply-diff"
            continue
        if rel in checks.present and rel not in checks.gone:
            return f"{path} was deleted after apply-diff"
        up = rel
        while up not in checks.gone and not (up != rel and up in checks.opaque):
            if not up:
                return f"{path} was deleted after apply-diff"
            up = up.rpartition("/")[0]
    return None


def replay(record: Record, root: str, write: Callable[[bytes | memoryview], object]) -> int:
    """Write the exact tar the record was made from, file bodies read from *root*; the bytes
    written. A body that does not match raises :class:`ArchiveError`."""
    total = 0
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for seg in record.segments():
            if isinstance(seg, bytes):
                write(seg)
                total += len(seg)
                continue
            if not seg.size:
                continue  # an empty file: nothing to read (the checks saw it is there)
            crc = 0
            # below the root, no symlink followed: the checks passed, this is belt and braces
            fd = open_beneath(root_fd, seg.path, os.O_RDONLY)
            try:
                for offset, length in seg.regions or [(0, seg.size)]:
                    left = length
                    while left:
                        chunk = os.pread(fd, min(left, 1 << 20), offset)
                        if not chunk:
                            raise ArchiveError(
                                f"exact diff: /{seg.path} is shorter than when it was applied"
                            )
                        crc = zlib.crc32(chunk, crc)
                        write(chunk)
                        offset += len(chunk)
                        left -= len(chunk)
                        total += len(chunk)
            finally:
                os.close(fd)
            if crc != seg.crc:
                raise ArchiveError(
                    f"exact diff: /{seg.path} differs from the file that was applied "
                    f"(changed behind the store); the tar written is not the layer's"
                )
    finally:
        os.close(root_fd)
    return total
