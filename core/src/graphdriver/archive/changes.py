"""What a layer changed: by comparing two trees (any driver), or by reading an overlay upper.

Paths are absolute inside the layer (``/etc/passwd``), in :func:`canonical_order`. As in Docker,
a directory that holds a change is itself listed as modified, so that its metadata travels with
the diff, and a deleted directory is one ``delete`` entry. Both ways give the same list for the
same changes (ARCHITECTURE.md, "Generated diffs are canonical").
"""

from __future__ import annotations

import contextlib
import enum
import os
import stat
from collections.abc import Collection, Generator, Iterator
from operator import itemgetter
from typing import NamedTuple

from ..linux import xattr
from . import dirs, fastpath, whiteout


class ChangeKind(enum.IntEnum):
    """Docker's numbering: Modify=0, Add=1, Delete=2."""

    MODIFY = 0
    ADD = 1
    DELETE = 2

    @property
    def letter(self) -> str:
        """``docker diff``'s letter: C, A or D."""
        return "CAD"[self.value]


class Change(NamedTuple):
    """A path of a layer and how it changed: a (path, kind number) pair, as a driver's native
    changes are (a tuple, so that making one costs less: a 10k-file diff makes as many)."""

    path: str
    kind: ChangeKind


def _xattrs(path: str) -> dict[str, bytes]:
    return dict(xattr.read(path, skip=xattr.NOT_IN_TARS))  # what a tar would carry


def _same_content(a: str, b: str) -> bool:
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            x = fa.read(1 << 20)
            y = fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _unchanged(
    new: os.stat_result, old: os.stat_result, new_path: str, old_path: str, boundary_ns: int | None
) -> bool:
    if (
        new.st_mode != old.st_mode
        or new.st_uid != old.st_uid
        or new.st_gid != old.st_gid
        or new.st_rdev != old.st_rdev
    ):
        return False
    is_dir = stat.S_ISDIR(new.st_mode)
    if not is_dir and (new.st_size != old.st_size or new.st_mtime_ns != old.st_mtime_ns):
        return False
    # Equal metadata. The file is untouched if nothing changed it since the layer was made
    # (ctime before the layer's boundary). Otherwise look closer, so that no write made within
    # one timestamp tick of the copy is missed, and no sleep is needed. The same inode number
    # with the same ctime (a btrfs or thin snapshot's file) proves nothing: the kernel's
    # timestamps are coarse and never move back (multigrain), so a file of a snapshot
    # rewritten with as many bytes soon after its parent's last write keeps the parent's
    # mtime and ctime too (moby's graphtest's rewrites were all missed on btrfs that way).
    if boundary_ns is not None and new.st_ctime_ns < boundary_ns:
        return True
    if _xattrs(new_path) != _xattrs(old_path):
        return False
    if stat.S_ISLNK(new.st_mode):
        return os.readlink(new_path) == os.readlink(old_path)
    if stat.S_ISREG(new.st_mode):
        return _same_content(new_path, old_path)
    return True


_S_IFMT = 0o170000

_Links = dict[tuple[int, int], list[str]]
#: an entry of the old tree: its stat and where it is
_Old = tuple[os.stat_result, str]
#: a directory's lstat where the compare listed it, None at the top
_Stat = os.stat_result | None
#: the kinds by number, as the C loop gives them
_KINDS = tuple(ChangeKind)
#: a subdirectory to compare: new path, path in the layer, old stack, full, new lstat
_Sub = tuple[str, str, list[str], bool, os.stat_result]


def canonical_order(changes: list[Change]) -> None:
    """Sort *changes* in place in the one order every diff uses: the bytes of the path (so a
    directory comes before what it holds), a delete at the place of the name it deletes."""
    if all(c.path.isascii() for c in changes):  # the bytes' order is the characters'
        changes.sort(key=_PATH)
    else:  # a name's undecodable bytes are surrogates, which sort after other characters
        changes.sort(key=lambda c: c.path.encode("utf-8", "surrogateescape"))  # os.fsencode


_PATH = itemgetter(0)


