"""Containers and volumes through the CLI, on overlay and vfs (loop-ext4): every spec form, the
lifecycle Docker users expect, and the safety rules (symlinks in images, bind sources, names)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GD

from graphdriver.linux.mount import MS_BIND, mount, mountinfo, mounts_under, unmount
from graphdriver.testing import Backing
from graphdriver.volumes import VolumeStore


@pytest.fixture(params=["overlay", "vfs"])
def gd(loop_ext4: Backing, request: pytest.FixtureRequest) -> Iterator[GD]:
    root = loop_ext4.root / re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:80]
    root.mkdir()
    runner = GD(root, request.param)
    try:
        yield runner
    finally:
        subprocess.run(runner.argv("cleanup"), capture_output=True, timeout=120)
        leftover = mounts_under(root)
        shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"mounts left behind: {leftover}"


def _tar(entries: dict[str, str | bytes | None]) -> bytes:
    """name -> bytes (file), None (directory) or "->target" (symlink)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, value in entries.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if value is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            elif isinstance(value, str):
                info.type, info.linkname = tarfile.SYMTYPE, value[2:]
                tf.addfile(info)
            else:
                info.size, info.mode = len(value), 0o640
                info.uid = info.gid = 1234
                tf.addfile(info, io.BytesIO(value))
    return buf.getvalue()


IMAGE = {
    "etc": None,
    "etc/hostname": b"image\n",
    "data": None,
    "data/seed": b"from the image\n",
    "data/sub": None,
    "data/sub/deep": b"deep\n",
    "srv": None,
    "srv/existing": b"image srv\n",
}


def _image(
    gd: GD, name: str = "img", *volumes: str, extra: dict[str, str | bytes | None] | None = None
) -> None:
    args = [a for v in volumes for a in ("--volume", v)]
    gd("create", *args, name)
    gd("apply-diff", name, input=_tar({**IMAGE, **(extra or {})}))


def _inspect(gd: GD, kind: str, name: str) -> dict:  # type: ignore[type-arg]
    return json.loads(gd(kind, "inspect", name).out)[0]  # type: ignore[no-any-return]


def _volumes(gd: GD) -> list[str]:
    return gd("volume", "ls", "-q").out.split()


def _fail(gd: GD, *args: str) -> str:
    res = gd(*args, check=False)
    assert res.code == 1, (res.code, res.out, res.err)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphdriver: error: "), res.err
    assert "Traceback" not in res.err
    return lines[0]


def _binds(root: Path) -> list[str]:
    base = os.path.realpath(root)
    return [m for m in mounts_under(base) if m != base]


def _mount_table(gd: GD) -> set[str]:
    """This namespace's mountpoints, less those of other test runs' loop roots (other sessions
    run the same tests on their own loop devices at the same time)."""
    ours = str(gd.root.parent)
    return {
        e.mountpoint
        for e in mountinfo()
        if "/gd-loop-" not in e.mountpoint or e.mountpoint.startswith(ours)
    }


# ------------------------------------------------------------------------- spec forms, mount


