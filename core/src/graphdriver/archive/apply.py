"""Unpack an OCI layer tar into a layer, in a sandbox.

The parent process reads the caller's stream, undoes gzip or zstd, hashes the plain tar (the
layer's diffID) and feeds it through a pipe to a forked child that has chrooted into the layer
(like Docker's chrootarchive). The child refuses entries that would leave the layer (``..``,
absolute names, writes through symlinks, hardlinks to outside names, whiteouts of ``..``) and
reports back one JSON line. Whatever a hostile tar holds, no write can land outside the layer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ArchiveError, GraphDriverError, UnsafeArchive
from . import sparse, tarsplit, whiteout
from .copy_up import LowerDirs, lstat_or_none
from .streams import LayerDecoder, compression_of
from .tar import (
    BLKTYPE,
    CHRTYPE,
    CHUNK,
    DIRTYPE,
    FIFOTYPE,
    LNKTYPE,
    SYMTYPE,
    TarEntry,
)
from .tar_reader import TarReader

log = logging.getLogger(__name__)

F_SETPIPE_SZ = 1031
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply_layer`` unpacked."""

    #: bytes of file data written (each file once; hardlinks add nothing)
    size: int
    #: "sha256:<hex>" of the uncompressed tar: the OCI diffID
    diff_id: str
    #: "none", "gzip" or "zstd"
    compression: str
    #: bytes of the uncompressed tar
    tar_size: int
    #: what an exact diff of the layer needs (``archive.tarsplit``), or None
    record: bytes | None = None
    #: why no record was kept (None when one was, or none was asked for)
    no_record: str | None = None


# ---------------------------------------------------------------------------------- the parent


