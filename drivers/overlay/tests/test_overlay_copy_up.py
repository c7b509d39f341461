"""apply-diff of a hardlink to a lower layer's file: copied up as overlayfs would, never more."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver import ArchiveError, LayerStore, UnsafeArchive, open_store
from graphdriver.testing import Backing, backing_or_skip
from graphdriver.toolkit import unmount_all_under


@pytest.fixture(scope="module")
def ext4() -> Iterator[Backing]:
    yield from backing_or_skip("loop-ext4")


@pytest.fixture
def store(ext4: Backing, request: pytest.FixtureRequest) -> Iterator[LayerStore]:
    path = ext4.root / request.node.name
    path.mkdir()
    try:
        with open_store(path, "overlay", {}) as s:
            yield s
    finally:
        unmount_all_under(path)


def _links(*pairs: tuple[str, str]) -> bytes:
    """A layer tar of hardlink entries only, as Docker writes for ``ln <target> <name>``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, target in pairs:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.LNKTYPE, target
            tf.addfile(info)
    return buf.getvalue()


def _upper(store: LayerStore, layer_id: str) -> list[str]:
    return sorted(os.listdir(store.root / "overlay" / layer_id / "diff"))


def _assert_rolled_back(store: LayerStore, layer_id: str) -> None:
    assert store.metadata(layer_id)["diff_id"] is None  # _ready: the record is kept, ready
    assert _upper(store, layer_id) == []
    store.apply_diff(layer_id, io.BytesIO(_links(("again", "keep"))))  # fresh: applies again


def test_a_target_deleted_by_a_nearer_layer_is_refused(store: LayerStore) -> None:
    store.create("base")
    with store.mounted("base") as root:
        for name in ("keep", "gone"):
            (root / name).write_text(name)
        (root / "dir").mkdir()
        (root / "dir" / "hidden").write_text("hidden")
    store.create("mid", "base")
    with store.mounted("mid") as root:  # a whiteout for gone, an opaque dir
        (root / "gone").unlink()
        shutil.rmtree(root / "dir")
        (root / "dir").mkdir()
    store.create("good", "mid")
    store.apply_diff("good", io.BytesIO(_links(("link", "keep"))))  # through mid, from base
    with store.mounted("good") as root:
        assert os.lstat(root / "link").st_ino == os.lstat(root / "keep").st_ino
        assert (root / "link").read_text() == "keep"
    for layer_id, target in (("deleted", "gone"), ("below-opaque", "dir/hidden")):
        store.create(layer_id, "mid")
        with pytest.raises(ArchiveError) as exc:
            store.apply_diff(layer_id, io.BytesIO(_links(("link", target))))
        assert str(exc.value) == f"hardlink 'link': target '{target}' is not in the layer"
        _assert_rolled_back(store, layer_id)


def test_a_symlink_in_a_lower_dir_cannot_redirect_the_copy_up(
    store: LayerStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host data")
    store.create("base")
    with store.mounted("base") as root:
        (root / "keep").write_text("keep")
        os.symlink(outside, root / "abs")
        os.symlink("../../../../../../../..", root / "up")
    target = str(outside / "secret").lstrip("/")
    for layer_id, linkname in (("abs", "abs/secret"), ("up", f"up/{target}")):
        store.create(layer_id, "base")
        with pytest.raises(UnsafeArchive) as exc:
            store.apply_diff(layer_id, io.BytesIO(_links(("stolen", linkname))))
        assert "\n" not in str(exc.value)
        assert "goes through the symlink" in str(exc.value)
        _assert_rolled_back(store, layer_id)
        with store.mounted(layer_id) as root:
            assert not (root / "stolen").exists()
    assert (outside / "secret").stat().st_nlink == 1


def test_a_sparse_target_keeps_its_holes(store: LayerStore) -> None:
    store.create("base")
    with store.mounted("base") as root, open(root / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(64 << 20)
        f.write(b"tail")
    store.create("child", "base")
    assert store.apply_diff("child", io.BytesIO(_links(("link", "sparse")))) == (64 << 20) + 4
    upper = store.root / "overlay" / "child" / "diff"
    st = os.lstat(upper / "sparse")
    assert st.st_nlink == 2 and st.st_size == (64 << 20) + 4
    assert st.st_blocks * 512 < 1 << 20, "the copy-up wrote the holes as zeros"
    with open(upper / "link", "rb") as f:
        assert f.read(4) == b"head"
        f.seek(64 << 20)
        assert f.read() == b"tail"
