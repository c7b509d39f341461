"""Exact diffs, the reading half: whether an applied layer is still as its record says
(:func:`stale`, before the first byte) and the replay of the applied tar from the record and
the layer's files (:func:`replay`). The record itself is :mod:`.tarsplit`'s."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path
from typing import Any

from ..errors import ArchiveError
from ..linux.bind import open_beneath
from ..linux.fs import fs_name
from . import fastpath
from .tar import CHUNK
from .tar_writer import TarWriter
from .tarsplit import Body, Checks, Record


def stale(checks: Checks, root: str, changes: list[tuple[str, bool]]) -> str | None:
    """Why the layer at *root* is no longer what the record describes, or None.

    *changes* are the layer's changes against its parent: (absolute path, is a deletion).
    """
    why = _noted_changed(checks, root)
    if why is not None:
        return why
    linked: set[tuple[int, int]] | None = None
    for path, deleted in changes:
        rel = path.lstrip("/")
        if not deleted:
            if rel not in checks.present:
                # another name of a noted file that the tar linked (``ln lower-file new``
                # of a parent's file with two names: the walk lists them all): the noted
                # name's check covers the inode; a later link would have changed its ctime
                inode = _inode(root, rel)
                if inode is not None and linked is None:
                    linked = _linked_inodes(checks, root)
                if inode is None or linked is None or inode not in linked:
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


def _inode(root: str, rel: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the non-directory *rel* under *root* that has other names."""
    try:
        st = os.lstat(f"{root}/{rel}")
    except OSError:
        return None
    return None if stat.S_ISDIR(st.st_mode) or st.st_nlink < 2 else (st.st_dev, st.st_ino)


def _linked_inodes(checks: Checks, root: str) -> set[tuple[int, int]]:
    """The inodes of the noted non-directories that have other names."""
    found = (_inode(root, p) for p, row in checks.present.items() if not stat.S_ISDIR(row[0]))
    return {inode for inode in found if inode is not None}


def unchanged_alone(checks: Checks, root: str) -> bool:
    """Whether the layer at *root*, which has no parent, is still what the record describes:
    :func:`stale` without the walk that lists the layer's changes.

    Against no parent every path in the layer is a change, an addition, and :func:`stale`
    wants each one noted. Here each noted directory's names are listed instead of each entry
    stat'ed: the root is noted, and a noted directory is one still (its mode was checked), so
    if every name in every noted directory is noted, by induction every path is, and the two
    agree. False sends the caller to the walk and :func:`stale`, which says why.
    """
    present = checks.present
    if "" not in present:
        return False
    split = _split(present)
    if _noted_changed(checks, root, split) is not None:
        return False
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for path in split[1]:  # the directories
            prefix = f"{path}/" if path else ""
            try:  # below the root, through no symlink (one swapped in since its check)
                fd = open_beneath(top, path, os.O_RDONLY | os.O_DIRECTORY) if path else top
            except OSError:  # changed since its check: the walk says how
                return False
            try:
                names = os.listdir(fd)
            finally:
                if fd != top:
                    os.close(fd)
            if any(prefix + name not in present for name in names):
                return False
    finally:
        os.close(top)
    return True


def _split(present: dict[str, tuple[int, int, int]]) -> tuple[list[str], list[str]]:
    """The noted paths that are not directories, and those that are."""
    if fastpath.ENABLED:
        assert fastpath.noted_split is not None
        return fastpath.noted_split(present)
    files = [path for path, row in present.items() if not stat.S_ISDIR(row[0])]
    return files, [path for path, row in present.items() if stat.S_ISDIR(row[0])]


