"""The pipe between the two halves of an apply: the parent (:mod:`.apply`) parses the tar, which
it reads whole anyway to hash it, keeps the exact-diff record's segments, and tells the
sandboxed child (:mod:`.extract`) what to write: the entries, and where the data of the regular
files among them is. Parsing, hashing and recording so run beside the extraction, on another
core, and the child spends its time on the filesystem.

On the pipe, frames: ``E`` and a length, then that many bytes of a pickled list of
(entry's fields, bytes of data, offset), and ``Z`` at the end of the tar. The bytes of data
are None for an entry whose data the child does not write; a sparse file's data is counted as
the tar carries it. Where the tar is a regular file the child reads the data from the file
itself, at each offset (in the plain tar; they only grow). Otherwise (a pipe, a compressed
layer: *inline*) the data of a frame's entries follows the frame on the pipe, in their order.
A pipe that ends before ``Z`` was cut (the parent stopped on a bad tar or died): the child
stops with an error, and the parent says why.

Only the parent's own pickles cross the pipe: the child trusts them as it trusts its own
memory. Whatever they name, the child writes inside its chroot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import ArchiveError, GraphDriverError
from ..linux.cpus import usable_cpus
from . import fastpath
from .tar import TarEntry
from .tar_reader import TarReader, write_all, write_all_of
from .tarsplit import SegmentRecorder

_FRAME = struct.Struct("<cQ")
_ENTRIES, _END = b"E", b"Z"
#: tar bytes a frame covers, and data gathered before it is written: about what the pipe holds
_BATCH = 1 << 20
#: entries in one frame at most, so that the child starts on the first ones early
_MAX_ENTRIES = 256

#: an entry as it crosses the pipe: the fields of its TarEntry, in order (a tuple pickles and
#: unpickles in a third of the time a slotted object does), its bytes of data, their offset
Sent = tuple[tuple[Any, ...], int | None, int]
#: the fields of a TarEntry in the order they cross the pipe
FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TarEntry))
_FIELDS = operator.attrgetter(*FIELD_NAMES)


class Feeder:
    """The parent's half: parse the plain tar that *readinto* reads, keep the record's segments
    in *segments*, and send the child its frames on *fd*, with the data *inline* or not.
    *body_path* says where the child writes an entry's data (None: it does not)."""

    def __init__(
        self,
        readinto: Callable[[memoryview], int],
        fd: int,
        *,
        inline: bool,
        segments: SegmentRecorder | None,
        body_path: Callable[[TarEntry], str | None],
    ) -> None:
        self.reader = TarReader(-1, readinto)
        if segments is not None:
            self.reader.tap, self.reader.tap_body = segments.raw, segments.start_body
        self._segments = segments
        self._fd = fd
        self._inline = inline
        self._body_path = body_path
        self._entries: list[Sent] = []
        #: inline data gathered for the next write: views of the reader's buffer, written
        #: before the reader reads into it again (:meth:`_flush` is its ``before_fill``)
        self._data: list[bytes | memoryview] = []
        self._framed = False  # the current entry's frame was written: its data goes straight on
        self._frame_start = 0  # where in the tar the entries gathered start
        if inline:
            self.reader.before_fill = self._flush

    def run(self) -> None:
        """Send the whole tar, then the end frame. On a tar that turns out corrupt or cut, the
        entries before the bad spot are sent first: the child's error on one of them comes
        first in the tar, and is the one to report."""
        try:
            self._run()
        except GraphDriverError:
            with contextlib.suppress(OSError):
                self._flush()
            raise
        write_all(self._fd, _FRAME.pack(_END, 0))

    def _run(self) -> None:
        reader = self.reader
        for entry in reader:
            path = self._body_path(entry)
            if path is None:
                self._entries.append((_FIELDS(entry), None, 0))  # its data stays in the raw part
            else:
                self._entries.append((_FIELDS(entry), reader.data_left, reader.offset))
                if self._inline or self._segments is not None:
                    self._body(path, entry)
            # a frame's bytes stay bounded: long PAX paths or xattrs count as the tar's bytes
            if len(self._entries) >= _MAX_ENTRIES or reader.offset - self._frame_start > _BATCH:
                self._flush()
        reader.drain()
        self._flush()

    def _body(self, path: str, entry: TarEntry) -> None:
        """Read the data of the entry at *path*, sent to the child if inline, and note it in
        the record as a body the layer's file holds."""
        segments, reader = self._segments, self.reader
        size = reader.data_left
        self._framed = False
        if self._inline:
            self._data.extend(reader.data())
            if segments is not None:
                segments.body(path, size, entry.sparse)
        elif segments is not None:  # the header and the body noted in one call, then past it
            segments.file(reader.untapped(), path, size, entry.sparse)
            reader.pass_data(noted=True)
        if self._framed:  # its frame went before the buffer was read into again: its data now
            self._write_data()

    def _flush(self) -> None:
        """Write the frame of the entries gathered, then their data. Called before the reader
        reads into its buffer again, the data's views are written while they are valid."""
        if self._entries:
            frame = pickle.dumps(self._entries, protocol=pickle.HIGHEST_PROTOCOL)
            self._data.insert(0, _FRAME.pack(_ENTRIES, len(frame)) + frame)
            self._entries.clear()
            self._framed = True
        self._frame_start = self.reader.offset
        self._write_data()

    def _write_data(self) -> None:
        if self._data:
            write_all_of(self._fd, self._data)
            self._data.clear()


class StreamCut(ArchiveError):
    """The parent stopped sending before the end of the tar: its error says why."""


