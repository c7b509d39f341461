"""Compressed layer streams both ways: the decoder that undoes gzip or zstd on apply (every member
or frame, skippable frames, zero padding), a tar writer onto an fd or a file, compressed or not,
and the read end of the pipe that ``LayerStore.diff`` hands out."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import select
import threading
import zlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import IO, Any, TypeVar

from ..errors import ArchiveError
from .tar_writer import TarWriter

T = TypeVar("T")

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: skippable frames have the magic 0x184D2A50..0x184D2A5F, little-endian
_SKIPPABLE_LOW = b"\x2a\x4d\x18"
#: input handed to a decompressor at a time (bounds the search for a gzip error's byte)
_SLICE = 64 * 1024
#: the most plain bytes one decoding step gives (a zstd block more at most): what a few KiB
#: of a compression bomb decode to is handed on in pieces of this size, never held whole
PLAIN_PIECE = 2 << 20
#: decoded pieces smaller than this are joined, up to about this size, before they are handed
#: on; a larger one (a zstd block is 128 KiB) goes as it is: joining them was a copy of the tar
GATHER = 64 * 1024


def compression_of(head: bytes) -> str:
    """ "gzip", "zstd" or "none", from the first bytes of a layer stream."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC) or _is_skippable(head):
        return "zstd"
    return "none"


def _is_skippable(head: bytes) -> bool:
    return len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == _SKIPPABLE_LOW


def _first_bad_byte(decompressor: Any, piece: bytes) -> int:
    """Where in *piece* a zlib decompressor (in its state before *piece*) fails: zlib says
    what is wrong but not where, and one byte at a time it fails on the byte at fault."""
    for i in range(len(piece)):
        try:
            decompressor.decompress(piece[i : i + 1], 1 << 16)
            while decompressor.unconsumed_tail:  # output is bounded: a byte can expand a lot
                decompressor.decompress(decompressor.unconsumed_tail, 1 << 16)
        except zlib.error:
            return i
    return len(piece) - 1


class _BadPart(Exception):
    """A zstd frame did not decode in its part (header, block, checksum) that starts *at*."""

    def __init__(self, at: int, part: str, reason: object) -> None:
        super().__init__(f"{part}: {reason}")
        self.at = at
        self.part = part
        self.reason = reason


class _ZstdFrame:
    """One zstd frame walked through its header, blocks and checksum (RFC 8878), each handed
    to the decompressor in turn: the frame's end comes from its own structure and an error
    names the part it is in. Reads like a zlib decompressor (decompress with a bound on the
    output, eof, unused_data, unconsumed_tail)."""

    def __init__(self) -> None:
        import zstandard

        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._pos = 0  # bytes of the frame taken
        self._part = "frame header"
        self._part_at = 0
        self._head = b""  # the frame or block header being gathered
        self._left = 0  # bytes of the block or checksum still to take
        self._checksum = False
        self._last = False
        self.eof = False
        self.unused_data = b""
        self.unconsumed_tail = b""

    def decompress(self, data: bytes, max_length: int) -> bytes:
        """What *data* decodes to, taken a part at a time until the output reaches
        *max_length* (passed by at most one block, 128 KiB): the rest of *data* is left in
        ``unconsumed_tail``, or in ``unused_data`` once the frame has ended."""
        out: list[bytes] = []
        produced = 0
        i = 0
        while i < len(data) and not self.eof and produced < max_length:
            if self._part in ("block", "checksum"):
                take = data[i : i + self._left]
                self._left -= len(take)
            else:
                take = data[i : i + self._header_size() - len(self._head)]
                self._head += take
            i += len(take)
            self._pos += len(take)
            try:
                plain = self._d.decompress(take)
            except Exception as exc:  # zstandard.ZstdError
                raise _BadPart(self._part_at, self._part, exc) from None
            if plain:  # most parts give nothing: a header, or a block not yet whole
                out.append(plain)
                produced += len(plain)
            self._advance()
        rest = data[i:]
        self.unused_data, self.unconsumed_tail = (rest, b"") if self.eof else (b"", rest)
        return out[0] if len(out) == 1 else b"".join(out)  # one block: no copy

    def _header_size(self) -> int:
        if self._part == "block header":
            return 3
        if len(self._head) < 5:  # magic and frame header descriptor
            return 5
        fhd = self._head[4]
        single_segment = bool(fhd & 0x20)
        content_size = (1 if single_segment else 0, 2, 4, 8)[fhd >> 6]
        return 5 + (not single_segment) + (0, 1, 2, 4)[fhd & 3] + content_size

    def _advance(self) -> None:
        """Move to the next part once the current one was taken whole."""
        if self._part in ("block", "checksum"):
            if self._left:
                return
            if self._part == "block":
                self._after_block()
            else:
                self._end()
            return
        if len(self._head) < self._header_size():
            return
        head, self._head = self._head, b""
        if self._part == "frame header":
            self._checksum = bool(head[4] & 0x04)
            self._start("block header")
            return
        value = int.from_bytes(head, "little")
        self._last = bool(value & 1)
        kind = (value >> 1) & 3
        if kind == 3:
            raise _BadPart(self._part_at, "block", "reserved block type")
        self._part, self._left = "block", 1 if kind == 1 else value >> 3  # RLE: one byte
        if not self._left:
            self._after_block()

    def _start(self, part: str) -> None:
        self._part, self._part_at = part, self._pos

    def _after_block(self) -> None:
        if not self._last:
            self._start("block header")
        elif self._checksum:
            self._start("checksum")
            self._left = 4
        else:
            self._end()

    def _end(self) -> None:
        if not self._d.eof:
            raise _BadPart(self._part_at, self._part, "the frame does not end after it")
        self.eof = True


