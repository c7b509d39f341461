"""A driver's own account of a layer's changes (``NativeDiff``: overlay's upper dir, btrfs's
generation numbers) is exactly what the walk of both merged trees finds, and its diff is the
tar the walk's changes make, byte for byte. On a driver without one both sides are the walk."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

from .. import Change, LayerStore
from ..archive import tree_changes, write_changes_tar
from ..archive.tar_writer import TarWriter
from .base import ConformanceBase
from .groups import group
from .require import needs_root

CHOWNS = "the changes include a chown to another owner"

#: a fixed time for what the steps date explicitly
_WHEN = 1_600_000_000


def _parent_steps(r: Path) -> None:
    """A parent with enough untouched neighbours that a driver reading only what changed skips
    most of it: 12 directories of 40 files, a deep chain, and one of each thing to change."""
    for d in range(12):
        folder = r / "bulk" / f"d{d:02}"
        folder.mkdir(parents=True)
        for f in range(40):
            (folder / f"f{f:02}").write_text(f"{d}/{f}\n")
    deep = r / "deep" / "a" / "b" / "c" / "d" / "e" / "f"
    deep.mkdir(parents=True)
    (deep / "leaf").write_text("leaf\n")
    (deep.parent / "beside").write_text("beside\n")
    etc = r / "etc"
    etc.mkdir()
    for name in ("content", "same-size", "mode", "owner", "mtime", "xattr", "gone", "moved"):
        (etc / name).write_text(f"{name} in the parent\n")
    os.setxattr(etc / "xattr", "user.note", b"old")
    os.utime(etc / "same-size", (_WHEN, _WHEN))
    (etc / "pair-a").write_text("a pair\n")
    os.link(etc / "pair-a", etc / "pair-b")
    (etc / "lone").write_text("linked to in the child\n")
    os.symlink("content", etc / "sym")
    for name in ("gone-dir", "file-to-dir", "redo", "dir-to-file", "renamed-dir"):
        (r / name / "sub").mkdir(parents=True)
        (r / name / "sub" / "x").write_text(f"{name}/sub/x\n")
        (r / name / "keep").write_text(f"{name}/keep\n")
    os.utime(r / "redo" / "keep", (_WHEN, _WHEN))
    os.link(r / "renamed-dir" / "keep", r / "bulk" / "d10" / "partner-of-moved")
    shutil.rmtree(r / "file-to-dir")
    (r / "file-to-dir").write_text("a file in the parent\n")


def _child_steps(r: Path) -> None:
    etc = r / "etc"
    (etc / "content").write_text("content changed in the child, longer\n")
    with open(etc / "same-size", "r+") as f:  # same size, mtime put back: only bytes differ
        f.write("S")
    os.utime(etc / "same-size", (_WHEN, _WHEN))
    os.chmod(etc / "mode", 0o600)
    os.chown(etc / "owner", 1234, 5678)
    os.utime(etc / "mtime", (_WHEN + 7, _WHEN + 7))
    os.setxattr(etc / "xattr", "user.note", b"new")
    os.chown(r / "bulk" / "d03" / "f07", 1, 1)  # and back: no change
    os.chown(r / "bulk" / "d03" / "f07", 0, 0)
    (etc / "gone").unlink()
    os.rename(etc / "moved", r / "bulk" / "d05" / "moved-here")
    with open(etc / "pair-a", "a") as f:  # one name of a pair written: both names travel
        f.write("more\n")
    os.link(etc / "lone", r / "bulk" / "d07" / "link-to-lone")
    os.unlink(etc / "sym")
    os.symlink("mode", etc / "sym")
    shutil.rmtree(r / "gone-dir")
    (r / "file-to-dir").unlink()
    (r / "file-to-dir" / "inside").mkdir(parents=True)
    shutil.rmtree(r / "dir-to-file")
    (r / "dir-to-file").write_text("a file in the child\n")
    shutil.rmtree(r / "redo")  # made again: overlayfs makes it opaque
    (r / "redo" / "sub").mkdir(parents=True)
    (r / "redo" / "keep").write_text("redo/keep\n")
    os.utime(r / "redo" / "keep", (_WHEN, _WHEN))  # equal to the parent's: no change
    (r / "redo" / "fresh").write_text("fresh\n")
    # as mv does it: overlayfs without redirect_dir refuses to rename a lower directory (EXDEV)
    shutil.move(r / "renamed-dir", r / "bulk" / "d09" / "renamed-dir")
    deep = r / "deep" / "a" / "b" / "c" / "d" / "e" / "f"
    (deep / "leaf").write_text("leaf changed\n")
    (deep / "g" / "h").mkdir(parents=True)
    (deep / "g" / "h" / "new").write_text("new, deep\n")
    os.mkfifo(r / "bulk" / "fifo", 0o640)


def _walk(store: LayerStore, layer_id: str, parent: str) -> tuple[list[Change], bytes]:
    """The changes and the tar the walk of both merged trees gives."""
    with store.mounted(layer_id) as top, store.mounted(parent) as below:
        changes = tree_changes(str(top), str(below))
        out = io.BytesIO()
        write_changes_tar(TarWriter(write=out.write), str(top), changes)
    return changes, out.getvalue()


class NativeDiffCases(ConformanceBase):
    """``LayerStore.changes`` and ``diff`` (a driver's native path where it has one) against
    the walk of both merged trees, for every kind of change."""

    def _check(self, store: LayerStore, layer_id: str, parent: str) -> None:
        before = store.changes(layer_id)
        walked, tar = _walk(store, layer_id, parent)
        assert before == walked
        # the walk read every file and directory of the layer (atimes moved): the same again
        assert store.changes(layer_id) == walked
        with store.diff(layer_id) as stream:
            assert stream.read() == tar
        paths = {c.path for c in walked}
        # overlay writes one name of a lower pair apart from the other (index=off): no pair-b
        assert "/etc/same-size" in paths and "/etc/pair-a" in paths
        assert "/bulk/d03/f07" not in paths and "/redo/keep" not in paths
        # a file moved with its directory is added; its other name, untouched, goes with it
        # (where the move was a rename: overlayfs without redirect_dir copies)
        with store.mounted(layer_id) as root:
            renamed = (root / "bulk/d09/renamed-dir/keep").stat().st_nlink == 2
        assert "/bulk/d09/renamed-dir/keep" in paths
        assert ("/bulk/d10/partner-of-moved" in paths) == renamed

    @group("diff")
    def test_native_changes_of_a_container_layer_match_the_walk(self, store: LayerStore) -> None:
        needs_root(CHOWNS)
        base = self.base_with(store, _parent_steps)
        store.create_rw("native-rw", base)
        self.fill(store, "native-rw", _child_steps)
        self._check(store, "native-rw", base)

    @group("diff")
    def test_native_changes_of_an_image_layer_match_the_walk(self, store: LayerStore) -> None:
        needs_root(CHOWNS)
        base = self.base_with(store, _parent_steps)
        store.create("native-image", base)
        self.fill(store, "native-image", _child_steps)
        store.create("native-grandchild", "native-image")  # the image layer is sealed now
        self._check(store, "native-image", base)
        assert store.changes("native-grandchild") == []
