"""A streaming writer of OCI layer tars: :class:`TarWriter` (a reused 1 MiB buffer; with a plain
fd, large bodies by sendfile(2) straight from the layer to the output) and
:func:`write_changes_tar`, a layer's changes as its tar. The headers are :mod:`.tar`'s.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..errors import ArchiveError
from ..linux import xattr
from . import fastpath, whiteout
from .changes import Change, ChangeKind
from .tar import (
    BLOCK,
    CHUNK,
    DIRTYPE,
    LNKTYPE,
    MODE_TYPE,
    REGTYPE,
    SYMTYPE,
    encode_header,
    plain_header,
)

if TYPE_CHECKING:
    from .tarsplit import Segments

log = logging.getLogger(__name__)

#: the xattrs no tar carries; the C fast path is told overlayfs's alone, and leaves to Python
#: any file with another (an XFS ACL's ``trusted.SGI_ACL_*`` comes with ``system.posix_acl_*``)
_SKIP = xattr.NOT_IN_TARS
_SKIP_BYTES = whiteout.OVERLAY_XATTR_PREFIX.encode()
#: what ``_fastpath.plain_entry`` returns for an entry that does not fit in the buffer's rest
_NO_ROOM = -2
#: bodies at least this large go from the layer to an output fd by sendfile(2), in the kernel;
#: smaller ones are read into the buffer, so that many entries leave in one write
KERNEL_COPY = 128 * 1024
_ZEROS = bytes(BLOCK)
#: errors of sendfile(2) that only say it cannot write to this output (O_APPEND, a tty...)
_NO_SENDFILE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


class TarWriter:
    """Writes tar entries to a file descriptor or to a ``write`` callable.

    Headers and small bodies gather in one reused buffer of :data:`CHUNK` bytes that leaves in
    one write; with a plain fd, large bodies go by sendfile(2) and never enter Python. A
    writer whose write raised is not used again (its buffer may hold what it did not count).
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

    def replay_run(
        self, segments: Segments, directory: bytes, dir_fd: int, noted: dict[str, Any]
    ) -> int:
        """Copy the raw parts and bodies at the front of *segments* in C, bodies of files in
        *directory* (open as *dir_fd*) that match their *noted* rows, until one that
        :func:`.exact.replay` must take (``_fastpath.c`` says which); the tar bytes added.
        Only for a writer to an fd without progress (:meth:`takes_runs`)."""
        assert fastpath.replay_run is not None and self._fd is not None
        segments.pos, self._pos, flushed, total = fastpath.replay_run(
            segments.buf,
            segments.pos,
            self._buf,
            self._pos,
            self._fd,
            directory,
            dir_fd,
            noted,
            KERNEL_COPY,
        )
        if flushed:
            self._wrote(flushed)
        return total

    def takes_runs(self) -> bool:
        """Whether :meth:`replay_run` may be used: the C loops were built, the output is an
        fd and nobody counts progress at each write."""
        return fastpath.ENABLED and self._fd is not None and self.progress is None

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

    def add_plain(self, path: str, arcname: str, dir_fd: int = -1, name: str = "") -> bool:
        """:meth:`add_path` of the file at *path* in C (``_fastpath.plain_entry``: its lstat,
        open, xattr listing, read and header, and no Python per call but this), if it is the
        entry nearly every generated diff is made of: a regular file of one link and less
        than :data:`KERNEL_COPY` bytes, with a name and numbers :func:`.tar.plain_header`
        takes and no xattr but overlayfs's own; the same bytes as :meth:`add_path`. False,
        having added nothing, for any other (:meth:`add_path` then takes it), or where the C
        loops were not built. With *dir_fd*, an open directory that holds the file as
        *name*, the calls look it up there (*path* names it in errors)."""
        if not fastpath.ENABLED:
            return False
        assert fastpath.plain_entry is not None
        buf, skip = self._buf, _SKIP_BYTES
        pos = fastpath.plain_entry(
            path, arcname, buf, self._pos, skip, KERNEL_COPY, dir_fd, name
        )  # fmt: skip
        if pos == _NO_ROOM:
            self.flush()
            pos = fastpath.plain_entry(path, arcname, buf, 0, skip, KERNEL_COPY, dir_fd, name)
        if pos < 0:
            return False
        self._pos = pos
        return True

    def add_plain_run(self, changes: list[Change], i: int, root: str, where: str, fd: int) -> int:
        """:meth:`add_plain` of the changes from *i* on while they are files of the directory
        *where* (open as *fd*) under *root* that it takes (``_fastpath.plain_run``, one call
        for them all); the index of the first it left."""
        assert fastpath.plain_run is not None
        while True:
            i, pos, no_room = fastpath.plain_run(
                changes, i, root, where, fd, self._buf, self._pos, _SKIP_BYTES, KERNEL_COPY
            )  # fmt: skip
            emptied = self._pos == pos == 0
            self._pos = pos
            if not no_room or emptied:  # (an empty buffer has room for any it takes)
                return i
            self.flush()

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
        typeflag = MODE_TYPE.get(fmt)
        if typeflag is None:  # sockets have no tar form; Docker skips them too
            return
        size = 0
        linkname = ""
        if st.st_nlink > 1 and fmt != stat.S_IFDIR:  # any inode but a directory's (Docker's)
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
            xattrs = () if typeflag == LNKTYPE else _xattrs(path if fd < 0 else fd, arcname)
            if not xattrs and not linkname and not major and not minor and size < KERNEL_COPY:
                header = plain_header(
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
    parent = _Parent(fastpath.ENABLED)
    listed = changes if isinstance(changes, list) else list(changes)
    i = 0
    try:
        while i < len(listed):
            change = listed[i]
            i += 1
            arc = _arc(change.path)
            if change.kind == ChangeKind.DELETE:
                head, _, base = arc.rpartition("/")
                prefix = head + "/" if head else ""
                writer.add_whiteout(prefix + whiteout.whiteout_name(base))
                continue
            full = root + change.path
            where, _, name = full.rpartition("/")
            fd = parent.fd(where)
            if not writer.add_plain(full, arc, fd, name):
                writer.add_path(full, arc, os.lstat(full))
            if fd >= 0:  # the directory's next files, in C
                i = writer.add_plain_run(listed, i, root, where, fd)
    finally:
        parent.close()
    writer.close()


class _Parent:
    """The directory of the entries being written, open while they are (a changes list in
    its order keeps a directory's files together), so that the C call looks each file up by
    its name in it; -1 where it cannot be opened (the whole path then gives the error, as
    it did), and always where there is no C call."""

    __slots__ = ("dir_fd", "path", "wanted")

    def __init__(self, wanted: bool) -> None:
        self.wanted = wanted
        self.path: str | None = None
        self.dir_fd = -1

    def fd(self, path: str) -> int:
        if path != self.path and self.wanted:
            self.close()
            self.path = path
            with contextlib.suppress(OSError):
                self.dir_fd = os.open(path or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return self.dir_fd

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def _xattrs(where: str | int, arcname: str) -> list[tuple[str, bytes]]:
    """The xattrs a tar carries of the file at *where* (a path or an fd): not :data:`_SKIP`,
    and not one whose name holds ``=``. A PAX record's key ends at its first ``=``, so that
    one would come back under another name and value (Go's archive/tar refuses to write it;
    GNU tar writes ``%3D``, which Docker and containerd would take literally); it is left
    out, with a warning."""
    found = xattr.read(where, _SKIP)
    for key, _ in found:
        if "=" in key:
            log.warning("xattr %r of %s is left out: a PAX key ends at '='", key, arcname)
    return [(key, value) for key, value in found if "=" not in key]