@pytest.mark.parametrize("api", ["new", "classic"])
def test_every_spec_form_is_mounted_where_asked(
    gd: GD, tmp_path: Path, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRAPHDRIVER_BIND_API", api)  # open_tree+move_mount, or mount(2)
    _image(gd)
    host = tmp_path / "host"
    host.mkdir()
    (host / "h").write_text("host file\n")
    (tmp_path / "single").write_text("one file\n")
    gd(
        "container", "create", "c1", "--image", "img",
        "-v", "named:/named",
        "-v", "ro-named:/ro-named:ro",
        "-v", f"{host}:/host",
        "-v", f"{host}:/host-ro:ro",
        "-v", f"{tmp_path / 'single'}:/etc/single:ro",
        "-v", "/anon",
        "-v", "/deep/anon/path",
    )  # fmt: skip
    info = _inspect(gd, "container", "c1")
    kinds = {m["Destination"]: (m["Type"], m["RW"]) for m in info["Mounts"]}
    assert kinds == {
        "/named": ("volume", True),
        "/ro-named": ("volume", False),
        "/host": ("bind", True),
        "/host-ro": ("bind", False),
        "/etc/single": ("bind", False),
        "/anon": ("volume", True),
        "/deep/anon/path": ("volume", True),
    }
    anon = [m["Name"] for m in info["Mounts"] if m.get("Anonymous")]
    assert len(anon) == 2 and all(re.fullmatch(r"[0-9a-f]{64}", n) for n in anon)
    assert sorted(_volumes(gd)) == sorted(["named", "ro-named", *anon])

    root = Path(gd("container", "mount", "c1").out.strip())
    assert (root / "etc" / "hostname").read_text() == "image\n"
    assert (root / "host" / "h").read_text() == "host file\n"
    assert (root / "etc" / "single").read_text() == "one file\n"
    (root / "named" / "n").write_text("n")
    (root / "host" / "from-container").write_text("c")
    (root / "deep" / "anon" / "path" / "x").write_text("x")
    assert (host / "from-container").read_text() == "c"
    for ro in ("ro-named", "host-ro"):
        with pytest.raises(OSError, match="Read-only"):
            (root / ro / "nope").write_text("x")
    with pytest.raises(OSError, match="Read-only"):
        (root / "etc" / "single").write_text("x")
    named = Path(_inspect(gd, "volume", "named")["Mountpoint"])
    assert named == gd.root / "volumes" / "named" / "_data"
    assert (named / "n").read_text() == "n"
    assert len(_binds(root)) == 7
    gd("container", "umount", "c1")
    assert _binds(root) == []
    assert not (root / "named" / "n").exists()  # the volume is not in the layer


def test_remount_keeps_data_and_mounts_are_counted(gd: GD) -> None:
    _image(gd)
    gd("container", "create", "c1", "--image", "img", "-v", "keep:/keep", "-v", "/anon")
    root = Path(gd("container", "mount", "c1").out.strip())
    (root / "etc" / "hostname").write_text("container\n")
    (root / "keep" / "k").write_text("k")
    (root / "anon" / "a").write_text("a")
    assert Path(gd("container", "mount", "c1").out.strip()) == root
    gd("container", "umount", "c1")
    assert (root / "keep" / "k").exists()  # still mounted: one reference left
    gd("container", "umount", "c1")
    assert _fail(gd, "container", "umount", "c1").endswith("container 'c1' is not mounted")
    root = Path(gd("container", "mount", "c1").out.strip())
    assert (root / "etc" / "hostname").read_text() == "container\n"
    assert (root / "keep" / "k").read_text() == "k"
    assert (root / "anon" / "a").read_text() == "a"
    assert _inspect(gd, "container", "c1")["Mounted"] is True
    gd("container", "umount", "c1")


def test_a_layer_umount_never_takes_a_mounted_containers_root(gd: GD) -> None:
    """The read-write layer of a mounted container: its ``mount`` and ``umount`` as a layer
    pair up, and one ``umount`` more is refused in one line. It unmounted the container's
    root from under it, its volumes' binds gone with it (or left behind, on vfs)."""
    _image(gd)
    gd("container", "create", "c1", "--image", "img", "-v", "keep:/keep")
    root = Path(gd("container", "mount", "c1").out.strip())
    layer = _inspect(gd, "container", "c1")["Layer"]
    gd("mount", layer)
    gd("umount", layer)
    assert _fail(gd, "umount", layer) == (
        f"graphdriver: error: layer {layer!r} is mounted by container 'c1', its read-write "
        f"layer; use `graphdriver container umount c1`"
    )
    (root / "keep" / "k").write_text("k")
    assert _inspect(gd, "container", "c1")["Mounted"] is True
    assert gd("ls").err == ""  # (no container found partly mounted)
    gd("container", "umount", "c1")
    assert _fail(gd, "umount", layer).endswith(f"layer {layer!r} is not mounted")
    assert (Path(_inspect(gd, "volume", "keep")["Mountpoint"]) / "k").read_text() == "k"


# ------------------------------------------------------------------ image-declared volumes


def test_diff_of_a_mounted_container_leaves_its_volumes_out(gd: GD, tmp_path: Path) -> None:
    _image(gd)
    host = tmp_path / "host"
    host.mkdir()
    gd("container", "create", "c1", "--image", "img", "-v", "named:/named", "-v", f"{host}:/h")
    layer = _inspect(gd, "container", "c1")["Layer"]
    root = Path(gd("container", "mount", "c1").out.strip())
    (root / "named" / "in-volume").write_text("v")
    (root / "h" / "in-bind").write_text("b")
    (root / "in-layer").write_text("l")
    changes = gd("changes", layer).out.splitlines()
    assert changes == ["A /h", "A /in-layer", "A /named"], changes
    with tarfile.open(fileobj=io.BytesIO(gd("diff", layer, stdout=None).raw)) as tf:
        assert sorted(tf.getnames()) == ["h", "in-layer", "named"]
    assert (root / "named" / "in-volume").exists()  # the container is still mounted
    gd("container", "umount", "c1")


def test_a_diff_killed_while_it_reads_a_container_with_volumes_leaves_no_mount(
    gd: GD, tmp_path: Path
) -> None:
    """The diff reads a copy of the container's mount without its volumes; killed while it
    reads, it leaves no mount behind (the copy is attached nowhere), and the next diff works."""
    _image(gd)
    gd("container", "create", "c1", "--image", "img", "-v", "named:/named")
    layer = _inspect(gd, "container", "c1")["Layer"]
    root = Path(gd("container", "mount", "c1").out.strip())
    (root / "in-layer").write_text("l")
    before = mounts_under(os.path.realpath(gd.root))
    killed = subprocess.run(
        gd.argv("diff", layer, "-o", str(tmp_path / "out.tar")),
        env={**os.environ, "GRAPHDRIVER_FAULT": "store.diff.view"},
        capture_output=True,
    )
    if gd.driver == "vfs":  # (overlay's diff reads its upper dir: no copy)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert mounts_under(os.path.realpath(gd.root)) == before
    assert not list((gd.root / gd.driver).glob(".diff-view-*"))
    with tarfile.open(fileobj=io.BytesIO(gd("diff", layer, stdout=None).raw)) as tf:
        assert sorted(tf.getnames()) == ["in-layer", "named"]
    gd("container", "umount", "c1")


def test_image_volume_is_filled_from_the_image_on_first_mount_only(gd: GD) -> None:
    _image(gd, "img", "/data")
    gd("create", "--parent", "img", "app")  # declared volumes are inherited by layers above
    gd("container", "create", "c1", "--image", "app")
    (mp,) = _inspect(gd, "container", "c1")["Mounts"]
    assert (mp["Destination"], mp["Origin"], mp["Anonymous"]) == ("/data", "image", True)
    data = Path(mp["Source"])
    assert os.listdir(data) == []
    root = Path(gd("container", "mount", "c1").out.strip())
    assert (root / "data" / "seed").read_text() == "from the image\n"
    assert (root / "data" / "sub" / "deep").read_text() == "deep\n"
    st = (data / "seed").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1234, 1234, 0o640)
    (root / "data" / "seed").unlink()
    gd("container", "umount", "c1")
    assert not (data / "seed").exists()
    root = Path(gd("container", "mount", "c1").out.strip())
    assert not (root / "data" / "seed").exists()  # not copied a second time
    gd("container", "umount", "c1")


