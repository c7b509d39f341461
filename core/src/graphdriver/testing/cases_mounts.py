"""What a driver owes the host around mounts and storage: a removal deletes nothing mounted
inside the layer and leaves none of its files behind, ``stored_layers`` lists what is stored,
its own directories keep other users out, and its :class:`~graphdriver.MountSpec` mounts show
the layer as it says (read-only, or writing to the layer's own storage)."""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

import pytest

from .. import LayerStore, MountEntry, MountSpec
from ..linux.mount import MNT_DETACH, MS_BIND, mount, mounts_under, unmount
from .base import A, ConformanceBase
from .groups import group
from .mountspec import mounted_entries
from .require import needs_root
from .trees import assert_same_tree, make_base, snapshot


def _files_under(home: Path, token: str) -> list[str]:
    """Paths under *home* whose name holds *token*, mounts not entered."""
    found = []
    dev = os.lstat(home).st_dev
    for top, dirs, names in os.walk(home):
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(top, d)).st_dev == dev]
        found += [os.path.join(top, n) for n in dirs + names if token in n]
    return found


class MountCases(ConformanceBase):
    """Removal, stored layers, who may reach a layer, and MountSpec mounts."""

    # ------------------------------------------------------------------ removal and storage

    @group("lifecycle")
    def test_remove_deletes_nothing_mounted_inside(self, store: LayerStore, tmp_path: Path) -> None:
        """A container runtime binds host directories into a layer (volumes); a layer removed
        while one is still bound there must leave the host's files alone (``unmount_all_under``
        before deleting the tree) and leave nothing mounted."""
        needs_root("the case bind-mounts a host directory into the layer")
        sentinel = tmp_path / "host-data"
        sentinel.mkdir()
        (sentinel / "precious").write_bytes(b"the host's own file")
        self.base_with(store, lambda r: (r / "volume").mkdir())
        target = store.get("base") / "volume"
        try:
            mount(str(sentinel), target, None, MS_BIND)
            store.put("base")
            store.remove("base")
        finally:
            if os.path.isdir(target):
                for where in mounts_under(target):
                    unmount(where, MNT_DETACH)
        assert (sentinel / "precious").read_bytes() == b"the host's own file", (
            "removing the layer deleted the files of a directory bound inside it"
        )
        assert mounts_under(store.root) == [], "a mount inside the removed layer stayed"

    @group("lifecycle")
    def test_remove_leaves_no_file_of_the_layer(self, store: LayerStore) -> None:
        """A removed layer's files are gone from the driver's home, not moved aside there (a
        trash that is never emptied fills the disk)."""
        token = "gone-" + secrets.token_hex(6)
        self.base_with(store, lambda r: (r / token).write_bytes(b"x" * 4096))
        store.create("child", "base")
        store.create_rw("c", "child")
        for layer_id in ("c", "child", "base"):
            store.remove(layer_id)
        left = _files_under(store.home, token)
        assert left == [], f"files of removed layers stay in the driver's home: {left}"

    @group("lifecycle")
    def test_stored_layers_lists_the_layers(self, store: LayerStore) -> None:
        """``stored_layers`` (what ``graphdriver check`` compares with the records) names every
        layer that has storage, and none that was removed."""
        self.base_with(store, make_base)
        store.create("child", "base")
        store.create_rw("c", "child")
        store.create("gone", "base")
        store.remove("gone")
        stored = store.driver.stored_layers()
        if stored is None:
            pytest.skip(f"driver {self.driver} does not list its stored layers (None)")
        keys = set(stored)
        assert {"base", "child", "c"} <= keys, f"stored_layers() lacks layers: {sorted(keys)}"
        assert "gone" not in keys, "stored_layers() lists a removed layer"

    @group("mount")
    def test_layer_content_out_of_other_users_reach(self, store: LayerStore) -> None:
        """A hostile layer's setuid-root file or ``brw-rw-rw-`` device node must not be
        reachable by other local users (CVE-2021-41091): some directory of the driver's own, on
        the way from its home to every layer's root, denies them search (o+x). The store's root
        and the driver's home, which the core makes 0700, are set aside: those the core keeps
        closed whatever the driver does, and a driver that opens them (or keeps layers in them
        directly) leaves its layers one chmod away from every user."""
        self.base_with(store, make_base)
        store.create("child", "base")
        store.create_rw("container", "child")
        for layer_id in ("base", "child", "container"):
            content = store.get(layer_id)
            try:
                walk = [content.parent, *content.parent.parents]
                assert store.home in walk, f"{layer_id}: {content} is not under {store.home}"
                path = walk[: walk.index(store.home)]
                modes = {str(d): stat.filemode(os.stat(d).st_mode) for d in path}
                assert any(not os.stat(d).st_mode & stat.S_IXOTH for d in path), (
                    f"{layer_id}: every directory of the driver between {store.home} and "
                    f"{content} lets other users through: {modes or 'there is none'} "
                    f"(make the folders holding layers with toolkit.private_dir)"
                )
            finally:
                store.put(layer_id)

    # ------------------------------------------------------------------ MountSpec

    def _spec_or_skip(self, store: LayerStore, layer_id: str, readonly: bool) -> list[MountEntry]:
        needs_root("the case mounts what the driver's mount_spec returns")
        if not isinstance(store.driver, MountSpec):
            pytest.skip(f"driver {self.driver} does not implement MountSpec")
        spec = store.mount_spec(layer_id, readonly=readonly)
        if spec is None:
            pytest.skip(f"driver {self.driver}'s mount_spec returned None for {layer_id}")
        return spec

    @group("mount")
    def test_mount_spec_readonly(self, store: LayerStore, tmp_path: Path) -> None:
        """``mount_spec(readonly=True)`` of a bottom layer and of a child: mounted as containerd
        would, each shows the layer, refuses writes with EROFS, and the layer is unchanged."""
        self.base_with(store, make_base)
        store.create("child", "base")
        self.fill(store, "child", lambda r: (r / "child-file").write_text("c"))
        for layer_id in ("base", "child"):
            before = self.snap(store, layer_id)
            spec = self._spec_or_skip(store, layer_id, True)
            with mounted_entries(spec, tmp_path / f"ro-{layer_id}") as root:
                assert_same_tree(before, snapshot(root), names="layer/spec")
                with pytest.raises(OSError) as info:
                    (root / "written").write_text("must not land")
                assert info.value.errno == errno.EROFS, f"{layer_id}: {info.value}"
            assert_same_tree(before, self.snap(store, layer_id), names="before/after")

    @group("mount")
    def test_mount_spec_writes_go_to_the_layer(self, store: LayerStore, tmp_path: Path) -> None:
        """``mount_spec(readonly=False)`` of a rw layer: mounted as containerd would, it shows
        the parent's files, and a file written there is a change of that layer, not of its
        parent."""
        self.base_with(store, make_base)
        store.create_rw("c", "base")
        before = self.snap(store, "base")
        spec = self._spec_or_skip(store, "c", False)
        with mounted_entries(spec, tmp_path / "rw") as root:
            assert (root / "a file").read_bytes() == b"Some data"
            (root / "written").write_text("through the spec")
        assert [(c.path, c.kind) for c in store.changes("c")] == [("/written", A)]
        with store.mounted("c") as root:
            assert (root / "written").read_text() == "through the spec"
        assert_same_tree(before, self.snap(store, "base"), names="before/after")
