"""GNU sparse files in tars: the maps of PAX formats 0.0, 0.1 and 1.0 and of GNU type ``S``,
checked before anything is written, and written back with their holes as holes.

A sparse entry carries only the data regions of a file; its map says where each region goes
and the real size says where the file ends. A map is bounded (CVE-2025-58183: an unbounded map
exhausts memory), sorted, without overlaps and inside the file, or the entry is refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from ..errors import ArchiveError
from .tar import MAX_SIZE, number

#: data regions one file may have: a map this long takes ~10 MB here, and no real file needs more
MAX_REGIONS = 1 << 17
#: digits of one number of a 1.0 map (2**64 has 20)
_MAX_DIGITS = 20

Region = tuple[int, int]  # (offset in the file, bytes of data)


def _int(text: bytes, name: str) -> int:
    if not text.isdigit() or len(text) > _MAX_DIGITS:
        raise ArchiveError(f"sparse file {name!r} has a corrupt sparse map ({text[:24]!r})")
    return int(text)


def check_count(count: int, name: str | None) -> None:
    """Refuse a map longer than MAX_REGIONS (*name* is None before the entry's name is known)."""
    if count > MAX_REGIONS:
        what = f"sparse file {name!r}" if name is not None else "a sparse file"
        raise ArchiveError(
            f"{what} has a map of {count} regions, more than the {MAX_REGIONS} this reader accepts"
        )


def pax_map(text: bytes, name: str) -> list[Region]:
    """The regions of a PAX 0.1 ``GNU.sparse.map`` ("off,len,off,len"; 0.0's repeated
    offset/numbytes records are folded into the same form when the header is read)."""
    if not text:
        return []
    check_count((text.count(b",") + 1) // 2, name)  # before splitting: bounded memory
    numbers = text.split(b",")
    if len(numbers) % 2:
        raise ArchiveError(f"sparse file {name!r} has a sparse map with an odd count of numbers")
    values = [_int(n, name) for n in numbers]
    return list(zip(values[0::2], values[1::2], strict=True))


def gnu_header_map(block: bytes, start: int, count: int, name: str) -> list[Region]:
    """The regions stored in a GNU header or extension block: *count* (offset, numbytes)
    pairs of 12-byte octal fields from *start*; an all-zero pair ends the list."""
    out = []
    for i in range(count):
        at = start + 24 * i
        off_field, len_field = block[at : at + 12], block[at + 12 : at + 24]
        if off_field.strip(b"\0") == b"" and len_field.strip(b"\0") == b"":
            break
        out.append((_octal(off_field, name), _octal(len_field, name)))
    return out


def _octal(field: bytes, name: str) -> int:
    try:
        return number(field, "sparse map")
    except ArchiveError:
        raise ArchiveError(f"sparse file {name!r} has a corrupt sparse map ({field!r})") from None


def check_map(regions: list[Region], real_size: int, data_size: int, name: str) -> None:
    """Refuse a map that is out of order, overlaps itself, points past the file's end, or
    does not account for exactly the data the entry carries."""
    check_count(len(regions), name)
    if not 0 <= real_size <= MAX_SIZE:
        raise ArchiveError(f"sparse file {name!r} has a size out of range ({real_size})")
    end = 0
    total = 0
    for offset, length in regions:
        if offset < 0 or length < 0:  # (a signed base-256 field)
            raise ArchiveError(
                f"sparse file {name!r} has a sparse map with a negative number "
                f"(offset {offset}, length {length})"
            )
        if offset < end:
            raise ArchiveError(
                f"sparse file {name!r} has a sparse map that overlaps itself or is out of "
                f"order at offset {offset}"
            )
        end = offset + length
        if end > real_size:
            raise ArchiveError(
                f"sparse file {name!r} has a sparse map that points past the file's size "
                f"({end} > {real_size})"
            )
        total += length
    if total != data_size:
        raise ArchiveError(
            f"sparse file {name!r} carries {data_size} bytes of data but its map describes {total}"
        )


class MapReader:
    """Parses a PAX 1.0 map (decimal numbers, one a line, at the start of the entry's data)
    from blocks fed one at a time, so that a hostile map is refused before it is held."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._text = b""
        self._numbers: list[int] = []
        self._want: int | None = None

    def feed(self, block: bytes) -> bool:
        """Take the next block; True once the whole map was read."""
        self._text += block
        while self._want is None or len(self._numbers) < self._want:
            line, nl, rest = self._text.partition(b"\n")
            if not nl:
                if len(self._text) > _MAX_DIGITS:
                    raise ArchiveError(f"sparse file {self.name!r} has a corrupt sparse map")
                return False
            self._text = rest
            value = _int(line, self.name)
            if self._want is None:
                check_count(value, self.name)
                self._want = 2 * value
            else:
                self._numbers.append(value)
        return True

    @property
    def regions(self) -> list[Region]:
        return list(zip(self._numbers[0::2], self._numbers[1::2], strict=True))


#: a sparse file's size is accepted up to its filesystem's capacity or this, whichever is more:
#: holes cost nothing, and real images hold big sparse files (``/var/log/lastlog`` after
#: ``useradd`` of a high uid is hundreds of GB), but one of many TiB could never be diffed
SPARSE_SIZE_FLOOR = 1 << 40


def check_fits(real_size: int, name: str) -> None:
    """Refuse a sparse file whose size is more than its filesystem's capacity and more than
    :data:`SPARSE_SIZE_FLOOR`: a hostile size, never read back or diffed whole."""
    st = os.statvfs(".")
    capacity = st.f_blocks * st.f_frsize
    limit = max(capacity, SPARSE_SIZE_FLOOR)
    if real_size > limit:
        raise ArchiveError(
            f"sparse file {name!r} declares {real_size} bytes, more than the {limit} a sparse "
            f"file may have here (the larger of its filesystem's size and 1 TiB)"
        )


def write_regions(
    fd: int, regions: list[Region], pieces: Iterable[bytes | memoryview], real_size: int
) -> None:
    """Write the entry's data to its regions of *fd*, skipping the holes, and set its size;
    what is skipped stays unallocated."""
    it = iter(pieces)
    view = memoryview(b"")
    for offset, length in regions:
        at, left = offset, length
        while left:
            if not view:
                piece = next(it, None)
                if piece is None:
                    raise ArchiveError("sparse file data is shorter than its map")
                view = memoryview(piece)
            n = os.pwrite(fd, view[:left], at)
            view = view[n:]
            at += n
            left -= n
    for rest in it:  # nothing is left but the iterator must run to its end (padding)
        if len(rest):
            raise ArchiveError("sparse file data is longer than its map")
    os.ftruncate(fd, real_size)