def test_cli_volume_overrides_image_volume_and_keeps_named_content(gd: GD) -> None:
    _image(gd, "img", "/data", "/srv")
    gd("volume", "create", "full")
    full = Path(_inspect(gd, "volume", "full")["Mountpoint"])
    (full / "mine").write_text("mine")
    gd("container", "create", "c1", "--image", "img", "-v", "full:/data", "-v", "empty:/srv:nocopy")
    mounts = {m["Destination"]: m for m in _inspect(gd, "container", "c1")["Mounts"]}
    assert mounts["/data"]["Name"] == "full" and mounts["/data"]["Origin"] == "cli"
    root = Path(gd("container", "mount", "c1").out.strip())
    assert sorted(os.listdir(root / "data")) == ["mine"]  # a non-empty volume is not filled
    assert os.listdir(root / "srv") == []  # nocopy
    gd("container", "umount", "c1")
    gd("container", "create", "c2", "--image", "img", "-v", "fresh:/data")
    root = Path(gd("container", "mount", "c2").out.strip())
    assert (root / "data" / "seed").read_text() == "from the image\n"  # an empty named one is
    gd("container", "umount", "c2")


# ---------------------------------------------------------------------------- lifecycle


def test_rm_keeps_volumes_and_rm_v_removes_only_anonymous_ones(gd: GD) -> None:
    _image(gd, "img", "/data")
    gd("container", "create", "c1", "--image", "img", "-v", "named:/named", "-v", "/anon")
    info = _inspect(gd, "container", "c1")
    anon = sorted(m["Name"] for m in info["Mounts"] if m["Anonymous"])
    root = Path(gd("container", "mount", "c1").out.strip())
    (root / "named" / "n").write_text("n")
    (root / "in-layer").write_text("layer data")
    assert _fail(gd, "container", "rm", "c1").endswith("is mounted; umount it first, or use -f")
    gd("container", "umount", "c1")
    assert _fail(gd, "rm", info["Layer"]).endswith("use `graphdriver container rm c1`")
    gd("container", "rm", "c1")
    assert info["Layer"] not in gd("ls").out.split()
    assert not list(gd.root.rglob(f"*{info['Layer']}*"))  # the layer's data is gone
    assert sorted(_volumes(gd)) == sorted(["named", *anon])  # volumes stay
    assert _fail(gd, "container", "inspect", "c1").endswith("container 'c1' does not exist")

    gd("container", "create", "c2", "--image", "img", "-v", "named:/named", "-v", "/anon")
    anon2 = sorted(m["Name"] for m in _inspect(gd, "container", "c2")["Mounts"] if m["Anonymous"])
    root = Path(gd("container", "mount", "c2").out.strip())
    assert (root / "named" / "n").read_text() == "n"  # the named volume came back with its data
    gd("container", "rm", "-f", "--volumes", "c2")  # -f: unmounted first
    assert _binds(root) == []
    assert sorted(_volumes(gd)) == sorted(["named", *anon])  # c2's anonymous ones are gone
    assert not set(anon2) & set(_volumes(gd))


def test_volume_in_use_needs_force_and_never_while_mounted(gd: GD) -> None:
    _image(gd)
    gd("container", "create", "c1", "--image", "img", "-v", "shared:/s")
    gd("container", "create", "c2", "--image", "img", "-v", "shared:/s")
    err = _fail(gd, "volume", "rm", "shared")
    assert err.endswith(
        "volume 'shared' is in use by container(s) c1, c2; remove them first, or use -f"
    )
    root = Path(gd("container", "mount", "c1").out.strip())
    (root / "s" / "f").write_text("f")
    assert "is mounted in container(s)" in _fail(gd, "volume", "rm", "-f", "shared")
    assert (root / "s" / "f").exists()
    gd("container", "umount", "c1")
    assert gd("volume", "rm", "-f", "shared").out.strip() == "shared"
    assert "shared" not in _volumes(gd)
    # a named volume a container still names is made again (empty) at its next mount
    root = Path(gd("container", "mount", "c2").out.strip())
    assert os.listdir(root / "s") == []
    assert _inspect(gd, "volume", "shared")["UsedBy"] == ["c2"]
    gd("container", "umount", "c2")
    assert gd("volume", "rm", "-f", "missing").code == 0  # -f: a missing volume is no error
    assert _fail(gd, "volume", "rm", "missing").endswith("volume 'missing' does not exist")


