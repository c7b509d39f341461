"""The extractor of the apply sandbox (:mod:`.sandbox`): in the forked child that has chrooted
into the layer, it unpacks the entries the parent parsed and sends (:mod:`.feed`), refusing
every entry that would leave the layer.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

from ..errors import ArchiveError, UnsafeArchive
from ..linux.tree import remove_tree
from ..linux.xattr import ACL_DEFAULT, NOT_IN_TARS, drop_xattrs_but, has_default_acl
from . import fastpath, sparse, tarsplit, whiteout
from .copy_up import LowerDirs, lstat_or_none
from .feed import FedReader
from .names import clean_name
from .tar import (
    AREGTYPE,
    BLKTYPE,
    CHRTYPE,
    CONTTYPE,
    DIRTYPE,
    FIFOTYPE,
    LNKTYPE,
    REGTYPE,
    SYMTYPE,
    TarEntry,
)

log = logging.getLogger(__name__)

_FILE_TYPES = (REGTYPE, AREGTYPE, CONTTYPE)
#: a regular file is made with O_EXCL (never through what is at its name) and O_NOFOLLOW
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


class Extractor:
    def __init__(
        self,
        reader: FedReader,
        whiteouts: str,
        lowers: LowerDirs | None,
        recorder: tarsplit.PathRecorder | None = None,
    ) -> None:
        self.reader = reader
        self.recorder = recorder
        self.overlay = whiteouts == "overlay"
        self.lowers = lowers
        self.root = os.geteuid() == 0
        self.safe_dirs: set[str] = {""}
        #: directories whose new entries get another group (setgid) or mode (a default ACL)
        #: than the ones asked for; the layer's root may be either, made under such a directory
        self.sgid_dirs: set[str] = {""} if os.lstat("/").st_mode & stat.S_ISGID else set()
        self.acl_dirs: set[str] = {""} if has_default_acl("") else set()
        self.created: set[str] = set()  #: the entries this tar made: an opaque marker keeps them
        self.made_dirs: set[str] = set()  #: made on the way to an entry, and not named yet
        self.whited: set[str] = set()  #: the whiteouts this tar made in an overlay upper
        #: the directories this extraction marked opaque: all of the upper's (it starts empty)
        self.opaque: set[str] = set()
        #: the directories an opaque marker cleared (:meth:`clear`)
        self.cleared: set[str] = set()
        #: directory -> (atime, mtime) the tar gives it, set last, deepest first
        self.dir_times: dict[str, tuple[int, int]] = {}
        self.size = 0

    def run(self) -> int:
        """Extract the entries, runs of plain files in C where that was built
        (:meth:`.FedReader.write_plain_files`, :data:`.fastpath.ENABLED`); the bytes of data
        written."""
        reader, plain_file, fast = self.reader, self.plain_file, fastpath.ENABLED
        rec = self.recorder
        record = None if rec is None else (rec.touched, rec.bodies, rec.written)
        for batch in reader.frames():
            i, n = 0, len(batch)
            while i < n:
                if fast:
                    dirs = (self.safe_dirs, self.sgid_dirs, self.acl_dirs)
                    i, size = reader.write_plain_files(
                        batch, i, dirs, self.created, record, self.root
                    )
                    self.size += size
                    if i == n:
                        break
                fields = reader.enter(batch[i])
                if not plain_file(fields):
                    self.entry(TarEntry(*fields))
                reader.leave(fields)
                i += 1
        reader.drain()
        for path, times in sorted(
            self.dir_times.items(), key=lambda t: t[0].count("/"), reverse=True
        ):
            os.utime(path or "/", ns=times, follow_symlinks=False)
        return self.size

    def plain_file(self, fields: tuple[Any, ...]) -> bool:
        """Write the entry of *fields* (a :class:`.TarEntry`'s, as :meth:`.FedReader.enter`
        gives them) if it is the common entry: a regular file, not sparse, without xattrs or
        setuid, setgid or sticky bits, owned by root (or by anyone when not run as root), with
        a clean name none of whose parts starts with a dot, in a directory this extraction
        already made safe, which is neither setgid nor has a default ACL, and nothing at its
        name yet. That is what :meth:`entry` would do for it, less the general cases' calls
        and checks and the TarEntry (together a third of the extractor's own CPU time on a
        layer of small files), and the record's stat of it taken from the open file. False,
        having done nothing, for any other entry."""
        raw, type_, mode, uid, gid, size, mtime_ns, atime_ns, _, _, _, xattrs, sparse = fields
        if type_ not in _FILE_TYPES or sparse is not None or xattrs or mode & 0o7000:
            return False
        name = raw[2:] if raw[:2] == "./" else raw
        # a name clean_name keeps as it is, and no part of it starts with a dot: nothing to
        # clean, nothing that climbs, no whiteout (a dotfile takes the general path too)
        if not name or name[0] in "./" or "/." in name or "//" in name or name[-1] == "/":
            return False
        head = name.rpartition("/")[0]
        if head not in self.safe_dirs or head in self.sgid_dirs or head in self.acl_dirs:
            return False
        if self.root and (uid or gid):
            return False
        try:
            fd = os.open(name, _CREATE, mode & 0o777)
        except FileExistsError:
            return False  # entry() removes what is in the way
        try:
            self.reader.write_to(fd)
            os.utime(fd, ns=(mtime_ns if atime_ns is None else atime_ns, mtime_ns))
            if self.recorder is not None:
                self.recorder.made_file(name, os.fstat(fd))
        finally:
            os.close(fd)
        self.size += size
        self.created.add(name)
        return True

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
            st = lstat_or_none(path)
            if whited_out := path in self.whited:  # this tar deleted it: made again, empty
                self.remove(path)
            if st is None or whited_out:
                if self.lowers is not None and not whited_out:  # a lower's: copied up
                    self.lowers.copy_up(path, raw, directory=True)
                copied = lstat_or_none(path)
                if copied is None:
                    os.mkdir(path, 0o755)
                    self.made_dirs.add(path)
                    self.uncleared(path)
                    if whited_out:
                        self.over_non_directory(path)
                    parent = path.rpartition("/")[0]
                    if parent in self.sgid_dirs:  # a new directory inherits the setgid bit
                        self.sgid_dirs.add(path)
                elif copied.st_mode & stat.S_ISGID:
                    self.sgid_dirs.add(path)
                self.safe_dirs.add(path)
                if has_default_acl(path):
                    self.acl_dirs.add(path)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeArchive(f"tar entry {raw!r} goes through the symlink {path!r}")
            if not stat.S_ISDIR(st.st_mode):
                raise ArchiveError(f"tar entry {raw!r}: {path!r} is not a directory")
            self.safe_dirs.add(path)
            if st.st_mode & stat.S_ISGID:
                self.sgid_dirs.add(path)
            if has_default_acl(path):
                self.acl_dirs.add(path)

    def forget_dirs_under(self, *paths: str) -> None:
        """Forget what is known of the directories *paths* and those under them, removed:
        whatever is made at their names later is checked, and gets its own times, again."""
        gone = {p for p in paths if p in self.safe_dirs}  # (one that is not holds none:
        if not gone:  # a parent layer's directory that the tar whites out, untouched)
            return
        if len(gone) == 1:
            path = next(iter(gone))
            prefix = path + "/"

            def kept(d: str) -> bool:
                return d != path and not d.startswith(prefix)

        else:  # (the directories a marker clears at once: each set filtered once for all)

            def kept(d: str) -> bool:
                while d:
                    if d in gone:
                        return False
                    d = d.rpartition("/")[0]
                return True

        self.safe_dirs = {d for d in self.safe_dirs if kept(d)}
        self.sgid_dirs = {d for d in self.sgid_dirs if kept(d)}
        self.acl_dirs = {d for d in self.acl_dirs if kept(d)}
        self.dir_times = {d: t for d, t in self.dir_times.items() if kept(d)}
        self.opaque = {d for d in self.opaque if kept(d)}
        self.whited = {w for w in self.whited if kept(w)}
        self.cleared = {d for d in self.cleared if kept(d)}
        self.made_dirs = {d for d in self.made_dirs if kept(d)}

    def remove(self, path: str) -> None:
        """Remove whatever is at *path* (missing is fine)."""
        self.whited.discard(path)
        st = lstat_or_none(path)
        if self.recorder is not None:
            self.recorder.removed(path, st is not None and stat.S_ISDIR(st.st_mode))
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            remove_tree(path)
            self.forget_dirs_under(path)
        else:
            os.unlink(path)

    def entry(self, e: TarEntry) -> None:
        name = clean_name(e.name)
        if not name:  # "/", "./" or ".": the layer's root itself, whose attributes it sets
            if e.type != DIRTYPE:
                raise ArchiveError(
                    f"tar entry {e.name!r} names the layer's root but is not a directory"
                )
            drop_xattrs_but("/", e.xattrs)
            self.attrs("/", e, "", is_dir=True)
            # what is made in the root from now on follows its new setgid bit and default ACL
            if e.mode & stat.S_ISGID:
                self.sgid_dirs.add("")
            else:
                self.sgid_dirs.discard("")
            if has_default_acl(""):
                self.acl_dirs.add("")
            else:
                self.acl_dirs.discard("")
            return
        head, _, base = name.rpartition("/")
        if base.startswith(whiteout.PREFIX):
            self.whiteout(name, head, base, e.name)
            return
        self.parent_dir(name, e.name)
        if self.recorder is not None:
            self.recorder.touch(name)
        self.created.add(name)
        if e.type == DIRTYPE:
            self.directory(name, head, e)
        elif e.is_file:
            self.regular(name, head, e)
        elif e.type == SYMTYPE:
            self.make(name, lambda: os.symlink(e.linkname, name))
            self.attrs(name, e, head, link=True, fresh=head not in self.sgid_dirs)
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
        target = clean_name(e.linkname)
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
        # made with its final permissions; one in a setgid directory inherits its group
        # and setgid bit, which attrs() then sets as the tar says
        fresh = head not in self.sgid_dirs
        try:
            os.mkdir(name, e.mode & 0o777)
            # made where a lower may have a directory: marked as merged (one where none has
            # is not merged, and overlayfs reads no mark there; looking would cost more)
            if self.lowers is not None and self.lowers.below_merged(name, self.opaque):
                whiteout.mark_overlay_merged(name)
        except FileExistsError:
            if stat.S_ISDIR(os.lstat(name).st_mode):
                fresh = False  # an existing directory: owner, mode, xattrs as the tar says
                if name not in self.made_dirs:  # (not one made on the way: its order's)
                    drop_xattrs_but(name, e.xattrs)
            else:
                self.remove(name)
                os.mkdir(name, e.mode & 0o777)
                if self.overlay:
                    self.over_non_directory(name)
        self.safe_dirs.add(name)
        self.made_dirs.discard(name)  # named now: a later entry for it is one as any other's
        if e.mode & stat.S_ISGID:
            self.sgid_dirs.add(name)
        else:
            self.sgid_dirs.discard(name)
        self.attrs(name, e, head, is_dir=True, fresh=fresh)
        # a new directory inherits its parent's default ACL; the tar may carry one of its own
        if (fresh and head in self.acl_dirs) or (
            (not fresh or ACL_DEFAULT in e.xattrs) and has_default_acl(name)
        ):
            self.acl_dirs.add(name)
        else:
            self.acl_dirs.discard(name)

    def over_non_directory(self, path: str) -> None:
        """Opaque: a directory made in an overlay upper over this tar's whiteout or file
        (``.wh.d`` or ``d``, then ``d/`` or ``d/x``), or over a lower's in an opaque root,
        lest the lower's show through."""
        if self.recorder is not None:
            self.recorder.made_opaque(path)
        whiteout.make_overlay_opaque(path)
        self.opaque.add(path)

    def regular(self, name: str, head: str, e: TarEntry) -> None:
        try:  # created with its final permissions: no chmod needed for most files
            fd = os.open(name, _CREATE, e.mode & 0o777)
        except FileExistsError:
            self.remove(name)
            fd = os.open(name, _CREATE, e.mode & 0o777)
        try:
            if e.sparse is not None:
                sparse.check_fits(e.size, e.name)
                sparse.write_regions(fd, e.sparse, self.reader.data(), e.size)
            else:
                self.reader.write_to(fd)
            if self.recorder is not None:
                self.recorder.wrote(name)
            self.size += e.size
            self.attrs(fd, e, head, fresh=True)
        finally:
            os.close(fd)

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
        """Owner, mode, xattrs and mtime of an entry; *fresh*: just made by this process
        with its permission bits, in a directory that is not setgid. A file made by root is
        owned 0:0 unless its directory is setgid, so most files need no chown; a chown clears
        setuid/setgid bits, so those are set after it."""
        fd_given = isinstance(target, int)
        if head in self.acl_dirs:  # made with the default ACL's permissions, not the tar's
            fresh = False
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
            if key.startswith(NOT_IN_TARS):
                continue  # overlayfs's, XFS's: a tar that carries them is ignored
            try:
                if fd_given:
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EPERM):  # named by entry, not fd
                    raise OSError(exc.errno, exc.strerror, f"{e.name}: xattr {key}") from None
                log.debug("xattr %s not kept on %s: %s", key, e.name, exc.strerror)
        times = (e.mtime_ns if e.atime_ns is None else e.atime_ns, e.mtime_ns)
        if is_dir:
            assert isinstance(target, str)
            self.dir_times[target] = times
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
            if self.recorder is not None:
                self.recorder.made_opaque(head)
            self.clear(head)
            if self.overlay and head:
                whiteout.make_overlay_opaque(head)
                self.opaque.add(head)
            elif self.overlay and self.lowers is not None:  # overlayfs ignores it on a root
                self.hide_lower_root(self.lowers)
            return
        if base.startswith(whiteout.META_PREFIX):
            return  # aufs bookkeeping, meaningless here
        hidden = base[len(whiteout.PREFIX) :]
        if hidden in ("", ".", "..") or "/" in hidden:
            raise UnsafeArchive(f"whiteout {raw!r} names {hidden!r}")
        path = f"{head}/{hidden}" if head else hidden
        self.remove(path)
        # none where no lower shows the name (overlayfs would list it): below nothing, in a
        # new or opaque directory, or in a layer without parent
        lowers = self.lowers
        if self.overlay and lowers is not None and lowers.shown(path, self.opaque) is not None:
            self.hide(path)

    def clear(self, head: str) -> None:
        """Below the directory *head* that an opaque marker names, what the tar did not make
        goes, as if the marker had come first (OCI: it hides the lower layers' entries, not
        the layer's own): the parent's entries (in a tree), what was copied up (a hardlink's
        target, in an overlay upper), this tar's whiteouts (which hide nothing now, and which
        overlayfs would list), and a directory the tar neither named nor made anything in
        (one it only went through, to a hardlink's target or a whiteout). A directory it
        named or made something in is kept and cleared the same way, whatever the order of
        its entries and the marker. A directory cleared once is not walked again: nothing
        the tar did not make comes below it later (no lower shows there any more)."""
        if head in self.cleared:
            return
        walked: list[str] = []
        todo = [head]  # (a list, not recursion: a tar's tree may be deeper than Python's)
        while todo:
            directory = todo.pop()
            walked.append(directory)
            prefix = f"{directory}/" if directory else ""
            with os.scandir(directory or ".") as it:
                entries = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in it]
            for name, is_dir in entries:
                path = prefix + name
                if is_dir and path in self.safe_dirs:  # named by the tar, or on its way
                    if path not in self.cleared:
                        todo.append(path)
                elif path not in self.created or is_dir:
                    self.remove(path)
        gone: set[str] = set()
        for directory in reversed(walked[1:]):  # (below its own directories: deepest first)
            if directory not in self.created and not os.listdir(directory):
                if self.recorder is not None:
                    self.recorder.removed(directory, True, empty=True)
                os.rmdir(directory)
                gone.add(directory)
        self.forget_dirs_under(*gone)
        self.cleared.update(d for d in walked if d not in gone)

    def uncleared(self, path: str) -> None:
        """A directory made at *path* that the tar does not name: those above it are no
        longer as a marker left them (a later one clears them again)."""
        if self.cleared:
            while path:
                path = path.rpartition("/")[0]
                self.cleared.discard(path)

    def hide(self, path: str) -> None:
        """An overlay whiteout at *path*, where nothing is, hiding the lowers' entry."""
        whiteout.make_overlay_whiteout(path)
        self.whited.add(path)
        self.created.discard(path)  # (the tar's entry there, removed: a marker removes this)
        if self.recorder is not None:
            self.recorder.touch(path)

    def hide_lower_root(self, lowers: LowerDirs) -> None:
        """An opaque root, as overlayfs shows it: a whiteout at each name the lowers show
        there, or an opaque mark where this tar made a directory over a lower's."""
        for name, lower_dir in lowers.root_names().items():
            st = lstat_or_none(name)
            if st is None:
                self.remove(name)  # recorded as a name the tar deletes
                self.hide(name)
            elif lower_dir and stat.S_ISDIR(st.st_mode):
                self.over_non_directory(name)
