"""Generated diffs are canonical: the same changes give the same tar bytes on every driver."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path

from .. import LayerStore
from .base import ConformanceBase
from .groups import group
from .reference import open_reference
from .require import needs_root
from .trees import IGNORED

#: every path's mtime is this plus a few seconds taken from its name, in the parent and the child
_EPOCH = 1_700_000_000
#: the one file whose mtime has a fraction of a second (a PAX ``mtime`` record)
_SUB_SECOND = "new-file"


def _mtime_ns(rel: str) -> int:
    seconds = _EPOCH + int.from_bytes(hashlib.sha256(rel.encode()).digest()[:2], "big")
    return seconds * 10**9 + (123_456_789 if rel == _SUB_SECOND else 0)


def _set_times(root: Path) -> None:
    """Give every path a fixed mtime (atime alike), files first, then directories deepest first:
    no time depends on when or where the steps ran."""
    files: list[str] = []
    dirs: list[str] = []
    for top, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in IGNORED or top != str(root))
        rel_top = os.path.relpath(top, root)
        for name in sorted(names):
            files.append(os.path.normpath(os.path.join(rel_top, name)))
        if rel_top != ".":
            dirs.append(rel_top)
    for rel in files:
        ns = _mtime_ns(rel)
        os.utime(root / rel, ns=(ns, ns), follow_symlinks=False)
    for rel in sorted(dirs, key=lambda d: d.count("/"), reverse=True):
        ns = _mtime_ns(rel)
        os.utime(root / rel, ns=(ns, ns))


def _parent_steps(r: Path) -> None:
    (r / "etc").mkdir()
    for name in ("conf", "mode-file", "owned", "xattr-file", "gone-file", "partner", "same"):
        (r / "etc" / name).write_text(f"{name} in the parent\n")
    os.setxattr(r / "etc" / "xattr-file", "user.note", b"old")
    (r / "old-dir" / "sub").mkdir(parents=True)
    (r / "old-dir" / "a").write_text("a")
    (r / "old-dir" / "sub" / "b").write_text("b")
    (r / "redo" / "subdir").mkdir(parents=True)
    for name in ("keep", "same", "drop", "subdir/x"):
        (r / "redo" / name).write_text(f"{name} in the parent\n")
    (r / "untouched").write_text("untouched")
    _set_times(r)


def _child_steps(r: Path) -> None:
    (r / "new-file").write_text("added\n")
    os.setxattr(r / "new-file", "user.b", b"2")
    os.setxattr(r / "new-file", "user.a", b"1")
    (r / "new-dir").mkdir()
    (r / "new-dir" / "inside").write_text("inside\n")
    os.setxattr(r / "new-dir", "user.on-dir", b"yes")
    (r / "etc" / "conf").write_text("conf in the child\n")  # the same size: a content compare
    os.chmod(r / "etc" / "mode-file", 0o600)
    os.chown(r / "etc" / "owned", 1234, 5678)
    os.setxattr(r / "etc" / "xattr-file", "user.note", b"new")
    os.chown(r / "etc" / "same", 1, 1)  # and back: a copy-up equal to its lower file
    os.chown(r / "etc" / "same", 0, 0)
    (r / "etc" / "gone-file").unlink()
    shutil.rmtree(r / "old-dir")
    shutil.rmtree(r / "redo")  # overlayfs makes the new redo/ opaque
    (r / "redo" / "subdir").mkdir(parents=True)
    (r / "redo" / "keep").write_text("keep in the child\n")
    (r / "redo" / "same").write_text("same in the parent\n")  # re-created equal: no change
    (r / "redo" / "fresh").write_text("fresh\n")
    (r / "links").mkdir()
    (r / "links" / "one").write_text("a new pair\n")
    os.link(r / "links" / "one", r / "links" / "two")
    os.link(r / "etc" / "partner", r / "links" / "to-partner")
    os.symlink("../etc/conf", r / "links" / "sym")
    os.mkfifo(r / "fifo", 0o640)
    _set_times(r)


def _entries(data: bytes) -> str:
    """One line per member: name, type, mode, owner, size, mtime, link and PAX keys, so that
    a failure shows which entries differ."""
    lines = []
    with tarfile.open(fileobj=io.BytesIO(data), format=tarfile.PAX_FORMAT) as tf:
        for m in tf:
            link = f" -> {m.linkname}" if m.linkname else ""
            pax = " pax=" + ",".join(m.pax_headers) if m.pax_headers else ""
            lines.append(
                f"{m.name} type={m.type.decode()} {m.mode:o} {m.uid}:{m.gid} size={m.size}"
                f" mtime={m.mtime}{link}{pax}"
            )
    return "\n".join(lines) + "\n"


def _build_and_diff(store: LayerStore) -> tuple[bytes, list[tuple[str, int]]]:
    store.create("canon-parent")
    with store.mounted("canon-parent") as root:
        _parent_steps(root)
    store.create("canon-child", "canon-parent")
    with store.mounted("canon-child") as root:
        _child_steps(root)
    with store.diff("canon-child") as stream:
        data = stream.read()
    return data, [(c.path, int(c.kind)) for c in store.changes("canon-child")]


class CanonicalCases(ConformanceBase):
    """The diff of a layer built the same way has the same bytes as the core's own walk of a
    full copy gives (:mod:`.reference`; vfs's, issue #13)."""

    @group("diff")
    def test_generated_diff_is_canonical(self, store: LayerStore) -> None:
        needs_root("its tree has files of other owners (chown)")
        # the reference store lives in a layer of the store under test: a filesystem that keeps
        # user.* xattrs as the driver's layers do (a tmpfs, where tmp_path may be, has none
        # before Linux 6.6: the devmapper guest's kernel is 6.1)
        store.create("canon-scratch")
        with store.mounted("canon-scratch") as scratch:
            reference = open_reference(scratch / "reference")
            try:
                want, want_changes = _build_and_diff(reference)
            finally:
                reference.cleanup()
                reference.close()
        got, got_changes = _build_and_diff(store)
        assert _entries(got) == _entries(want)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(want).hexdigest()
        assert got_changes == want_changes
        with tarfile.open(fileobj=io.BytesIO(got)) as tf:
            names = tf.getnames()
        # the form chosen: one whiteout per deleted name, never an opaque marker
        assert "redo/.wh.drop" in names and "redo/subdir/.wh.x" in names
        assert not any(n.endswith(".wh..wh..opq") for n in names)
        assert "redo/same" not in names and "etc/same" not in names
        with tarfile.open(fileobj=io.BytesIO(got)) as tf:
            partner, link = tf.getmember("etc/partner"), tf.getmember("links/to-partner")
            assert partner.isreg() and link.islnk() and link.linkname == "etc/partner"
            mtime = tf.getmember(_SUB_SECOND).pax_headers.get("mtime", "")
            assert mtime.endswith(".123456789"), "a sub-second mtime needs its PAX record"
            assert tf.getmember("fifo").isfifo()