def test_volumes_from_shares_the_same_directories(gd: GD, tmp_path: Path) -> None:
    _image(gd, "img", "/data")
    host = tmp_path / "h"
    host.mkdir()
    gd("container", "create", "a", "--image", "img", "-v", "named:/named", "-v", f"{host}:/host")
    gd("container", "create", "b", "--image", "img", "--volumes-from", "a")
    gd("container", "create", "r", "--image", "img", "--volumes-from", "a:ro", "-v", "/named")
    mounts_b = {m["Destination"]: m for m in _inspect(gd, "container", "b")["Mounts"]}
    mounts_a = {m["Destination"]: m for m in _inspect(gd, "container", "a")["Mounts"]}
    assert {k: v.get("Name", v["Source"]) for k, v in mounts_b.items()} == {
        k: v.get("Name", v["Source"]) for k, v in mounts_a.items()
    }
    assert all(m["Origin"] == "volumes-from:a" for m in mounts_b.values())
    ra = Path(gd("container", "mount", "a").out.strip())
    rb = Path(gd("container", "mount", "b").out.strip())
    rr = Path(gd("container", "mount", "r").out.strip())
    (ra / "data" / "from-a").write_text("a")
    (rb / "named" / "from-b").write_text("b")
    assert (rb / "data" / "from-a").read_text() == "a"
    assert (ra / "named" / "from-b").read_text() == "b"
    assert (rr / "data" / "from-a").read_text() == "a"
    with pytest.raises(OSError, match="Read-only"):
        (rr / "data" / "x").write_text("x")
    assert os.listdir(rr / "named") == []  # -v overrides what volumes-from brought
    (rr / "named" / "own").write_text("own")
    for c in ("a", "b", "r"):
        gd("container", "umount", c)
    gd("container", "rm", "--volumes", "a")  # b still uses a's anonymous volume: kept
    rb = Path(gd("container", "mount", "b").out.strip())
    assert (rb / "data" / "from-a").read_text() == "a"
    gd("container", "umount", "b")


# ------------------------------------------------------------------------------- safety


def test_symlinks_in_the_image_cannot_send_a_volume_to_the_host(gd: GD) -> None:
    before = _mount_table(gd)
    _image(
        gd,
        "img",
        "/data/link/x",
        "/escape/e",
        extra={
            "data/link": "->/etc",
            "escape": "->../../../../../../../../etc",
            "dangling": "->/nowhere/at/all",
        },
    )
    gd("container", "create", "c1", "--image", "img", "-v", "/data/link/y", "-v", "esc:/escape/z")
    root = Path(gd("container", "mount", "c1").out.strip())
    new = _mount_table(gd) - before
    real_root = os.path.realpath(root)
    assert new and all(m == real_root or m.startswith(real_root + "/") for m in new), new
    # every mount landed on the image's own /etc, inside the root filesystem
    assert {m[len(real_root) :] for m in new if m != real_root} == {
        "/etc/x",
        "/etc/y",
        "/etc/e",
        "/etc/z",
    }
    (root / "etc" / "y" / "marker").write_text("m")
    assert not any(Path("/etc", n).exists() for n in "xyez")
    gd("container", "umount", "c1")
    # a symlink to a path the image lacks is refused at mount, and nothing stays mounted
    gd("container", "create", "c2", "--image", "img", "-v", "named:/ok", "-v", "/dangling/v")
    err = _fail(gd, "container", "mount", "c2")
    assert "/dangling is a symlink to a missing path inside the image" in err
    assert _mount_table(gd) == before
    assert _inspect(gd, "container", "c2")["Mounted"] is False
    assert _inspect(gd, "volume", "named")["MountCount"] == 0
    assert not Path("/nowhere").exists()


def test_a_volume_path_that_resolves_to_the_root_is_refused(gd: GD) -> None:
    """An image's symlink that sends a volume's path to the root itself (``-> /``, ``-> .``,
    ``-> ../../..``) is refused at mount, as Docker refuses ``/``: bound there, the volume
    would hide the root filesystem and take a copy of it. Nothing stays mounted or copied."""
    before = _mount_table(gd)
    links: dict[str, str | bytes | None] = {"top": "->/", "dot": "->.", "up": "->../../.."}
    _image(gd, "declaring", "/dot", extra=links)
    _image(gd, "img", extra=links)
    gd("container", "create", "declared", "--image", "declaring")
    for link in ("top", "up"):
        gd("container", "create", link, "--image", "img", "-v", f"named:/{link}")
    for name, where in (("declared", "/dot"), ("top", "/top"), ("up", "/up")):
        err = _fail(gd, "container", "mount", name)
        assert err.endswith(
            f"volume {where} of container {name!r} resolves to the container's root "
            "(through a symlink); a volume cannot be mounted at '/'"
        ), err
        assert _mount_table(gd) == before
        assert _inspect(gd, "container", name)["Mounted"] is False
    assert os.listdir(gd.root / "volumes" / "named" / "_data") == []
    assert _inspect(gd, "volume", "named")["MountCount"] == 0


