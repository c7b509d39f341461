"""Exact diffs: the diff of an applied, unchanged layer is the applied tar, byte for byte
(Docker's ReproducesExactDiffs); a layer changed after apply-diff gets a generated diff, which
says why."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

from .. import LayerStore
from .base import APPLIES, ConformanceBase
from .groups import group
from .require import needs_root, run_tool
from .tars import edge_tars, tarfile_tar
from .trees import make_rich, random_content


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _gnu_tar(src: Path, *args: str) -> bytes:
    return run_tool(
        ["tar", "--numeric-owner", *args, "-C", str(src), "-cf", "-", "."],
        capture_output=True,
        check=True,
    ).stdout


class ExactDiffCases(ConformanceBase):
    """apply-diff keeps what ``diff`` needs to give the applied tar back, on every driver."""

    def _export(self, store: LayerStore, layer_id: str) -> tuple[bytes, bool, str | None]:
        out = io.BytesIO()
        result = store.export(layer_id, out)
        assert result.tar_size == len(out.getvalue())
        return out.getvalue(), result.exact, result.reason

    def _assert_exact(self, store: LayerStore, layer_id: str, applied: bytes) -> None:
        data, exact, reason = self._export(store, layer_id)
        assert exact, f"diff of {layer_id} is generated: {reason}"
        assert data == applied, f"diff of {layer_id} is not the applied tar"
        assert store.metadata(layer_id)["diff_id"] == _sha(applied)

    @group("streams")
    def test_diff_gives_back_the_applied_tar(self, store: LayerStore, tmp_path: Path) -> None:
        self.base_with(store, make_rich, "source")
        sparse = tmp_path / "sparse"
        sparse.mkdir()
        with open(sparse / "holes", "wb") as f:
            f.truncate(8 << 20)
            f.seek(3 << 20)
            f.write(random_content(5000, 3))
        with store.mounted("source") as src:
            tars = {
                "gnu-tar": _gnu_tar(src, "--format=gnu", "--xattrs", "--xattrs-include=*"),
                "gnu-tar-pax": _gnu_tar(src, "--format=pax", "--xattrs", "--xattrs-include=*"),
            }
        tars["gnu-tar-sparse"] = _gnu_tar(sparse, "--format=pax", "-S")
        tars["gnu-tar-sparse-gnu"] = _gnu_tar(sparse, "--format=gnu", "-S")
        tars.update(edge_tars())
        with store.diff("source") as stream:
            tars["our-own"] = stream.read()
        for i, (name, applied) in enumerate(tars.items()):
            # each tar twice: plain from a file, whose bodies the apply reads where they are
            # (the record notes each header and body as it passes them), and its gzip form
            # from a stream, whose bodies pass through the reader (its diff: the plain tar)
            (tmp_path / f"{i}.tar").write_bytes(applied)
            for layer_id in (f"exact-{i}", f"exact-{i}-gz"):
                store.create(layer_id)
                if layer_id.endswith("-gz"):
                    got = store.apply(layer_id, io.BytesIO(gzip.compress(applied, mtime=0)))
                else:
                    with open(tmp_path / f"{i}.tar", "rb") as f:
                        got = store.apply(layer_id, f)
                assert got.diff_id == _sha(applied), f"{name} ({layer_id})"
                self._assert_exact(store, layer_id, applied)
                with store.mounted(layer_id):
                    pass  # mounted and unmounted, never written: still the same layer
                data, exact, reason = self._export(store, layer_id)
                assert exact and data == applied, f"{name} ({layer_id}): {reason}"
        meta = store.metadata("exact-0")
        assert isinstance(meta["exact_diff_record"], int)
        assert meta["exact_diff_record"] < len(tars["gnu-tar"])
        assert ("Reproduces Exact Diffs", "true") in store.status()

    @group("streams")
    def test_exact_diff_of_a_child_with_whiteouts(self, store: LayerStore) -> None:
        needs_root(APPLIES)
        parent = tarfile_tar(
            ("a", tarfile.DIRTYPE, None),
            ("a/x", tarfile.REGTYPE, b"x"),
            ("a/y", tarfile.REGTYPE, b"y"),
            ("d", tarfile.DIRTYPE, None),
            ("d/1", tarfile.REGTYPE, b"1"),
            ("e", tarfile.DIRTYPE, None),
            ("e/old", tarfile.REGTYPE, b"old"),
            ("f", tarfile.REGTYPE, b"lower file"),
            ("keep", tarfile.REGTYPE, b"keep"),
            format=tarfile.PAX_FORMAT,
        )
        child = tarfile_tar(
            ("a/.wh.x", tarfile.REGTYPE, b""),
            (".wh.d", tarfile.REGTYPE, b""),
            ("e", tarfile.DIRTYPE, None),
            ("e/.wh..wh..opq", tarfile.REGTYPE, b""),
            ("e/new", tarfile.REGTYPE, b"new"),
            ("link-to-f", tarfile.LNKTYPE, b"f"),
            ("keep", tarfile.REGTYPE, b"changed"),
            format=tarfile.PAX_FORMAT,
        )
        store.create("parent")
        store.apply("parent", io.BytesIO(parent))
        store.create("child", "parent")
        store.apply("child", io.BytesIO(child))
        self._assert_exact(store, "child", child)
        self._assert_exact(store, "parent", parent)  # a child on top changes nothing
        _size, data = self.roundtrip(store, "child", "again")
        assert data == child
        with store.mounted("child") as root:
            assert sorted(os.listdir(root)) == ["a", "e", "f", "keep", "link-to-f"]
            assert os.listdir(root / "e") == ["new"]
            assert os.stat(root / "link-to-f").st_ino == os.stat(root / "f").st_ino

    @group("streams")
    def test_whiteouts_of_nothing_and_an_opaque_root_are_alike_on_every_driver(
        self, store: LayerStore
    ) -> None:
        """A whiteout of a name no layer below holds deletes nothing, and an opaque root hides
        every name below it, in the mount of the layer and of its children too, on every
        driver. overlay made a whiteout anyway, which overlayfs lists in a new directory as
        an entry that cannot be opened ('c?????????'), and marked the root of its upper
        opaque, which overlayfs ignores: the parent's names showed through."""
        needs_root(APPLIES)
        dir_, reg = tarfile.DIRTYPE, tarfile.REGTYPE
        bottom = tarfile_tar(
            (".wh.none", reg, b""), ("d", dir_, None), ("d/.wh.none", reg, b""),
            format=tarfile.PAX_FORMAT,
        )  # fmt: skip
        parent = tarfile_tar(
            ("a", dir_, None), ("a/keep", reg, b"k"), ("b", dir_, None), ("b/x", reg, b"x"),
            ("f", reg, b"f"), format=tarfile.PAX_FORMAT,
        )  # fmt: skip
        child = tarfile_tar(
            ("new", dir_, None), ("new/.wh.none", reg, b""), ("new/f", reg, b"f"),
            ("a/sub", dir_, None), ("a/sub/.wh.none", reg, b""), ("a/.wh.none", reg, b""),
            (".wh.none", reg, b""), format=tarfile.PAX_FORMAT,
        )  # fmt: skip
        opaque_root = tarfile_tar(
            (".wh..wh..opq", reg, b""), ("a", dir_, None), ("a/n", reg, b"n"), ("c", reg, b"c"),
            format=tarfile.PAX_FORMAT,
        )  # fmt: skip
        on_top = tarfile_tar(("top", reg, b"t"), format=tarfile.PAX_FORMAT)
        layers = [
            ("bottom", None, bottom, ["d"]),
            ("parent", None, parent, ["a", "a/keep", "b", "b/x", "f"]),
            ("child", "parent", child, ["a", "a/keep", "a/sub", "b", "b/x", "f", "new", "new/f"]),
            ("opaque", "parent", opaque_root, ["a", "a/n", "c"]),
            ("on-top", "opaque", on_top, ["a", "a/n", "c", "top"]),
        ]
        for layer_id, parent_id, applied, _ in layers:
            store.create(layer_id, parent_id)
            store.apply(layer_id, io.BytesIO(applied))
        for layer_id, _, applied, names in layers:
            with store.mounted(layer_id) as root:
                shown = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
                for path in shown:
                    os.lstat(root / path)  # each name listed can be opened
            assert shown == names, layer_id
            self._assert_exact(store, layer_id, applied)

    @group("streams")
    def test_an_opaque_marker_after_the_tars_own_entries(self, store: LayerStore) -> None:
        """An opaque marker hides the parent's entries of its directory, not the tar's own,
        wherever it stands: what the tar made before it stays (a file, a hardlink to a
        parent's file, a file in a parent's directory, which stays with it alone); a
        directory the tar only went through (to a hardlink's target, to a whiteout) goes,
        as in Docker's unpacker. overlay kept the parent's file the hardlink had copied up,
        vfs the parent's files in a directory the tar wrote into."""
        needs_root(APPLIES)
        dir_, reg = tarfile.DIRTYPE, tarfile.REGTYPE
        parent = tarfile_tar(
            ("d", dir_, None), ("d/sub", dir_, None), ("d/sub/t", reg, b"t"),
            ("d/sub/o", reg, b"o"), ("d/x", reg, b"x"), ("d/keep", dir_, None),
            ("d/keep/k", reg, b"k"), format=tarfile.PAX_FORMAT,
        )  # fmt: skip
        child = tarfile_tar(
            ("d", dir_, None), ("d/new", reg, b"n"), ("d/link", tarfile.LNKTYPE, b"d/sub/t"),
            ("d/e/.wh.none", reg, b""), ("d/keep/mine", reg, b"m"), ("d/.wh.x", reg, b""),
            ("d/.wh..wh..opq", reg, b""), format=tarfile.PAX_FORMAT,
        )  # fmt: skip
        store.create("parent")
        store.apply("parent", io.BytesIO(parent))
        store.create("child", "parent")
        store.apply("child", io.BytesIO(child))
        with store.mounted("child") as root:
            shown = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
            assert (root / "d" / "link").read_bytes() == b"t"
        assert shown == ["d", "d/keep", "d/keep/mine", "d/link", "d/new"]
        self._assert_exact(store, "child", child)

    @group("streams")
    def test_exact_diff_outlives_a_look_through_the_layers_mount(self, store: LayerStore) -> None:
        """Every name of an applied child layer read through its mount, the layer keeps its
        exact diff. On overlay the kernel's first lookup of a directory that merges with the
        parent's wrote the parent's file handle on it and a mark on its parent, changing
        their ctimes: the diff was generated, and its digest was another."""
        needs_root(APPLIES)
        dir_, reg = tarfile.DIRTYPE, tarfile.REGTYPE
        parent = tarfile_tar(
            ("usr", dir_, None), ("usr/bin", dir_, None), ("usr/bin/a", reg, b"a"),
            ("etc", dir_, None), ("etc/deep", dir_, None), ("etc/deep/conf", reg, b"c"),
            format=tarfile.PAX_FORMAT,
        )  # fmt: skip
        child = tarfile_tar(
            ("usr", dir_, None), ("usr/bin", dir_, None), ("usr/bin/b", reg, b"b"),
            ("etc/deep/new", reg, b"n"), ("etc/link", tarfile.LNKTYPE, b"usr/bin/a"),
            format=tarfile.PAX_FORMAT,
        )  # fmt: skip
        store.create("parent")
        store.apply("parent", io.BytesIO(parent))
        store.create("child", "parent")
        store.apply("child", io.BytesIO(child))
        for _ in range(2):  # the second mount is the one that found the first's marks
            with store.mounted("child") as root:
                for path in root.rglob("*"):
                    os.lstat(path)
        self._assert_exact(store, "child", child)

    @group("streams")
    def test_a_changed_layer_gets_a_generated_diff(self, store: LayerStore) -> None:
        needs_root(APPLIES)
        applied = tarfile_tar(
            ("dir", tarfile.DIRTYPE, None),
            ("dir/file", tarfile.REGTYPE, b"0123456789"),
            ("other", tarfile.REGTYPE, b"other"),
            format=tarfile.PAX_FORMAT,
        )

        def add_file(root: Path) -> None:
            (root / "dir" / "new").write_bytes(b"new")

        def same_size_same_mtime(root: Path) -> None:
            st = os.stat(root / "dir" / "file")
            with open(root / "dir" / "file", "r+b") as f:
                f.write(b"ABCDEFGHIJ")
            os.utime(root / "dir" / "file", ns=(st.st_atime_ns, st.st_mtime_ns))

        def chmod_and_back(root: Path) -> None:
            os.chmod(root / "other", 0o600)
            os.chmod(root / "other", 0o644)

        def delete(root: Path) -> None:
            os.unlink(root / "other")

        for i, (change, path) in enumerate(
            (
                (add_file, "/dir"),
                (same_size_same_mtime, "/dir/file"),
                (chmod_and_back, "/other"),
                (delete, "/other"),
            )
        ):
            layer_id = f"changed-{i}"
            store.create(layer_id, rw=True)
            store.apply(layer_id, io.BytesIO(applied))
            self._assert_exact(store, layer_id, applied)
            self.fill(store, layer_id, change)
            data, exact, reason = self._export(store, layer_id)
            assert not exact, f"{change.__name__}: the stale record was used"
            assert reason is not None and path in reason, reason
            assert data != applied
            self.roundtrip(store, layer_id, f"copy-{i}")  # the generated diff is the layer

    @group("streams")
    def test_a_tar_that_overwrites_itself_has_no_record(self, store: LayerStore) -> None:
        needs_root(APPLIES)
        applied = tarfile_tar(
            ("f", tarfile.REGTYPE, b"first"),
            ("f", tarfile.REGTYPE, b"second"),
            format=tarfile.PAX_FORMAT,
        )
        store.create("dup")
        store.apply("dup", io.BytesIO(applied))
        _data, exact, reason = self._export(store, "dup")
        assert not exact and reason is not None
        with store.mounted("dup") as root:
            assert (root / "f").read_bytes() == b"second"
        self.roundtrip(store, "dup", "dup-copy")

    @group("streams")
    def test_a_record_goes_with_its_layer(self, store: LayerStore) -> None:
        needs_root(APPLIES)
        first = tarfile_tar(("f", tarfile.REGTYPE, b"first"), format=tarfile.GNU_FORMAT)
        second = tarfile_tar(("g", tarfile.REGTYPE, b"second"), format=tarfile.PAX_FORMAT)
        store.create("L")
        store.apply("L", io.BytesIO(first))
        store.remove("L")
        store.create("L")
        assert store.metadata("L")["exact_diff_record"] is None
        store.apply("L", io.BytesIO(second))
        self._assert_exact(store, "L", second)

    # ------------------------------------------------------------------ found in review (#13)

    @group("streams")
    def test_a_directory_chowned_or_given_an_xattr_gets_a_generated_diff(
        self, store: LayerStore
    ) -> None:
        """A chown or an xattr changes only a directory's ctime, which the record does not
        check: the applied tar's header (old owner, no xattr) must not be replayed as exact."""
        needs_root(APPLIES)
        applied = tarfile_tar(
            ("dir", tarfile.DIRTYPE, None),
            ("dir/file", tarfile.REGTYPE, b"0123456789"),
            format=tarfile.PAX_FORMAT,
        )

        def chown_dir(root: Path) -> None:
            os.chown(root / "dir", 4242, 4242)

        def xattr_on_dir(root: Path) -> None:
            os.setxattr(root / "dir", "user.review", b"new")

        def chown_root(root: Path) -> None:
            os.chown(root, 4242, 4242)

        for i, change in enumerate((chown_dir, xattr_on_dir, chown_root)):
            layer_id = f"dir-attr-{i}"
            store.create(layer_id, rw=True)
            store.apply(layer_id, io.BytesIO(applied))
            self._assert_exact(store, layer_id, applied)
            self.fill(store, layer_id, change)
            data, exact, _reason = self._export(store, layer_id)
            assert not exact, f"{change.__name__}: a stale directory header was replayed"
            assert data != applied

    @group("streams")
    def test_a_file_dated_after_2262_is_applied(self, store: LayerStore) -> None:
        """mtimes past 2^63 ns (year 2262; ext4, xfs bigtime and btrfs keep them) fit a tar
        and apply without a record; with one, apply-diff failed with "error('argument out
        of range')" (the check table packs nanoseconds as a signed 64-bit number)."""
        needs_root(APPLIES)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
            info = tarfile.TarInfo("future")
            info.size, info.mtime = 4, 10_500_000_000  # the year 2302
            tf.addfile(info, io.BytesIO(b"data"))
        applied = buf.getvalue()
        store.create("future")
        store.apply("future", io.BytesIO(applied))
        self._assert_exact(store, "future", applied)

    @group("streams")
    def test_a_file_dated_before_1970_in_base_256_is_applied(
        self, store: LayerStore, tmp_path: Path
    ) -> None:
        """GNU tar's gnu and oldgnu formats write a time before 1970 as a negative base-256
        number (0xff first); it was read as a huge positive one and the apply failed with an
        OverflowError. The layer gets the date, and its diff is the applied tar."""
        needs_root(APPLIES)
        src = tmp_path / "old"
        src.mkdir()
        (src / "file").write_bytes(b"from 1960")
        os.utime(src / "file", (-315619200, -315619200))
        tars = {
            "gnu-tar": _gnu_tar(src, "--format=gnu"),
            "gnu-tar-oldgnu": _gnu_tar(src, "--format=oldgnu"),
        }
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
            info = tarfile.TarInfo("file")
            info.size, info.mtime = 9, -315619200
            tf.addfile(info, io.BytesIO(b"from 1960"))
        tars["tarfile-gnu"] = buf.getvalue()
        for name, applied in tars.items():
            assert b"\xff\xff\xff\xff" in applied, f"{name}: no base-256 time"
            store.create(name)
            store.apply(name, io.BytesIO(applied))
            with store.mounted(name) as root:
                assert (root / "file").read_bytes() == b"from 1960", name
                assert os.lstat(root / "file").st_mtime == -315619200, name
            self._assert_exact(store, name, applied)

    @group("streams")
    def test_v7_directories_are_directories(self, store: LayerStore) -> None:
        """A v7 tar (bsdtar --format=v7) has no directory type: a directory is a "regular"
        entry of type NUL whose name ends in '/', as Go's archive/tar and Python's tarfile
        read it. It was refused ("'dd' is not a directory")."""
        needs_root(APPLIES)
        members = [("dd/", None), ("dd/sub/", None), ("dd/sub/f", b"in a v7 tree\n")]
        applied = b""
        for name, data in members:
            block = bytearray(512)
            block[: len(name)] = name.encode()
            block[100:148] = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (
                0o755 if data is None else 0o644,
                0,
                0,
                len(data or b""),
                1_600_000_000,
            )
            block[148:156] = b"%06o\0 " % (sum(block) + 8 * 32)  # type NUL, no magic
            applied += bytes(block) + (data or b"") + bytes(-len(data or b"") % 512)
        applied += bytes(1024)
        store.create("v7")
        store.apply("v7", io.BytesIO(applied))
        with store.mounted("v7") as root:
            assert (root / "dd" / "sub").is_dir() and not (root / "dd" / "sub").is_symlink()
            assert (root / "dd" / "sub" / "f").read_bytes() == b"in a v7 tree\n"
        self._assert_exact(store, "v7", applied)

    @group("streams")
    def test_a_child_mounted_and_unmounted_keeps_its_exact_diff(self, store: LayerStore) -> None:
        """Mounting a layer with a parent and unmounting it, nothing written, keeps its diff
        the applied tar. Overlay on Linux 6.6+ (uuid=auto) wrote ``trusted.overlay.uuid`` on
        a new upper dir's root at its first mount, whose ctime then said the layer changed."""
        needs_root(APPLIES)
        parent = tarfile_tar(("f", tarfile.REGTYPE, b"lower"), format=tarfile.PAX_FORMAT)
        child = tarfile_tar(("g", tarfile.REGTYPE, b"upper"), format=tarfile.PAX_FORMAT)
        store.create("parent")
        store.apply("parent", io.BytesIO(parent))
        store.create("child", "parent")
        store.apply("child", io.BytesIO(child))
        for _ in range(2):
            with store.mounted("child") as root:
                assert sorted(os.listdir(root)) == ["f", "g"]
            self._assert_exact(store, "child", child)

    @group("streams")
    def test_a_link_to_a_parents_file_with_two_names_keeps_its_exact_diff(
        self, store: LayerStore
    ) -> None:
        """A tar that links a new name to a parent's file which has two names (``ln`` of a
        hardlinked file in a build step): where the layer holds the parent's files (vfs,
        btrfs) the walk lists every name of that inode, and the one the tar never named
        cost the layer its exact diff. A link made after apply is still noticed."""
        needs_root(APPLIES)
        parent = tarfile_tar(
            ("a", tarfile.REGTYPE, b"shared"),
            ("b", tarfile.LNKTYPE, b"a"),
            ("solo", tarfile.REGTYPE, b"alone"),
            format=tarfile.PAX_FORMAT,
        )
        child = tarfile_tar(("new", tarfile.LNKTYPE, b"a"), format=tarfile.PAX_FORMAT)
        store.create("parent")
        store.apply("parent", io.BytesIO(parent))
        store.create("child", "parent")
        store.apply("child", io.BytesIO(child))
        self._assert_exact(store, "child", child)
        with store.mounted("child") as root:
            assert os.lstat(root / "new").st_ino == os.lstat(root / "a").st_ino
            os.link(root / "solo", root / "later")
        _data, exact, reason = self._export(store, "child")
        assert not exact and reason is not None, "a link made after apply went unseen"