def _noted_changed(
    checks: Checks, root: str, split: tuple[list[str], list[str]] | None = None
) -> str | None:
    """Why a noted path is not as apply left it (gone, another type or mode, another mtime
    or ctime), or None; files first, so that a deleted or rewritten file is named, not the
    directory that holds it. *split*: :func:`_split` of the noted paths, if the caller has it."""
    present = checks.present
    files, dirs = split or _split(present)
    ordered = files + dirs
    lstat = os.lstat
    first_changed = fastpath.first_changed if fastpath.ENABLED else None
    top = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        i = 0
        while i < len(ordered):
            if first_changed is not None:  # the same lstat and compare in C, up to the first
                i = first_changed(ordered, i, top, present)  # that differs, looked at here
                if i == len(ordered):
                    break
            path = ordered[i]
            noted = present[path]
            try:
                st = lstat(path or ".", dir_fd=top)  # relative to the root: its path once
            except (FileNotFoundError, NotADirectoryError):  # or a directory above is a file
                return f"/{path} was removed after apply-diff"
            if (st.st_mode, st.st_mtime_ns, st.st_ctime_ns) != noted:
                return _why(path, noted, st)
            i += 1
    finally:
        os.close(top)
    return None


def _why(path: str, noted: tuple[int, int, int], st: os.stat_result) -> str:
    if st.st_mode != noted[0]:
        return f"/{path} changed type or mode after apply-diff"
    what = "the directory /" if stat.S_ISDIR(st.st_mode) else "/"  # owner, xattrs, links, data
    return f"{what}{path} changed after apply-diff"


#: filesystems whose ctime moves on every write however soon after the last stat, from Linux
#: 6.13 on (multigrain timestamps); elsewhere a write within one timer tick of apply's stat can
#: leave mtime and ctime as they were, so replay hashes the tar it writes against the diffID
_MULTIGRAIN_FS = frozenset({"btrfs", "extfs", "xfs", "tmpfs"})


def fine_ctimes(root: str) -> bool:
    """Whether every write to a file under *root* gives it a new ctime (see replay)."""
    version = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if version is None or (int(version[1]), int(version[2])) < (6, 13):
        return False
    try:
        return fs_name(Path(root)) in _MULTIGRAIN_FS
    except OSError:
        return False


def replay(
    record: Record,
    root: str,
    writer: TarWriter,
    diff_id: str | None = None,
    *,
    check: bool | None = None,
) -> int:
    """Write the exact tar the record was made from, file bodies read from *root*; the bytes
    written. A body that is not the applied one raises :class:`ArchiveError`.

    :func:`stale` found every noted path as apply left it just before. After a body is copied
    its file is looked at again (fstat of the fd read): the same size, mtime and ctime as after
    apply mean the bytes read are the applied ones, since every write moves the ctime, which no
    user can set back. That holds where the kernel's multigrain timestamps give even a write
    right after apply's stat a new ctime (:func:`fine_ctimes`): there nothing is hashed and
    large bodies go by sendfile. Elsewhere, or with *check* True, the bodies go through user
    space and every byte written is hashed: the tar's sha256 must be *diff_id*, the layer's
    diffID, or the replay ends in an error once the tar is written (tar-split checks each
    body's CRC-64 after writing it; a sha256 of the whole tar covers the headers too, and
    cannot be matched on purpose). ``check --digests`` hashes the whole tar the same way.
    Unhashed, to an fd, runs of raw parts and small bodies are copied by a C loop
    (:meth:`.TarWriter.replay_run`), which leaves to this one whatever it would not do alike.
    """
    total = 0
    noted = record.checks().present
    digest = _digest(fine_ctimes(root) is False if check is None else check, diff_id)
    write_raw = writer.write_raw
    segments = record.segment_reader()
    runs = digest is None and writer.takes_runs()
    with _Bodies(root) as bodies:
        while True:
            if runs:  # the common segments in C, as below; what it leaves, here
                total += writer.replay_run(segments, bodies.dir_bytes, bodies.dir_fd, noted)
            seg = segments.next()
            if seg is None:
                break
            if isinstance(seg, bytes):
                if digest is not None:
                    digest.update(seg)
                write_raw(seg)
                total += len(seg)
                continue
            total += _copy_checked(seg, bodies, writer, digest, noted)
    if digest is not None and "sha256:" + digest.hexdigest() != diff_id:
        raise ArchiveError(
            f"exact diff: the tar written is not the layer's (its sha256 is not the diffID "
            f"{diff_id}): a file changed behind the store"
        )
    return total


