"""The tree compare's C loop (``_fastpath.compare_dir``), which settles the entries of a
directory that two lstats settle and leaves the rest to the Python loop: held to the same
changes as the Python loop alone (``fastpath.ENABLED`` False), for a plain tree and for an
overlay upper over more lowers than the compare keeps open."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from graphdriver.archive import ChangeKind, fastpath, overlay_changes, tree_changes
from graphdriver.archive.changes import Change, canonical_order
from graphdriver.archive.changes_within import changes_within
from graphdriver.testing import host_lacks

M, A, D = ChangeKind.MODIFY, ChangeKind.ADD, ChangeKind.DELETE
ODD = os.fsdecode(b"odd-\xff")  # a name that is no UTF-8: a surrogate in Python


def _needs_the_c_loop() -> None:
    if not fastpath.ENABLED:
        host_lacks("the C fast path was not built (gcc, python3-dev at install)", "fastpath")


def _both(monkeypatch: pytest.MonkeyPatch, compare: object) -> list[Change]:
    """The compare's changes with the C loop and without, which must be the same; the C loop
    must have settled some entries itself."""
    assert callable(compare)
    real = fastpath.compare_dir
    assert real is not None
    settled: list[str] = []

    def counting(*args: object) -> tuple[list[tuple[str, int]], list[str]]:
        done, left = real(*args)  # type: ignore[arg-type]
        settled.extend(name for name, _ in done)
        return done, left

    monkeypatch.setattr(fastpath, "compare_dir", counting)
    got = compare()
    assert settled
    monkeypatch.setattr(fastpath, "ENABLED", False)
    assert compare() == got
    monkeypatch.setattr(fastpath, "ENABLED", True)
    monkeypatch.setattr(fastpath, "compare_dir", real)
    return list(got)


def _boundary(tree: Path) -> int:
    """A ctime of the filesystem's clock, as LayerStore.create takes a layer's boundary."""
    (tree / ".boundary").touch()
    ns = (tree / ".boundary").stat().st_ctime_ns
    (tree / ".boundary").unlink()
    return ns


def _old_tree(old: Path) -> None:
    (old / "dir" / "sub").mkdir(parents=True)
    for name in ("same", "rewritten", "chmodded", "twin", "gone", "dir/a", "dir/sub/b", "was-file"):
        (old / name).write_text(f"{name} before")
    (old / "gone-dir" / "deep").mkdir(parents=True)
    (old / "gone-dir" / "deep" / "x").write_text("x")
    (old / "was-dir").mkdir()
    (old / "link").symlink_to("target-a")
    (old / "é").write_text("accent")
    (old / ODD).write_text("odd")
    (old / "linked").write_text("one inode")


def _new_tree(old: Path, new: Path) -> int:
    """The new tree, made from *old*, and its boundary: the ctime after the copy."""
    shutil.copytree(old, new, symlinks=True)  # copy2: the same mtimes, other inodes
    for tree in (old, new):  # a fifo copytree cannot copy: the same metadata, made twice
        os.mkfifo(tree / "fifo", 0o640)
        os.utime(tree / "fifo", ns=(1, 1_700_000_000_123_456_789))
    boundary = _boundary(new)
    (new / "rewritten").write_text("rewritten, longer")
    (new / "chmodded").chmod(0o600)
    st = (new / "twin").stat()
    (new / "twin").write_text("TWIN BEFORE")  # same size, then the same mtime: the content
    os.utime(new / "twin", ns=(st.st_atime_ns, st.st_mtime_ns))
    st = os.lstat(new / "link")
    (new / "link").unlink()
    (new / "link").symlink_to("target-b")  # same length and mtime: readlink tells
    os.utime(new / "link", ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    (new / "gone").unlink()
    shutil.rmtree(new / "gone-dir")
    (new / "was-file").unlink()
    (new / "was-file").mkdir()
    (new / "was-dir").rmdir()
    (new / "was-dir").write_text("now a file")
    (new / "added").write_text("new")
    (new / "added-dir" / "in").mkdir(parents=True)
    (new / "added-dir" / "in" / "f").write_text("new")
    (new / "dir" / "sub" / "b").write_text("changed below")
    os.link(new / "linked", new / "dir" / "second-name")  # the unchanged name comes along
    (new / ODD).write_text("odd, changed")
    return boundary


def test_a_plain_tree_compares_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kind of entry a plain tree compare meets: what the lstats settle (added, deleted,
    rewritten, chmodded), what they leave (same metadata and other content, a retargeted
    symlink of the same length and mtime, hardlinks, directories replaced by files and the
    reverse, a name that is no UTF-8), the same with the C loop and without, with the
    layer's boundary (the C loop runs) and without (the Python loop alone)."""
    _needs_the_c_loop()
    old, new = tmp_path / "old", tmp_path / "new"
    _old_tree(old)
    boundary = _new_tree(old, new)
    got = _both(monkeypatch, lambda: tree_changes(str(new), str(old), boundary))
    assert tree_changes(str(new), str(old)) == got
    assert got == [
        ("/added", A),
        ("/added-dir", A),
        ("/added-dir/in", A),
        ("/added-dir/in/f", A),
        ("/chmodded", M),
        ("/dir", M),
        ("/dir/second-name", A),
        ("/dir/sub", M),
        ("/dir/sub/b", M),
        ("/gone", D),
        ("/gone-dir", D),
        ("/link", M),
        ("/linked", M),  # the other name of a changed (new) link
        (f"/{ODD}", M),
        ("/rewritten", M),
        ("/twin", M),
        ("/was-dir", M),
        ("/was-file", M),
    ]  # "/same", "/é", "/fifo": unchanged


