"""A container or volume command killed (SIGKILL) at any of its state transitions, on overlay and
vfs: the next command opens the store, the half-done thing is gone or complete, nothing else is
lost, no mount is stacked or leaked, and every count is right. Sent SIGTERM there instead, the
command rolls back itself, to the same state, and leaves the next command nothing to do."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import GD
from test_containers import _image, gd  # noqa: F401  (gd: the overlay/vfs fixture)

from graphdriver.linux.mount import is_mountpoint, mounts_under

CREATE = [
    "containers.create.after-record",
    "volumes.create.after-record",  # the image's anonymous volume
    "volumes.create.after-driver",
    "containers.create.after-layer",
    "containers.create.after-volumes",
]
MOUNT = [
    "containers.mount.after-get",  # layer mounted, not yet committed
    "containers.mount.after-layer",
    "volumes.mount.after-driver",  # the tmpfs volume mounted, not yet counted
    "containers.mount.after-volume",
    "containers.mount.after-bind",  # a bind in place, not yet recorded
]
UMOUNT = [
    "containers.umount.after-mark",
    "containers.umount.after-unbind",
    "containers.umount.after-volumes",
    "containers.umount.after-put",  # layer unmounted, not yet committed
]
RM = ["containers.rm.after-mark", "containers.rm.after-layer", "containers.rm.after-refs"]
RM_V = [*RM, "volumes.remove.after-mark", "volumes.remove.after-driver"]
VOLUME_RM = ["volumes.remove.after-mark", "volumes.remove.after-driver"]
VOLUME_CREATE = ["volumes.create.after-record", "volumes.create.after-driver"]

CASES = [
    *(("create", p) for p in CREATE),
    *(("mount", p) for p in MOUNT),
    *(("umount", p) for p in UMOUNT),
    *(("rm", p) for p in RM),
    *(("rm-v", p) for p in RM_V),
    *(("volume-rm", p) for p in VOLUME_RM),
    *(("volume-create", p) for p in VOLUME_CREATE),
]


def _json(runner: GD, *args: str) -> Any:
    return json.loads(runner(*args, "--json").out)


class World:
    """A store with a mounted container ``o`` (a named and an anonymous volume), a named volume
    with data, a tmpfs volume and a host directory: what must survive any kill."""

    def __init__(self, runner: GD, tmp_path: Path) -> None:
        self.gd = g = runner
        _image(g, "img", "/data")
        g("volume", "create", "keep")
        self.keep = g.root / "volumes" / "keep" / "_data"
        (self.keep / "k").write_text("keep")
        g("volume", "create", "tmp2", "--opt", "type=tmpfs", "--opt", "device=tmpfs")
        self.host = tmp_path / "host"
        self.host.mkdir()
        (self.host / "h").write_text("host")
        g("container", "create", "o", "--image", "img", "-v", "keep:/keep")
        self.o_root = Path(g("container", "mount", "o").out.strip())
        (self.o_root / "in-o").write_text("o's layer")
        (self.o_root / "data" / "in-anon").write_text("o's anonymous volume")
        self.c_specs = ["-v", "tmp2:/a-tmp", "-v", f"{self.host}:/h", "-v", "keep:/k"]
        self.action = "kill"
        self.base = 1 if g.driver == "overlay" else 0  # the overlay mount of a root

    def create_c(self) -> None:
        self.gd("container", "create", "c", "--image", "img", *self.c_specs)

    def killed(self, *args: str, point: str) -> None:
        """The command, killed at *point* (SIGKILL), or, where the test's action is ``term``,
        sent SIGTERM there: it then rolls back what it had half done itself, and the next
        command finds nothing to recover (no warning)."""
        proc = subprocess.run(
            self.gd.argv(*args),
            env={**os.environ, "GRAPHDRIVER_FAULT": f"{point}={self.action}"},
            capture_output=True,
            timeout=300,
        )
        err = proc.stderr.decode()
        if self.action == "kill":
            assert proc.returncode == -9, (point, proc.returncode, err)
            return
        assert proc.returncode == 128 + 15, (point, proc.returncode, err)
        said = "graphdriver: interrupted by SIGTERM; what it had half done was rolled back\n"
        assert err.endswith(said), err
        assert self.gd("container", "ls").err == ""
        assert self.gd("volume", "ls").err == ""

    def mounts(self) -> list[str]:
        return mounts_under(os.path.realpath(self.gd.root))

    def check(self, *, c: str | None) -> None:
        """c: None (gone), "unmounted" or "mounted"."""
        gd = self.gd  # noqa: F811
        containers = {i["Name"]: i for i in _json(gd, "container", "ls")}
        assert sorted(containers) == sorted(["o", *([] if c is None else ["c"])])
        o = containers["o"]
        assert o["MountCount"] == 1 and Path(o["Root"]) == self.o_root
        assert (self.o_root / "in-o").read_text() == "o's layer"
        assert (self.o_root / "keep" / "k").read_text() == "keep"
        assert (self.o_root / "data" / "in-anon").read_text() == "o's anonymous volume"
        o_real = os.path.realpath(self.o_root)
        expect = self.base + 2  # o's binds: /data and /keep
        if c == "mounted":
            expect += self.base + 4 + 1  # c's root, binds, and tmp2's tmpfs
        assert len(self.mounts()) == expect, self.mounts()
        layers = gd("ls").out.split()
        wanted = ["img", o["Layer"], *([containers["c"]["Layer"]] if c else [])]
        assert sorted(layers) == sorted(wanted)
        vols = {v["Name"]: v for v in _json(gd, "volume", "ls")}
        assert vols["keep"]["MountCount"] == (2 if c == "mounted" else 1)
        assert sorted(vols["keep"]["UsedBy"]) == sorted(["o", *(["c"] if c else [])])
        assert vols["tmp2"]["MountCount"] == (1 if c == "mounted" else 0)
        assert is_mountpoint(vols["tmp2"]["Mountpoint"]) == (c == "mounted")
        (o_anon,) = [m["Name"] for m in o["Mounts"] if m["Type"] == "volume" and m["Anonymous"]]
        assert vols[o_anon]["MountCount"] == 1
        assert (self.keep / "k").read_text() == "keep"
        assert all(m.startswith(o_real) for m in self.mounts()) or c == "mounted"

    def mount_c_once(self) -> None:
        """Mount c: every bind once (nothing stacked), its data there; then unmount it."""
        root = Path(self.gd("container", "mount", "c").out.strip())
        real = os.path.realpath(root)
        inside = [m for m in self.mounts() if m == real or m.startswith(real + "/")]
        assert len(inside) == self.base + 4, inside
        assert (root / "h" / "h").read_text() == "host"
        assert (root / "k" / "k").read_text() == "keep"
        assert len(self.mounts()) == 2 * self.base + 2 + 4 + 1  # o, c and tmp2's tmpfs
        self.gd("container", "umount", "c")

    def finish(self) -> None:
        self.gd("container", "umount", "o")
        self.gd("cleanup")
        assert self.mounts() == []


@pytest.mark.parametrize("action", ["kill", "term"])
@pytest.mark.parametrize(("verb", "point"), CASES, ids=[f"{v}-{p}" for v, p in CASES])
def test_a_kill_at_any_transition_loses_nothing(
    gd: GD,  # noqa: F811
    tmp_path: Path,
    verb: str,
    point: str,
    action: str,
) -> None:
    w = World(gd, tmp_path)
    w.action = action
    if verb == "create":
        w.killed("container", "create", "c", "--image", "img", *w.c_specs, point=point)
        w.check(c=None)
        assert len(_json(gd, "volume", "ls")) == 3  # keep, tmp2, o's anonymous one
        w.create_c()
        w.mount_c_once()
    elif verb in ("mount", "umount"):
        w.create_c()
        if verb == "umount":
            gd("container", "mount", "c")
        w.killed("container", verb, "c", point=point)
        w.check(c="unmounted")
        w.mount_c_once()
    elif verb in ("rm", "rm-v"):
        w.create_c()
        mounts = json.loads(gd("container", "inspect", "c").out)[0]["Mounts"]
        (anon,) = [m["Name"] for m in mounts if m.get("Anonymous")]  # the image's /data
        w.killed("container", "rm", *(["--volumes"] if verb == "rm-v" else []), "c", point=point)
        w.check(c=None)
        left = {v["Name"] for v in _json(gd, "volume", "ls")}
        assert (anon in left) == (verb == "rm")
        w.create_c()
    elif verb == "volume-rm":
        gd("volume", "create", "gone")
        w.killed("volume", "rm", "gone", point=point)
        w.check(c=None)
        assert "gone" not in gd("volume", "ls", "-q").out.split()
        assert not (gd.root / "volumes" / "gone").exists()
        gd("volume", "create", "gone")
    else:
        w.killed("volume", "create", "new", point=point)
        w.check(c=None)
        assert "new" not in gd("volume", "ls", "-q").out.split()
        assert not (gd.root / "volumes" / "new").exists()
        gd("volume", "create", "new")
    w.finish()


def test_status_lists_a_volume_whose_recovery_fails(gd: GD) -> None:  # noqa: F811
    """A volume that a killed `volume rm` left half-removed, and whose data cannot be deleted
    (an immutable file in it: EPERM), is listed by status as "Recovery Failed" at every open
    while other commands go on; once the file can go, the next open finishes the removal."""
    gd("volume", "create", "v")
    gd("volume", "create", "keep")
    data = Path(json.loads(gd("volume", "inspect", "v").out)[0]["Mountpoint"])
    (data / "stuck").write_text("x")
    proc = subprocess.run(
        gd.argv("volume", "rm", "v"),
        env={**os.environ, "GRAPHDRIVER_FAULT": "volumes.remove.after-mark"},
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr.decode()
    subprocess.run(["chattr", "+i", str(data / "stuck")], check=True)
    try:
        text = gd("status").out.splitlines()
        failed = [line for line in text if line.startswith("Recovery Failed: ")]
        assert len(failed) == 1 and failed[0].startswith("Recovery Failed: volume v: "), text
        listed = json.loads(gd("status", "--json").out)["Recovery Failed"]
        assert len(listed) == 1 and listed[0].startswith("volume v: ")
        gd("create", "other")  # never in the way of the rest
        assert gd("volume", "ls", "-q").out.split() == ["keep"]
    finally:
        subprocess.run(["chattr", "-i", str(data / "stuck")], check=True)
    assert "Recovery Failed" not in gd("status", "--json").out
    assert not data.exists()
    assert gd("volume", "ls", "-q").out.split() == ["keep"]


def _termed(gd: GD, point: str, *args: str) -> str:  # noqa: F811
    """The last line of the command *args*, sent SIGTERM at *point*; it exits 128+15."""
    proc = subprocess.run(
        gd.argv(*args),
        env={**os.environ, "GRAPHDRIVER_FAULT": f"{point}=term"},
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 128 + 15, proc.stderr.decode()
    return proc.stderr.decode().strip().splitlines()[-1]


def test_an_interrupt_whose_rollback_fails_says_so(gd: GD) -> None:  # noqa: F811
    """SIGTERM between two steps of `volume rm`, whose volume cannot be deleted (an immutable
    file): the command's rollback fails, and its last line says so, not "was rolled back"."""
    gd("volume", "create", "v")
    data = Path(json.loads(gd("volume", "inspect", "v").out)[0]["Mountpoint"])
    (data / "stuck").write_text("x")
    subprocess.run(["chattr", "+i", str(data / "stuck")], check=True)
    try:
        last = _termed(gd, "volumes.remove.after-mark", "volume", "rm", "v")
        assert last.startswith(
            "graphdriver: interrupted by SIGTERM; what it had half done could not all be "
            "rolled back (volume v: "
        ), last
        assert last.endswith("); see `graphdriver status`"), last
        assert "Recovery Failed: volume v: " in gd("status").out
        # another command interrupted meanwhile, whose own rollback works: v's failure, which
        # its open found already, is not laid at its door
        last = _termed(gd, "volumes.create.after-record", "volume", "create", "x")
        assert last == "graphdriver: interrupted by SIGTERM; what it had half done was rolled back"
        assert "x" not in gd("volume", "ls", "-q").out.split()
    finally:
        subprocess.run(["chattr", "-i", str(data / "stuck")], check=True)
    assert "Recovery Failed" not in gd("status").out
    assert "v" not in gd("volume", "ls", "-q").out.split()


