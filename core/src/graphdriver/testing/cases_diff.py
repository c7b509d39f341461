"""What a layer changed, and diffs that apply back to the same tree."""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

from .. import LayerStore
from .base import APPLIES, A, C, ConformanceBase, D
from .groups import group
from .require import needs_root
from .trees import listing, make_base, make_rich, random_content


class DiffCases(ConformanceBase):
    """What a layer changed, and diffs that apply back to the same tree."""

    # ------------------------------------------------------------------ changes

    @group("diff")
    def test_changes_exact(self, store: LayerStore) -> None:
        def base(r: Path) -> None:
            (r / "a" / "b").mkdir(parents=True)
            (r / "a" / "b" / "file").write_text("one")
            (r / "a" / "same").write_text("same")
            (r / "old").write_text("old")
            (r / "gone" / "sub").mkdir(parents=True)
            (r / "gone" / "sub" / "x").write_text("x")
            (r / "untouched").write_text("u")

        def child(r: Path) -> None:
            (r / "a" / "b" / "file").write_text("two")
            (r / "new").write_text("new")
            (r / "old").unlink()
            shutil.rmtree(r / "gone")

        self.base_with(store, base)
        store.create("child", "base")
        self.fill(store, "child", child)
        got = [(c.path, c.kind) for c in store.changes("child")]
        assert got == [
            ("/a", C),
            ("/a/b", C),
            ("/a/b/file", C),
            ("/gone", D),
            ("/new", A),
            ("/old", D),
        ]
        assert [(c.path, c.kind) for c in store.changes("base")] == [
            ("/a", A),
            ("/a/b", A),
            ("/a/b/file", A),
            ("/a/same", A),
            ("/gone", A),
            ("/gone/sub", A),
            ("/gone/sub/x", A),
            ("/old", A),
            ("/untouched", A),
        ]

    @group("diff")
    def test_changes_same_size_rewrite_right_after_create(self, store: LayerStore) -> None:
        # A rewrite within one timestamp tick keeps size and mtime; it must still be seen,
        # without sleeping to the next second like moby's NaiveDiffDriver. Put the mtime back
        # by hand to stand for the same tick deterministically.
        self.base_with(store, lambda r: (r / "f").write_text("aaaa"))
        store.create("child", "base")

        def rewrite(r: Path) -> None:
            st = os.stat(r / "f")
            (r / "f").write_text("bbbb")
            os.utime(r / "f", ns=(st.st_atime_ns, st.st_mtime_ns))

        self.fill(store, "child", rewrite)
        assert [(c.path, c.kind) for c in store.changes("child")] == [("/f", C)]
        self.roundtrip(store, "child", "copy")

    @group("diff")
    def test_changes_at_ten_depths(self, store: LayerStore) -> None:
        def base(r: Path) -> None:
            d = r
            for i in range(10):
                d = d / f"d{i}"
                d.mkdir()
                (d / "file").write_text(f"depth {i}")

        def child(r: Path) -> None:
            d = r
            for i in range(10):
                d = d / f"d{i}"
                (d / "file").write_text(f"changed at depth {i}")

        self.base_with(store, base)
        store.create("child", "base")
        self.fill(store, "child", child)
        want = []
        path = ""
        for i in range(10):
            path += f"/d{i}"
            want += [(path, C), (path + "/file", C)]
        assert sorted((c.path, c.kind) for c in store.changes("child")) == sorted(want)

    @group("diff")
    def test_chown_and_chmod_in_child(self, store: LayerStore) -> None:
        self.base_with(store, make_rich)
        store.create("child", "base")

        def change(r: Path) -> None:
            os.chown(r / "etc" / "hostname", 42, 43)
            os.chmod(r / "big.bin", 0o600)
            os.chmod(r / "deep" / "a", 0o711)
            os.setxattr(r / "xattr-file", "user.comment", b"changed")

        self.fill(store, "child", change)
        got = {c.path: c.kind for c in store.changes("child")}
        for p in ("/etc/hostname", "/big.bin", "/deep/a", "/xattr-file"):
            assert got[p] == C
        self.roundtrip(store, "child", "copy")

    # ------------------------------------------------------------------ diff and apply

    @group("diff")
    def test_diff_apply_reproduces_layer(self, store: LayerStore) -> None:
        self.base_with(store, make_rich)
        store.create_rw("child", "base")

        def change(r: Path) -> None:
            (r / "etc" / "hostname").write_bytes(b"changed\n")
            (r / "added" / "tree").mkdir(parents=True)
            (r / "added" / "tree" / "data").write_bytes(random_content(300_000, 3))
            os.link(r / "added" / "tree" / "data", r / "added" / "data-link")
            os.symlink("../etc", r / "added" / "etc-link")
            os.mkfifo(r / "added" / "pipe")
            (r / "null").unlink()
            (r / "abs-link").unlink()
            shutil.rmtree(r / "deep" / "a" / "b")
            os.chmod(r / "tmp", 0o1770)

        self.fill(store, "child", change)
        size, _ = self.roundtrip(store, "child", "copy")
        assert size == store.diff_size("child")
        assert size == 300_000 + len(b"changed\n")
        assert {(c.path, c.kind) for c in store.changes("copy")} == {
            (c.path, c.kind) for c in store.changes("child")
        }

    @group("diff")
    def test_diff_apply_of_base_layer(self, store: LayerStore) -> None:
        self.base_with(store, make_rich)
        size, data = self.roundtrip(store, "base", "copy")
        assert size == store.diff_size("base")
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            names = tf.getnames()
        assert "big.bin" in names and "etc/hostname" in names

    @group("diff")
    def test_delete_file_from_lower(self, store: LayerStore) -> None:
        self.base_with(store, make_base)
        store.create("child", "base")
        self.fill(store, "child", lambda r: (r / "a file").unlink())
        with store.mounted("child") as root:
            assert listing(root) == ["a subdir"]
        assert [(c.path, c.kind) for c in store.changes("child")] == [("/a file", D)]
        self.roundtrip(store, "child", "copy")
        with store.mounted("base") as root:
            assert (root / "a file").read_bytes() == b"Some data"

    @group("diff")
    def test_delete_directory_from_lower(self, store: LayerStore) -> None:
        self.base_with(store, make_rich)
        store.create("child", "base")
        self.fill(store, "child", lambda r: shutil.rmtree(r / "deep"))
        with store.mounted("child") as root:
            assert not (root / "deep").exists()
        assert [(c.path, c.kind) for c in store.changes("child")] == [("/deep", D)]
        self.roundtrip(store, "child", "copy")

    @group("diff")
    def test_directory_deleted_and_recreated(self, store: LayerStore) -> None:
        def base(r: Path) -> None:
            (r / "dir").mkdir()
            (r / "dir" / "x").write_text("x")
            (r / "dir" / "y").write_text("y")

        def child(r: Path) -> None:
            shutil.rmtree(r / "dir")
            (r / "dir").mkdir()
            (r / "dir" / "z").write_text("z")

        self.base_with(store, base)
        store.create("child", "base")
        self.fill(store, "child", child)
        self.roundtrip(store, "child", "copy")
        with store.mounted("copy") as root:
            assert sorted(os.listdir(root / "dir")) == ["z"]

    @group("diff")
    def test_file_moved_out_of_lower(self, store: LayerStore) -> None:
        def base(r: Path) -> None:
            (r / "a").mkdir()
            (r / "a" / "file").write_bytes(random_content(10_000, 4))

        def child(r: Path) -> None:
            (r / "b").mkdir()
            os.rename(r / "a" / "file", r / "b" / "file")

        self.base_with(store, base)
        store.create("child", "base")
        self.fill(store, "child", child)
        got = {(c.path, c.kind) for c in store.changes("child")}
        assert {("/a/file", D), ("/b", A), ("/b/file", A)} <= got
        self.roundtrip(store, "child", "copy")

    @group("diff")
    def test_hardlink_to_a_file_of_the_lower_layer(self, store: LayerStore) -> None:
        def base(r: Path) -> None:
            (r / "orig").write_text("shared")
            (r / "sub").mkdir()

        self.base_with(store, base)
        store.create("child", "base")
        self.fill(store, "child", lambda r: os.link(r / "orig", r / "sub" / "link"))
        with store.mounted("child") as root:
            assert os.lstat(root / "orig").st_ino == os.lstat(root / "sub" / "link").st_ino
        got = {(c.path, c.kind) for c in store.changes("child")}
        assert ("/sub/link", A) in got
        self.roundtrip(store, "child", "copy")  # the copy links the two names as well
        with store.mounted("copy") as root:
            assert os.lstat(root / "orig").st_ino == os.lstat(root / "sub" / "link").st_ino

    @group("diff")
    def test_applied_hardlink_to_a_file_of_the_parent(self, store: LayerStore) -> None:
        needs_root(APPLIES)

        # `ln dir/orig new` in a build step: Docker and podman write only the hardlink entry;
        # the kernel had copied dir/orig up, keeping its data and attributes, and dir's
        def base(r: Path) -> None:
            (r / "dir").mkdir()
            (r / "dir" / "orig").write_bytes(b"shared data")
            os.setxattr(r / "dir" / "orig", "user.kept", b"yes")
            os.chown(r / "dir" / "orig", 1000, 1001)
            os.chmod(r / "dir" / "orig", 0o4751)
            os.utime(r / "dir" / "orig", ns=(1_600_000_000_000_000_001,) * 2)
            os.chown(r / "dir", 5, 6)
            os.chmod(r / "dir", 0o710)
            os.utime(r / "dir", ns=(1_500_000_000_000_000_000,) * 2)

        self.base_with(store, base)
        before = self.snap(store, "base")
        with store.mounted("base") as root:
            want = {p: os.lstat(root / p) for p in ("dir", "dir/orig")}
        info = tarfile.TarInfo("new")
        info.type, info.linkname = tarfile.LNKTYPE, "dir/orig"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            tf.addfile(info)
        store.create("child", "base")
        store.apply_diff("child", io.BytesIO(buf.getvalue()))
        with store.mounted("child") as root:
            new, orig = os.lstat(root / "new"), os.lstat(root / "dir" / "orig")
            assert (new.st_ino, new.st_nlink) == (orig.st_ino, 2)
            assert (root / "new").read_bytes() == b"shared data"
            assert os.getxattr(root / "new", "user.kept") == b"yes"
            for rel, st in want.items():
                got = os.lstat(root / rel)
                assert (got.st_mode, got.st_uid, got.st_gid) == (st.st_mode, st.st_uid, st.st_gid)
                assert got.st_mtime_ns == st.st_mtime_ns, rel
        assert self.snap(store, "base") == before
        self.roundtrip(store, "child", "copy")

    @group("diff")
    def test_diff_against_grandparent(self, store: LayerStore) -> None:
        self.base_with(store, make_base)
        store.create("mid", "base")
        self.fill(store, "mid", lambda r: (r / "from-mid").write_text("m"))
        store.create("top", "mid")
        self.fill(store, "top", lambda r: (r / "from-top").write_text("t"))
        assert [c.path for c in store.changes("top")] == ["/from-top"]
        assert [c.path for c in store.changes("top", "base")] == ["/from-mid", "/from-top"]
        assert store.diff_size("top", "base") == 2

    @group("diff")
    def test_times_a_ustar_field_cannot_hold_survive_a_generated_diff(
        self, store: LayerStore
    ) -> None:
        """Whole seconds before 1970 or after 2242 go in a PAX ``mtime`` record; the ustar
        field alone was clamped to 0 and 8^11-1, so the layer applied from the diff got
        1970 and 2242 instead."""
        self.base_with(store, make_base)
        store.create_rw("dated", "base")
        times = {"old": -473_385_600, "far": 10_413_792_000, "old-fraction": -473_385_599}

        def date(root: Path) -> None:
            for name, seconds in times.items():
                (root / name).write_text(name)
                ns = seconds * 10**9 + (250_000_000 if name.endswith("fraction") else 0)
                os.utime(root / name, ns=(ns, ns))

        self.fill(store, "dated", date)
        with store.mounted("dated") as root:
            kept = {name: os.lstat(root / name).st_mtime_ns for name in times}
        assert kept["old"] == -473_385_600 * 10**9, "the filesystem keeps no time before 1970"
        self.roundtrip(store, "dated", "copy")
        with store.mounted("copy") as root:
            assert {name: os.lstat(root / name).st_mtime_ns for name in times} == kept

    @group("diff")
    def test_hardlinked_symlinks_fifos_and_devices_stay_linked(self, store: LayerStore) -> None:
        """Any inode but a directory's may have several names; a generated diff wrote only a
        regular file's later names as links, so a symlink, fifo or device node linked in a
        layer came back as separate inodes. Docker's diff links them all."""
        needs_root(APPLIES)

        def lower(root: Path) -> None:  # linked in the child: the diff must carry both names
            os.symlink("a file", root / "old-sym")
            os.mkfifo(root / "old-fifo")

        self.base_with(store, lower)
        store.create_rw("linked", "base")
        pairs = [("sym", "sym-link"), ("fifo", "fifo-link"), ("dev", "dev-link")]
        pairs += [("old-sym", "old-sym-link"), ("old-fifo", "old-fifo-link")]

        def link(root: Path) -> None:
            os.symlink("a file", root / "sym")
            os.mkfifo(root / "fifo")
            os.mknod(root / "dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
            for name, other in pairs:
                os.link(root / name, root / other, follow_symlinks=False)

        self.fill(store, "linked", link)
        _, data = self.roundtrip(store, "linked", "copy")
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            assert {m.name for m in tf if m.islnk()} == {other for _, other in pairs}
        with store.mounted("copy") as root:
            for name, other in pairs:
                first, second = os.lstat(root / name), os.lstat(root / other)
                assert (first.st_ino, first.st_nlink) == (second.st_ino, 2), name

    @group("diff")
    def test_a_tree_deeper_than_python_s_stack_compares_copies_and_diffs(
        self, store: LayerStore
    ) -> None:
        """A tree 1,100 directories deep (Python stops at 1,000 nested calls): its changes,
        its generated diff, a child of it, and a container's writes at the bottom and their
        diff, applied. The tree compare and vfs's copy for a child called themselves once a
        level: "internal error: RecursionError"."""
        needs_root(APPLIES)
        levels = ["a"] * 1100
        bottom = "/".join(levels)

        def deep(root: Path) -> None:
            at = str(root)
            for name in levels:  # (os.makedirs and Path.mkdir call themselves a level too)
                at += "/" + name
                os.mkdir(at)
            Path(at, "f").write_text("f")

        self.base_with(store, deep)
        dirs = ["/" + "/".join(levels[:n]) for n in range(1, 1101)]
        assert store.changes("base") == [(d, A) for d in dirs] + [("/" + bottom + "/f", A)]
        with store.diff("base") as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
            names = [m.name for m in tf]
        assert names == [d[1:] for d in dirs] + [bottom + "/f"]
        store.create("child", "base")
        store.create_rw("rw", "child")

        def write(root: Path) -> None:
            Path(root, bottom, "g").write_text("g")
            Path(root, bottom, "f").unlink()

        self.fill(store, "rw", write)
        want = [(d, C) for d in dirs] + [("/" + bottom + "/f", D), ("/" + bottom + "/g", A)]
        assert store.changes("rw") == want
        with store.diff("rw") as stream:
            data = stream.read()
        store.create("copy", "child")
        store.apply("copy", io.BytesIO(data))
        assert store.changes("copy") == want
        with store.mounted("copy") as root:
            assert os.listdir(Path(root, bottom)) == ["g"]
        for layer in ("copy", "rw", "child", "base"):
            store.remove(layer)