class LayerDecoder:
    """Undoes gzip or zstd, the way ``gzip -dc`` and ``zstd -dc`` read a file.

    Every gzip member and every zstd frame is decoded in turn (pigz, zstd:chunked); zstd
    skippable frames are skipped without being held in memory; zero bytes after the last
    member are padding. Anything else is an ArchiveError naming the format and the offset.
    """

    def __init__(self, head: bytes) -> None:
        self.kind = compression_of(head)
        self.offset = 0  # compressed bytes consumed
        self._member: Any = None  # the decompressor of the current member or frame
        self._member_start = 0
        self._skip = 0  # bytes of a skippable frame still to skip
        self._skip_start = 0
        self._skip_size = 0
        self._padding = False  # only zero bytes may follow
        self._pending = b""  # the start of a member or frame header, split across reads

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The plain bytes that *data* (the next part of the stream) decodes to, in pieces of
        at most :data:`PLAIN_PIECE` and a zstd block, each decoded when the one before is
        taken: a decoding step's output as it is when it has :data:`GATHER` bytes or more
        (after what was gathered before it), smaller ones joined up to that."""
        if self.kind == "none":
            yield data
            return
        parts: list[bytes] = []
        have = 0
        for plain in self._decode_all(data):
            if len(plain) >= GATHER:
                if parts:
                    yield b"".join(parts)
                    parts, have = [], 0
                yield plain
                continue
            parts.append(plain)
            have += len(plain)
            if have >= GATHER:
                yield b"".join(parts)
                parts, have = [], 0
        if parts:
            yield b"".join(parts)

    def _decode_all(self, data: bytes) -> Iterator[bytes]:
        buf = self._pending + data if self._pending else data
        self._pending = b""
        pos = 0
        while pos < len(buf):
            if self._member is not None:
                start = self.offset
                yield from self._decode(buf[pos : pos + _SLICE])
                pos += self.offset - start
            elif self._skip:
                n = min(self._skip, len(buf) - pos)
                self._skip -= n
                self.offset += n
                pos += n
            elif self._padding:
                self._check_zeros(buf, pos)
                self.offset += len(buf) - pos
                pos = len(buf)
            elif not self._next(buf, pos):
                self._pending = buf[pos:]
                break

    def _decode(self, piece: bytes) -> Iterator[bytes]:
        """Hand *piece*, the next bytes of the current member or frame, to its decompressor and
        yield what it decodes to, a bounded piece at a time; ``offset`` moves on by the bytes
        used (all but those after the member's end, where the member is done)."""
        member = self._member
        while True:
            before = member.copy() if self.kind == "gzip" else None
            try:
                plain = member.decompress(piece, PLAIN_PIECE)
            except _BadPart as bad:
                raise ArchiveError(
                    f"corrupt zstd stream: the {bad.part} at byte {self._member_start + bad.at} "
                    f"(in the frame that starts at byte {self._member_start}) does not decode: "
                    f"{bad.reason}"
                ) from None
            except zlib.error as exc:
                assert before is not None
                raise ArchiveError(
                    f"corrupt gzip stream at byte {self.offset + _first_bad_byte(before, piece)} "
                    f"(the member that starts at byte {self._member_start}): {exc}"
                ) from None
            if member.eof:
                self.offset += len(piece) - len(member.unused_data)
                self._member = None
                if plain:
                    yield plain
                return
            rest = member.unconsumed_tail
            self.offset += len(piece) - len(rest)
            if plain:
                yield plain
            if len(plain) < PLAIN_PIECE and not rest:
                return
            piece = rest  # the output was cut at the bound: zlib may hold more of it

    @property
    def _unit(self) -> str:
        return "member" if self.kind == "gzip" else "frame"

    def _next(self, buf: bytes, pos: int) -> bool:
        """Start what begins at *pos*: a member, a frame, a skippable frame or zero padding;
        False if too few bytes are there to tell."""
        head = buf[pos : pos + 8]
        magic = GZIP_MAGIC if self.kind == "gzip" else ZSTD_MAGIC
        if head.startswith(magic):
            self._member = self._new_member()
            self._member_start = self.offset
            return True
        if self.kind == "zstd" and _is_skippable(head):
            if len(head) < 8:
                return False
            self._skip_size = int.from_bytes(head[4:8], "little")
            self._skip = 8 + self._skip_size
            self._skip_start = self.offset
            return True
        if head[:1] == b"\0":
            self._padding = True
            return True
        if len(head) < 4 and (magic.startswith(head) or self._skippable_prefix(head)):
            return False
        raise ArchiveError(
            f"{self.kind} stream has trailing data at byte {self.offset} that is neither "
            f"a {self.kind} {self._unit} nor zero padding"
        )

    def _skippable_prefix(self, head: bytes) -> bool:
        return (
            self.kind == "zstd" and head[0] & 0xF0 == 0x50 and _SKIPPABLE_LOW.startswith(head[1:])
        )

    def _new_member(self) -> Any:
        if self.kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        return _ZstdFrame()

    def _check_zeros(self, buf: bytes, pos: int) -> None:
        rest = buf[pos:]
        if rest.count(0) != len(rest):
            bad = len(rest) - len(rest.lstrip(b"\0"))
            raise ArchiveError(
                f"{self.kind} stream has trailing data at byte {self.offset + bad} after "
                f"zero padding; it is neither a {self.kind} {self._unit} nor zero padding"
            )

    def finish(self) -> None:
        """Refuse a stream that ended inside a member, a frame or a frame header."""
        if self.kind == "none":
            return
        if self._member is not None:
            raise ArchiveError(
                f"truncated {self.kind} stream: input ended at byte {self.offset} inside the "
                f"{self._unit} that starts at byte {self._member_start}"
            )
        if self._skip:
            raise ArchiveError(
                f"truncated zstd stream: input ended at byte {self.offset} inside the "
                f"skippable frame at byte {self._skip_start}, which declares "
                f"{self._skip_size} bytes"
            )
        if self._pending:
            raise ArchiveError(
                f"truncated {self.kind} stream: input ended at byte {self.offset} inside "
                f"a {self._unit} header"
            )


def tar_writer(out: IO[bytes] | int, compress: str | None) -> tuple[TarWriter, Callable[[], None]]:
    """A TarWriter onto *out*, compressing if asked, and the function that finishes it."""
    if compress in (None, "none"):
        if isinstance(out, int):
            return TarWriter(fd=out), lambda: None
        try:
            fd = out.fileno()
        except (AttributeError, OSError, ValueError):  # BytesIO and other in-memory files
            return TarWriter(write=out.write), lambda: None
        out.flush()
        return TarWriter(fd=fd), lambda: None
    write: Callable[[bytes], object]
    if isinstance(out, int):
        fd = out

        def write(data: bytes) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
    else:
        write = out.write
    if compress == "gzip":
        compressor: Any = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    else:
        import zstandard

        compressor = zstandard.ZstdCompressor(level=3).compressobj()

    def finish() -> None:
        write(compressor.flush())

    return TarWriter(write=lambda d: write(compressor.compress(d))), finish


def big_pipe() -> tuple[int, int]:
    """A pipe (both ends close-on-exec) of 1 MiB where the kernel allows it: a tar crosses it
    in fewer, larger reads and writes than through the default 64 KiB."""
    r, w = os.pipe2(os.O_CLOEXEC)
    grow_pipe(w)
    return r, w


def read_head(stream: IO[bytes], size: int = 8) -> bytes:
    """The first *size* bytes of *stream*, fewer only at its end: they tell its compression.
    A raw stream (``Popen(bufsize=0).stdout``, a socket) gives in a read what its writer has
    written so far, one byte of gzip's two-byte magic may be all, and a plain tar taken from
    that failed as a cut one."""
    head = b""
    while len(head) < size and (got := read_ready(stream, partial(stream.read, size - len(head)))):
        head += got
    return head


def read_ready(stream: IO[bytes], read: Callable[[], T | None]) -> T:
    """*read*'s result, a read of *stream*; while it is None or raises BlockingIOError (a
    non-blocking stream with nothing to read yet, not its end), *read* again once the stream's
    fd is readable. ArchiveError for such a stream without an fd to wait on."""
    while True:
        try:
            got = read()
        except BlockingIOError:
            got = None
        if got is not None:
            return got
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):
            raise ArchiveError(
                "the layer stream has nothing to read yet (non-blocking) and no fd to wait on"
            ) from None
        waiting = select.poll()  # (select() refuses an fd past 1023: a busy server's)
        waiting.register(fd, select.POLLIN)
        waiting.poll()  # a hang-up wakes it too: the read then gives the end


def grow_pipe(fd: int, size: int = 1 << 20) -> None:
    """Make the pipe *fd* (either end) hold *size* bytes where the kernel allows it (never
    smaller than it is): a bigger pipe is faster, not needed. A caller's pipe stays so."""
    with contextlib.suppress(OSError):
        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < size:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)


class DiffStream(io.RawIOBase):
    """The read end of a diff pipe; end of stream re-raises the writer's error, if any."""

    def __init__(self, fd: int, thread: threading.Thread, failure: list[BaseException]) -> None:
        self._fd = fd
        self._thread = thread
        self._failure = failure

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = os.readv(self._fd, [buffer])
        if n == 0:
            self._thread.join()
            if self._failure:
                raise self._failure[0]
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
            self._thread.join()
        super().close()