def test_status_lists_a_container_whose_recovery_fails(gd: GD) -> None:  # noqa: F811
    """A container that a killed create left half-made, whose layer someone mounted meanwhile
    (it cannot be removed while mounted), is listed by status as "Recovery Failed"; once the
    layer is unmounted, the next open rolls the create back."""
    _image(gd)
    proc = subprocess.run(
        gd.argv("container", "create", "c", "--image", "img"),
        env={**os.environ, "GRAPHDRIVER_FAULT": "containers.create.after-layer"},
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr.decode()
    (layer,) = [x for x in gd("ls").out.split() if x != "img"]
    gd("mount", layer)
    try:
        listed = json.loads(gd("status", "--json").out)["Recovery Failed"]
        assert len(listed) == 1 and listed[0].startswith("container c: "), listed
        assert json.loads(gd("container", "ls", "--json").out) == []  # none while half-made
    finally:
        gd("umount", layer)
    assert "Recovery Failed" not in gd("status", "--json").out
    assert gd("ls").out.split() == ["img"]


def test_status_says_when_the_volumes_cannot_be_read(gd: GD) -> None:  # noqa: F811
    """status is what one runs on a store in trouble: volumes locked past --wait, or their
    catalogue damaged, are one line of it, not its end."""
    gd("volume", "create", "v")
    volumes = Path(json.loads(gd("volume", "inspect", "v").out)[0]["Mountpoint"]).parents[1]
    with open(volumes / ".lock", "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        res = gd("--wait", "1", "status")
    assert any(line.startswith("Volumes: cannot be read: ") for line in res.out.splitlines())
    (volumes / ".metadata.db").write_bytes(b"not a database" * 100)
    for name in (".metadata.db-wal", ".metadata.db-shm"):
        (volumes / name).unlink(missing_ok=True)
    res = gd("status", "--json")
    assert json.loads(res.out)["Volumes"].startswith("cannot be read: ")


def test_a_container_mount_killed_before_its_commit_is_undone_by_a_layer_command(
    gd: GD,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Killed after its layer was mounted and before the container's record and the layer's
    count committed (one transaction): the layer's mount was marked before, so the next
    command of the layer store alone (``ls``) unmounts it, not only a container command."""
    w = World(gd, tmp_path)
    w.create_c()
    w.killed("container", "mount", "c", point="containers.mount.after-get")
    left = w.mounts()
    gd("ls")
    assert len(w.mounts()) == w.base + 2, (left, w.mounts())  # o's root and binds alone
    w.check(c="unmounted")
    w.mount_c_once()
    w.finish()
