"""Creating, snapshotting, listing, mounting and limiting layers."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from .. import CreateOpts, InvalidOption, LayerInUse, LayerStore, NotMounted
from ..linux.mount import mounts_under
from .base import ConformanceBase, MiB, _writer, quota_or_skip
from .groups import group
from .require import needs_root
from .trees import (
    ROOT_XATTR,
    assert_same_tree,
    listing,
    make_base,
    make_rich,
    random_content,
    root_entry,
    snapshot,
)


class LayerCases(ConformanceBase):
    """Creating, snapshotting, listing, mounting and limiting layers."""

    # ------------------------------------------------------------------ create and snapshot

    @group("lifecycle")
    def test_create_empty(self, store: LayerStore) -> None:
        needs_root("a new layer's root is owned by 0:0 only when root makes it")
        store.create("empty")
        with store.mounted("empty") as root:
            st = os.stat(root)
            assert stat.S_ISDIR(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o755
            assert (st.st_uid, st.st_gid) == (0, 0)
            assert listing(root) == []
        assert store.exists("empty")

    @group("lifecycle")
    def test_create_base(self, store: LayerStore) -> None:
        self.base_with(store, make_base)
        with store.mounted("base") as root:
            assert listing(root) == ["a file", "a subdir"]
            sub = os.lstat(root / "a subdir")
            assert stat.S_IMODE(sub.st_mode) == 0o705 | stat.S_ISVTX
            assert (sub.st_uid, sub.st_gid) == (1, 2)
            f = os.lstat(root / "a file")
            assert stat.S_IMODE(f.st_mode) == 0o222 | stat.S_ISUID
            assert (root / "a file").read_bytes() == b"Some data"

    @group("lifecycle")
    def test_snapshot_inherits_everything(self, store: LayerStore) -> None:
        self.base_with(store, make_rich)
        store.create("child", "base")
        store.create_rw("container", "child")
        with store.mounted("base") as root:
            want, want_root = snapshot(root, exact=True), root_entry(root)
        assert ROOT_XATTR in want_root["xattrs"]
        for layer_id in ("child", "container"):
            with store.mounted(layer_id) as root:
                assert_same_tree(want, snapshot(root, exact=True), names=f"base/{layer_id}")
                assert root_entry(root) == want_root, f"{layer_id}'s root differs from base's"
            assert store.changes(layer_id) == [], f"{layer_id} is untouched: no changes"
        with store.mounted("container") as root:
            a, b = os.lstat(root / "hard1"), os.lstat(root / "etc" / "hard2")
            assert a.st_ino == b.st_ino and a.st_nlink == 2

    @group("lifecycle")
    def test_root_chmod_inherited_by_grandchild(self, store: LayerStore) -> None:
        needs_root("the test chowns a layer's root to 5:6")

        def chmod_root(root: Path) -> None:
            os.chmod(root, 0o700)
            os.chown(root, 5, 6)

        self.base_with(store, chmod_root)
        store.create("child", "base")
        store.create_rw("grandchild", "child")
        with store.mounted("grandchild") as root:
            st = os.stat(root)
            assert stat.S_IMODE(st.st_mode) == 0o700
            assert (st.st_uid, st.st_gid) == (5, 6)

    @group("depth")
    def test_deep_chain_read(self, store: LayerStore) -> None:
        depth = min(self.deep_chain, store.driver.capabilities.max_depth)
        self.base_with(store, lambda r: (r / "bottom").write_bytes(b"from the bottom"), "l0")
        for i in range(1, depth):
            store.create(f"l{i}", f"l{i - 1}")
            if i % 16 == 0:
                self.fill(store, f"l{i}", _writer(f"at-{i}", str(i)))
        top = f"l{depth - 1}"
        assert store.metadata(top)["depth"] == depth
        with store.mounted(top) as root:
            assert (root / "bottom").read_bytes() == b"from the bottom"
            for i in range(16, depth, 16):
                assert (root / f"at-{i}").read_text() == str(i)

    @group("lifecycle")
    def test_layer_file_update_per_layer(self, store: LayerStore) -> None:
        self.base_with(store, lambda r: (r / "f").write_text("v0"), "l0")
        for i in range(1, 4):
            store.create(f"l{i}", f"l{i - 1}")
            self.fill(store, f"l{i}", _writer("f", f"v{i}"))
        for i in range(4):
            with store.mounted(f"l{i}") as root:
                assert (root / "f").read_text() == f"v{i}"

    # ------------------------------------------------------------------ listing and refcounts

    @group("lifecycle")
    def test_ls_lists_exactly_what_exists(self, store: LayerStore) -> None:
        assert store.layers() == []
        store.create("one")
        store.create("two", "one")
        store.create_rw("three", "two")
        assert store.layers() == ["one", "two", "three"]
        store.remove("three")
        assert store.layers() == ["one", "two"]
        assert not store.exists("three")
        meta = store.metadata("two")
        assert meta["parent"] == "one" and meta["rw"] is False and meta["depth"] == 2
        assert meta["children"] == []

    @group("lifecycle")
    def test_remove_then_reuse_id(self, store: LayerStore) -> None:
        self.base_with(store, make_base, "x")
        store.remove("x")
        store.create("x")
        with store.mounted("x") as root:
            assert listing(root) == []

    @group("mount")
    def test_get_get_put_keeps_mounted(self, store: LayerStore) -> None:
        self.base_with(store, make_base)
        p1 = store.get("base")
        p2 = store.get("base")
        assert p1 == p2
        store.put("base")
        assert (p1 / "a file").read_bytes() == b"Some data"
        assert store.metadata("base")["mount_count"] == 1
        store.put("base")
        assert store.metadata("base")["mount_count"] == 0
        with pytest.raises(NotMounted):
            store.put("base")

    @group("mount")
    def test_the_last_put_during_a_diff_leaves_the_unmount_to_its_end(
        self, store: LayerStore
    ) -> None:
        """A container's layer that a diff reads (dockerd's Diff of a running container) and
        that is put meanwhile (the container stops): its mount stays while the diff reads,
        and goes when the diff ends."""
        self.base_with(store, make_base)
        store.create("c", "base", rw=True)
        (store.get("c") / "new").write_bytes(b"x")
        stream = store.diff("c")
        try:
            store.put("c")
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                names = [m.name for m in tar]
        finally:
            stream.close()
        assert "new" in names
        assert store.metadata("c")["mount_count"] == 0
        assert mounts_under(store.home) == [], "the layer stayed mounted after the diff"

    @group("lifecycle")
    def test_remove_refused_while_mounted_or_with_children(self, store: LayerStore) -> None:
        self.base_with(store, make_base)
        store.get("base")
        with pytest.raises(LayerInUse):
            store.remove("base")
        store.put("base")
        store.create("child", "base")
        with pytest.raises(LayerInUse):
            store.remove("base")
        assert store.exists("base") and store.exists("child")
        store.remove("child")
        store.remove("base")
        assert store.layers() == []

    @group("lifecycle")
    def test_read_only_parent_never_changes(self, store: LayerStore) -> None:
        self.base_with(store, make_rich)
        before = self.snap(store, "base")
        store.create_rw("c1", "base")
        store.create_rw("c2", "base")

        def vandalise(r: Path) -> None:
            shutil.rmtree(r / "etc")
            (r / "big.bin").write_bytes(b"overwritten")
            os.chmod(r, 0o700)
            os.setxattr(r / "xattr-file", "user.comment", b"no")
            (r / "hard1").write_bytes(b"through a hardlink")

        self.fill(store, "c1", vandalise)
        self.roundtrip(store, "c1", "c3")
        assert self.snap(store, "base") == before
        assert self.snap(store, "c2") == before

    @group("mount")
    def test_image_layer_with_children_is_read_only(self, store: LayerStore) -> None:
        if not store.driver.capabilities.readonly_images:
            pytest.skip(f"driver {self.driver} does not declare read-only image mounts")
        self.base_with(store, make_base)
        store.create("mid", "base")
        self.fill(store, "mid", lambda r: (r / "mid-file").write_text("m"))
        store.create("top", "mid")
        for layer in ("base", "mid"):
            with store.mounted(layer) as root:
                with pytest.raises(OSError) as info:
                    (root / "new").write_text("must not land")
                assert info.value.errno == errno.EROFS
                assert not (root / "new").exists()
        with store.mounted("top") as root:  # the child sees them unchanged and can write
            assert (root / "mid-file").read_text() == "m"
            (root / "new").write_text("fine here")

    @group("lifecycle")
    def test_no_child_of_a_mounted_layer(self, store: LayerStore) -> None:
        self.base_with(store, make_base)
        store.get("base")
        with pytest.raises(LayerInUse):
            store.create("child", "base")
        assert not store.exists("child")
        store.put("base")
        store.create("child", "base")

    @group("mount")
    def test_second_store_sees_same_layers_and_mounts(
        self,
        store: LayerStore,
        open_again: Callable[[], LayerStore],
        store_root: Path,
        store_options: dict[str, str],
    ) -> None:
        self.base_with(store, make_base)
        store.create_rw("c", "base")
        path = store.get("c")
        other = open_again()
        assert other.layers() == ["base", "c"]
        assert other.metadata("c")["mount_count"] == 1
        cmd = [
            sys.executable,
            "-m",
            "graphdriver",
            "--root",
            str(store_root),
            "--driver",
            self.driver,
        ]
        for k, v in store_options.items():
            cmd += ["--opt", f"{k}={v}"]
        out = subprocess.run([*cmd, "ls"], capture_output=True, text=True, check=True)
        assert out.stdout.split() == ["base", "c"]
        assert (path / "a file").read_bytes() == b"Some data"
        subprocess.run([*cmd, "umount", "c"], capture_output=True, text=True, check=True)
        assert store.metadata("c")["mount_count"] == 0
        with pytest.raises(NotMounted):
            other.put("c")

    @group("mount")
    def test_mounts_of_every_kind_of_layer_outlive_the_open(
        self, store: LayerStore, open_again: Callable[[], LayerStore], store_root: Path
    ) -> None:
        """A mount made through one open is the same mount to the next: a bottom image layer
        with children, one in the middle, a leaf and a container layer each keep their count
        and their content there, a second get gives the same path, and the puts through the
        other open unmount them all (overlay's read-only bind of a sealed bottom layer is on
        its own filesystem, which ``os.path.ismount`` does not see)."""
        self.base_with(store, make_base)
        store.create("mid", "base")
        store.create("top", "mid")
        store.create_rw("c", "top")
        kinds = ("base", "mid", "top", "c")
        paths = {layer: store.get(layer) for layer in kinds}
        other = open_again()
        for layer in kinds:
            assert other.metadata(layer)["mount_count"] == 1, layer
            assert (paths[layer] / "a file").read_bytes() == b"Some data", layer
            assert other.get(layer) == paths[layer], layer
        for layer in kinds:
            other.put(layer)
            other.put(layer)
        again = open_again()
        assert all(again.metadata(layer)["mount_count"] == 0 for layer in kinds)
        for layer in reversed(kinds):
            again.remove(layer)
        assert again.layers() == []
        assert mounts_under(store_root) == [], "a layer's mount outlived its last put"

    # ------------------------------------------------------------------ quota

    @group("quota")
    def test_quota(self, store: LayerStore) -> None:
        quota_or_skip(store, self.backing)
        store.create("base")
        store.create_rw("limited", "base", CreateOpts(size=50 * MiB))
        with store.mounted("limited") as root:
            (root / "fits").write_bytes(random_content(25 * MiB, 5))
            with pytest.raises(OSError) as info, open(root / "too-big", "wb") as f:
                for _ in range(100):
                    f.write(random_content(MiB, 6))
                    f.flush()
                    os.fsync(f.fileno())
            assert info.value.errno in (errno.EDQUOT, errno.ENOSPC)
            (root / "too-big").unlink()

    @group("quota")
    def test_size_without_quota_refused(self, store: LayerStore) -> None:
        if store.driver.capabilities.quota:
            pytest.skip(f"driver {self.driver} has quota; the refusal case does not apply")
        with pytest.raises(InvalidOption):
            store.create_rw("limited", None, CreateOpts(size=50 * MiB))
        assert not store.exists("limited")