class _Compare:
    """The tree compare behind :func:`tree_changes` and :func:`overlay_changes`.

    The old side is a stack of directories, nearest first: one directory for a plain tree, or
    an overlay's lower dirs, read as overlayfs merges them (a 0/0 character device hides the
    name below it, an opaque directory hides everything below it).
    """

    def __init__(self, boundary_ns: int | None, overlay: bool) -> None:
        self.boundary_ns = boundary_ns
        self.overlay = overlay
        self.out: list[Change] = []
        self.links: _Links = {}
        #: whether names of one inode are gathered (not when every entry is new anyway)
        self.linking = True

    def note_link(self, st: os.stat_result, path: str) -> None:
        """Gather the names of a hardlinked inode: any but a directory's (symlinks, fifos and
        device nodes are linked too, and a diff links them as Docker's does)."""
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            self.links.setdefault((st.st_dev, st.st_ino), []).append(path)

    def add_all(self, path: str, rel: str, was: os.stat_result | None = None) -> None:
        """Everything below the new directory *path* (*was*: its lstat) is added; the
        directory's entry types (d_type) say which to stat: files for their links, others for
        overlay whiteouts (and directories, to be sure to go down the one listed).

        The directories still to list are kept on a list, not Python's stack, and one is open
        at a time: a tree of any depth."""
        todo: list[tuple[str, str, os.stat_result | None]] = [(path, rel, was)]
        while todo:
            path, rel, was = todo.pop()
            down: list[tuple[str, str, os.stat_result | None]] = []
            with dirs.listing(path, was is None, was) as it:
                for entry in it:
                    child = rel + "/" + entry.name
                    if entry.is_dir(follow_symlinks=False):
                        self.out.append(Change(child, ChangeKind.ADD))
                        st = entry.stat(follow_symlinks=False)
                        down.append((path + "/" + entry.name, child, st))
                        continue
                    if (
                        self.overlay
                        and not entry.is_file(follow_symlinks=False)
                        and not entry.is_symlink()
                        and whiteout.is_overlay_whiteout(entry.stat(follow_symlinks=False))
                    ):
                        continue  # nothing below a new directory for it to hide
                    if self.linking:
                        self.note_link(entry.stat(follow_symlinks=False), child)
                    self.out.append(Change(child, ChangeKind.ADD))
            todo += reversed(down)  # the first one listed goes down first

    def lookup(self, stack: dirs.Stack, name: str) -> tuple[_Old | None, list[str]]:
        """The entry *name* of the merged *stack*, and the stack of directories at it."""
        found: _Old | None = None
        below: list[str] = []
        for i, d in enumerate(stack.paths):
            try:
                fd = stack.fd(i)
                st = os.lstat(name, dir_fd=fd) if fd >= 0 else os.lstat(d + "/" + name)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                dirs.named(exc, d)
                raise
            kind = st.st_mode & _S_IFMT
            if self.overlay and kind == stat.S_IFCHR and st.st_rdev == 0:  # a whiteout
                break
            p = d + "/" + name
            if found is None:
                found = (st, p)
            if kind != stat.S_IFDIR:
                break  # a file hides what is below it; a directory above hides the file
            below.append(p)
            if self.overlay and whiteout.is_overlay_opaque(p):
                break
        return found, below

    def enters(self, rel: str) -> bool:
        """Whether the compare goes into the directory *rel* (else it is taken as unchanged)."""
        return True

    def scan_both(
        self, new_dir: str, rel: str, stack: list[str], full: bool, was: _Stat, olds: dirs.Stack
    ) -> tuple[dict[str, os.stat_result], dict[str, _Old]]:
        """The entries of *new_dir* (*was*: its lstat, None at the top) and, when *full*, of
        the merged *stack* (*olds*), to compare: where the C loop runs, the changes it finds
        are appended, and these are the entries it leaves."""
        top = was is None
        # not for two plain trees without a boundary (a diff against a layer not the parent):
        # there most entries have equal metadata and the Python loop would stat them again
        if fastpath.ENABLED and (
            not full or (not self.overlay and len(stack) == 1 and self.boundary_ns is not None)
        ):
            return self._scan_quick(new_dir, rel, stack[0] if full else None, was, olds)
        return dirs.scan(new_dir, top, was), self.scan_old(stack, top) if full else {}

    def _scan_quick(
        self,
        new_dir: str,
        rel: str,
        old_dir: str | None,
        was: _Stat,
        olds: dirs.Stack,
        written: Collection[int] | None = None,
    ) -> tuple[dict[str, os.stat_result], dict[str, _Old]]:
        """:meth:`scan_both` by ``_fastpath.compare_dir``: the changes that the two lstats of
        an entry settle, appended, and the entries they show unchanged, dropped; the others
        (directories, hardlinks, whiteouts, equal metadata of a file that may have been
        written) stat'ed for :meth:`_entries`. *old_dir*: the one old directory of a full
        compare, else None (an overlay upper over *olds*); *written*: as
        :class:`_Within`'s."""
        top = was is None
        new_fd, old_fd = dirs.open_dir(new_dir, top, was), -1
        where = new_dir  # what an error names
        try:
            if old_dir is None:
                fds = olds.known_fds()
            else:
                where = old_dir
                old_fd = dirs.open_dir(old_dir, top)
                fds = (old_fd,)
            try:
                full, boundary = old_dir is not None, self.boundary_ns
                done, left = fastpath.compare_dir(
                    new_fd, fds, self.overlay, full, -1 if boundary is None else boundary, written
                )  # fmt: skip
            except OSError as exc:  # a directory's read failed: its descriptor is the filename
                dirs.name_whole(exc, new_dir if exc.filename == new_fd else old_dir or "")
                raise
            rel += "/"
            self.out += [Change(rel + name, _KINDS[kind]) for name, kind in done]
            where = new_dir
            new = {name: os.lstat(name, dir_fd=new_fd) for name in left}
            old: dict[str, _Old] = {}
            if old_dir is not None:
                where = old_dir
                for name in left:
                    with contextlib.suppress(FileNotFoundError):
                        old[name] = (os.lstat(name, dir_fd=old_fd), old_dir + "/" + name)
        except OSError as exc:
            dirs.named(exc, where)
            raise
        finally:
            os.close(new_fd)
            if old_fd >= 0:
                os.close(old_fd)
        return new, old

    def scan_old(self, stack: list[str], top: bool) -> dict[str, _Old]:
        """Every visible entry of the merged *stack*: the nearest one of each name."""
        seen: dict[str, _Old] = {}
        hidden: set[str] = set()
        for d in stack:
            with dirs.listing(d, top) as it:
                for entry in it:
                    name = entry.name
                    if name in seen or name in hidden:
                        continue
                    st = entry.stat(follow_symlinks=False)
                    if self.overlay and whiteout.is_overlay_whiteout(st):
                        hidden.add(name)
                    else:
                        seen[name] = (st, d + "/" + name)
        return seen

    def compare(
        self,
        new_dir: str,
        rel: str,
        stack: list[str],
        full: bool,
        was: os.stat_result | None = None,
    ) -> bool:
        """Append the changes below *rel*; return whether there were any. *was*: the lstat of
        *new_dir* where the compare listed it (None at the top).

        *full*: *new_dir* is the whole new content at *rel* (a plain tree, or an opaque
        directory of an overlay upper and what it holds), so a name of the old side that it
        lacks is deleted. Otherwise *new_dir* is an overlay upper directory over *stack*,
        holding only what changed.

        Each directory is a frame of :meth:`_compare` on a list, not a call on Python's stack,
        so a tree of any depth compares (and no descriptor is held across a level).
        """
        frames = [self._compare(new_dir, rel, stack, full, was)]
        answer: bool | None = None  # what the last finished frame found (None: a new frame)
        while True:
            try:
                sub = frames[-1].send(answer)
            except StopIteration as done:
                frames.pop()
                if not frames:
                    return bool(done.value)
                answer = done.value
                continue
            frames.append(self._compare(*sub))
            answer = None

    def _compare(
        self, new_dir: str, rel: str, stack: list[str], full: bool, was: _Stat
    ) -> Generator[_Sub, bool | None, bool]:
        """:meth:`compare` of one directory: it yields each subdirectory to compare, and is
        sent whether that one had changes."""
        if not self.enters(rel):
            return False
        start = len(self.out)
        olds = dirs.Stack(stack, was is None)
        try:
            new, old = self.scan_both(new_dir, rel, stack, full, was, olds)
            down = self._entries(new_dir, rel, new, old, olds, full)
        finally:
            olds.close()
        for name in old:  # what the new side lacks (the entries took theirs out)
            self.out.append(Change(rel + "/" + name, ChangeKind.DELETE))
        for npath, child, below, opaque, nst, ost, opath in down:
            inner = yield npath, child, below, opaque, nst
            if inner or not _unchanged(nst, ost, npath, opath, self.boundary_ns):
                self.out.append(Change(child, ChangeKind.MODIFY))
        return len(self.out) > start

    def _entries(
        self,
        new_dir: str,
        rel: str,
        new: dict[str, os.stat_result],
        old: dict[str, _Old],
        olds: dirs.Stack,
        full: bool,
    ) -> list[tuple[str, str, list[str], bool, os.stat_result, os.stat_result, str]]:
        """:meth:`compare`'s look at each entry of *new*: its changes appended (an entry of
        *old* it matches taken out of it), but for the directories on both sides, returned,
        to be compared once this directory's descriptors are closed."""
        out, overlay = self.out, self.overlay
        lookup, links = self.lookup, self.links
        down = []
        for name, nst in new.items():
            child = rel + "/" + name
            npath = new_dir + "/" + name
            kind = nst.st_mode & _S_IFMT
            if overlay and kind == stat.S_IFCHR and nst.st_rdev == 0:  # a whiteout
                if not full and lookup(olds, name)[0] is not None:
                    out.append(Change(child, ChangeKind.DELETE))
                continue
            if nst.st_nlink > 1 and kind != stat.S_IFDIR:  # (note_link)
                links.setdefault((nst.st_dev, nst.st_ino), []).append(child)
            below: list[str] | None = None
            if full:
                found = old.pop(name, None)
            else:
                found, below = lookup(olds, name)
            if found is None:
                out.append(Change(child, ChangeKind.ADD))
                if kind == stat.S_IFDIR:
                    self.add_all(npath, child, nst)
                continue
            ost, opath = found
            new_is_dir, old_is_dir = kind == stat.S_IFDIR, stat.S_ISDIR(ost.st_mode)
            if new_is_dir and old_is_dir:
                if below is None:  # a plain tree's stack is the one old directory
                    below = lookup(olds, name)[1] if overlay else [opath]
                opaque = full or (overlay and whiteout.is_overlay_opaque(npath))
                down.append((npath, child, below, opaque, nst, ost, opath))
            elif old_is_dir != new_is_dir:
                # a directory replaced by a file or the reverse: the tar must drop the old one
                out.append(Change(child, ChangeKind.MODIFY))
                if new_is_dir:
                    self.add_all(npath, child, nst)
            elif not _unchanged(nst, ost, npath, opath, self.boundary_ns):
                out.append(Change(child, ChangeKind.MODIFY))
        return down

    def complete_links(self) -> None:
        """A changed file's other names go into the diff too, so that applying it links them.

        Without this, ``ln old new`` in a layer would unpack as two separate files, since the
        unchanged ``old`` is not in the tar for ``new`` to be linked to.
        """
        if all(len(names) < 2 for names in self.links.values()):
            return
        changed = {c.path for c in self.out if c.kind != ChangeKind.DELETE}
        listed = {c.path for c in self.out}
        for names in self.links.values():
            if len(names) < 2 or not any(n in changed for n in names):
                continue
            for name in names:
                parent = name
                while parent not in listed:
                    listed.add(parent)
                    self.out.append(Change(parent, ChangeKind.MODIFY))
                    parent = parent.rpartition("/")[0]
                    if not parent:
                        break

    def result(self) -> list[Change]:
        self.complete_links()
        canonical_order(self.out)
        return self.out