def apply_layer(
    target: Path,
    stream: BinaryIO,
    *,
    whiteouts: str = "delete",
    lowers: Sequence[Path] = (),
    progress: Callable[[int], None] | None = None,
    record: bool = False,
) -> ApplyResult:
    """Unpack the layer tar read from *stream* into the directory *target*.

    *whiteouts* is ``"delete"`` (target is the layer's full view: remove what a whiteout names)
    or ``"overlay"`` (target is an overlay upper: write overlayfs whiteouts). *lowers* are an
    overlay upper's lower dirs, nearest first: a hardlink to a file in them copies it up, as
    the kernel does. With *record*, the result carries what an exact diff of the layer
    needs (``tarsplit``). On error the target is left half-written; the caller rolls it back.
    """
    if whiteouts not in ("delete", "overlay"):
        raise ValueError(whiteouts)
    lower_fds: list[int] = []
    try:  # opened before the sandbox's chroot: its only way to the lower dirs
        for lower in lowers:
            lower_fds.append(os.open(lower, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        direct = _plain_file(stream)
        if direct is not None:
            return _apply_file(target, *direct, _Sandbox(whiteouts, lower_fds, record), progress)
        return _apply_stream(target, stream, _Sandbox(whiteouts, lower_fds, record), progress)
    finally:
        for fd in lower_fds:
            os.close(fd)


@dataclass(frozen=True)
class _Sandbox:
    """What the extraction child is asked to do besides reading the tar."""

    whiteouts: str
    lower_fds: list[int]
    record: bool


def _apply_stream(
    target: Path,
    stream: BinaryIO,
    sandbox: _Sandbox,
    progress: Callable[[int], None] | None,
) -> ApplyResult:
    """apply_layer for any stream: decoded and hashed here, fed to the sandbox by a pipe."""
    head = stream.read(8)
    decoder = LayerDecoder(head)
    data_r, data_w = os.pipe2(os.O_CLOEXEC)
    res_r, res_w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # a bigger pipe is faster, not needed
        fcntl.fcntl(data_w, F_SETPIPE_SZ, 1 << 20)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, reported through res_w
        os.close(data_w)
        os.close(res_r)
        _child(str(target), data_r, res_w, sandbox)
    os.close(data_r)
    os.close(res_w)
    digest = hashlib.sha256()
    tar_size = 0
    feed_error: GraphDriverError | None = None
    try:
        chunk = head
        while chunk:
            plain = decoder.feed(chunk)
            if plain:
                digest.update(plain)
                tar_size += len(plain)
                _write_all(data_w, plain)
            if progress is not None:
                progress(len(chunk))
            chunk = stream.read(CHUNK)
        decoder.finish()
    except BrokenPipeError:
        pass  # the child stopped reading: its report says why
    except GraphDriverError as exc:
        feed_error = exc
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(data_w)
        report = _read_all(res_r)
        os.close(res_r)
        _, status = os.waitpid(pid, 0)
    return _result(report, status, feed_error, digest, decoder.kind, tar_size)


def _plain_file(stream: BinaryIO) -> tuple[int, int] | None:
    """(fd, offset) if *stream* is an uncompressed tar in a regular file, else None."""
    try:
        fd = stream.fileno()
        offset = stream.tell()
    except (AttributeError, OSError, ValueError):
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return None
    if compression_of(os.pread(fd, 8, offset)) != "none":
        return None
    return fd, offset


def _apply_file(
    target: Path,
    fd: int,
    offset: int,
    sandbox: _Sandbox,
    progress: Callable[[int], None] | None,
) -> ApplyResult:
    """apply_layer for a plain tar in a regular file: the sandbox reads the file itself while
    this process hashes it, so no byte goes through a pipe."""
    own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)  # an offset of its own
    os.lseek(own, offset, os.SEEK_SET)
    res_r, res_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, reported through res_w
        os.close(res_r)
        _child(str(target), own, res_w, sandbox)
    os.close(own)
    os.close(res_w)
    digest = hashlib.sha256()
    pos = offset
    try:
        while chunk := os.pread(fd, CHUNK, pos):
            digest.update(chunk)
            pos += len(chunk)
            if progress is not None:
                progress(len(chunk))
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        report = _read_all(res_r)
        os.close(res_r)
        _, status = os.waitpid(pid, 0)
    return _result(report, status, None, digest, "none", pos - offset)


def _result(
    report: bytes,
    status: int,
    feed_error: GraphDriverError | None,
    digest: Any,
    compression: str,
    tar_size: int,
) -> ApplyResult:
    line, _, blob = report.partition(b"\n")
    result = json.loads(line) if line else {}
    if result.get("unsafe"):
        raise UnsafeArchive(result["error"])
    if feed_error is not None:  # the sandbox saw a cut stream: its error is a consequence
        raise feed_error
    if "error" in result:
        raise ArchiveError(result["error"], errno_=result.get("errno"))
    if status != 0 or "size" not in result:
        raise ArchiveError(f"the extraction process died ({_describe(status)})")
    if tar_size == 0:
        log.warning(
            "the layer stream was empty (0 bytes): applied as an empty layer, as Docker does"
        )
    no_record = result.get("no_record")
    if blob and result.get("tar_size") != tar_size:  # never: the sandbox read what was hashed
        no_record, blob = "its record does not cover the whole tar", b""
    return ApplyResult(
        size=int(result["size"]),
        diff_id="sha256:" + digest.hexdigest(),
        compression=compression,
        tar_size=tar_size,
        record=blob or None,
        no_record=no_record,
    )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 65536):
        parts.append(chunk)
    return b"".join(parts)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


# ----------------------------------------------------------------------------------- the child


