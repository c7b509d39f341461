"""What a layer changed: by comparing two trees (any driver), or by reading an overlay upper.

Paths are absolute inside the layer (``/etc/passwd``), sorted so that a directory comes before
what it holds. As in Docker, a directory that holds a change is itself listed as modified, so that
its metadata travels with the diff, and a deleted directory is one ``delete`` entry.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from . import whiteout


class ChangeKind(enum.IntEnum):
    """Docker's numbering: Modify=0, Add=1, Delete=2."""

    MODIFY = 0
    ADD = 1
    DELETE = 2

    @property
    def letter(self) -> str:
        """``docker diff``'s letter: C, A or D."""
        return "CAD"[self.value]


@dataclass(frozen=True, order=True)
class Change:
    path: str
    kind: ChangeKind


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in names:
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return out


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
    # Equal metadata. The file is untouched if it is the very same inode with the same ctime
    # (a btrfs or thin snapshot), or if nothing changed it since the layer was made (ctime
    # before the layer's boundary). Otherwise look closer, so that no write made within one
    # timestamp tick of the copy is missed, and no sleep is needed.
    if new.st_ino == old.st_ino and new.st_ctime_ns == old.st_ctime_ns:
        return True
    if boundary_ns is not None and new.st_ctime_ns < boundary_ns:
        return True
    if _xattrs(new_path) != _xattrs(old_path):
        return False
    if stat.S_ISLNK(new.st_mode):
        return os.readlink(new_path) == os.readlink(old_path)
    if stat.S_ISREG(new.st_mode):
        return _same_content(new_path, old_path)
    return True


def _scan(path: str) -> dict[str, os.stat_result]:
    out = {}
    with os.scandir(path) as it:
        for entry in it:
            out[entry.name] = entry.stat(follow_symlinks=False)
    return out


_Links = dict[tuple[int, int], list[str]]


def _note_link(links: _Links, st: os.stat_result, path: str) -> None:
    if st.st_nlink > 1 and stat.S_ISREG(st.st_mode):
        links.setdefault((st.st_dev, st.st_ino), []).append(path)


def _add_all(path: str, rel: str, out: list[Change], links: _Links) -> None:
    with os.scandir(path) as it:
        for entry in it:
            child = rel + "/" + entry.name
            out.append(Change(child, ChangeKind.ADD))
            if entry.is_dir(follow_symlinks=False):
                _add_all(entry.path, child, out, links)
            elif entry.is_file(follow_symlinks=False):
                _note_link(links, entry.stat(follow_symlinks=False), child)


def _complete_links(out: list[Change], links: _Links) -> None:
    """A changed file's other names go into the diff too, so that applying it links them.

    Without this, ``ln old new`` in a layer would unpack as two separate files, since the
    unchanged ``old`` is not in the tar for ``new`` to be linked to.
    """
    changed = {c.path for c in out if c.kind != ChangeKind.DELETE}
    listed = {c.path for c in out}
    for names in links.values():
        if len(names) < 2 or not any(n in changed for n in names):
            continue
        for name in names:
            parent = name
            while parent not in listed:
                listed.add(parent)
                out.append(Change(parent, ChangeKind.MODIFY))
                parent = parent.rpartition("/")[0]
                if not parent:
                    break


def tree_changes(
    new_root: str, old_root: str | None, boundary_ns: int | None = None
) -> list[Change]:
    """Changes that turn the tree at *old_root* (None: empty) into the tree at *new_root*.

    *boundary_ns* is a ctime taken right after the new layer was made from the old one (see
    :meth:`LayerStore.create`); None when the two trees are not parent and child.
    """
    out: list[Change] = []
    links: _Links = {}
    if old_root is None:
        _add_all(new_root, "", out, links)
    else:
        _compare(new_root, old_root, "", boundary_ns, out, links)
    _complete_links(out, links)
    out.sort()
    return out


def _compare(
    new_dir: str,
    old_dir: str,
    rel: str,
    boundary_ns: int | None,
    out: list[Change],
    links: _Links,
) -> bool:
    """Append the changes below *rel*; return whether there were any."""
    new = _scan(new_dir)
    old = _scan(old_dir)
    changed = False
    for name, nst in new.items():
        child = rel + "/" + name
        npath = new_dir + "/" + name
        _note_link(links, nst, child)
        ost = old.get(name)
        if ost is None:
            out.append(Change(child, ChangeKind.ADD))
            if stat.S_ISDIR(nst.st_mode):
                _add_all(npath, child, out, links)
            changed = True
            continue
        opath = old_dir + "/" + name
        if stat.S_ISDIR(nst.st_mode) and stat.S_ISDIR(ost.st_mode):
            inner = _compare(npath, opath, child, boundary_ns, out, links)
            if inner or not _unchanged(nst, ost, npath, opath, boundary_ns):
                out.append(Change(child, ChangeKind.MODIFY))
                changed = True
            continue
        if stat.S_ISDIR(ost.st_mode) != stat.S_ISDIR(nst.st_mode):
            # a directory replaced by a file or the reverse: the tar must drop the old one
            out.append(Change(child, ChangeKind.MODIFY))
            if stat.S_ISDIR(nst.st_mode):
                _add_all(npath, child, out, links)
            changed = True
            continue
        if not _unchanged(nst, ost, npath, opath, boundary_ns):
            out.append(Change(child, ChangeKind.MODIFY))
            changed = True
    for name in old.keys() - new.keys():
        out.append(Change(rel + "/" + name, ChangeKind.DELETE))
        changed = True
    return changed


def overlay_changes(upper: str, exists_below: Callable[[str], bool]) -> list[Change]:
    """Changes recorded in an overlay upper directory.

    A 0/0 character device is a delete, anything else an add or a modify depending on whether
    *exists_below* (a path like ``/etc/passwd``) finds it in the lower layers.
    """
    out: list[Change] = []

    def walk(path: str, rel: str, below: bool) -> None:
        with os.scandir(path) as it:
            for entry in it:
                child = rel + "/" + entry.name
                st = entry.stat(follow_symlinks=False)
                if whiteout.is_overlay_whiteout(st):
                    out.append(Change(child, ChangeKind.DELETE))
                    continue
                here = below and exists_below(child)
                out.append(Change(child, ChangeKind.MODIFY if here else ChangeKind.ADD))
                if stat.S_ISDIR(st.st_mode):
                    opaque = whiteout.is_overlay_opaque(entry.path)
                    walk(entry.path, child, here and not opaque)

    walk(upper, "", True)
    out.sort()
    return out


def changes_size(root: str, changes: list[Change]) -> int:
    """Bytes of file data that a diff of *changes* carries (each inode counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for change in changes:
        if change.kind == ChangeKind.DELETE:
            continue
        try:
            st = os.lstat(root + change.path)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
        total += st.st_size
    return total
