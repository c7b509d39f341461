"""A streaming reader of layer tars: POSIX ustar + PAX, GNU long names, GNU sparse files
(PAX 0.0, 0.1, 1.0 and type ``S``), nanosecond PAX times.

The reader hands file data over in large slices and reports corrupt or truncated input as
:class:`~graphdriver.errors.ArchiveError`.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from zlib import adler32

from ..errors import ArchiveError
from . import fastpath, sparse
from . import tar_headers as headers
from .tar import (
    BLOCK,
    CHUNK,
    GNU_LONGLINK,
    GNU_LONGNAME,
    GNU_SPARSE,
    LNKTYPE,
    REGTYPE,
    TYPE_MODE,
    XGLTYPE,
    XHDTYPE,
    TarEntry,
    number,
)

_ZERO_BLOCK = b"\0" * BLOCK
#: bytes of the read buffer (a larger one for a longer extension header)
_BUFFER = 2 * CHUNK
#: what copy_file_range and splice say when they cannot move these bytes
_NO_MOVE = frozenset((errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF))
_EXTENSIONS = (XHDTYPE, XGLTYPE, GNU_LONGNAME, GNU_LONGLINK)
#: the most buffers one writev takes
_IOV_MAX = max(os.sysconf("SC_IOV_MAX"), 16)


def _buffer(size: int) -> memoryview:
    return memoryview(mmap.mmap(-1, size))


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until all of *data* is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_all_of(fd: int, pieces: list[bytes | memoryview]) -> None:
    """os.writev until all of *pieces* are written, in order."""
    first = 0
    while first < len(pieces):
        done = os.writev(fd, pieces[first : first + _IOV_MAX])
        while first < len(pieces) and done >= len(pieces[first]):
            done -= len(pieces[first])
            first += 1
        if done:  # a short write ended inside this one
            pieces[first] = memoryview(pieces[first])[done:]


class TarReader:
    """Reads tar entries from a file descriptor; per entry, call :meth:`write_to`,
    :meth:`data` or :meth:`skip` (or nothing: the next entry skips what is left)."""

    def __init__(self, fd: int, readinto: Callable[[memoryview], int] | None = None) -> None:
        """Reads *fd*, or calls *readinto* where one is given (it fills the start of the view
        it gets, as far as it can, and says how many bytes; 0 at the end of input)."""
        self._fd = fd
        self._move: Callable[[int, int, int], int] | None = None
        if readinto is None:
            mode = os.fstat(fd).st_mode
            self._move = (
                os.copy_file_range
                if stat.S_ISREG(mode)
                else os.splice
                if stat.S_ISFIFO(mode)
                else None
            )
            self._readinto: Callable[[memoryview], int] = lambda view: os.readv(fd, (view,))
        else:
            self._readinto = readinto
        # one buffer, read into again and again: a fresh 1 MiB bytes object per read costs
        # more in page faults than the read itself; anonymous memory, whose pages are only
        # made when first read into (a small tar touches a few)
        self._view = _buffer(_BUFFER)
        self._pos = 0  # the read position in _view
        self._end = 0  # the end of what was read into _view
        self._base = 0  # offset in the input of _view[0]
        self._tapped = 0  # _view[:_tapped] went to tap already, or was an entry's data
        self._data_left = 0  # data of the current entry not consumed yet
        self._pad = 0  # its padding
        self._globals: dict[str, bytes] = {}
        #: the input ended where a header would start, with no end-of-archive marker
        self.unmarked = False
        #: called with every byte read that is not a regular file's data (headers, extension
        #: data, padding, sparse maps, the end marker and what follows it, skipped data), in
        #: runs as long as the buffer allows, as a view the callee must copy: an exact diff's
        #: record (tarsplit.SegmentRecorder.raw); except what a caller takes itself through
        #: untapped (and then passes on with pass_data(noted=True))
        self.tap: Callable[[memoryview], None] | None = None
        #: called before the buffer is read into again (what it handed out is then
        #: overwritten): a caller that holds views of it writes them out (archive.feed)
        self.before_fill: Callable[[], None] | None = None
        #: called where a regular file's data starts, after the tap got what came before it
        #: (tarsplit.SegmentRecorder.start_body); not for a body passed with pass_data(noted=True)
        self.tap_body: Callable[[], None] | None = None

    @property
    def data_left(self) -> int:
        """Bytes of the current entry's data (as the tar carries it) not consumed yet."""
        return self._data_left

    @property
    def offset(self) -> int:
        """Bytes of the input consumed."""
        return self._base + self._pos

    def _flush_tap(self) -> None:
        if self._tapped < self._pos:
            if self.tap is not None:
                self.tap(self._view[self._tapped : self._pos])
            self._tapped = self._pos

    def _start_body(self) -> None:
        self._flush_tap()
        if self.tap_body is not None:
            self.tap_body()

    def _fill(self, n: int) -> None:
        """Make *n* bytes available at the read position (fewer at the end of input); what
        the buffer handed out before is overwritten."""
        if self.before_fill is not None:
            self.before_fill()
        self._flush_tap()
        rest = bytes(self._view[self._pos : self._end])
        if n > len(self._view):  # a long extension header: a larger buffer
            self._view = _buffer(n + CHUNK)
        view = self._view
        view[: len(rest)] = rest
        self._base += self._pos
        self._pos = self._tapped = 0
        have = len(rest)
        while have < n:
            got = self._readinto(view[have:])
            if not got:
                break
            have += got
        self._end = have

    def _read(self, n: int) -> bytes:
        """Exactly *n* bytes, or fewer at end of input."""
        end = self._pos + n
        if end > self._end:
            self._fill(n)
            end = min(n, self._end)
        out = bytes(self._view[self._pos : end])
        self._pos = end
        return out

    def _need(self, n: int, what: str) -> bytes:
        data = self._read(n)
        if len(data) != n:
            raise ArchiveError(f"truncated tar: input ended inside {what} at byte {self.offset}")
        return data

    def _pass(self, n: int, what: str) -> None:
        """Consume *n* bytes that stay in the tap (padding, skipped data)."""
        while n:
            if self._pos == self._end:
                self._fill(1)
                if not self._end:
                    raise ArchiveError(
                        f"truncated tar: input ended inside {what} at byte {self.offset}"
                    )
            take = min(n, self._end - self._pos)
            self._pos += take
            n -= take

    def __iter__(self) -> Iterator[TarEntry]:
        ext = headers.Extensions()
        extended = False  # an extension header came since the last entry (ext holds it)
        first = True
        # an entry of its header and at most one PAX header before it, read in C
        plain = fastpath.ustar_entry if fastpath.ENABLED else None
        # the same, with the checksums, straight from the buffer (None where it is not all there)
        nxt = fastpath.next_entry if fastpath.ENABLED else None
        pax: bytes | None = None  # that PAX header's data, not parsed yet (nor in ext)
        while True:
            if self._data_left or self._pad:
                self.skip()
            if nxt is not None and pax is None and not extended and not self._globals:
                found = nxt(self._view, self._pos, self._end)
                if found is not None:
                    self._pos += found[1]
                    first = False
                    entry = TarEntry(*found[0])
                    self._data_left = entry.size
                    self._pad = -entry.size % BLOCK
                    yield entry
                    continue
            try:
                block = self._header(first)
            except ArchiveError:
                if pax is not None:  # its own error first, as when it was parsed at once
                    headers.parse_pax(pax)
                raise
            if block is None:
                self._ended(pax, extended)
                return
            first = False
            if plain is not None and not extended and not self._globals:
                fields = plain(block, pax)
                if fields is not None:
                    entry = TarEntry(*fields)
                    self._data_left = entry.size
                    self._pad = -entry.size % BLOCK
                    pax = None
                    yield entry
                    continue
            if pax is not None:  # not for the C: read as it always was
                ext.pax.update(headers.parse_pax(pax))
                extended, pax = True, None
            typeflag = block[156:157]
            size = headers.size_field(block)
            if typeflag in _EXTENSIONS:
                data = self._extension_data(size)
                if plain is not None and typeflag == XHDTYPE and not extended and not self._globals:
                    pax = data
                    continue
                self._extension(typeflag, data, ext)
                extended = True
                continue
            yield self._entry(block, typeflag, size, ext)
            ext = headers.Extensions()
            extended = False

    def _ended(self, pax: bytes | None, extended: bool) -> None:
        """The archive ended: a PAX header read but not parsed (*pax*), or an extended
        header's entry never come (*extended*), with no end marker, is a truncated tar."""
        if pax is not None:
            headers.parse_pax(pax)  # a corrupt one says so, as it always did
        if self.unmarked and (pax is not None or extended):
            raise ArchiveError(
                "truncated tar: input ended after an extended header, before its entry"
            )
        self._flush_tap()

    def _header(self, first: bool) -> bytes | None:
        """The next header block, or None at the end-of-archive marker."""
        block = self._read(BLOCK)
        if not block:
            # the end of input where a header would start ends the archive, as Go's
            # archive/tar reads it (dockerd applies such a tar, and old `docker save` wrote
            # 0-byte layer.tars, moby#18170); a cut inside an entry is still refused
            self.unmarked = not first
            return None
        if len(block) != BLOCK:
            raise ArchiveError(f"truncated tar: input ended inside a header at byte {self.offset}")
        if block == _ZERO_BLOCK:
            self._end_marker()
            return None
        # the checksum counts its own field as eight spaces; the common case inline
        field8 = block[148:156]
        try:
            total = (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2
            fast_ok = int(field8.strip(b" \0"), 8) == total - sum(field8) + 256  # byte_sum
        except ValueError:
            fast_ok = False
        if not fast_ok and not headers.checksum_ok(block):
            if first:
                raise ArchiveError("not a tar archive (bad header checksum)")
            raise ArchiveError(f"corrupt tar: bad header checksum at byte {self.offset - BLOCK}")
        return block

    def _end_marker(self) -> None:
        """After a zero block: a second one, or the end of input, ends the archive (as Go's
        archive/tar reads it); a header there means the archive is corrupt."""
        block = self._read(BLOCK)
        if block and block != _ZERO_BLOCK:
            raise ArchiveError(
                f"corrupt tar: a lone zero block at byte {self.offset - len(block) - BLOCK} "
                f"is followed by more data"
            )

    def _extension_data(self, size: int) -> bytes:
        """The data of an extension header of *size* bytes, and its padding consumed."""
        if size > 16 << 20:
            raise ArchiveError(f"tar extension header of {size} bytes is too large")
        return self._need(size + (-size % BLOCK), "an extended header")[:size]

    def _extension(self, typeflag: bytes, data: bytes, ext: headers.Extensions) -> None:
        """Fold a PAX or GNU long-name header into what applies to the next entry."""
        if typeflag == XHDTYPE:
            ext.pax.update(headers.parse_pax(data))
        elif typeflag == XGLTYPE:
            self._globals.update(headers.parse_pax(data))
        elif typeflag == GNU_LONGNAME:
            ext.longname = data.split(b"\0", 1)[0]
        else:
            ext.longlink = data.split(b"\0", 1)[0]

    def _entry(self, block: bytes, typeflag: bytes, size: int, ext: headers.Extensions) -> TarEntry:
        """The entry a header block describes, with its extensions folded in."""
        pax = {**self._globals, **ext.pax} if self._globals else ext.pax
        entry = headers.header_entry(block, typeflag, size, ext, pax)
        data_left = entry.size
        if typeflag == GNU_SPARSE:
            self._gnu_sparse(entry, block)
        elif pax and ("GNU.sparse.map" in pax or "GNU.sparse.major" in pax):
            data_left = self._pax_sparse(entry, pax)
        elif typeflag not in TYPE_MODE and typeflag != LNKTYPE:
            raise ArchiveError(
                f"tar entry {entry.name!r} has unsupported type "
                f"{typeflag.decode(errors='replace')!r}"
            )
        self._data_left = data_left
        self._pad = -data_left % BLOCK  # a 1.0 map fills whole blocks: the same padding
        return entry

    def _gnu_sparse(self, entry: TarEntry, block: bytes) -> None:
        """GNU type S: a map of 4 regions in the header, 21 more per extension block."""
        regions = sparse.gnu_header_map(block, 386, 4, entry.name)
        extended = block[482]
        while extended:
            more = self._need(BLOCK, "a sparse header")
            regions += sparse.gnu_header_map(more, 0, 21, entry.name)
            sparse.check_count(len(regions), entry.name)
            extended = more[504]
        real_size = number(block[483:495], "realsize")
        sparse.check_map(regions, real_size, entry.size, entry.name)
        entry.type, entry.sparse, entry.size = REGTYPE, regions, real_size

    def _pax_sparse(self, entry: TarEntry, pax: dict[str, bytes]) -> int:
        """PAX GNU.sparse.*: the map in the header (0.0, 0.1) or at the start of the data
        (1.0); returns the bytes of data that follow the map."""
        real = pax.get("GNU.sparse.realsize", pax.get("GNU.sparse.size"))
        if real is None:
            raise ArchiveError(f"sparse file {entry.name!r} has no real size")
        real_size = headers.pax_int(real, "GNU.sparse.realsize")
        data_size = entry.size
        if pax.get("GNU.sparse.major") == b"1":
            reader = sparse.MapReader(entry.name)
            used = 0
            done = False
            while not done:
                if used >= data_size:
                    raise ArchiveError(f"sparse file {entry.name!r}: its map is cut short")
                done = reader.feed(self._need(BLOCK, "a sparse map"))
                used += BLOCK
            regions = reader.regions
            data_size -= used
        else:
            regions = sparse.pax_map(pax.get("GNU.sparse.map", b""), entry.name)
        sparse.check_map(regions, real_size, data_size, entry.name)
        entry.type, entry.sparse, entry.size = REGTYPE, regions, real_size
        return data_size

    def data(self) -> Iterator[bytes | memoryview]:
        """The current entry's data in slices, each valid until the next is asked for (the
        buffer is read into again); its padding is consumed after the last one. The data
        does not go to the tap."""
        self._start_body()
        while self._data_left:
            yield self._piece()
        self._pass(self._pad, "padding")
        self._pad = 0

    def untapped(self) -> memoryview:
        """The bytes read that the tap has not had (the current entry's header, after a
        body), now taken as had: for a caller that records them itself, along with the start
        of the data (the view is valid until the next read)."""
        view = self._view[self._tapped : self._pos]
        self._tapped = self._pos
        return view

    def pass_data(self, noted: bool = False) -> None:
        """Consume the current entry's data and its padding as :meth:`data` does (the data
        does not go to the tap), without handing it out: an apply that reads its bodies from
        the tar file itself still records where each one is. *noted*: the caller recorded
        what came before the data (:meth:`untapped`) and its start itself; neither the tap
        nor tap_body is called for them."""
        if not noted:
            self._start_body()
        end = self._pos + self._data_left
        if end <= self._end:  # the common case: all of it buffered
            self._pos = self._tapped = end
            self._data_left = 0
        while self._data_left:
            self._piece()
        self._pass(self._pad, "padding")
        self._pad = 0

    def _piece(self) -> bytes | memoryview:
        """The next slice of the current entry's data."""
        if self._pos == self._end:
            self._fill(1)
            if not self._end:
                self._truncated()
        n = min(self._end - self._pos, self._data_left)
        start = self._pos
        self._pos = self._tapped = start + n
        self._data_left -= n
        return self._view[start : start + n]

    def write_to(self, fd: int) -> None:
        """Write the current entry's data to *fd*; a large body goes from the input to *fd* in
        the kernel (copy_file_range from a file, splice from a pipe)."""
        start, left = self._pos, self._data_left
        if start + left + self._pad <= self._end:  # the common case: all of it buffered
            if self.tap is not None or self.tap_body is not None:
                self._start_body()
            end = self._pos = self._tapped = start + left
            if left:  # one write, and the rest if it was short
                body = self._view[start:end]
                done = os.write(fd, body)
                if done < left:
                    write_all(fd, body[done:])
            self._pos += self._pad
            self._data_left = self._pad = 0
            return
        self._start_body()
        while self._data_left:
            if self._pos == self._end and self._data_left >= CHUNK and self._moved(fd):
                continue
            write_all(fd, self._piece())
        self._pass(self._pad, "padding")
        self._pad = 0

    def _moved(self, fd: int) -> bool:
        """Move the rest of the current entry's data to *fd* in the kernel, as far as it goes;
        False if it cannot (then it is read and written)."""
        move = self._move
        if move is None:
            return False
        try:
            n = move(self._fd, fd, self._data_left)
        except OSError as exc:
            if exc.errno not in _NO_MOVE:
                raise
            self._move = None  # another filesystem or an old kernel: read and write
            return False
        if not n:
            self._truncated()
        self._data_left -= n
        self._base += n
        return True

    def _truncated(self) -> None:
        raise ArchiveError(f"truncated tar: input ended inside file data at byte {self.offset}")

    def skip(self) -> None:
        """Skip the rest of the current entry's data and its padding (they go to the tap)."""
        left = self._data_left + self._pad
        self._data_left = self._pad = 0
        self._pass(left, "file data")

    def drain(self) -> None:
        """Read the input to its end (the bytes after the end-of-archive marker)."""
        while True:
            self._pos = self._end
            self._fill(1)
            if not self._end:
                return
