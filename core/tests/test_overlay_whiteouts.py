"""OCI whiteouts both ways against a real overlayfs mount (not mocked)."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver.archive import ChangeKind, apply_layer, overlay_changes, tree_changes
from graphdriver.archive.tar_writer import TarWriter, write_changes_tar
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


def test_apply_writes_overlay_whiteouts_that_overlayfs_honours(
    dirs: dict[str, Path], tmp_path: Path
) -> None:
    _lower(dirs["lower"])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, kind in (
            ("dir", tarfile.DIRTYPE),
            ("dir/.wh..wh..opq", tarfile.REGTYPE),
            ("dir/new", tarfile.REGTYPE),
            (".wh.gone", tarfile.REGTYPE),
            (".wh.never-there", tarfile.REGTYPE),
        ):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o755
            tf.addfile(info, io.BytesIO(b""))
    lowers = [dirs["lower"]]
    result = apply_layer(
        dirs["upper"], io.BytesIO(buf.getvalue()), whiteouts="overlay", lowers=lowers
    )
    assert result.size == 0
    st = os.lstat(dirs["upper"] / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert not os.path.lexists(dirs["upper"] / "never-there")  # nothing below to hide
    assert os.getxattr(dirs["upper"] / "dir", "trusted.overlay.opaque") == b"y"
    merged = _mount(dirs)
    assert sorted(os.listdir(merged)) == ["dir", "keep"]
    assert os.listdir(merged / "dir") == ["new"]
    alone = tmp_path / "alone"  # an upper with no lower: no whiteout at all
    alone.mkdir()
    apply_layer(alone, io.BytesIO(buf.getvalue()), whiteouts="overlay")
    assert sorted(os.listdir(alone)) == ["dir"] and os.listdir(alone / "dir") == ["new"]


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


def _overlay(target: Path, lowers: list[Path], upper: Path | None, work: Path | None) -> Path:
    target.mkdir(exist_ok=True)
    data = "lowerdir=" + ":".join(map(str, lowers)) + ",index=off"
    if upper is not None:
        data += f",upperdir={upper},workdir={work}"
    mount("overlay", target, "overlay", 0, data)
    return target


def test_upper_over_two_lowers_gives_the_tree_compare(tmp_path: Path) -> None:
    """overlay_changes of an upper over lowers that hold whiteouts and opaque dirs lists what a
    tree compare of the two merged mounts lists, and writes the same tar bytes."""
    d = {n: tmp_path / n for n in ("bottom", "mid", "upper", "w1", "w2")}
    for p in d.values():
        p.mkdir()
    bottom, mid, upper = d["bottom"], d["mid"], d["upper"]
    (bottom / "dir" / "sub").mkdir(parents=True)
    for name in ("dir/a", "dir/b", "dir/sub/c", "keep", "gone", "opq/x"):
        (bottom / name).parent.mkdir(exist_ok=True)
        (bottom / name).write_text(name)
    try:
        merged = _overlay(tmp_path / "m1", [bottom], mid, d["w1"])
        (merged / "dir" / "b").unlink()  # a whiteout in the middle layer
        shutil.rmtree(merged / "opq")  # and an opaque directory there
        (merged / "opq").mkdir()
        (merged / "opq" / "y").write_text("y")
        (merged / "keep").write_text("kept")
        unmount_all_under(tmp_path)

        merged = _overlay(tmp_path / "m2", [mid, bottom], upper, d["w2"])
        shutil.rmtree(merged / "dir")
        (merged / "dir" / "sub").mkdir(parents=True)
        (merged / "dir" / "a").write_text("changed")
        (merged / "dir" / "b").write_text("back")  # deleted below, made again: an add
        (merged / "gone").unlink()
        os.chown(merged / "keep", 7, 7)
        os.chown(merged / "keep", 0, 0)  # a copy-up equal to what is below
        (merged / "opq" / "z").write_text("z")
        old = _overlay(tmp_path / "old", [mid, bottom], None, None)

        got = overlay_changes(str(upper), [str(mid), str(bottom)])
        want = tree_changes(str(merged), str(old))
        assert got == want
        assert [(c.path, c.kind) for c in got] == [
            ("/dir", ChangeKind.MODIFY),
            ("/dir/a", ChangeKind.MODIFY),
            ("/dir/b", ChangeKind.ADD),
            ("/dir/sub", ChangeKind.MODIFY),
            ("/dir/sub/c", ChangeKind.DELETE),
            ("/gone", ChangeKind.DELETE),
            ("/opq", ChangeKind.MODIFY),
            ("/opq/z", ChangeKind.ADD),
        ]
        tars = []
        for root, changes in ((upper, got), (merged, want)):
            chunks: list[bytes] = []
            write_changes_tar(TarWriter(write=chunks.append), str(root), changes)
            tars.append(b"".join(chunks))
        assert tars[0] == tars[1]
    finally:
        unmount_all_under(tmp_path)


def test_many_lowers_and_a_deep_new_tree_need_few_descriptors(tmp_path: Path) -> None:
    """The compare looks names up in directories it opens, a few at a time: 300 lowers in
    which a name new at one level is looked for (one descriptor each would be 300), under a
    130-deep new directory chain (the old walk held a listing open per level), compare with
    32 descriptors free, in an overlay upper and in a plain tree alike."""
    import resource

    lowers = [tmp_path / f"lower{i:03d}" for i in range(300)]
    for i, lower in enumerate(lowers):
        (lower / "etc").mkdir(parents=True)
        (lower / "etc" / f"f{i:03d}").write_text("below")
    chain = "/".join(f"d{i}" for i in range(130))
    upper, new = tmp_path / "upper", tmp_path / "new"
    for tree in (upper, new):
        (tree / "etc").mkdir(parents=True)
        (tree / "etc" / "new").write_text("new")  # looked for in every lower
        (tree / "etc" / "f000").write_text("changed")
        (tree / chain).mkdir(parents=True)
        (tree / chain / "deepest").write_text("new")
    shutil.copytree(lowers[0], tmp_path / "old")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # descriptors go to the lowest free numbers: 32 free below the limit, whatever is open
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 32, hard))
    try:
        got = overlay_changes(str(upper), [str(p) for p in lowers])
        plain = tree_changes(str(new), str(tmp_path / "old"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for changes in (got, plain):
        listed = {(c.path, c.kind) for c in changes}
        assert ("/etc/new", ChangeKind.ADD) in listed
        assert ("/etc/f000", ChangeKind.MODIFY) in listed
        assert (f"/{chain}/deepest", ChangeKind.ADD) in listed
        assert len(changes) == 3 + 1 + 130  # /etc, and each directory of the chain, added


def test_errors_name_the_whole_path(tmp_path: Path) -> None:
    """A name looked up in a directory's descriptor that cannot be reached is named by its
    whole path, and an empty file that cannot be opened is still written (its xattrs are
    listed by path, as before): root without its permission-bypassing capabilities, in a
    child process."""
    (tmp_path / "upper" / "d").mkdir(parents=True)
    (tmp_path / "upper" / "d" / "new").write_text("new")
    (tmp_path / "lower" / "d").mkdir(parents=True)
    (tmp_path / "lower" / "d").chmod(0o600)  # no search permission
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "empty").touch(mode=0o000)
    script = """