def test_the_c_loop_settles_what_two_lstats_settle(tmp_path: Path) -> None:
    """compare_dir itself: added, rewritten and deleted names are settled in C; a directory,
    a hardlinked entry of any kind (its names are gathered: "pipe", linked into both trees,
    too) and a file whose metadata equal the old one's are left, but for one not changed
    since the boundary (its ctime before it, not at it), which is unchanged."""
    _needs_the_c_loop()
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    for name in ("same", "rewritten", "gone", "linked"):
        (old / name).write_text(name)
    shutil.copytree(old, new)
    boundary = time.time_ns() + 10**9  # after every ctime here
    os.mkfifo(old / "pipe")
    os.link(old / "pipe", new / "pipe")  # the very same inode and ctime
    (new / "gone").unlink()
    (new / "rewritten").write_text("rewritten, longer")
    (new / "added").write_text("added")
    (new / "dir").mkdir()
    os.link(new / "linked", new / "second")
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in (new, old)]
    try:
        done, left = fastpath.compare_dir(fds[0], (fds[1],), False, True, -1, None)
        lookup_only, left_too = fastpath.compare_dir(fds[0], (fds[1],), False, False, -1, None)
        bounded, left_bounded = fastpath.compare_dir(
            fds[0], (fds[1],), False, True, boundary, None
        )  # fmt: skip
        at = (new / "same").stat().st_ctime_ns
        _, left_at = fastpath.compare_dir(fds[0], (fds[1],), False, True, at, None)
    finally:
        for fd in fds:
            os.close(fd)
    assert sorted(done) == [("added", 1), ("gone", 2), ("rewritten", 0)]
    assert sorted(left) == ["dir", "linked", "pipe", "same", "second"]
    assert sorted(lookup_only) == [("added", 1), ("rewritten", 0)]  # no deletes: not full
    assert sorted(left_too) == sorted(left)
    assert sorted(bounded) == sorted(done)
    assert sorted(left_bounded) == ["dir", "linked", "pipe", "second"]  # "same": unchanged
    assert "same" in left_at  # a ctime at the boundary may be a write after it


def test_a_snapshot_compare_within_written_dirs_compares_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """changes_within with the inode numbers written (btrfs's): an entry at the old one's
    inode number and not written is the old one's, unstat'ed; a written one is compared; a
    directory not entered is unchanged. A snapshot's shared inode numbers are hardlinks here."""
    _needs_the_c_loop()
    old, new = tmp_path / "old", tmp_path / "new"
    for name in ("kept", "written-same", "rewritten", "gone", "sub/x", "skipped/y"):
        path = old / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(name)
    for d in ("", "sub", "skipped"):
        (new / d).mkdir(exist_ok=True)
    for name in ("kept", "written-same", "sub/x", "skipped/y"):
        os.link(old / name, new / name)  # the same inode number at the same name
    (new / "rewritten").write_text("rewritten, longer")
    (new / "added").write_text("added")
    written = {os.lstat(new / n).st_ino for n in ("written-same", "rewritten", "added")}
    os.chmod(new / "skipped" / "y", 0o600)  # (not entered: never seen)
    got = _both(
        monkeypatch,
        lambda: changes_within(str(new), str(old), {"", "/sub"}, lambda _ino: [], written),
    )
    assert got == [("/added", A), ("/gone", D), ("/rewritten", M)]