def test_a_volume_over_a_file_of_the_image_says_why(gd: GD, tmp_path: Path) -> None:
    """A directory volume where the image has a file (or a host file where it has a
    directory) is refused in one line that says so, not the kernel's "Invalid argument"."""
    before = _mount_table(gd)
    _image(gd)
    host = tmp_path / "host-file"
    host.write_text("x")
    gd("container", "create", "c1", "--image", "img", "-v", "named:/etc/hostname")
    gd("container", "create", "c2", "--image", "img", "-v", f"{host}:/srv")
    assert _fail(gd, "container", "mount", "c1").endswith(
        "cannot mount named at /etc/hostname in container 'c1': it is a directory, and the "
        "image has a file there"
    )
    assert _fail(gd, "container", "mount", "c2").endswith(
        f"cannot mount {host} at /srv in container 'c2': it is a file, and the image has a "
        "directory there"
    )
    assert _mount_table(gd) == before
    assert _inspect(gd, "volume", "named")["MountCount"] == 0


def test_volumes_stacked_on_one_directory_all_go_at_umount(gd: GD) -> None:
    """Two volumes whose paths resolve to one directory (``/x/y -> /data``) are bound there
    one over the other, as Docker binds them; the umount takes both away."""
    before = _mount_table(gd)
    _image(gd, "img", extra={"x": None, "x/y": "->/data"})
    gd("container", "create", "c", "--image", "img", "-v", "a:/data", "-v", "b:/x/y")
    root = Path(gd("container", "mount", "c").out.strip())
    (root / "data" / "f").write_text("top")  # the last bound, b, is the one seen
    assert (gd.root / "volumes" / "b" / "_data" / "f").read_text() == "top"
    res = gd("container", "umount", "c")
    assert res.err == ""
    assert _mount_table(gd) == before


def test_a_busy_volume_is_detached_lazily_at_umount(gd: GD) -> None:
    """A container umount while a process works in one of its volumes (a shell's working
    directory) detaches that bind lazily, as Docker does, and takes the whole container down:
    not half of it, with the umount failing and the container left "Recovery Failed"."""
    before = _mount_table(gd)
    _image(gd)
    gd("container", "create", "c", "--image", "img", "-v", "named:/named", "-v", "/data")
    root = Path(gd("container", "mount", "c").out.strip())
    (root / "named" / "f").write_text("kept")
    busy = subprocess.Popen(["sleep", "60"], cwd=root / "named")
    try:
        res = gd("container", "umount", "c")
        assert "/named in container c is busy; detaching it lazily" in res.err, res.err
        assert _inspect(gd, "container", "c")["Mounted"] is False
        assert _inspect(gd, "volume", "named")["MountCount"] == 0
        assert _mount_table(gd) == before
        assert "Recovery Failed" not in gd("status").out
    finally:
        busy.kill()
        busy.wait()
    root = Path(gd("container", "mount", "c").out.strip())
    assert (root / "named" / "f").read_text() == "kept"
    gd("container", "umount", "c")


def test_a_bind_source_swapped_for_the_store_is_refused_at_mount(gd: GD, tmp_path: Path) -> None:
    _image(gd)
    host = tmp_path / "host"
    host.mkdir()
    gd("container", "create", "c1", "--image", "img", "-v", "v:/v", "-v", f"{host}:/h")
    host.rmdir()
    host.symlink_to(gd.root / "volumes")  # after create: now it names the store's own files
    before = _mount_table(gd)
    assert "inside the graphdriver root" in _fail(gd, "container", "mount", "c1")
    assert _mount_table(gd) == before
    assert _inspect(gd, "volume", "v")["MountCount"] == 0


