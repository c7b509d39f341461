"""What the overlay driver promises beyond the conformance suite: layout, depth, native diff."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graphdriver import (
    DriverUnavailable,
    GraphDriverError,
    InvalidLayerId,
    InvalidOption,
    LayerStore,
    MaxDepthExceeded,
    open_store,
)
from graphdriver.testing import Backing, backing_or_skip
from graphdriver.testing.trees import make_rich, snapshot
from graphdriver.toolkit import is_mountpoint, mount, mountinfo, unmount_all_under


@pytest.fixture(scope="module")
def xfs() -> Iterator[Backing]:
    yield from backing_or_skip("loop-xfs")


@pytest.fixture(scope="module")
def ext4() -> Iterator[Backing]:
    yield from backing_or_skip("loop-ext4")


@pytest.fixture
def root(xfs: Backing, request: pytest.FixtureRequest) -> Iterator[Path]:
    path = xfs.root / request.node.name.replace("[", "_").replace("]", "")
    path.mkdir()
    yield path
    unmount_all_under(path)


def _open(root: Path, **opts: str) -> LayerStore:
    return open_store(root, "overlay", {f"overlay.{k}": v for k, v in opts.items()})


def test_layout_like_overlay2(root: Path) -> None:
    with _open(root) as s:
        s.create("base")
        s.create("child", "base")
        s.create_rw("top", "child")
        home = root / "overlay"
        short = {i: (home / i / "link").read_text() for i in ("base", "child", "top")}
        for layer, link in short.items():
            assert len(link) == 26 and link.isupper()
            assert os.readlink(home / "l" / link) == f"../{layer}/diff"
            assert (home / layer / "diff").is_dir() and (home / layer / "work").is_dir()
        assert not (home / "base" / "lower").exists()
        assert (home / "child" / "lower").read_text() == f"l/{short['base']}"
        assert (home / "top" / "lower").read_text() == f"l/{short['child']}:l/{short['base']}"
        s.create("solo")
        assert s.get("solo") == home / "solo" / "diff"  # nothing below or above: no mount
        s.put("solo")
        sealed = s.get("base")  # has children: a read-only bind mount
        assert sealed == home / "base" / "merged" and is_mountpoint(sealed)
        merged = s.get("top")
        assert merged == home / "top" / "merged" and is_mountpoint(merged)
        s.put("top")
        s.put("base")
        assert not merged.exists() and not sealed.exists()  # unmounted and removed
        s.remove("solo")
        for layer in ("top", "child", "base"):
            s.remove(layer)
        assert list((home / "l").iterdir()) == []


@pytest.mark.parametrize("needs", ["classic-mount", "apply-diff"])
def test_missing_links_are_recreated_where_they_are_needed(root: Path, needs: str) -> None:
    """A link gone from ``l/`` is made again by what reads through it (a classic mount's
    lowerdir, apply-diff's copy-up from the lower layers), not by every open; a mount with
    the new API names the diff dirs and works without it."""
    with _open(root) as s:
        s.create("base")
        with s.mounted("base") as p:
            (p / "f").write_text("from base")
        s.create("child", "base")
        s.create("grandchild", "child")
        link = root / "overlay" / "l" / (root / "overlay" / "base" / "link").read_text()
        link.unlink()
    with _open(root) as s:
        assert not link.is_symlink()  # the open read no layer's link file
        with s.mounted("child") as p:
            assert (p / "f").read_text() == "from base"
        stored = s.driver.stored_layers()  # (check's, and a rebuild's) by the link files
        assert stored == {"base": None, "child": "base", "grandchild": "child"}
    link.unlink(missing_ok=True)  # (a kernel without the new API: the mount made it again)
    api = "classic" if needs == "classic-mount" else "auto"
    with _open(root, mount_api=api) as s:
        if needs == "classic-mount":
            with s.mounted("child") as p:
                assert (p / "f").read_text() == "from base"
        else:  # apply-diff into a layer with parents takes their diff dirs through l/
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tf:
                info = tarfile.TarInfo("g")
                tf.addfile(info, io.BytesIO())
            s.apply_diff("grandchild", io.BytesIO(buf.getvalue()))
            with s.mounted("grandchild") as p:
                assert sorted(os.listdir(p)) == ["f", "g"]
        assert os.readlink(link) == "../base/diff"
        s.cleanup()


def test_link_repair_goes_by_each_layers_link_file(root: Path) -> None:
    """A link that names a layer is not that layer's link (a create cut between its symlink
    and its link file leaves one, and the layer made again gets another); a layer directory
    without its link file yet, a stray file and a dangling link in ``l/`` are left alone."""
    with _open(root) as s:
        s.create("base")
        with s.mounted("base") as p:
            (p / "f").write_text("from base")
        s.create("child", "base")
        s.create("grandchild", "child")
    home = root / "overlay"
    short = (home / "child" / "link").read_text()
    (home / "l" / short).unlink()
    (home / "l" / "ORPHAN").symlink_to("../child/diff")  # the cut create's
    (home / "half").mkdir()  # a create cut before it wrote anything else
    (home / "l" / "STRAY").write_text("not a link")
    (home / "l" / "DANGLING").symlink_to("../gone/diff")
    with _open(root, mount_api="classic") as s:  # lowerdir=l/<short>:...
        with s.mounted("grandchild") as p:
            assert (p / "f").read_text() == "from base"
        assert os.readlink(home / "l" / short) == "../child/diff"
        assert (home / "l" / "STRAY").read_text() == "not a link"
        assert os.readlink(home / "l" / "DANGLING") == "../gone/diff"
        s.cleanup()


@pytest.mark.parametrize("name", ["l", "inflight", "lock", "metadata.db", "metadata.db-wal"])
def test_a_layer_id_that_names_the_homes_own_files_is_refused(root: Path, name: str) -> None:
    """The layers' directories sit beside ``l/``, ``inflight/``, the lock and the database:
    a layer of one of those names was refused only by its mkdir, and the rollback of that
    failed create then deleted what the name named."""
    with _open(root) as s:
        s.create("base")
        s.create("child", "base")
        home = root / "overlay"
        before = sorted(p.name for p in home.iterdir())
        links = sorted(p.name for p in (home / "l").iterdir())
        with pytest.raises(InvalidLayerId, match="keeps that name for its own files"):
            s.create(name, "base")
        assert sorted(p.name for p in home.iterdir()) == before
        assert sorted(p.name for p in (home / "l").iterdir()) == links
        assert sorted(s.layers()) == ["base", "child"]
        with s.mounted("child"):
            pass
        s.create("after", "child")
        s.create("metadata.dbx", "child")  # only the names in use are kept
        s.remove("metadata.dbx")
        assert not (home / "metadata.dbx").exists()
        s.cleanup()


def _chain(s: LayerStore, depth: int) -> None:
    s.create("l0")
    with s.mounted("l0") as p:
        (p / "bottom").write_text("at the bottom")
    for i in range(1, depth):
        s.create(f"l{i}", f"l{i - 1}")


def test_500_deep_chain_mounts_and_501_is_refused_at_create(root: Path) -> None:
    try:
        s = _open(root, mount_api="new")
    except DriverUnavailable as exc:
        pytest.skip(f"host lacks it: {exc}")
    with s:
        assert dict(s.status())["Mount API"].startswith("new")
        _chain(s, 500)
        with s.mounted("l499") as p:
            assert (p / "bottom").read_text() == "at the bottom"
        with pytest.raises(MaxDepthExceeded, match="500"):
            s.create("l500", "l499")
        assert not s.exists("l500")
        s.create_rw("sibling", "l498")  # 500 deep as a rw layer too
        with s.mounted("sibling") as p:
            (p / "new").write_text("upper")
            assert (p / "bottom").read_text() == "at the bottom"


def test_classic_mount_128_deep_and_129_refused(root: Path) -> None:
    with _open(root, mount_api="classic") as s:
        assert dict(s.status())["Mount API"].startswith("classic")
        _chain(s, 128)
        with s.mounted("l127") as p:
            assert (p / "bottom").read_text() == "at the bottom"
        with pytest.raises(MaxDepthExceeded, match="128"):
            s.create("l128", "l127")


def _entries(data: bytes) -> dict[str, tuple[Any, ...]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf:
            body = tf.extractfile(m).read() if m.isfile() else b""  # type: ignore[union-attr]
            out[m.name.rstrip("/")] = (
                m.type,
                m.mode,
                m.uid,
                m.gid,
                m.size,
                m.mtime,
                m.linkname,
                sorted(m.pax_headers.items()),
                hashlib.sha256(body).hexdigest(),
            )
    return out


def _tricky(r: Path) -> None:
    (r / "etc" / "hostname").write_bytes(b"changed\n")
    os.setxattr(r / "xattr-file", "user.comment", b"changed xattr")
    os.chmod(r / "big.bin", 0o600)
    os.link(r / "hard1", r / "hard3")  # a new name for a lower file
    os.rename(r / "suid", r / "suid-renamed")  # a file moved out of the lower layer
    shutil.move(r / "deep" / "a", r / "moved-dir")  # a directory renamed: EXDEV, copied
    shutil.rmtree(r / "tmp")
    (r / "tmp").mkdir()  # deleted and made again: opaque
    (r / "tmp" / "fresh").write_text("fresh")
    (r / "rel-link").unlink()
    os.symlink("elsewhere", r / "rel-link")
    (r / "new-dir" / "sub").mkdir(parents=True)
    (r / "new-dir" / "sub" / "file").write_bytes(os.urandom(5000))
    os.unlink(r / "fifo")


def test_native_diff_equals_naive_diff(root: Path) -> None:
    with _open(root) as s:
        s.create("base")
        with s.mounted("base") as p:
            make_rich(p)
            (p / "tmp" / "old1").write_text("1")
            (p / "tmp" / "old2").write_text("2")
        s.create_rw("child", "base")
        with s.mounted("child") as p:
            _tricky(p)
        native_changes = s.changes("child")
        native = io.BytesIO()
        s.write_diff("child", native)
        native_size = s.diff_size("child")
    with _open(root, native_diff="off") as naive_store:
        assert dict(naive_store.status())["Native Overlay Diff"] == "false"
        naive_changes = naive_store.changes("child")
        naive = io.BytesIO()
        naive_store.write_diff("child", naive)
        assert naive_store.diff_size("child") == native_size
    # generated diffs are canonical: the re-made (opaque) directory is one whiteout per name
    # that went away on both paths, and the bytes are the same
    assert naive_changes == native_changes
    a, b = _entries(native.getvalue()), _entries(naive.getvalue())
    assert "tmp/.wh.old1" in a and "tmp/.wh.old2" in a and "tmp/.wh..wh..opq" not in a
    assert a == b
    assert native.getvalue() == naive.getvalue()
    # and both reproduce the layer
    with _open(root) as s:
        want = None
        for name, data in (("from-native", native), ("from-naive", naive)):
            s.create(name, "base")
            s.apply(name, io.BytesIO(data.getvalue()))
            with s.mounted(name) as p:
                got = snapshot(p)
            with s.mounted("child") as p:
                want = snapshot(p)
            assert got == want, name


def test_status(root: Path) -> None:
    with _open(root) as s:
        status = dict(s.status())
    assert status["Backing Filesystem"] == "xfs"
    assert status["Supports d_type"] == "true"
    assert status["Native Overlay Diff"] == "true"
    assert status["Using metacopy"] == "false"
    new_api = status["Mount API"].startswith("new")
    assert status["Max Depth"] == ("500" if new_api else "128")
    assert set(status) >= {"Mount API", "Project Quota"}


def test_size_refused_without_project_quota(ext4: Backing) -> None:
    from graphdriver import CreateOpts

    with _open(ext4.root / "size") as s:
        with pytest.raises(InvalidOption, match="XFS mounted with prjquota"):
            s.create_rw("c", None, CreateOpts(size=50 << 20))
        assert s.layers() == []


def test_upper_on_overlayfs_is_refused(tmp_path: Path) -> None:
    for d in ("lower", "upper", "work", "merged"):
        (tmp_path / d).mkdir()
    mount(
        "overlay",
        tmp_path / "merged",
        "overlay",
        0,
        f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,workdir={tmp_path}/work",
    )
    try:
        with pytest.raises(DriverUnavailable, match="overlayfs"):
            open_store(tmp_path / "merged" / "root", "overlay")
    finally:
        unmount_all_under(tmp_path)


def test_d_type_less_filesystem_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "img"
    with open(image, "wb") as f:
        f.truncate(400 << 20)
    mkfs = subprocess.run(
        ["mkfs.xfs", "-q", "-f", "-m", "crc=0", "-n", "ftype=0", str(image)], capture_output=True
    )
    if mkfs.returncode != 0:
        pytest.skip("host lacks it: mkfs.xfs cannot make ftype=0 (V4) filesystems")
    target = tmp_path / "mnt"
    target.mkdir()
    if (
        subprocess.run(
            ["mount", "-o", "loop", str(image), str(target)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip(
            "host lacks it: the kernel does not mount XFS V4, the only XFS without "
            "d_type (CONFIG_XFS_SUPPORT_V4 is off)"
        )
    try:
        with pytest.raises(DriverUnavailable, match="d_type"):
            open_store(target, "overlay")
    finally:
        unmount_all_under(target)


def test_mount_label_is_passed_as_selinux_context(root: Path) -> None:
    if not Path("/sys/fs/selinux/enforce").exists():
        pytest.skip("host lacks it: SELinux is not enabled, so no context= mount option")
    from graphdriver import CreateOpts

    with _open(root) as s:
        s.create("base")
        s.create_rw("c", "base", CreateOpts(mount_label="system_u:object_r:container_file_t:s0"))
        with s.mounted("c") as p:
            assert "container_file_t" in os.getxattr(p, "security.selinux").decode()


def test_failed_readonly_remount_leaves_no_writable_bind(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image layer with children is bound read-only; if the classic bind-then-remount
    fails half-way, the writable bind must not stay (an image layer would then change)."""
    with _open(root, mount_api="classic") as s:
        s.create("base")
        s.create("child", "base")
        merged = root / "overlay" / "base" / "merged"
        monkeypatch.setenv("GRAPHDRIVER_FAULT", "overlay.mount.readonly-remount=EIO")
        with pytest.raises(GraphDriverError):
            s.get("base")
        assert not is_mountpoint(merged)
        assert [m for m in mountinfo() if m.mountpoint.startswith(str(root))] == []
        monkeypatch.delenv("GRAPHDRIVER_FAULT")
        with s.mounted("base") as p:
            with pytest.raises(OSError) as info:
                (p / "new").write_text("must not land in an image layer")
            assert info.value.errno == errno.EROFS
        assert not (root / "overlay" / "base" / "diff" / "new").exists()