def _child(  # pragma: no cover
    target: str, data_fd: int, res_fd: int, sandbox: _Sandbox
) -> None:
    code = 0
    report: dict[str, object]
    blob = b""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.chroot(target)
        os.chdir("/")
        os.umask(0)
        lowers = LowerDirs(sandbox.lower_fds) if sandbox.lower_fds else None
        reader = TarReader(data_fd)
        recorder = tarsplit.Recorder() if sandbox.record else None
        if recorder is not None:
            reader.tap = recorder.raw
        size = _Extractor(reader, sandbox.whiteouts, lowers, recorder).run()
        report = {"size": size}
        if recorder is not None:
            blob = recorder.finish(lambda p: os.lstat(p or "/")) or b""
            report.update(tar_size=recorder.tar_size, no_record=recorder.failed)
    except UnsafeArchive as exc:
        report, code = {"error": str(exc), "unsafe": True}, 1
    except ArchiveError as exc:
        report, code = {"error": str(exc), "errno": exc.errno}, 1
    except OSError as exc:
        what = f"cannot unpack the layer: {exc.strerror}"
        if exc.filename:
            what += f" ({exc.filename})"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            what += ": the filesystem or the layer's size limit is full"
        report, code = {"error": what, "errno": exc.errno}, 1
    except BaseException as exc:
        report, code = {"error": f"cannot unpack the layer: {exc!r}"}, 2
    try:
        _write_all(res_fd, json.dumps(report).encode() + b"\n" + blob)
    finally:
        os._exit(code)


def _clean_name(raw: str) -> str:
    """The entry name as a path relative to the layer's root ("" for the root itself).

    Cleaned as Docker and containerd do: ``.`` parts and empty parts go, a leading ``/`` is
    the layer's root (``/``, ``./`` and ``.`` name the root, ``/etc/x`` is ``etc/x``), and
    ``..`` is resolved lexically; a ``..`` that climbs above the root is refused.
    """
    name = raw[2:] if raw.startswith("./") else raw
    name = name.rstrip("/")
    if name and name[0] not in "./" and "/." not in name and "//" not in name:
        return name  # the common case: nothing to clean, nothing that can climb
    absolute = raw.startswith("/")
    parts: list[str] = []
    for part in raw.split("/"):
        if part in ("", "."):
            continue
        if part != "..":
            parts.append(part)
        elif parts:
            parts.pop()
        elif not absolute:  # "/.." is "/" (as in a path), "../x" leaves the layer
            raise UnsafeArchive(f"tar entry {raw!r} points outside the layer ('..')")
    return "/".join(parts)