import io, sys, tarfile
from graphdriver.archive import overlay_changes, tree_changes
from graphdriver.archive.tar_writer import TarWriter, write_changes_tar
root = sys.argv[1]
try:
    overlay_changes(root + "/upper", [root + "/lower"])
except PermissionError as exc:
    print(exc.filename)
out = io.BytesIO()
write_changes_tar(TarWriter(write=out.write), root + "/tree", tree_changes(root + "/tree", None))
out.seek(0)
print(*tarfile.open(fileobj=out).getnames())
"""
    try:
        done = subprocess.run(
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--",
             sys.executable, "-c", script, str(tmp_path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    finally:
        (tmp_path / "lower" / "d").chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "lower" / "d" / "new"), "sub", "sub/empty"]


@pytest.mark.parametrize("fast", [True, False], ids=["C loop", "Python loop"])
def test_a_directory_replaced_while_it_is_compared_is_not_gone_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    """A container may write its upper while it is diffed: a directory the compare listed,
    replaced by a symlink to elsewhere before the compare goes down into one below it, fails
    the compare instead of listing what the symlink leads to (the directories read by the
    C loop or by os.scandir alike)."""
    from graphdriver.archive import dirs, fastpath

    if fast and not fastpath.ENABLED:
        host_lacks("the C fast path was not built (gcc, python3-dev at install)", "fastpath")
    monkeypatch.setattr(fastpath, "ENABLED", fast)

    new, old, outside = tmp_path / "new", tmp_path / "old", tmp_path / "outside"
    (new / "a" / "b").mkdir(parents=True)
    (new / "a" / "b" / "f").write_text("f")
    (old / "a" / "b").mkdir(parents=True)
    (outside / "b").mkdir(parents=True)
    (outside / "b" / "host-secret").write_text("secret")
    real = dirs._open

    def swapping(path: str, *rest: object) -> object:
        if path == f"{new}/a/b" and not (new / "a").is_symlink():
            (new / "a").rename(tmp_path / "moved")
            (new / "a").symlink_to(outside)
        return real(path, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(dirs, "_open", swapping)
    with pytest.raises(OSError) as got:
        tree_changes(str(new), str(old))
    assert "replaced while the layer was compared" in str(got.value)
