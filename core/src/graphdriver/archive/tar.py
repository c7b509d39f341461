"""A streaming reader and writer of OCI layer tars (POSIX ustar + PAX, GNU long names read).

Written for this job rather than taken from :mod:`tarfile`: the writer sends file data with
sendfile(2) straight from the layer to the output, the reader hands file data over in large
slices, and both report corrupt or truncated input as :class:`~graphdriver.errors.ArchiveError`.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from ..errors import ArchiveError
from . import whiteout
from .changes import Change, ChangeKind

BLOCK = 512
CHUNK = 1 << 20

REGTYPE = b"0"
AREGTYPE = b"\0"
LNKTYPE = b"1"
SYMTYPE = b"2"
CHRTYPE = b"3"
BLKTYPE = b"4"
DIRTYPE = b"5"
FIFOTYPE = b"6"
CONTTYPE = b"7"
XHDTYPE = b"x"
XGLTYPE = b"g"
GNU_LONGNAME = b"L"
GNU_LONGLINK = b"K"

_MODE_TYPE = {
    stat.S_IFREG: REGTYPE,
    stat.S_IFDIR: DIRTYPE,
    stat.S_IFLNK: SYMTYPE,
    stat.S_IFCHR: CHRTYPE,
    stat.S_IFBLK: BLKTYPE,
    stat.S_IFIFO: FIFOTYPE,
}
_TYPE_MODE = {v: k for k, v in _MODE_TYPE.items()}
_TYPE_MODE[AREGTYPE] = stat.S_IFREG
_TYPE_MODE[CONTTYPE] = stat.S_IFREG

_OCTAL_LIMITS = {8: 0o7777777, 12: 0o77777777777}


@dataclass(slots=True)
class TarEntry:
    """One member of a tar as read, after PAX and GNU extensions were folded in."""

    name: str
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)

    @property
    def is_file(self) -> bool:
        return self.type in (REGTYPE, AREGTYPE, CONTTYPE)


# ---------------------------------------------------------------------------------------- writer


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n = len(str(n).encode()) + len(body)
    return str(n).encode() + body


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) for a ustar header, or None if the path needs PAX."""
    if len(name) <= 100:
        return b"", name
    if len(name) > 256:
        return None
    for i in range(len(name) - 1, 0, -1):
        if name[i : i + 1] == b"/" and i <= 155 and len(name) - i - 1 <= 100 and i > 0:
            return name[:i], name[i + 1 :]
    return None


def encode_header(
    name: str,
    typeflag: bytes,
    *,
    mode: int = 0,
    uid: int = 0,
    gid: int = 0,
    size: int = 0,
    mtime: int = 0,
    linkname: str = "",
    devmajor: int = 0,
    devminor: int = 0,
    xattrs: Iterable[tuple[str, bytes]] = (),
) -> bytes:
    """The header block(s) of one entry: a PAX extended header first when ustar cannot hold it."""
    bname = os.fsencode(name)
    blink = os.fsencode(linkname)
    pax: list[bytes] = []
    split = _split_ustar(bname) if bname.isascii() else None
    if split is None:
        pax.append(_pax_record("path", bname))
        split = (b"", bname[:100])
    if len(blink) > 100 or not blink.isascii():
        pax.append(_pax_record("linkpath", blink))
        blink = blink[:100]
    if uid > _OCTAL_LIMITS[8]:
        pax.append(_pax_record("uid", str(uid).encode()))
        uid = 0
    if gid > _OCTAL_LIMITS[8]:
        pax.append(_pax_record("gid", str(gid).encode()))
        gid = 0
    if size > _OCTAL_LIMITS[12]:
        pax.append(_pax_record("size", str(size).encode()))
    mtime = max(0, min(mtime, _OCTAL_LIMITS[12]))
    for key, value in sorted(xattrs):
        pax.append(_pax_record("SCHILY.xattr." + key, value))
    out = b""
    if pax:
        data = b"".join(pax)
        pname = (b"PaxHeaders/" + split[1])[:100]
        out = _block(pname, b"", XHDTYPE, 0o644, 0, 0, len(data), mtime, b"", 0, 0)
        out += data + b"\0" * (-len(data) % BLOCK)
    out += _block(
        split[1],
        split[0],
        typeflag,
        mode,
        uid,
        gid,
        size if size <= _OCTAL_LIMITS[12] else 0,
        mtime,
        blink,
        devmajor,
        devminor,
    )
    return out


