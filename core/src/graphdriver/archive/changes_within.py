"""The tree compare of a snapshot against the tree it was taken of, entering only the
directories a driver knows were written (btrfs's generation numbers): :func:`changes_within`."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable

from . import dirs, fastpath
from .changes import Change, ChangeKind, _Compare, _Old, _Stat


class _Within(_Compare):
    """The compare entering only the directories in *within*; every other directory of the
    new tree is taken to be the old tree's, unchanged, and so is everything below it. With
    *written*, an entry other than a directory whose inode number is the old tree's at the same
    name and not in *written* is the old tree's too, and neither side of it is stat'ed."""

    def __init__(
        self,
        within: Collection[str],
        names_of: Callable[[int], Iterable[str]],
        written: Collection[int] | None,
    ) -> None:
        super().__init__(None, overlay=False)
        self.within = within
        self.names_of = names_of
        self.written = written

    def enters(self, rel: str) -> bool:
        return rel in self.within

    def scan_both(
        self, new_dir: str, rel: str, stack: list[str], full: bool, was: _Stat, olds: dirs.Stack
    ) -> tuple[dict[str, os.stat_result], dict[str, _Old]]:
        written = self.written
        if written is None or not full or len(stack) != 1:
            return super().scan_both(new_dir, rel, stack, full, was, olds)
        if fastpath.ENABLED:  # the same, in C
            return self._scan_quick(new_dir, rel, stack[0], was, olds, written)
        top = was is None
        # the names and inode numbers of both sides come with the directory reads (getdents):
        # only the entries that differ there, or were written, are stat'ed
        old_dir = stack[0]
        with dirs.listing(old_dir, top) as it:
            before_here = {entry.name: entry for entry in it}
            with dirs.listing(new_dir, top, was) as new_it:
                new: dict[str, os.stat_result] = {}
                for entry in new_it:
                    name, ino = entry.name, entry.inode()
                    before = before_here.get(name)
                    if (
                        before is not None
                        and before.inode() == ino
                        and ino not in written
                        and not entry.is_dir(follow_symlinks=False)
                    ):
                        del before_here[name]  # the old tree's own entry
                        continue
                    new[name] = entry.stat(follow_symlinks=False)
            old = {
                name: (e.stat(follow_symlinks=False), old_dir + "/" + name)
                for name, e in before_here.items()
            }
        return new, old

    def complete_links(self) -> None:
        # the full walk sees every name of a hardlinked file; here the caller lists the names
        # in directories the compare did not enter, for the files whose names change
        changed = {c.path for c in self.out if c.kind != ChangeKind.DELETE}
        for (_dev, ino), names in self.links.items():
            if any(n in changed for n in names):
                names[:] = sorted(set(names) | {"/" + p for p in self.names_of(ino)})
        super().complete_links()


def changes_within(
    new_root: str,
    old_root: str,
    within: Collection[str],
    names_of: Callable[[int], Iterable[str]],
    written: Collection[int] | None = None,
) -> list[Change]:
    """:func:`tree_changes` of a snapshot against the tree it was taken of, entering only the
    directories in *within* (``""`` the root, ``"/a/b"``, each with every directory above it).

    For a driver that knows which directories were written since the snapshot (btrfs's
    generation numbers): what it leaves out must be the old tree's own, unchanged.
    *names_of(inode)* gives every name (relative to *new_root*, no leading ``/``) of a
    hardlinked file, so that a changed file's names in directories not entered are linked too.
    *written*, when given, holds the inode numbers of every inode of the new tree that may
    differ from the old tree's inode of that number (a snapshot shares its inode numbers with
    the tree it was taken of): in the directories entered, any other inode that is not a
    directory and sits at the same name on both sides is taken as unchanged without a stat.
    """
    walk = _Within(within, names_of, written)
    walk.compare(new_root, "", [old_root], full=True)
    return walk.result()
