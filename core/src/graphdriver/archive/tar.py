"""A streaming writer of OCI layer tars (POSIX ustar + PAX), and what it shares with the
reader in :mod:`.tar_reader`: the type flags and :class:`TarEntry`.

Written for this job rather than taken from :mod:`tarfile`: the writer sends file data with
sendfile(2) straight from the layer to the output.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from zlib import adler32

from ..errors import ArchiveError
from ..linux import xattr
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
GNU_SPARSE = b"S"

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

#: the largest numbers an 8- and a 12-byte octal field hold
_MAX_ID, _MAX_NUMBER = 0o7777777, 0o77777777777
#: overlayfs's own xattrs (origin, impure, opaque) never go into a tar
_SKIP = (whiteout.OVERLAY_XATTR_PREFIX,)


@dataclass(slots=True)
class TarEntry:
    """One member of a tar as read, after PAX and GNU extensions were folded in."""

    name: str
    type: bytes
    mode: int
    uid: int
    gid: int
    #: bytes of the file (of a sparse file: its real size, holes included)
    size: int
    mtime_ns: int
    atime_ns: int | None = None
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    #: a sparse file's data regions (offset, length); the rest of it is holes
    sparse: list[tuple[int, int]] | None = None

    @property
    def is_file(self) -> bool:
        return self.type in (REGTYPE, AREGTYPE, CONTTYPE)


# ---------------------------------------------------------------------------------------- writer


def _pax_record(key: str, value: bytes) -> bytes:
    """``<length> <key>=<value>\n``, the length counting its own digits."""
    body = b" %s=%s\n" % (key.encode(), value)
    n = len(body)
    digits = len(str(n))
    if len(str(n + digits)) > digits:  # they made it a digit longer: 98 + 2 is 100, so 101
        digits += 1
    return b"%d%s" % (n + digits, body)


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
    mtime_ns: int | None = None,
    linkname: str = "",
    devmajor: int = 0,
    devminor: int = 0,
    xattrs: Iterable[tuple[str, bytes]] = (),
) -> bytes:
    """The header block(s) of one entry: a PAX extended header first when ustar cannot hold it.

    *mtime_ns*, when it has a fraction of a second, goes in a PAX ``mtime`` record as well;
    whole seconds stay in the ustar field alone (as Docker writes them)."""
    bname = name.encode("utf-8", "surrogateescape")  # os.fsencode, without its call
    if not linkname and not xattrs and not devmajor and not devminor:
        head = _plain_header(bname, typeflag, mode, uid, gid, size, mtime, mtime_ns)
        if head is not None:
            return head
    return _general_header(
        bname, typeflag, mode, uid, gid, size, mtime, mtime_ns, linkname, devmajor, devminor,
        xattrs,
    )  # fmt: skip


def _general_header(
    bname: bytes,
    typeflag: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    mtime_ns: int | None,
    linkname: str,
    devmajor: int,
    devminor: int,
    xattrs: Iterable[tuple[str, bytes]],
) -> bytes:
    """:func:`encode_header` for any entry, block by block."""
    blink = linkname.encode("utf-8", "surrogateescape")
    pax: list[bytes] = []
    if len(bname) <= 100 and bname.isascii():  # most names: no call to split them
        split: tuple[bytes, bytes] | None = (b"", bname)
    else:
        split = _split_ustar(bname) if bname.isascii() else None
    if split is None:
        pax.append(_pax_record("path", bname))
        split = (b"", bname[:100])
    if blink and (len(blink) > 100 or not blink.isascii()):
        pax.append(_pax_record("linkpath", blink))
        blink = blink[:100]
    if uid > _MAX_ID:
        pax.append(_pax_record("uid", str(uid).encode()))
        uid = 0
    if gid > _MAX_ID:
        pax.append(_pax_record("gid", str(gid).encode()))
        gid = 0
    if size > _MAX_NUMBER:
        pax.append(_pax_record("size", str(size).encode()))
        size = 0
    if mtime_ns is not None:
        mtime = _sub_second_mtime(pax, mtime_ns)
    mtime = 0 if mtime < 0 else min(mtime, _MAX_NUMBER)
    if xattrs:
        for key, value in sorted(xattrs):
            pax.append(_pax_record("SCHILY.xattr." + key, value))
    head = _pax_header(pax, split[1], mtime) if pax else b""
    prefix, base = split
    return head + _block(
        base, prefix, typeflag, mode, uid, gid, size, mtime, blink, devmajor, devminor
    )


def _pax_header(records: list[bytes], name: bytes, mtime: int) -> bytes:
    """The PAX extended header (its block and its records) that goes before an entry."""
    data = b"".join(records)
    pname = (b"PaxHeaders/" + name)[:100]
    head = _block(pname, b"", XHDTYPE, 0o644, 0, 0, len(data), mtime, b"", 0, 0)
    return head + data + b"\0" * (-len(data) % BLOCK)


def _sub_second_mtime(pax: list[bytes], ns: int) -> int:
    """Whole seconds of *ns* for the ustar field, and a PAX ``mtime`` record when there is a
    fraction ("seconds.fraction", trailing zeros dropped, as Go's archive/tar writes it)."""
    whole, frac = divmod(ns, 1_000_000_000)
    if frac:
        if ns >= 0:  # a file's mtime after 1970: the common case, formatted once
            text = (b"%d.%09d" % (whole, frac)).rstrip(b"0")
        else:
            int_part, frac_part = divmod(-ns, 1_000_000_000)
            text = (b"-%d.%09d" % (int_part, frac_part)).rstrip(b"0")
        pax.append(_pax_record("mtime", text))
    return whole


#: a ustar header: name, the five numbers (mode, uid, gid, size, mtime: 48 bytes), checksum,
#: type, link name, magic and version, owner names (empty), device numbers, prefix
_USTAR_FORMAT = "100s48s8sc100s8s64x16s155s12x"
_USTAR = struct.Struct(_USTAR_FORMAT)
#: a PAX header whose records fit one block, that block, and the entry's ustar header
_PAX_BLOCK_USTAR = struct.Struct(_USTAR_FORMAT + "512s" + _USTAR_FORMAT)
_NUMBERS = b"%07o\0%07o\0%07o\0%011o\0%011o\0"
_NO_DEVICE = b"0000000\0" * 2


def byte_sum(data: bytes) -> int:
    """``sum(data)``, the arithmetic of a tar header's checksum, in C: adler32's low half is 1
    plus the byte sum modulo 65,521, which is exact for 256 bytes (at most 65,280). Four
    times faster than sum() on a 512-byte header."""
    if len(data) <= 256:  # most headers' non-zero parts (name, prefix and link in 191 bytes)
        return (adler32(data) & 0xFFFF) - 1
    total = 0
    for start in range(0, len(data), 256):
        total += (adler32(data[start : start + 256]) & 0xFFFF) - 1
    return total


#: what the checksum adds for the fields every header has the same: the checksum field
#: itself (eight spaces while it is summed), the magic "ustar\0" and the version "00"
_CHKSUM_FIXED = sum(b"        ustar\x0000")
#: ... and the device fields of a header that is not a device's
_CHKSUM_NO_DEVICE = _CHKSUM_FIXED + sum(_NO_DEVICE)
_MAGIC = b"ustar\x0000"


def _plain_header(
    bname: bytes,
    typeflag: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    mtime_ns: int | None,
) -> bytes | None:
    """:func:`encode_header` for the entry nearly every diff is made of (an ASCII name of
    at most 100 bytes, numbers that fit, an mtime after 1970; the caller checks that it has
    no link, device or xattrs), in one pack: its ustar header, after the PAX header of its
    sub-second mtime if it has one. The same bytes as the general path, in a third of the
    time (9 us a header was a quarter of the Python of a generated diff of small files).
    None for any other entry."""
    if uid > _MAX_ID or gid > _MAX_ID or size > _MAX_NUMBER or len(bname) > 100:
        return None
    if not bname.isascii():
        return None
    if mtime_ns is not None:
        mtime, frac = divmod(mtime_ns, 1_000_000_000)
    else:
        frac = 0
    if mtime < 0 or mtime > _MAX_NUMBER:
        return None
    numbers = _NUMBERS % (mode & 0o7777, uid, gid, size, mtime)
    chksum = (adler32(bname + typeflag + numbers) & 0xFFFF) - 1 + _CHKSUM_NO_DEVICE
    if not frac:
        return _USTAR.pack(
            bname, numbers, b"%06o\0 " % chksum, typeflag, b"", _MAGIC, _NO_DEVICE, b""
        )
    text = (b"%d.%09d" % (mtime, frac)).rstrip(b"0")
    # "<length> mtime=<text>\n": 10 bytes and the text, whose length has two digits
    record = b"%d mtime=%s\n" % (len(text) + 10, text)
    pname = (b"PaxHeaders/" + bname)[:100]
    pnumbers = _NUMBERS % (0o644, 0, 0, len(record), mtime)
    pchksum = (adler32(pname + XHDTYPE + pnumbers) & 0xFFFF) - 1 + _CHKSUM_NO_DEVICE
    return _PAX_BLOCK_USTAR.pack(
        pname, pnumbers, b"%06o\0 " % pchksum, XHDTYPE, b"", _MAGIC, _NO_DEVICE, b"",
        record,
        bname, numbers, b"%06o\0 " % chksum, typeflag, b"", _MAGIC, _NO_DEVICE, b"",
    )  # fmt: skip


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
    name, prefix, linkname = name[:100], prefix[:155], linkname[:100]
    # one format for the five numbers, and the devices' constant for all but devices: a
    # header was 5 us of formatting
    numbers = _NUMBERS % (mode & 0o7777, uid, gid, size, mtime)
    dev = b"%07o\0%07o\0" % (devmajor, devminor) if devmajor or devminor else _NO_DEVICE
    if len(numbers) != 48 or len(dev) != 16:
        raise ValueError("a number too large for a ustar field")  # encode_header caps them
    # the sum of the header's bytes, from its non-zero parts: summing all 512 was half the
    # cost of a header
    chksum = byte_sum(b"".join((name, prefix, linkname, typeflag, numbers, dev))) + _CHKSUM_FIXED
    return _USTAR.pack(
        name, numbers, b"%06o\0 " % chksum, typeflag, linkname, b"ustar\x0000", dev, prefix
    )


#: bodies at least this large go from the layer to an output fd by sendfile(2), in the kernel;
#: smaller ones are read into the buffer, so that many entries leave in one write
KERNEL_COPY = 128 * 1024
_ZEROS = bytes(BLOCK)
#: errors of sendfile(2) that only say it cannot write to this output (O_APPEND, a tty...)
_NO_SENDFILE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


class TarWriter:
    """Writes tar entries to a file descriptor or to a ``write`` callable.

    Headers and small bodies gather in one reused buffer of :data:`CHUNK` bytes that leaves in
    one write; with a plain fd, large bodies go by sendfile(2) and never enter Python.
    """

    def __init__(
        self, write: Callable[[bytes], object] | None = None, fd: int | None = None
    ) -> None:
        if (write is None) == (fd is None):
            raise ValueError("give exactly one of write or fd")
        self._write = write
        self._fd = fd
        self._sendfile = fd is not None
        self._buf = memoryview(bytearray(CHUNK))
        self._pos = 0
        self._links: dict[tuple[int, int], str] = {}
        self.bytes_written = 0
        #: called with the number of bytes each time some are written
        self.progress: Callable[[int], object] | None = None

    def write_raw(self, data: bytes | memoryview) -> None:
        """Bytes that are already tar (headers, padding, an exact diff's raw parts)."""
        n = len(data)
        pos = self._pos
        if pos + n > CHUNK:
            self.flush()
            pos = 0
            if n > CHUNK:
                self._out(data)
                return
        self._buf[pos : pos + n] = data
        self._pos = pos + n

    def _out(self, data: bytes | memoryview) -> None:
        if self._fd is not None:
            with memoryview(data) as view:
                done = 0
                while done < len(view):
                    done += os.write(self._fd, view[done:])
        else:
            assert self._write is not None
            self._write(bytes(data))
        self._wrote(len(data))

    def _wrote(self, n: int) -> None:
        self.bytes_written += n
        if self.progress is not None:
            self.progress(n)

    def flush(self) -> None:
        if self._pos:
            self._out(self._buf[: self._pos])
            self._pos = 0

    def copy_from(self, src: int, offset: int, length: int) -> int:
        """Append *length* bytes of the open file *src* from *offset*; the bytes copied, fewer
        only when the file ends sooner."""
        if length >= KERNEL_COPY:
            if self._sendfile:
                self.flush()
                done = self._kernel_copy(src, offset, length)
                if done >= 0:
                    self._wrote(done)
                    return done
        elif self._pos + length <= CHUNK:  # a small body that fits: one pread, no loop
            data = os.pread(src, length, offset)
            pos, n = self._pos, len(data)
            self._buf[pos : pos + n] = data
            self._pos = pos + n
            if n == length or not n:
                return n
            return n + self.copy_from(src, offset + n, length - n)
        done = 0
        while done < length:
            if self._pos == CHUNK:
                self.flush()
            pos = self._pos
            # pread and a copy cost less than preadv into the buffer (its iovec set-up)
            data = os.pread(src, min(CHUNK - pos, length - done), offset + done)
            if not data:
                break
            n = len(data)
            self._buf[pos : pos + n] = data
            self._pos = pos + n
            done += n
        return done

    def _kernel_copy(self, src: int, offset: int, length: int) -> int:
        """sendfile(2) of the range; -1 when this output takes no sendfile (nothing written)."""
        assert self._fd is not None
        done = 0
        while done < length:
            try:
                n = os.sendfile(self._fd, src, offset + done, min(length - done, 1 << 30))
            except OSError as exc:
                if done or exc.errno not in _NO_SENDFILE:
                    raise
                self._sendfile = False
                return -1
            if not n:
                break
            done += n
        return done

    def _small_file(self, header: bytes, fd: int, size: int) -> bool:
        """Put the entry of the open file *fd* of at most :data:`KERNEL_COPY` bytes (its
        *header*, its *size* bytes, their padding) into the buffer at once, if the file still
        has *size* bytes: the entry most diffs are made of, in one pread and no calls. False,
        having added nothing, otherwise."""
        if self._pos + len(header) + size + BLOCK > CHUNK:
            self.flush()
        pos = self._pos
        start = pos + len(header)
        end = start + size
        padded = end + (-size % BLOCK)
        data = os.pread(fd, size, 0) if size else b""
        if len(data) != size:
            return False
        buf = self._buf
        buf[pos:start] = header
        buf[start:end] = data
        buf[end:padded] = _ZEROS[: padded - end]
        self._pos = padded
        return True

    def pad(self, size: int) -> None:
        """The zeros that end a body of *size* bytes on a block boundary."""
        self.write_raw(_ZEROS[: -size % BLOCK])

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
        elif typeflag == DIRTYPE and not arcname.endswith("/"):
            arcname += "/"
        major = minor = 0
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):
            major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        # a file with data is opened once: its xattrs are read through the fd that reads its
        # data (one path lookup where there were three)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW) if size else -1
        try:
            xattrs = () if typeflag == LNKTYPE else xattr.read(path if fd < 0 else fd, _SKIP)
            if not xattrs and not linkname and not major and not minor and size < KERNEL_COPY:
                header = _plain_header(
                    arcname.encode("utf-8", "surrogateescape"), typeflag, st.st_mode,
                    st.st_uid, st.st_gid, size, 0, st.st_mtime_ns,
                )  # fmt: skip
                if header is not None and self._small_file(header, fd, size):
                    return
            self.write_raw(
                encode_header(
                    arcname,
                    typeflag,
                    mode=stat.S_IMODE(st.st_mode),
                    uid=st.st_uid,
                    gid=st.st_gid,
                    size=size,
                    mtime_ns=st.st_mtime_ns,
                    linkname=linkname,
                    devmajor=major,
                    devminor=minor,
                    xattrs=xattrs,
                )
            )
            if size:
                if self.copy_from(fd, 0, size) != size:
                    raise ArchiveError(f"{path} shrank while it was being archived")
                self.pad(size)
        finally:
            if fd >= 0:
                os.close(fd)

    def add_whiteout(self, arcname: str) -> None:
        """Add an empty OCI whiteout entry (``.wh.<name>`` or ``.wh..wh..opq``)."""
        self.write_raw(encode_header(arcname, REGTYPE, mode=0, mtime=0))

    def close(self) -> None:
        """Write the end-of-archive marker (two zero blocks) and flush."""
        self.write_raw(_ZEROS * 2)
        self.flush()


def _arc(path: str) -> str:
    return path.lstrip("/")


def write_changes_tar(
    writer: TarWriter, root: str, changes: Iterable[Change], *, source: str = "tree"
) -> None:
    """Write *changes* of the layer whose files are under *root* as an OCI layer tar.

    Every delete is one ``.wh.<name>``, never an opaque marker, whatever *source* (``"tree"``
    or ``"overlay"``, an upper directory) the changes came from: overlay's
    :func:`~.changes.overlay_changes` lists one delete per name an opaque directory hides,
    so the same changes give the same bytes on every driver.
    """
    del source  # kept for callers; the entries do not depend on it
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
    writer.close()
