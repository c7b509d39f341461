"""OCI whiteouts both ways against a real overlayfs mount (not mocked)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver.archive import ChangeKind, apply_layer, overlay_changes
from graphdriver.archive.tar import TarWriter, write_changes_tar
from graphdriver.linux.mount import mount, unmount_all_under
from graphdriver.testing import host_lacks


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        host_lacks("needs root to mount overlayfs", "root")


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[dict[str, Path]]:
    d = {n: tmp_path / n for n in ("lower", "upper", "work", "merged")}
    for p in d.values():
        p.mkdir()
    try:
        yield d
    finally:
        unmount_all_under(tmp_path)


def _mount(d: dict[str, Path]) -> Path:
    mount(
        "overlay",
        d["merged"],
        "overlay",
        0,
        f"lowerdir={d['lower']},upperdir={d['upper']},workdir={d['work']},index=off",
    )
    return d["merged"]


def _lower(lower: Path) -> None:
    (lower / "keep").write_text("keep")
    (lower / "gone").write_text("gone")
    (lower / "dir").mkdir()
    (lower / "dir" / "old1").write_text("1")
    (lower / "dir" / "old2").write_text("2")


def test_apply_writes_overlay_whiteouts_that_overlayfs_honours(dirs: dict[str, Path]) -> None:
    _lower(dirs["lower"])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, kind in (
            ("dir", tarfile.DIRTYPE),
            ("dir/.wh..wh..opq", tarfile.REGTYPE),
            ("dir/new", tarfile.REGTYPE),
            (".wh.gone", tarfile.REGTYPE),
        ):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o755
            tf.addfile(info, io.BytesIO(b""))
    result = apply_layer(dirs["upper"], io.BytesIO(buf.getvalue()), whiteouts="overlay")
    assert result.size == 0
    st = os.lstat(dirs["upper"] / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(dirs["upper"] / "dir", "trusted.overlay.opaque") == b"y"
    merged = _mount(dirs)
    assert sorted(os.listdir(merged)) == ["dir", "keep"]
    assert os.listdir(merged / "dir") == ["new"]


def test_upper_written_by_overlayfs_becomes_oci_whiteouts(dirs: dict[str, Path]) -> None:
    _lower(dirs["lower"])
    merged = _mount(dirs)
    (merged / "gone").unlink()
    for name in os.listdir(merged / "dir"):
        (merged / "dir" / name).unlink()
    (merged / "dir").rmdir()
    (merged / "dir").mkdir()  # overlayfs marks the new directory opaque
    (merged / "dir" / "fresh").write_text("fresh")
    (merged / "added").write_text("a")
    unmount_all_under(merged)

    lower = dirs["lower"]
    assert os.getxattr(dirs["upper"] / "dir", "trusted.overlay.opaque") == b"y"
    changes = overlay_changes(str(dirs["upper"]), [str(lower)])
    kinds = {c.path: c.kind for c in changes}
    assert kinds == {
        "/added": ChangeKind.ADD,
        "/dir": ChangeKind.MODIFY,
        "/dir/fresh": ChangeKind.ADD,
        "/dir/old1": ChangeKind.DELETE,
        "/dir/old2": ChangeKind.DELETE,
        "/gone": ChangeKind.DELETE,
    }
    chunks: list[bytes] = []
    write_changes_tar(TarWriter(write=chunks.append), str(dirs["upper"]), changes, source="overlay")
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tf:
        names = tf.getnames()
    # the opaque directory is written as a tree compare sees it: one whiteout per old name
    assert names == ["added", "dir", "dir/fresh", "dir/.wh.old1", "dir/.wh.old2", ".wh.gone"]