def writers() -> int:
    """Threads that write a run of plain files at once: two where this process may keep one
    CPU and a half busy or more (its affinity, and its cgroups' CPU quota: :mod:`..linux.cpus`),
    else one. Measured on 2 CPUs, library applies, medians: the bench's 10k small files on an
    XFS loop in RAM from 0.35 to 0.32 s, the apt layer on a vfs child of minbase from 0.15 to
    0.13 s; four threads were slower there (0.41 s), the parent's parse taking its share of
    the CPUs. In a cgroup with a CPU quota, 10k small files on vfs on an XFS loop in RAM, 11
    runs, one thread against two: 499 against 519 ms at one CPU (394 against 417 in another
    session's 9), 381 against 380 at 1.25, 357 against 307 at 1.5."""
    return 2 if usable_cpus() >= 1.5 else 1


class FedReader(TarReader):
    """The child's half: the entries and their data as the parent sent them, read as a
    :class:`.TarReader` reads a tar (the extractor cannot tell them apart). Frames come from
    *frames_fd*; the data from *data_fd* (the tar file) or, without one, inline."""

    def __init__(self, frames_fd: int, data_fd: int | None, writers: int = 1) -> None:
        super().__init__(frames_fd if data_fd is None else data_fd)
        self._frames = self if data_fd is None else TarReader(frames_fd)
        self._inline = data_fd is None
        #: an entry whose data the parent sent but the extractor did not write (the record,
        #: which counts on it, cannot be kept)
        self.unwritten: str | None = None
        #: the input ended before what was asked for (the parent stopped: a cut stream)
        self.ended = False
        self._sent = True
        #: threads that write a run of plain files at once (:func:`writers`)
        self.writers = writers

    def _fill(self, n: int) -> None:
        super()._fill(n)
        if self._end < n:
            self.ended = True

    def _truncated(self) -> None:
        self.ended = True  # a splice that found the pipe's end: the parent stopped sending
        super()._truncated()

    def __iter__(self) -> Iterator[TarEntry]:
        """The entries as the parent sent them, each's data ready to be read until the next is
        asked for, as a :class:`.TarReader` gives a tar's (the extractor itself takes them
        frame by frame: :meth:`frames`)."""
        for batch in self.frames():
            for sent in batch:
                fields = self.enter(sent)
                yield TarEntry(*fields)
                self.leave(fields)

    def frames(self) -> Iterator[list[Sent]]:
        """The entries frame by frame, for a reader that takes each in turn (:meth:`enter`,
        then :meth:`leave`) or a run of them at once (:meth:`write_plain_files`)."""
        while (batch := self._frame()) is not None:
            yield batch

    def enter(self, sent: Sent) -> tuple[Any, ...]:
        """Make *sent* the current entry, its data ready to be read; its fields."""
        fields, size, offset = sent
        if size is not None and not self._inline and offset > self.offset:
            self._skip(offset - self.offset)  # headers, and data not written
        self._data_left, self._pad, self._sent = size or 0, 0, size is not None
        return fields

    def leave(self, fields: tuple[Any, ...]) -> None:
        """Done with the current entry (*fields*): skip what of its data was not written."""
        if self._data_left:
            self.unwritten = fields[0]
            self.skip()

    def write_plain_files(
        self,
        batch: list[Sent],
        i: int,
        dirs: tuple[set[str], set[str], set[str]],
        created: set[str] | None,
        record: tuple[set[str], set[str], dict[str, bytes]] | None,
        root: bool,
    ) -> tuple[int, int]:
        """Write the plain files of *batch* from its entry *i* on, in C, with the
        extractor's state (its safe, setgid and default-ACL directories, the set of what it
        created, the record's touched and body paths and rows, whether it runs as root),
        until one that needs the extractor's general path or whose data is not read yet:
        that entry's index, and the bytes written (``_fastpath.c`` says which), by
        :attr:`writers` threads at once."""
        assert fastpath.write_plain_files is not None
        i, self._pos, size = fastpath.write_plain_files(
            batch,
            i,
            self._view,
            self._pos,
            self._end,
            self._base,
            self._inline,
            dirs,
            created,
            record,
            root,
            self.writers,
        )
        self._tapped = self._pos
        return i, size

    def _skip(self, n: int) -> None:
        """Skip *n* bytes of the tar file: past what is buffered, by moving the file offset."""
        buffered = self._end - self._pos
        if n <= buffered:
            self._pos += n
            return
        self._pos = self._end
        os.lseek(self._fd, n - buffered, os.SEEK_CUR)
        self._base += n - buffered

    def _frame(self) -> list[Sent] | None:
        """The entries of the next frame, or None at the end frame."""
        head = self._frames._read(_FRAME.size)
        if len(head) != _FRAME.size:
            raise StreamCut("the layer stream ended early")
        tag, n = _FRAME.unpack(head)
        if tag == _END:
            return None
        frame = self._frames._read(n)
        if tag != _ENTRIES or len(frame) != n:
            raise StreamCut("the layer stream ended early")
        batch: list[Sent] = pickle.loads(frame)  # noqa: S301 - the parent's own pickles
        return batch

    def write_to(self, fd: int) -> None:
        self._check_sent()
        super().write_to(fd)

    def data(self) -> Iterator[bytes | memoryview]:
        self._check_sent()
        return super().data()

    def _check_sent(self) -> None:
        if not self._sent:  # the two halves disagree on which entries carry data
            raise ArchiveError("internal error: the apply process sent no data for this file")

    def drain(self) -> None:
        """Nothing to read after the end frame: the parent read the tar to its end."""