_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12s")


def _block(
    name: bytes,
    prefix: bytes,
    typeflag: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    linkname: bytes,
    devmajor: int,
    devminor: int,
) -> bytes:
    hdr = _USTAR.pack(
        name, b"%07o\0" % (mode & 0o7777), b"%07o\0" % uid, b"%07o\0" % gid,
        b"%011o\0" % size, b"%011o\0" % mtime, b"        ", typeflag, linkname,
        b"ustar\0", b"00", b"", b"", b"%07o\0" % devmajor, b"%07o\0" % devminor, prefix, b"",
    )  # fmt: skip
    return hdr[:148] + b"%06o\0 " % sum(hdr) + hdr[156:]


def _xattrs(path: str) -> list[tuple[str, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []
    out = []
    for key in names:
        if key.startswith(whiteout.OVERLAY_XATTR_PREFIX):
            continue
        try:
            out.append((key, os.getxattr(path, key, follow_symlinks=False)))
        except OSError:
            continue
    return out


class TarWriter:
    """Writes tar entries to a file descriptor or to a ``write`` callable.

    With a plain fd the file data goes by sendfile(2) and never enters Python.
    """

    def __init__(
        self, write: Callable[[bytes], object] | None = None, fd: int | None = None
    ) -> None:
        if (write is None) == (fd is None):
            raise ValueError("give exactly one of write or fd")
        self._write = write
        self._fd = fd
        self._buf = bytearray()
        self._links: dict[tuple[int, int], str] = {}
        self.bytes_written = 0
        #: called with the number of bytes each time some are written
        self.progress: Callable[[int], object] | None = None

    def _emit(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        self.bytes_written += len(self._buf)
        if self.progress is not None:
            self.progress(len(self._buf))
        if self._fd is not None:
            with memoryview(self._buf) as view:
                done = 0
                while done < len(view):
                    done += os.write(self._fd, view[done:])
            self._buf.clear()
        else:
            assert self._write is not None
            data, self._buf = self._buf, bytearray()
            self._write(bytes(data))

    def add_path(self, path: str, arcname: str, st: os.stat_result | None = None) -> None:
        """Add the file at *path* (not following a final symlink) as *arcname*."""
        if st is None:
            st = os.lstat(path)
        fmt = stat.S_IFMT(st.st_mode)
        typeflag = _MODE_TYPE.get(fmt)
        if typeflag is None:  # sockets have no tar form; Docker skips them too
            return
        size = 0
        linkname = ""
        if fmt == stat.S_IFREG and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = self._links.get(key)
            if first is not None:
                typeflag, linkname = LNKTYPE, first
            else:
                self._links[key] = arcname
        if typeflag == REGTYPE:
            size = st.st_size
        elif typeflag == SYMTYPE:
            linkname = os.readlink(path)
        if typeflag == DIRTYPE and not arcname.endswith("/"):
            arcname += "/"
        major = minor = 0
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):
            major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        self._emit(
            encode_header(
                arcname,
                typeflag,
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                size=size,
                mtime=int(st.st_mtime),
                linkname=linkname,
                devmajor=major,
                devminor=minor,
                xattrs=() if typeflag == LNKTYPE else _xattrs(path),
            )
        )
        if size:
            self._add_data(path, size)

    def _add_data(self, path: str, size: int) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            left = size
            if self._fd is not None and size > 256 * 1024:
                self.flush()
                offset = 0
                while left:
                    n = os.sendfile(self._fd, fd, offset, min(left, 1 << 30))
                    if n == 0:
                        break
                    offset += n
                    left -= n
                self.bytes_written += size - left
                if self.progress is not None:
                    self.progress(size - left)
            else:
                while left:
                    data = os.read(fd, min(left, CHUNK))
                    if not data:
                        break
                    left -= len(data)
                    self._emit(data)
            if left:
                raise ArchiveError(f"{path} shrank while it was being archived")
        finally:
            os.close(fd)
        self._emit(b"\0" * (-size % BLOCK))

    def add_whiteout(self, arcname: str) -> None:
        """Add an empty OCI whiteout entry (``.wh.<name>`` or ``.wh..wh..opq``)."""
        self._emit(encode_header(arcname, REGTYPE, mode=0, mtime=0))

    def close(self) -> None:
        """Write the end-of-archive marker (two zero blocks) and flush."""
        self._emit(b"\0" * (2 * BLOCK))
        self.flush()


def _arc(path: str) -> str:
    return path.lstrip("/")


def write_changes_tar(
    writer: TarWriter, root: str, changes: Iterable[Change], *, source: str = "tree"
) -> None:
    """Write *changes* of the layer whose files are under *root* as an OCI layer tar.

    With ``source="overlay"`` *root* is an overlay upper directory: a 0/0 character device
    becomes ``.wh.<name>`` and an opaque directory gets ``<dir>/.wh..wh..opq``.
    """
    for change in changes:
        arc = _arc(change.path)
        head, _, base = arc.rpartition("/")
        prefix = head + "/" if head else ""
        if change.kind == ChangeKind.DELETE:
            writer.add_whiteout(prefix + whiteout.whiteout_name(base))
            continue
        full = root + change.path
        st = os.lstat(full)
        writer.add_path(full, arc, st)
        if source == "overlay" and stat.S_ISDIR(st.st_mode) and whiteout.is_overlay_opaque(full):
            writer.add_whiteout(arc + "/" + whiteout.OPAQUE)
    writer.close()


# ---------------------------------------------------------------------------------------- reader


def _number(field: bytes, what: str) -> int:
    try:  # the common case: octal digits padded with spaces or NULs
        return int(field.strip(b" \0"), 8)
    except ValueError:
        pass
    if field and field[0] & 0x80:  # GNU base-256
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise ArchiveError(f"corrupt tar header: {what} field {field!r}") from None


def _checksum_ok(block: bytes) -> bool:
    stored = block[148:156].split(b"\0", 1)[0].strip(b" ")
    if not stored:
        return False
    try:
        want = int(stored, 8)
    except ValueError:
        return False
    # the checksum counts its own field as eight spaces
    unsigned = sum(block) - sum(block[148:156]) + 256
    if want == unsigned:
        return True
    signed = sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 256
    return want == signed


_ZERO_BLOCK = b"\0" * BLOCK


def _pax_time(value: bytes) -> int:
    """Whole seconds of a PAX time ("1700000000.123456789", maybe negative)."""
    whole, _, _frac = value.partition(b".")
    try:
        return int(whole) if whole not in (b"", b"-") else 0
    except ValueError:
        raise ArchiveError(f"corrupt PAX time {value[:40]!r}") from None


def _parse_pax(data: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise ArchiveError("corrupt PAX header")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ArchiveError("corrupt PAX header length") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise ArchiveError("corrupt PAX header record")
        key, _, value = record[:-1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return out


class TarReader:
    """Reads tar entries from a file descriptor; call :meth:`data` or :meth:`skip` per entry."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = b""
        self._pos = 0
        self.offset = 0
        self._data_left = 0  # data of the current entry not consumed yet
        self._pad = 0  # its padding
        self._globals: dict[str, bytes] = {}

    def _read(self, n: int) -> bytes:
        """Exactly *n* bytes, or fewer at end of input."""
        avail = len(self._buf) - self._pos
        if avail < n:
            parts = [self._buf[self._pos :]]
            have = avail
            while have < n:
                chunk = os.read(self._fd, max(CHUNK, n - have))
                if not chunk:
                    break
                parts.append(chunk)
                have += len(chunk)
            self._buf = b"".join(parts)
            self._pos = 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        self.offset += len(out)
        return out

    def _need(self, n: int, what: str) -> bytes:
        data = self._read(n)
        if len(data) != n:
            raise ArchiveError(f"truncated tar: input ended inside {what} at byte {self.offset}")
        return data

    def __iter__(self) -> Iterator[TarEntry]:
        pax: dict[str, bytes] = {}
        longname: bytes | None = None
        longlink: bytes | None = None
        first = True
        while True:
            if self._data_left or self._pad:
                self.skip()
            block = self._read(BLOCK)
            if not block:
                if first:
                    raise ArchiveError("not a tar archive: the input is empty")
                raise ArchiveError("truncated tar: input ended without the end-of-archive marker")
            if len(block) != BLOCK:
                raise ArchiveError(
                    f"truncated tar: input ended inside a header at byte {self.offset}"
                )
            if block == _ZERO_BLOCK:
                if first:
                    raise ArchiveError("not a tar archive: it starts with an empty block")
                return
            # the checksum counts its own field as eight spaces; the common case inline
            field8 = block[148:156]
            try:
                fast_ok = int(field8.strip(b" \0"), 8) == sum(block) - sum(field8) + 256
            except ValueError:
                fast_ok = False
            if not fast_ok and not _checksum_ok(block):
                if first:
                    raise ArchiveError("not a tar archive (bad header checksum)")
                raise ArchiveError(
                    f"corrupt tar: bad header checksum at byte {self.offset - BLOCK}"
                )
            first = False
            typeflag = block[156:157]
            size = _number(block[124:136], "size")
            if typeflag in (XHDTYPE, XGLTYPE, GNU_LONGNAME, GNU_LONGLINK):
                if size > 16 << 20:
                    raise ArchiveError(f"tar extension header of {size} bytes is too large")
                data = self._need(size + (-size % BLOCK), "an extended header")[:size]
                if typeflag == XHDTYPE:
                    pax.update(_parse_pax(data))
                elif typeflag == XGLTYPE:
                    self._globals.update(_parse_pax(data))
                elif typeflag == GNU_LONGNAME:
                    longname = data.split(b"\0", 1)[0]
                else:
                    longlink = data.split(b"\0", 1)[0]
                continue
            merged = {**self._globals, **pax} if self._globals else pax
            name = block[0:100].split(b"\0", 1)[0]
            if block[257:262] == b"ustar" and block[345] != 0:
                name = block[345:500].split(b"\0", 1)[0] + b"/" + name
            if longname is not None:
                name = longname
            if "path" in merged:
                name = merged["path"]
            link = block[157:257].split(b"\0", 1)[0]
            if longlink is not None:
                link = longlink
            if "linkpath" in merged:
                link = merged["linkpath"]
            if "size" in merged:
                size = int(merged["size"])
            entry = TarEntry(
                name=name.decode("utf-8", "surrogateescape"),
                type=typeflag,
                mode=_number(block[100:108], "mode") & 0o7777,
                uid=int(merged["uid"]) if "uid" in merged else _number(block[108:116], "uid"),
                gid=int(merged["gid"]) if "gid" in merged else _number(block[116:124], "gid"),
                size=size,
                mtime=_pax_time(merged["mtime"])
                if "mtime" in merged
                else _number(block[136:148], "mtime"),
                linkname=link.decode("utf-8", "surrogateescape") if link else "",
            )
            if typeflag in (CHRTYPE, BLKTYPE):
                entry.devmajor = _number(block[329:337], "devmajor")
                entry.devminor = _number(block[337:345], "devminor")
            if merged:
                entry.xattrs = {
                    k[len("SCHILY.xattr.") :]: v
                    for k, v in merged.items()
                    if k.startswith("SCHILY.xattr.")
                }
            if typeflag not in _TYPE_MODE and typeflag != LNKTYPE:
                raise ArchiveError(
                    f"tar entry {entry.name!r} has unsupported type "
                    f"{typeflag.decode(errors='replace')!r}"
                )
            self._data_left = size
            self._pad = -size % BLOCK
            pax, longname, longlink = {}, None, None
            yield entry

    def data(self) -> Iterator[bytes | memoryview]:
        """The current entry's data in slices; its padding is consumed after the last one."""
        while self._data_left:
            avail = len(self._buf) - self._pos
            if not avail:
                if self._data_left >= CHUNK:  # large file: hand over reads without buffering
                    chunk = os.read(self._fd, CHUNK)
                    if not chunk:
                        self._truncated()
                    self._data_left -= len(chunk)
                    self.offset += len(chunk)
                    yield chunk
                    continue
                self._buf = os.read(self._fd, CHUNK)
                self._pos = 0
                avail = len(self._buf)
                if not avail:
                    self._truncated()
            n = min(avail, self._data_left)
            view = memoryview(self._buf)[self._pos : self._pos + n]
            self._pos += n
            self.offset += n
            self._data_left -= n
            yield view
        self._need(self._pad, "padding")
        self._pad = 0

    def _truncated(self) -> None:
        raise ArchiveError(f"truncated tar: input ended inside file data at byte {self.offset}")

    def skip(self) -> None:
        """Skip the rest of the current entry's data and its padding."""
        left = self._data_left + self._pad
        while left:
            got = len(self._read(min(left, CHUNK)))
            if not got:
                self._truncated()
            left -= got
        self._data_left = self._pad = 0

    def drain(self) -> None:
        """Read the input to its end (the bytes after the end-of-archive marker)."""
        while os.read(self._fd, CHUNK):
            pass