def test_a_volume_of_the_stores_own_device_is_refused(gd: GD, tmp_path: Path) -> None:
    """A local volume that mounts the block device holding the store's filesystem (``--opt
    type=xfs --opt device=/dev/loop3``) is refused in one line at create, and at mount when
    its device path names that device only by then. Mounted in a container, it showed every
    layer and volume of the store, the databases included."""
    _image(gd)
    found = subprocess.run(
        ["findmnt", "-no", "SOURCE,FSTYPE", "--target", str(gd.root)],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    device, fstype = found[0], found[1]
    err = _fail(gd, "volume", "create", "--opt", f"type={fstype}", "--opt", f"device={device}", "x")
    assert err == (
        f"graphdriver: error: device {device} holds the filesystem of the graphdriver root "
        f"{gd.root}; a volume must not reach the store's own files"
    )
    later = tmp_path / "disk"  # no such device yet: taken at create
    gd("volume", "create", "--opt", f"type={fstype}", "--opt", f"device={later}", "late")
    gd("container", "create", "c1", "--image", "img", "-v", "late:/late")
    later.symlink_to(device)
    before = _mount_table(gd)
    assert "holds the filesystem of the graphdriver root" in _fail(gd, "container", "mount", "c1")
    assert _mount_table(gd) == before
    assert _volumes(gd) == ["late"]


def _bind_volume(name: str, device: Path) -> list[str]:
    opts = ("--opt", "type=none", "--opt", f"device={device}", "--opt", "o=bind")
    return ["volume", "create", name, *opts]


def test_bind_sources_are_compared_by_identity_not_by_path(gd: GD, tmp_path: Path) -> None:
    _image(gd)
    store = gd.root / gd.driver  # holds metadata.db
    create = ["container", "create", "c1", "--image", "img", "-v"]
    err = _fail(gd, *_bind_volume("meta", store))
    assert f"bind device {store} is inside the graphdriver root" in err
    link = tmp_path / "link"
    link.symlink_to(gd.root / "volumes")
    assert "is inside the graphdriver root" in _fail(gd, *create, f"{link}:/x")
    assert "contains the graphdriver root" in _fail(gd, *create, f"{gd.root.parent}:/x")
    alias = tmp_path / "alias"  # a second path to the root's inode
    alias.mkdir()
    mount(str(gd.root), alias, None, MS_BIND)
    try:
        assert "is inside the graphdriver root" in _fail(gd, *create, f"{alias / gd.driver}:/d")
        err = _fail(gd, *create, f"{alias / gd.driver / 'metadata.db'}:/m")
        assert "is inside the graphdriver root" in err
        assert "is the graphdriver root" in _fail(gd, *create, f"{alias}:/d")
        assert "is inside the graphdriver root" in _fail(
            gd, *_bind_volume("meta", alias / gd.driver)
        )
    finally:
        unmount(alias)
    assert _volumes(gd) == [] and gd("container", "ls", "--json").out.strip() == "[]"
    # a host directory is fine, as -v and as a local bind volume
    host = tmp_path / "host"
    host.mkdir()
    (host / "f").write_text("host")
    gd(*_bind_volume("hv", host))
    gd(*create, f"{host}:/h", "-v", "hv:/hv")
    root = Path(gd("container", "mount", "c1").out.strip())
    assert (root / "h" / "f").read_text() == (root / "hv" / "f").read_text() == "host"
    gd("container", "umount", "c1")
    # swapped for a path into the store after create: refused at mount, on the fd bound
    gd("container", "create", "c2", "--image", "img", "-v", "hv:/hv")
    host.rename(tmp_path / "host.old")
    host.symlink_to(store)
    assert "is inside the graphdriver root" in _fail(gd, "container", "mount", "c2")
    assert mounts_under(gd.root) == []
    assert _inspect(gd, "volume", "hv")["MountCount"] == 0
    assert _inspect(gd, "container", "c2")["Mounted"] is False


def test_the_volumes_folder_is_for_root_only(gd: GD) -> None:
    gd("volume", "create", "v")
    folder = gd.root / "volumes"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o755)  # made by an older graphdriver
    gd("volume", "ls")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_containers_layer_is_no_image(gd: GD) -> None:
    """A container's read-write layer (or any read-write layer) is refused as another
    container's image: it changes under the new container whenever its own is mounted."""
    _image(gd)
    gd("container", "create", "c", "--image", "img")
    layer = _inspect(gd, "container", "c")["Layer"]
    err = _fail(gd, "container", "create", "d", "--image", layer)
    assert err.endswith(
        f"image {layer!r} is the read-write layer of container 'c'; a container's image must "
        "be an image layer"
    ), err
    gd("create", "--rw", "--parent", "img", "plain")
    assert _fail(gd, "container", "create", "e", "--image", "plain").endswith(
        "image 'plain' is read-write; a container's image must be an image layer"
    )
    assert [c["Name"] for c in json.loads(gd("container", "ls", "--json").out)] == ["c"]
    assert sorted(gd("ls").out.split()) == sorted(["img", layer, "plain"])


def test_a_refused_container_rm_commits_nothing(gd: GD) -> None:
    _image(gd, "img", "/data")
    gd("container", "create", "c1", "--image", "img", "-v", "named:/named")
    info = _inspect(gd, "container", "c1")
    layer = info["Layer"]
    gd("mount", layer)  # the layer by itself, outside the container
    for args in (["rm"], ["rm", "-f"], ["rm", "-f", "--volumes"]):
        err = _fail(gd, "container", *args, "c1")
        assert err.endswith(f"`graphdriver umount {layer}` first"), err
    assert _inspect(gd, "container", "c1") == info  # every verb still works
    root = Path(gd("container", "mount", "c1").out.strip())
    (root / "named" / "n").write_text("n")
    gd("container", "umount", "c1")
    gd("umount", layer)
    assert sorted(gd("ls").out.split()) == sorted(["img", layer])
    gd("create", "--parent", layer, "child")  # a layer made on the container's
    assert "remove them first" in _fail(gd, "container", "rm", "c1")
    gd("cleanup")
    assert _inspect(gd, "container", "c1") == info
    gd("rm", "child")
    gd("container", "rm", "--volumes", "c1")
    assert gd("ls").out.split() == ["img"] and _volumes(gd) == ["named"]


def test_a_volume_rm_that_fails_keeps_the_volume(gd: GD) -> None:
    gd("volume", "create", "v")
    stuck = Path(_inspect(gd, "volume", "v")["Mountpoint"]) / "f"
    stuck.write_text("x")
    subprocess.run(["chattr", "+i", str(stuck)], check=True)  # unlink fails with EPERM
    try:
        assert "remove volume v: Operation not permitted" in _fail(gd, "volume", "rm", "v")
        assert _volumes(gd) == ["v"]  # still there, and every volume verb still works
        assert _inspect(gd, "volume", "v")["Name"] == "v"
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    gd("volume", "rm", "v")
    assert _volumes(gd) == []