def tree_changes(
    new_root: str, old_root: str | None, boundary_ns: int | None = None
) -> list[Change]:
    """Changes that turn the tree at *old_root* (None: empty) into the tree at *new_root*.

    *boundary_ns* is a ctime taken right after the new layer was made from the old one (see
    :meth:`LayerStore.create`); None when the two trees are not parent and child.
    """
    walk = _Compare(boundary_ns, overlay=False)
    if old_root is None:
        walk.linking = False  # every name is in the diff: nothing to complete
        walk.add_all(new_root, "")
    else:
        walk.compare(new_root, "", [old_root], full=True)
    return walk.result()


def overlay_changes(upper: str, lowers: list[str]) -> list[Change]:
    """Changes recorded in an overlay upper directory over its *lowers* (nearest first).

    The result is what :func:`tree_changes` finds between the merged layer and the merged
    lowers: an upper entry equal to the one below (copied up, a chown and back) is not a
    change, a whiteout of nothing is dropped, and an opaque directory becomes one delete per
    name below that it lacks, so that every driver writes the same tar for the same changes.
    """
    walk = _Compare(None, overlay=True)
    walk.linking = bool(lowers)  # with nothing below, every name is in the diff
    walk.compare(upper, "", lowers, full=whiteout.is_overlay_opaque(upper))
    return walk.result()