def test_a_sealed_bottom_layer_whose_bind_vanished_is_mounted_again(root: Path) -> None:
    """An image layer with children and no parent is a read-only bind of its diff dir; if
    that bind goes (a reboot, an admin's umount), the count is reset at the next open and the
    next mount binds it again, never handing out the empty ``merged`` dir."""
    with _open(root) as s:
        s.create("base")
        with s.mounted("base") as p:
            (p / "f").write_text("from base")
        s.create("child", "base")
        merged = s.get("base")
        assert merged == root / "overlay" / "base" / "merged" and is_mountpoint(merged)
        subprocess.run(["umount", str(merged)], check=True)
    with _open(root) as s:
        assert s.metadata("base")["mount_count"] == 0
        with s.mounted("base") as p:
            assert (p / "f").read_text() == "from base"


def test_a_sealed_bottom_layer_stays_mounted_across_opens(root: Path) -> None:
    """The read-only bind of a sealed bottom layer is on the same filesystem as its
    ``merged`` dir (``os.path.ismount`` does not see it): another open keeps its count, a
    second get binds nothing more, the last put leaves no bind and the layer goes."""
    with _open(root) as s:
        s.create("base")
        s.create("child", "base")
        merged = s.get("base")
    binds = lambda: sum(e.mountpoint == str(merged) for e in mountinfo())  # noqa: E731
    assert binds() == 1
    with _open(root) as s:
        assert s.metadata("base")["mount_count"] == 1
        assert s.get("base") == merged and binds() == 1
    with _open(root) as s:
        s.put("base")
        s.put("base")
        assert binds() == 0
        s.remove("child")
        s.remove("base")
        assert not (root / "overlay" / "base").exists()