def _copy_checked(
    seg: Body, bodies: _Bodies, writer: TarWriter, digest: Any, noted: dict[str, Any]
) -> int:
    """Copy the body *seg* from the layer and look at its file again (:func:`replay`); the
    bytes copied."""
    path, size, regions = seg
    if not size:  # an empty file has nothing to read (the checks saw it is there)
        return 0
    fd = bodies.open(path)
    try:
        if digest is not None:
            _copy_hashed(seg, fd, writer, digest)
        elif regions is None:  # most bodies: one call
            if writer.copy_from(fd, 0, size) != size:
                raise _shorter(seg)
        else:
            _copy_body(seg, fd, writer)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if (st.st_mode, st.st_mtime_ns, st.st_ctime_ns) != noted.get(path) or (
        regions is None and st.st_size != size
    ):
        raise _differs(seg)
    return size


def _digest(check: bool, diff_id: str | None) -> Any:
    """The hash of the tar a replay writes, if it is to be checked against *diff_id*."""
    if not check:
        return None
    if not diff_id:
        raise ArchiveError("exact diff: no diffID to check the tar written against")
    return hashlib.sha256()


def _shorter(seg: Body) -> ArchiveError:
    return ArchiveError(f"exact diff: /{seg.path} is shorter than when it was applied")


def _differs(seg: Body) -> ArchiveError:
    return ArchiveError(
        f"exact diff: /{seg.path} differs from the file that was applied "
        f"(changed behind the store); the tar written is not the layer's"
    )


def _copy_body(seg: Body, fd: int, writer: TarWriter) -> None:
    for offset, length in seg.regions or [(0, seg.size)]:
        if writer.copy_from(fd, offset, length) != length:
            raise _shorter(seg)


def _copy_hashed(seg: Body, fd: int, writer: TarWriter, digest: Any) -> None:
    """_copy_body through user space, every byte into *digest* as well."""
    for offset, length in seg.regions or [(0, seg.size)]:
        done = 0
        while done < length:
            data = os.pread(fd, min(CHUNK, length - done), offset + done)
            if not data:
                raise _shorter(seg)
            digest.update(data)
            writer.write_raw(data)
            done += len(data)


class _Bodies:
    """Opens the files of a layer below its root, following no symlink; the directory of the
    last one stays open, since a tar's files come directory by directory."""

    #: O_NONBLOCK: a FIFO swapped in for a file does not hang the open (a regular file's
    #: reads are the same), as in _fastpath.c
    _FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

    def __init__(self, root: str) -> None:
        self._root = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dir = ""
        self.dir_fd = self._root
        #: the directory open as :attr:`dir_fd`, relative to the root, as the record spells it
        self.dir_bytes = b""

    def open(self, path: str) -> int:
        """An fd of the file *path* (relative, no ``.`` or ``..`` part: see :func:`_body`)."""
        head, _, name = path.rpartition("/")
        if head != self._dir:
            self._close_dir()
            # below the root, no symlink followed: the checks passed, this is belt and braces
            if head:
                self.dir_fd = open_beneath(self._root, head, os.O_PATH | os.O_DIRECTORY)
            self._dir, self.dir_bytes = head, head.encode("utf-8", "surrogateescape")
        return os.open(name, self._FLAGS, dir_fd=self.dir_fd)

    def _close_dir(self) -> None:
        if self.dir_fd != self._root:
            os.close(self.dir_fd)
        self._dir, self.dir_fd, self.dir_bytes = "", self._root, b""

    def __enter__(self) -> _Bodies:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_dir()
        os.close(self._root)