class _Extractor:
    def __init__(
        self,
        reader: TarReader,
        whiteouts: str,
        lowers: LowerDirs | None,
        recorder: tarsplit.Recorder | None = None,
    ) -> None:
        self.reader = reader
        self.recorder = recorder
        self.overlay = whiteouts == "overlay"
        self.lowers = lowers
        self.root = os.geteuid() == 0
        self.safe_dirs: set[str] = {""}
        self.sgid_dirs: set[str] = set()
        self.created: set[str] = set()
        self.dir_times: list[tuple[str, int, int]] = []
        self.size = 0
        self._body_size = self._body_crc = 0

    def run(self) -> int:
        for entry in self.reader:
            self.entry(entry)
        self.reader.drain()
        for path, atime, mtime in sorted(
            self.dir_times, key=lambda t: t[0].count("/"), reverse=True
        ):
            os.utime(path or "/", ns=(atime, mtime), follow_symlinks=False)
        return self.size

    def parent_dir(self, name: str, raw: str) -> None:
        """Make sure every directory above *name* exists and is a real directory."""
        if name.rpartition("/")[0] in self.safe_dirs:
            return
        parts = name.split("/")[:-1]
        path = ""
        for part in parts:
            path = path + "/" + part if path else part
            if path in self.safe_dirs:
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if self.lowers is not None:  # a directory of a lower layer: copied up
                    self.lowers.copy_up(path, raw, directory=True)
                copied = lstat_or_none(path)
                if copied is None:
                    os.mkdir(path, 0o755)
                    parent = path.rpartition("/")[0]
                    if parent in self.sgid_dirs:  # a new directory inherits the setgid bit
                        self.sgid_dirs.add(path)
                elif copied.st_mode & stat.S_ISGID:
                    self.sgid_dirs.add(path)
                self.safe_dirs.add(path)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeArchive(f"tar entry {raw!r} goes through the symlink {path!r}")
            if not stat.S_ISDIR(st.st_mode):
                raise ArchiveError(f"tar entry {raw!r}: {path!r} is not a directory")
            self.safe_dirs.add(path)
            if st.st_mode & stat.S_ISGID:
                self.sgid_dirs.add(path)

    def forget_dirs_under(self, path: str) -> None:
        prefix = path + "/"
        self.safe_dirs = {d for d in self.safe_dirs if d != path and not d.startswith(prefix)}

    def remove(self, path: str) -> None:
        """Remove whatever is at *path* (missing is fine)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if self.recorder is not None:
            self.recorder.removed(path, st is not None and stat.S_ISDIR(st.st_mode))
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
            self.forget_dirs_under(path)
        else:
            os.unlink(path)

    def entry(self, e: TarEntry) -> None:
        name = _clean_name(e.name)
        if not name:  # "/", "./" or ".": the layer's root itself, whose attributes it sets
            if e.type != DIRTYPE:
                raise ArchiveError(
                    f"tar entry {e.name!r} names the layer's root but is not a directory"
                )
            self.attrs("/", e, "", is_dir=True)
            return
        head, _, base = name.rpartition("/")
        if base.startswith(whiteout.PREFIX):
            self.whiteout(name, head, base, e.name)
            return
        self.parent_dir(name, e.name)
        if self.recorder is not None:
            self.recorder.touch(name)
        if not self.overlay:
            self.created.add(name)
        if e.type == DIRTYPE:
            self.directory(name, head, e)
        elif e.is_file:
            self.regular(name, head, e)
        elif e.type == SYMTYPE:
            self.make(name, lambda: os.symlink(e.linkname, name))
            self.attrs(name, e, head, link=True)
        elif e.type == LNKTYPE:
            target = self.link_target(e)
            self.make(name, lambda: os.link(target, name, follow_symlinks=False))
        elif e.type in (CHRTYPE, BLKTYPE, FIFOTYPE):
            kind = {CHRTYPE: stat.S_IFCHR, BLKTYPE: stat.S_IFBLK, FIFOTYPE: stat.S_IFIFO}[e.type]
            dev = os.makedev(e.devmajor, e.devminor)
            self.make(name, lambda: os.mknod(name, kind | 0o600, dev))
            self.attrs(name, e, head)

    def link_target(self, e: TarEntry) -> str:
        """The existing name a hardlink entry links to; one that only a lower dir of an overlay
        upper holds is copied up first, as the kernel did when the layer was built."""
        target = _clean_name(e.linkname)
        if not target:
            raise UnsafeArchive(f"hardlink {e.name!r} points at the layer's root")
        if self.lowers is not None:
            self.size += self.lowers.copy_up(target, e.linkname)
        if self.recorder is not None:  # its link count (ctime) changes; maybe copied up
            self.recorder.touch(target)
        self.parent_dir(target, e.linkname)
        try:
            tst = os.lstat(target)
        except FileNotFoundError:
            tst = None
        if tst is None or (self.overlay and whiteout.is_overlay_whiteout(tst)):
            raise ArchiveError(f"hardlink {e.name!r}: target {e.linkname!r} is not in the layer")
        if stat.S_ISDIR(tst.st_mode):
            raise UnsafeArchive(f"hardlink {e.name!r} points at a directory")
        return target

    def make(self, name: str, create: Callable[[], object]) -> None:
        """Run *create*; if something is in the way, remove it and run it again."""
        try:
            create()
        except FileExistsError:
            self.remove(name)
            create()

    def directory(self, name: str, head: str, e: TarEntry) -> None:
        try:
            os.mkdir(name, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(name).st_mode):
                self.remove(name)
                os.mkdir(name, 0o700)
        self.safe_dirs.add(name)
        if e.mode & stat.S_ISGID:
            self.sgid_dirs.add(name)
        else:
            self.sgid_dirs.discard(name)
        self.attrs(name, e, head, is_dir=True)

    def regular(self, name: str, head: str, e: TarEntry) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        try:  # created with its final permissions: no chmod needed for most files
            fd = os.open(name, flags, e.mode & 0o777)
        except FileExistsError:
            self.remove(name)
            fd = os.open(name, flags, e.mode & 0o777)
        try:
            pieces = self.reader.data()
            if self.recorder is not None:
                self.recorder.start_body()
                pieces = self._counted(pieces)
            if e.sparse is not None:
                sparse.check_fits(e.size, e.name)
                sparse.write_regions(fd, e.sparse, pieces, e.size)
            else:
                for piece in pieces:
                    view = memoryview(piece)
                    while view:
                        view = view[os.write(fd, view) :]
            if self.recorder is not None:
                self.recorder.body(name, self._body_size, self._body_crc, e.sparse)
            self.size += e.size
            self.attrs(fd, e, head, fresh=True)
        finally:
            os.close(fd)

    def _counted(self, pieces: Iterator[bytes | memoryview]) -> Iterator[bytes | memoryview]:
        """*pieces*, their bytes and CRC-32 noted for the record."""
        self._body_size = self._body_crc = 0
        for piece in pieces:
            self._body_crc = zlib.crc32(piece, self._body_crc)
            self._body_size += len(piece)
            yield piece

    def attrs(
        self,
        target: str | int,
        e: TarEntry,
        head: str,
        *,
        is_dir: bool = False,
        link: bool = False,
        fresh: bool = False,
    ) -> None:
        """Owner, mode, xattrs and mtime of an entry; *fresh* files already have their mode.

        A file made by root is owned 0:0 unless its directory is setgid, so most files need
        no chown; a chown clears setuid/setgid bits, so those are set after it.
        """
        fd_given = isinstance(target, int)
        if self.root and (e.uid or e.gid or head in self.sgid_dirs or not fresh):
            if isinstance(target, int):
                os.fchown(target, e.uid, e.gid)
            else:
                os.chown(target, e.uid, e.gid, follow_symlinks=False)
            fresh = False
        if not link and (not fresh or e.mode & 0o7000):
            if isinstance(target, int):
                os.fchmod(target, e.mode)
            else:
                os.chmod(target, e.mode)  # never a symlink: those have link=True
        for key, value in e.xattrs.items():
            if key.startswith(whiteout.OVERLAY_XATTR_PREFIX):
                continue  # only overlayfs may write these; a tar that carries them is ignored
            try:
                if fd_given:
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
                log.debug("xattr %s not kept on %s: %s", key, e.name, exc.strerror)
        times = (e.mtime_ns if e.atime_ns is None else e.atime_ns, e.mtime_ns)
        if is_dir:
            assert isinstance(target, str)
            self.dir_times.append((target, *times))
        elif fd_given:
            os.utime(target, ns=times)
        else:
            os.utime(target, ns=times, follow_symlinks=False)

    def whiteout(self, name: str, head: str, base: str, raw: str) -> None:
        if head:
            self.parent_dir(name, raw)
        if self.recorder is not None:
            self.recorder.touch(head)
        if base == whiteout.OPAQUE:
            directory = head or "."
            if self.recorder is not None:
                self.recorder.made_opaque(head)
            if self.overlay:
                whiteout.make_overlay_opaque(directory)
                return
            with os.scandir(directory) as it:
                victims = [entry.name for entry in it]
            for victim in victims:
                path = f"{head}/{victim}" if head else victim
                if path not in self.created:
                    self.remove(path)
            return
        if base.startswith(whiteout.META_PREFIX):
            return  # aufs bookkeeping, meaningless here
        hidden = base[len(whiteout.PREFIX) :]
        if hidden in ("", ".", "..") or "/" in hidden:
            raise UnsafeArchive(f"whiteout {raw!r} names {hidden!r}")
        path = f"{head}/{hidden}" if head else hidden
        self.remove(path)
        if self.overlay:
            whiteout.make_overlay_whiteout(path)
            if self.recorder is not None:
                self.recorder.touch(path)
