"""Copy-up from an overlay upper's lower dirs, for a hardlink whose target is below the layer.

A build step that runs ``ln lower-file new-name`` writes a layer tar holding only the hardlink;
the kernel had copied ``lower-file`` up (data, mode, owner, xattrs, times, and its parent
directories) and linked the new name to the copy. The apply sandbox does the same from the lower
dirs, opened as descriptors before its chroot: every name is looked up one component at a time
with ``O_NOFOLLOW``, as overlayfs merges them (a whiteout or an opaque directory hides what lies
below it), so no symlink in a lower dir can send the copy anywhere else. The same lookups say
what the lowers show at a name (:meth:`LowerDirs.shown`, :meth:`LowerDirs.root_names`): whether a
whiteout there hides anything, and which directories of the upper merge with a lower's.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Container, Iterator, Sequence

from ..errors import ArchiveError, UnsafeArchive
from ..linux.copy import copy_data
from ..linux.xattr import NOT_IN_TARS
from . import whiteout

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class LowerDirs:
    """The read-only lower dirs of the overlay upper that is the current root, nearest first."""

    def __init__(self, fds: Sequence[int]) -> None:
        self.fds = list(fds)
        self.root = os.geteuid() == 0
        #: directory -> the lowers (indices, nearest first) that show a directory there, as
        #: overlayfs merges them below an upper without opaque directories; the lowers never
        #: change during an apply, so each directory is looked up once
        self._dirs: dict[str, tuple[int, ...]] = {"": tuple(range(len(self.fds)))}

    def copy_up(self, path: str, raw: str, *, directory: bool = False) -> int:
        """Copy *path* (clean, relative) into the upper dir from the nearest lower that shows
        it, with the directories above it; returns the bytes copied (0 when the upper has it
        already, or no lower shows it: the caller then refuses the hardlink).

        With *directory*, *path* is a directory a tar entry needs but does not name: it is
        copied up (mode, owner, xattrs, times) if the lowers show a directory there, as the
        kernel does when a file is made in it; nothing is done otherwise (the caller makes a
        plain one, as over an empty lower).
        """
        parts = path.split("/")
        layers = self.fds
        upper = ""
        opened: list[int] = []
        try:
            for i, part in enumerate(parts):
                upper = f"{upper}/{part}" if upper else part
                in_upper = lstat_or_none(upper)
                last = i == len(parts) - 1 and not directory
                if in_upper is not None and stat.S_ISLNK(in_upper.st_mode) and not last:
                    if directory:
                        return 0  # the extractor refuses the entry, naming the symlink
                    raise UnsafeArchive(
                        f"hardlink target {raw!r} goes through the symlink {upper!r}"
                    )
                if in_upper is not None and last:
                    return 0
                if in_upper is not None and (
                    not stat.S_ISDIR(in_upper.st_mode) or whiteout.is_overlay_opaque(upper)
                ):
                    return 0  # below a whiteout, a file or an opaque dir: nothing shows through
                found = self._lookup(
                    layers, part, upper, raw, last=last, in_upper=in_upper is not None,
                    directory=directory,
                )  # fmt: skip
                if not found:
                    return 0
                if last:
                    with _parent_times_kept(upper):
                        return _copy_entry(found[0], part, upper, self.root)
                opened.extend(found)
                if in_upper is None:
                    with _parent_times_kept(upper):
                        _copy_dir(found[0], upper, self.root)
                layers = found
            return 0
        finally:
            for fd in opened:
                os.close(fd)

    def shown(self, path: str, opaque: Container[str]) -> os.stat_result | None:
        """The lstat of what the lowers show at *path* (clean, relative) below the upper's
        directories above it, which the caller made or copied up, *opaque* those of them
        marked opaque; None where nothing shows: no lower has it, a nearer one deleted it, or
        it lies below an opaque directory of the upper."""
        head = path.rpartition("/")[0]
        if not self.below_merged(path, opaque):
            return None
        for i in self._stack(head):
            try:
                st = os.stat(path, dir_fd=self.fds[i], follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                continue
            return None if whiteout.is_overlay_whiteout(st) else st
        return None

    def below_merged(self, path: str, opaque: Container[str]) -> bool:
        """Whether the directory above *path* merges with a lower's (*opaque*: the upper's
        opaque directories): whether a lower may show anything at *path*, known without a
        lookup of the name itself."""
        head = up = path.rpartition("/")[0]
        while up:
            if up in opaque:
                return False
            up = up.rpartition("/")[0]
        return bool(self._stack(head))

    def _stack(self, path: str) -> tuple[int, ...]:
        """The lowers that show the directory *path*, looked up below its nearest known
        ancestor. A lower is in a directory's stack only if each directory above is a
        directory in it too (no symlink, checked as the stack was made), so a whole path
        is looked up in it at once, never through a link."""
        known = self._dirs.get(path)
        if known is not None:
            return known
        parts = path.split("/")
        depth = len(parts) - 1
        while depth and "/".join(parts[:depth]) not in self._dirs:
            depth -= 1
        at = "/".join(parts[:depth])
        stack = self._dirs[at]
        for part in parts[depth:]:
            at = f"{at}/{part}" if at else part
            below: list[int] = []
            for i in stack:
                try:
                    st = os.stat(at, dir_fd=self.fds[i], follow_symlinks=False)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    break  # a whiteout or a file hides the lowers below it
                below.append(i)
                fd = os.open(at, _DIR_FLAGS, dir_fd=self.fds[i])
                try:
                    if _opaque(fd):
                        break
                finally:
                    os.close(fd)
            stack = self._dirs[at] = tuple(below)
        return stack

    def root_names(self) -> dict[str, bool]:
        """The names the lowers show at the root, each with whether it is a directory there
        (the nearest lower's entry; a whiteout hides the name in the lowers below it)."""
        shown: dict[str, bool] = {}
        hidden: set[str] = set()
        for fd in self.fds:
            for name in os.listdir(fd):
                if name in shown or name in hidden:
                    continue
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if whiteout.is_overlay_whiteout(st):
                    hidden.add(name)
                else:
                    shown[name] = stat.S_ISDIR(st.st_mode)
        return shown

    @staticmethod
    def _lookup(
        layers: list[int],
        part: str,
        upper: str,
        raw: str,
        *,
        last: bool,
        in_upper: bool,
        directory: bool,
    ) -> list[int]:
        """The lower dirs (as fds) that show *part* below the current directory, nearest first:
        the directory fds for a directory, or the one parent fd that holds the last part.
        A lower non-directory under a directory of the upper (*in_upper*) is not merged; one
        the merged view shows where a directory is needed is refused as a tree's would be:
        a symlink is gone through, a file is not a directory (*directory*: for the tar entry
        *raw*, else the hardlink target *raw*, which a missing target refuses anyway)."""
        shown: list[int] = []
        for fd in layers:
            try:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if whiteout.is_overlay_whiteout(st):
                break
            if last:
                return [fd]
            if not stat.S_ISDIR(st.st_mode):
                if not shown and not in_upper:  # what the merged view shows at *upper*
                    what = "tar entry" if directory else "hardlink target"
                    if stat.S_ISLNK(st.st_mode):
                        raise UnsafeArchive(f"{what} {raw!r} goes through the symlink {upper!r}")
                    if directory:
                        raise ArchiveError(f"tar entry {raw!r}: {upper!r} is not a directory")
                break
            sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
            shown.append(sub)
            if _opaque(sub):
                break
        if last or not shown:
            for fd in shown:
                os.close(fd)
            return []
        return shown


@contextlib.contextmanager
def _parent_times_kept(path: str) -> Iterator[None]:
    """Give the directory above *path* its times back after a copy-up into it, as the kernel
    does: a copy-up changes no time a user can see."""
    parent = path.rpartition("/")[0] or "."
    st = os.lstat(parent)
    yield
    os.utime(parent, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, whiteout.OVERLAY_OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def _copy_dir(src: int, upper: str, root: bool) -> None:
    """Make the directory *upper* as a copy of the lower directory *src* (not its content)."""
    os.mkdir(upper, 0o700)
    dst = os.open(upper, _DIR_FLAGS)
    try:
        _copy_attrs(src, dst, os.fstat(src), root)
        whiteout.mark_overlay_merged(dst)
    finally:
        os.close(dst)


def _copy_entry(parent: int, part: str, upper: str, root: bool) -> int:
    """Copy the non-directory *part* of the lower dir *parent* to *upper*; the bytes copied."""
    st = os.stat(part, dir_fd=parent, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        return 0  # the caller refuses a hardlink to a directory
    if stat.S_ISREG(st.st_mode):
        src = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            dst = os.open(upper, flags, 0o600)
            try:
                copy_data(src, dst, st.st_size)
                _copy_attrs(src, dst, st, root)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        return st.st_size
    if stat.S_ISLNK(st.st_mode):  # linked as itself, never followed
        os.symlink(os.readlink(part, dir_fd=parent), upper)
    else:  # a fifo or a device node
        os.mknod(upper, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev)
    if root:
        os.chown(upper, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(upper, stat.S_IMODE(st.st_mode))
    os.utime(upper, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    return 0


def _copy_attrs(src: int, dst: int, st: os.stat_result, root: bool) -> None:
    """Owner, mode (after the chown, which clears setuid bits), xattrs and times."""
    if root:
        os.fchown(dst, st.st_uid, st.st_gid)
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    for key in os.listxattr(src):
        if key.startswith(NOT_IN_TARS):
            continue  # overlayfs's own bookkeeping of the lower layer; XFS's raw ACLs
        try:
            os.setxattr(dst, key, os.getxattr(src, key))
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
            log.debug("xattr %s not kept on copy-up: %s", key, exc.strerror)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