def test_bad_specs_fail_with_one_line_and_change_nothing(gd: GD, tmp_path: Path) -> None:
    _image(gd)
    before = (_volumes(gd), gd("ls").out)
    cases = {
        ("-v", str(tmp_path / "missing") + ":/x"): "bind source " + str(tmp_path / "missing"),
        ("-v", "named:relative/path"): "is not an absolute path",
        ("-v", "relative"): "is not an absolute path",
        ("-v", "named:/"): "cannot be mounted at '/'",
        ("-v", "named:/a/../b"): "has a '..' component",
        ("-v", "named:/x:rx"): "is not a comma list of ro, rw, nocopy",
        ("-v", "/x:ro"): "a volume without a source takes no mode",
        ("-v", "bad name!:/x"): "invalid volume name",
        ("-v", "./rel:/x"): "a bind source must be an absolute host path",
        ("-v", f"{gd.root}:/x"): "is the graphdriver root",
        ("-v", f"{gd.root / 'volumes'}:/x"): "inside the graphdriver root",
        ("-v", "a:/x", "-v", "b:/x"): "duplicate mount point /x",
        ("--volumes-from", "ghost"): "container 'ghost' does not exist",
        ("--volumes-from", "ghost:rx"): "the mode is ro or rw",
        ("--volume-driver", "nope", "-v", "v:/x"): "no volume driver named 'nope'",
    }
    for args, message in cases.items():
        err = _fail(gd, "container", "create", "c1", "--image", "img", *args)
        assert message in err, (args, err)
    assert _fail(gd, "container", "create", "c1", "--image", "ghost").endswith(
        "image 'ghost' does not exist"
    )
    assert "invalid container name" in _fail(gd, "container", "create", "../x", "--image", "img")
    assert "invalid volume path" in _fail(gd, "create", "--volume", "rel", "x")
    assert (_volumes(gd), gd("ls").out) == before
    assert gd("container", "ls", "--json").out.strip() == "[]"
    gd("container", "create", "c1", "--image", "img")
    assert _fail(gd, "container", "create", "c1", "--image", "img").endswith(
        "container 'c1' already exists"
    )
    err = _fail(gd, "container", "create", "c2", "--image", "img", "--volumes-from", "c2")
    assert err.endswith("container 'c2' cannot take volumes from itself")