def _kept(root: str, changes: list[Change]) -> Iterator[os.stat_result]:
    """The lstat of each inode that *changes* adds or changes, once (a hardlinked file's
    names are one inode); a deletion, or a name gone since, has none."""
    seen: set[tuple[int, int]] = set()
    for change in changes:
        if change.kind == ChangeKind.DELETE:
            continue
        try:
            st = os.lstat(root + change.path)
        except FileNotFoundError:
            continue
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            seen.add(key)
            yield st


def changes_size(root: str, changes: list[Change], links: bool = False) -> int:
    """Bytes of file data that a diff of *changes* carries (each inode counted once); with
    *links*, a symlink's target too, as Docker's ``ChangesSize`` counts every non-directory's
    size (``docker ps -s``)."""
    return sum(
        st.st_size
        for st in _kept(root, changes)
        if stat.S_ISREG(st.st_mode) or (links and stat.S_ISLNK(st.st_mode))
    )


def changes_usage(root: str, changes: list[Change]) -> tuple[int, int]:
    """(bytes, inodes) on disk of the entries that *changes* adds or changes, each inode once:
    its allocated blocks (``st_blocks``), directories and symlinks included, a sparse file's
    holes not, as containerd's snapshotters report a snapshot's Usage (the ``du`` of what it
    holds), which Kubernetes counts against a pod's ephemeral storage."""
    blocks = [st.st_blocks for st in _kept(root, changes)]
    return sum(blocks) * 512, len(blocks)