def _whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, 0)


def test_an_overlay_upper_over_many_lowers_compares_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upper over 10 lowers (the compare opens 8 at a time, and the C loop leaves a name
    it would have to look up by path): whiteouts above and below, a name found only in the
    9th lower, an opaque directory, copies up equal to what is below; the same changes with
    the C loop and without."""
    _needs_the_c_loop()
    if os.geteuid() != 0:
        host_lacks("needs root to make whiteouts (0/0 character devices)", "root")
    lowers = [tmp_path / f"l{i}" for i in range(10)]
    for i, lower in enumerate(lowers):
        (lower / "etc").mkdir(parents=True)
        (lower / "etc" / f"only-in-{i}").write_text(f"lower {i}")
    (lowers[9] / "etc" / "deep-only").write_text("found in the 10th")
    (lowers[0] / "etc" / "hidden").write_text("hidden below")
    _whiteout(lowers[0] / "etc" / "only-in-3")  # hides the 4th lower's
    (lowers[1] / "opq").mkdir()
    (lowers[1] / "opq" / "below").write_text("below")
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    shutil.copy2(lowers[0] / "etc" / "only-in-0", upper / "etc" / "only-in-0")  # equal: no change
    (upper / "etc" / "only-in-1").write_text("rewritten")
    (upper / "etc" / "only-in-3").write_text("made again")  # deleted below: added
    (upper / "etc" / "deep-only").write_text("rewritten deep")
    (upper / "etc" / "brand-new").write_text("new")
    _whiteout(upper / "etc" / "only-in-5")
    _whiteout(upper / "etc" / "never-was")  # a whiteout of nothing: dropped
    (upper / "opq").mkdir()
    os.setxattr(upper / "opq", "trusted.overlay.opaque", b"y")
    (upper / "opq" / "fresh").write_text("fresh")
    got = _both(monkeypatch, lambda: overlay_changes(str(upper), [str(p) for p in lowers]))
    assert got == [
        ("/etc", M),
        ("/etc/brand-new", A),
        ("/etc/deep-only", M),
        ("/etc/only-in-1", M),
        ("/etc/only-in-3", A),
        ("/etc/only-in-5", D),
        ("/opq", M),
        ("/opq/below", D),
        ("/opq/fresh", A),
    ]


def test_the_canonical_order_is_the_bytes_order() -> None:
    """ASCII paths sort as strings; with a name that is no UTF-8 among them, by their bytes
    (a surrogate sorts after every other character, its byte before a multibyte one)."""
    plain = [Change(p, A) for p in ("/b", "/a/z", "/a", "/a b", "/a/b")]
    canonical_order(plain)
    assert [c.path for c in plain] == ["/a", "/a b", "/a/b", "/a/z", "/b"]
    odd = [Change(p, A) for p in ("/é", f"/{ODD}", "/z", "/odd-a")]
    canonical_order(odd)
    assert [os.fsencode(c.path) for c in odd] == [b"/odd-a", b"/odd-\xff", b"/z", "/é".encode()]


def test_a_directory_the_c_loop_cannot_read_is_named_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compare_dir names a directory whose read failed by its descriptor; the compare names
    it by its path, once, relative roots too (not joined to the other side's)."""
    _needs_the_c_loop()
    for side in ("new", "old"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "f").write_text(side)

    def failing(new_fd: int, *_rest: object) -> object:
        raise OSError(errno.EIO, os.strerror(errno.EIO), new_fd)

    monkeypatch.setattr(fastpath, "compare_dir", failing)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError) as got:
        tree_changes("new", "old", _boundary(tmp_path / "new"))
    assert got.value.errno == errno.EIO and got.value.filename == "new"