def test_a_killed_create_is_rolled_back(gd: GD) -> None:
    _image(gd, "img", "/data")
    gd("volume", "create", "keep")
    proc = subprocess.run(
        gd.argv("container", "create", "c1", "--image", "img", "-v", "keep:/k", "-v", "/anon"),
        env={**os.environ, "GRAPHDRIVER_FAULT": "containers.create.after-volumes"},
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -9
    assert len(_volumes(gd)) == 3  # keep + two anonymous, until the next open rolls back
    assert gd("container", "ls", "--json").out.strip() == "[]"  # opens the store: rolls back
    assert _volumes(gd) == ["keep"]
    assert _inspect(gd, "volume", "keep")["UsedBy"] == []
    assert gd("ls").out.split() == ["img"]
    gd("container", "create", "c1", "--image", "img", "-v", "keep:/k")


# -------------------------------------------------------------------------- volume verbs


def test_volume_verbs(gd: GD) -> None:
    name = gd("volume", "create").out.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", name)
    gd("volume", "create", "web", "--label", "app=shop", "--label", "tier=front")
    assert gd("volume", "create", "web").out.strip() == "web"  # same driver: returns it
    assert "already exists" in _fail(
        gd, "volume", "create", "web", "--opt", "type=tmpfs", "--opt", "device=tmpfs"
    )
    info = _inspect(gd, "volume", "web")
    assert info["Driver"] == "local" and info["Labels"] == {"app": "shop", "tier": "front"}
    assert info["Anonymous"] is False and info["Scope"] == "local"
    assert gd("volume", "ls", "-q", "--filter", "label=app=shop").out.split() == ["web"]
    assert gd("volume", "ls", "-q", "--filter", "dangling=false").out.split() == []
    assert "no volume driver named 'nfs-x'" in _fail(
        gd, "volume", "create", "--volume-driver", "nfs-x", "v"
    )
    assert "has no option 'colour'" in _fail(gd, "volume", "create", "--opt", "colour=red", "v")
    assert "needs both --opt type" in _fail(gd, "volume", "create", "--opt", "type=tmpfs", "v")
    assert "invalid volume name" in _fail(gd, "volume", "create", "bad!")
    Path(info["Mountpoint"], "f").write_bytes(b"x" * 10000)
    _image(gd)
    gd("container", "create", "c1", "--image", "img", "-v", "/used")
    used = _inspect(gd, "container", "c1")["Mounts"][0]["Name"]
    pruned = json.loads(gd("volume", "prune", "--json").out)
    assert pruned["VolumesDeleted"] == [name]  # anonymous and unused only
    assert sorted(_volumes(gd)) == sorted(["web", used])
    pruned = json.loads(gd("volume", "prune", "--all", "--json").out)
    assert pruned["VolumesDeleted"] == ["web"] and pruned["SpaceReclaimed"] >= 10000
    assert not (gd.root / "volumes" / "web").exists()
    assert _volumes(gd) == [used]


def test_a_cleanup_releases_only_its_own_drivers_volume_mounts(gd: GD) -> None:
    """``cleanup`` unmounts its driver's containers and releases their volumes, and no other
    holder's: another driver's containers under the same root, and dockerd's (the volume
    plugin's ``docker:<ID>``), keep their volumes mounted, counted, and safe from ``rm -f``."""
    other = GD(gd.root, "vfs" if gd.driver == "overlay" else "overlay")
    tmpfs = ["--opt", "type=tmpfs", "--opt", "device=tmpfs", "--opt", "o=size=4m"]
    try:
        _image(gd)
        _image(other)
        gd("volume", "create", "scratch", *tmpfs)
        gd("container", "create", "mine", "--image", "img", "-v", "scratch:/t")
        specs = ["-v", "keep:/db", "-v", "scratch:/t"]
        other("container", "create", "theirs", "--image", "img", *specs)
        theirs = Path(other("container", "mount", "theirs").out.strip())
        gd("container", "mount", "mine")
        (theirs / "db" / "data").write_text("important")
        (theirs / "t" / "data").write_text("scratch")
        volumes = VolumeStore(gd.root)
        try:
            volumes.create("dv")
            volumes.mount("dv", "docker:abc123")
        finally:
            volumes.close()
        gd("cleanup")
        assert _inspect(gd, "container", "mine")["Mounted"] is False
        assert _inspect(gd, "volume", "keep")["MountCount"] == 1
        assert _inspect(gd, "volume", "scratch")["MountCount"] == 1  # was 2: mine's released
        assert _inspect(gd, "volume", "dv")["MountCount"] == 1
        for name in ("keep", "dv"):
            assert "is mounted in container(s)" in _fail(gd, "volume", "rm", "-f", name)
        assert (theirs / "db" / "data").read_text() == "important"
        assert (theirs / "t" / "data").read_text() == "scratch"  # the same tmpfs, still there
        other("container", "umount", "theirs")
        assert _inspect(gd, "volume", "scratch")["MountCount"] == 0
    finally:
        other("cleanup", check=False)
        volumes = VolumeStore(gd.root)
        try:
            volumes.unmount("dv", "docker:abc123")
        finally:
            volumes.close()


def test_a_counted_volume_whose_mount_is_gone_is_mounted_again(gd: GD) -> None:
    """A tmpfs volume that dockerd (through the volume plugin) holds, whose mount went away
    (a reboot, an umount by hand) while it stays counted: the next container that mounts it
    gets a tmpfs again, never the directory below it on the store's disk."""
    _image(gd)
    tmpfs = ["--opt", "type=tmpfs", "--opt", "device=tmpfs", "--opt", "o=size=4m"]
    gd("volume", "create", "t", *tmpfs)
    volumes = VolumeStore(gd.root)
    try:
        data = volumes.mount("t", "docker:abc")
    finally:
        volumes.close()
    unmount(data)  # as a reboot would
    gd("container", "create", "c", "--image", "img", "-v", "t:/x")
    try:
        res = gd("container", "mount", "c")
        assert "volume t is counted as mounted but its mount is gone" in res.err, res.err
        root = Path(res.out.strip())
        (root / "x" / "f").write_text("in the tmpfs")
        mounted = {e.mountpoint: e.fstype for e in mountinfo()}
        assert mounted[os.path.realpath(root / "x")] == "tmpfs"
        assert mounted[os.path.realpath(data)] == "tmpfs"
        gd("container", "umount", "c")
        assert (data / "f").read_text() == "in the tmpfs"  # still mounted: dockerd's
    finally:
        volumes = VolumeStore(gd.root)
        try:
            volumes.unmount("t", "docker:abc")
        finally:
            volumes.close()
    assert not os.path.ismount(data) and not (data / "f").exists()


def test_local_volume_with_a_tmpfs_mount(gd: GD) -> None:
    _image(gd)
    gd(
        "volume",
        "create",
        "scratch",
        "--opt",
        "type=tmpfs",
        "--opt",
        "device=tmpfs",
        "--opt",
        "o=size=4m,mode=0700",
    )
    gd("container", "create", "c1", "--image", "img", "-v", "scratch:/scratch")
    gd("container", "create", "c2", "--image", "img", "-v", "scratch:/scratch")
    r1 = Path(gd("container", "mount", "c1").out.strip())
    r2 = Path(gd("container", "mount", "c2").out.strip())
    (r1 / "scratch" / "f").write_text("shared")
    assert (r2 / "scratch" / "f").read_text() == "shared"  # one tmpfs for both
    entry = next(e for e in mountinfo() if e.mountpoint == os.path.realpath(r1 / "scratch"))
    assert entry.fstype == "tmpfs" and "size=4096k" in entry.super_options
    assert _inspect(gd, "volume", "scratch")["MountCount"] == 2
    gd("container", "umount", "c1")
    assert (r2 / "scratch" / "f").exists()
    gd("container", "umount", "c2")
    assert _inspect(gd, "volume", "scratch")["MountCount"] == 0
    data = gd.root / "volumes" / "scratch" / "_data"
    assert os.path.realpath(data) not in {e.mountpoint for e in mountinfo()}
