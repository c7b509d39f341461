"""`graphdriver serve containerd` as containerd's proxy plugin sees it: the gRPC API, its
status codes, bad input, restarts and crashes, the mounts per driver, concurrency."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from ctd_proxy import Proxy, code, listening

pytestmark = pytest.mark.privileged

REPO = Path(__file__).resolve().parents[3]


def _fails(call: object, *args: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)  # type: ignore[operator]
    return code(info.value)


def _mount(m: object, target: Path) -> None:
    options = ",".join(m.options)  # type: ignore[attr-defined]
    subprocess.run(
        ["mount", "-t", m.type, "-o", options, m.source, str(target)],  # type: ignore[attr-defined]
        check=True,
        capture_output=True,
    )


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True)


# ---------------------------------------------------------------------------- the model


def test_under_systemd_the_proxy_says_ready_once_it_serves(tmp_path: Path) -> None:
    """Started by a ``Type=notify`` unit (graphdriver-containerd.service), the proxy sends
    READY=1 to NOTIFY_SOCKET once it serves, not before: systemd starts containerd then, whose
    CRI forgets, for good, every image it cannot check with its snapshotter as it starts."""
    notify = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(60)
    proxy = Proxy(tmp_path / "store", "vfs", tmp_path / "gd.sock")
    argv = proxy.command("serve", "containerd", "--address", str(proxy.address))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
    with open(proxy.log, "ab") as log:
        proxy.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
    try:
        said = listener.recv(4096)
        assert listening(proxy.address)  # it serves as it says so
        assert said.startswith(b"READY=1\nSTATUS=serving containerd snapshots of vfs"), said
        proxy.prepare("k")
    finally:
        listener.close()
        assert proxy.stop() == 0
    assert proxy.proc is None


def test_prepare_commit_view_stat_list_and_usage(vfs: Proxy, tmp_path: Path) -> None:
    key = "default/1/extract-12 sha256:abc"  # what containerd sends: '/', ':' and a space
    mounts = vfs.prepare(key, label="x")
    assert [m.type for m in mounts] == ["bind"]  # type: ignore[attr-defined]
    target = tmp_path / "mnt"
    target.mkdir()
    _mount(mounts[0], target)
    try:
        (target / "hello").write_text("hello\n")
        (target / "dir").mkdir()
        (target / "sparse").write_bytes(b"")
        os.truncate(target / "sparse", 1 << 30)  # a 1 GiB hole: no block on disk
        on_disk = sum(os.lstat(target / n).st_blocks * 512 for n in ("hello", "dir", "sparse"))
    finally:
        _umount(target)
    info = vfs.stat(key)
    assert (info.name, info.kind, info.parent, dict(info.labels)) == (key, 2, "", {"label": "x"})
    assert info.created_at == info.updated_at
    vfs.commit("default/2/sha256:chain", key, gc="root")
    committed = vfs.stat("default/2/sha256:chain")
    assert (committed.kind, dict(committed.labels)) == (3, {"gc": "root"})
    assert _fails(vfs.stat, key) == grpc.StatusCode.NOT_FOUND
    # what the snapshot takes on disk, as containerd's snapshotters say (du), not the bytes a
    # diff would carry: Kubernetes counts it against a pod's ephemeral storage
    size, inodes = vfs.usage("default/2/sha256:chain")
    assert (size, inodes) == (on_disk, 3)
    assert size < 1 << 20
    # the committed snapshot is the same layer, now an image layer: nothing was copied
    layers = vfs.layers()
    assert len(layers) == 1
    view = vfs.view("v", "default/2/sha256:chain")
    assert "ro" in view[0].options  # type: ignore[attr-defined]
    _mount(view[0], target)
    try:
        assert (target / "hello").read_text() == "hello\n"
        with pytest.raises(OSError, match="Read-only"):
            (target / "new").write_text("no")
    finally:
        _umount(target)
    assert vfs.list() == ["default/2/sha256:chain", "v"]
    assert vfs.list("kind==view") == ["v"]
    assert vfs.list('parent=="default/2/sha256:chain"') == ["v"]
    vfs.remove("v")
    vfs.remove("default/2/sha256:chain")
    assert vfs.layers() == []


def test_update_honours_the_field_mask(vfs: Proxy) -> None:
    from google.protobuf import field_mask_pb2

    from graphdriver_containerd.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb

    vfs.prepare("a", l1="v1", l2="v2")
    info = pb.Info(name="a", labels={"l1": "new", "l3": "v3"})
    mask = field_mask_pb2.FieldMask(paths=["labels.l1", "labels.l2"])
    got = vfs.stub.Update(pb.UpdateSnapshotRequest(info=info, update_mask=mask)).info
    assert dict(got.labels) == {"l1": "new"}
    assert got.updated_at != got.created_at
    # a label of empty value is no label, as containerd's own store keeps them: set to ""
    # by an Update it goes, and a presence filter does not see it
    emptied = pb.Info(name="a", labels={"l1": "", "l4": ""})
    mask = field_mask_pb2.FieldMask(paths=["labels.l1", "labels.l4"])
    got = vfs.stub.Update(pb.UpdateSnapshotRequest(info=emptied, update_mask=mask)).info
    assert dict(got.labels) == {}
    vfs.prepare("b", l5="")
    assert dict(vfs.stat("b").labels) == {} and vfs.list("labels.l5") == []
    bad = field_mask_pb2.FieldMask(paths=["parent"])
    with pytest.raises(grpc.RpcError) as exc:
        vfs.stub.Update(pb.UpdateSnapshotRequest(info=info, update_mask=bad))
    assert code(exc.value) == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_input_gets_the_codes_containerd_expects_and_leaves_nothing(vfs: Proxy) -> None:
    assert _fails(vfs.stat, "nope") == grpc.StatusCode.NOT_FOUND
    assert _fails(vfs.mounts, "nope") == grpc.StatusCode.NOT_FOUND
    assert _fails(vfs.remove, "nope") == grpc.StatusCode.NOT_FOUND
    assert _fails(vfs.commit, "c", "nope") == grpc.StatusCode.NOT_FOUND
    assert _fails(vfs.prepare, "k", "no-such-parent") == grpc.StatusCode.NOT_FOUND
    vfs.prepare("a")
    assert _fails(vfs.prepare, "a") == grpc.StatusCode.ALREADY_EXISTS
    assert _fails(vfs.view, "a") == grpc.StatusCode.ALREADY_EXISTS
    assert _fails(vfs.prepare, "child", "a") == grpc.StatusCode.INVALID_ARGUMENT  # not committed
    vfs.commit("c", "a")
    vfs.view("v", "c")
    assert _fails(vfs.commit, "c2", "v") == grpc.StatusCode.FAILED_PRECONDITION  # a view
    assert _fails(vfs.mounts, "c") == grpc.StatusCode.FAILED_PRECONDITION  # committed
    assert _fails(vfs.remove, "c") == grpc.StatusCode.FAILED_PRECONDITION  # has a child
    vfs.prepare("b")
    assert _fails(vfs.commit, "c", "b") == grpc.StatusCode.ALREADY_EXISTS
    assert vfs.stat("b").kind == 2  # still active, still there
    big = {"k": "x" * 4096}
    assert _fails(lambda: vfs.prepare("huge", **big)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _fails(vfs.list, "kind=") == grpc.StatusCode.INVALID_ARGUMENT
    assert _fails(vfs.prepare, "") == grpc.StatusCode.INVALID_ARGUMENT
    assert vfs.list() == ["b", "c", "v"]
    assert len(vfs.layers()) == 3  # nothing half-made


def test_store_errors_get_the_codes_containerd_expects() -> None:
    """What the proxy sends for errors of the store and of its catalogue (a full database's
    StoreError carries ENOSPC; a chain too deep for the driver is a precondition, as
    containerd's own snapshotters report what the parent's chain cannot take)."""
    from graphdriver import MaxDepthExceeded, StoreError
    from graphdriver_containerd.snapshotter import translate

    full = StoreError("the filesystem holding snapshots.db is full", errno_=errno.ENOSPC)
    assert translate(full).code == "RESOURCE_EXHAUSTED"
    assert translate(OSError(errno.EDQUOT, "quota")).code == "RESOURCE_EXHAUSTED"
    assert translate(MaxDepthExceeded("501 layers deep")).code == "FAILED_PRECONDITION"
    assert translate(StoreError("damaged")).code == "UNKNOWN"


def test_filters_as_containerd_parses_them(vfs: Proxy) -> None:
    vfs.prepare("p-tmp")
    vfs.commit("p", "p-tmp", **{"containerd.io/gc.root": "x", "l": "1"})
    vfs.prepare("a", "p", l="2")
    vfs.view("v", "p")
    assert vfs.list('labels."containerd.io/gc.root"') == ["p"]
    assert vfs.list("labels.l==2", "name==v") == ["a", "v"]
    assert vfs.list("kind~=/^(act|vi)/,parent==p") == ["a", "v"]
    assert vfs.list('parent!=""') == ["a", "v"]
    assert vfs.list("labels.l!=1") == ["a", "v"]


def test_cleanup_removes_layers_no_key_names(vfs: Proxy) -> None:
    subprocess.run(
        vfs.command("create", "--label", "graphdriver.containerd=snapshot", "ctd-orphan"),
        check=True,
    )
    subprocess.run(vfs.command("create", "mine"), check=True)  # not the proxy's: kept
    vfs.prepare("a")
    vfs.cleanup()
    layers = vfs.layers()
    assert "ctd-orphan" not in layers and "mine" in layers and len(layers) == 2


# ---------------------------------------------------------------------------- mounts


def test_overlay_returns_containerds_own_mounts(overlay: Proxy, tmp_path: Path) -> None:
    [bottom] = overlay.prepare("l1-tmp")
    assert (bottom.type, bottom.options[-1]) == ("bind", "rbind")  # type: ignore[attr-defined]
    target = tmp_path / "mnt"
    target.mkdir()
    _mount(bottom, target)
    (target / "lowest").write_text("1")
    (target / "gone").write_text("x")
    _umount(target)
    overlay.commit("l1", "l1-tmp")
    [m] = overlay.prepare("l2-tmp", "l1")
    opts = dict(o.partition("=")[::2] for o in m.options)  # type: ignore[attr-defined]
    assert m.type == "overlay" and {"upperdir", "workdir", "lowerdir"} <= opts.keys()  # type: ignore[attr-defined]
    _mount(m, target)
    assert (target / "lowest").read_text() == "1"
    (target / "gone").unlink()
    (target / "new").write_text("2")
    _umount(target)
    overlay.commit("l2", "l2-tmp")
    [v] = overlay.view("v", "l2")
    assert v.type == "overlay" and not any(o.startswith("upperdir=") for o in v.options)  # type: ignore[attr-defined]
    _mount(v, target)
    try:
        assert sorted(p.name for p in target.iterdir()) == ["lowest", "new"]
        with pytest.raises(OSError, match="Read-only"):
            (target / "x").write_text("x")
    finally:
        _umount(target)
    # the layer containerd wrote is an image layer whose diff carries the whiteout
    diff = subprocess.run(
        overlay.command("changes", _layer_of(overlay, "l2")), capture_output=True, text=True
    )
    assert sorted(diff.stdout.split("\n")) == ["", "A /new", "D /gone"]


def _layer_of(proxy: Proxy, key: str) -> str:
    import sqlite3

    db = proxy.root / "containerd" / proxy.driver / "snapshots.db"
    with sqlite3.connect(db) as conn:
        return str(conn.execute("SELECT layer FROM snapshots WHERE key=?", (key,)).fetchone()[0])


def test_a_chain_past_one_page_binds_a_mount_the_proxy_holds(
    overlay: Proxy, tmp_path: Path
) -> None:
    parent = ""
    for i in range(70):  # 70 lower dirs of ~90 bytes each: more than a 4096-byte page
        overlay.prepare(f"t{i}", parent)
        overlay.commit(f"c{i}", f"t{i}")
        parent = f"c{i}"
    [m] = overlay.prepare("top", parent)
    assert m.type == "bind"  # type: ignore[attr-defined]
    held = Path(m.source)  # type: ignore[attr-defined]
    assert os.path.ismount(held)
    # the operator's CLI leaves the mount a container binds alone: made again by Mounts, it
    # would be a second overlay on the same upper directory
    top = _layer_of(overlay, "top")
    for verb in (["cleanup"], ["umount", top]):
        assert _refused(overlay, *verb) == (
            "the containerd proxy holds the mount of snapshot 'top' (a container binds it); "
            "containerd releases it when it removes the snapshot"
        )
        assert os.path.ismount(held) and overlay.mounts("top") == [m]
    overlay.remove("top")
    assert not os.path.ismount(held), "Remove left the proxy's mount behind"


def _refused(proxy: Proxy, *args: str) -> str:
    """The one error line of a CLI command refused on the proxy's store."""
    out = subprocess.run(proxy.command(*args), capture_output=True, text=True)
    assert out.returncode != 0 and out.stderr.count("\n") == 1, out
    return out.stderr.removeprefix("graphdriver: error: ").strip()


def test_a_stopped_proxys_held_layer_is_the_users_to_mount_and_unmount(vfs: Proxy) -> None:
    """With the proxy stopped and its counts reset (a cleanup, a reboot), a mount of the
    layer of a held snapshot is the user's, and so is its unmount (it was refused as the
    proxy's); the proxy serves and removes the snapshot as before."""
    vfs.prepare("a")
    layer = _layer_of(vfs, "a")
    assert vfs.stop() == 0
    for verb in (["cleanup"], ["mount", layer], ["umount", layer]):
        done = subprocess.run(vfs.command(*verb), capture_output=True, text=True)
        assert done.returncode == 0, (verb, done.stderr)
    vfs.start()
    [m] = vfs.mounts("a")
    assert Path(m.source).is_dir()  # type: ignore[attr-defined]
    vfs.remove("a")
    assert layer not in vfs.layers()


@pytest.mark.parametrize("kind", ["active", "view", "committed"])
def test_the_cli_never_removes_a_snapshots_layer(overlay: Proxy, kind: str) -> None:
    """`graphdriver rm` of the layer of a snapshot containerd has: refused in one line (it
    used to delete it: Mounts then named missing directories, and containerd, which still
    listed the snapshot, never unpacked it again)."""
    overlay.prepare("base-tmp")
    overlay.commit("base", "base-tmp")
    {"active": overlay.prepare, "view": overlay.view}.get(kind, overlay.prepare)("k", "base")
    if kind == "committed":
        overlay.commit("image", "k")
    key = "image" if kind == "committed" else "k"
    layer = _layer_of(overlay, key)
    assert _refused(overlay, "rm", layer) == (
        f"layer {layer!r} holds containerd snapshot {key!r}: remove it through containerd "
        "(`ctr snapshots rm`, or the image or container that uses it)"
    )
    assert layer in overlay.layers() and overlay.stat(key).name == key
    overlay.remove(key)  # through containerd: it goes
    assert layer not in overlay.layers()
    mine = subprocess.run(overlay.command("create", "mine"), capture_output=True, check=True)
    subprocess.run(overlay.command("rm", "mine"), check=True)  # the store's own: not refused
    assert mine.returncode == 0 and "mine" not in overlay.layers()


# ---------------------------------------------------------------------------- the process


def test_restart_keeps_everything_and_removes_the_socket(vfs: Proxy) -> None:
    vfs.prepare("a-tmp")
    vfs.commit("a", "a-tmp", x="1")
    vfs.prepare("b", "a")
    before = (vfs.stat("a"), vfs.stat("b"), vfs.mounts("b"))
    assert vfs.stop() == 0
    assert not vfs.address.exists(), "SIGTERM left the socket"
    vfs.start()
    assert (vfs.stat("a"), vfs.stat("b"), vfs.mounts("b")) == before
    status = subprocess.run(vfs.command("status"), capture_output=True, text=True, check=True)
    assert "containerd Snapshots: 2 (1 committed, 1 active, 0 view)" in status.stdout
    assert f"containerd Proxy: running (pid {vfs.proc.pid})" in status.stdout  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("point", "outcome"),
    [
        ("store.create.after-driver", "gone"),
        ("containerd.prepare.after-layer", "gone"),
        ("containerd.commit.recorded", "committed"),
        ("containerd.commit.after-store", "committed"),
    ],
)
def test_killed_mid_prepare_or_commit_recovers(vfs: Proxy, point: str, outcome: str) -> None:
    vfs.prepare("base-tmp")
    vfs.commit("base", "base-tmp")
    vfs.prepare("a", "base")
    vfs.stop()
    vfs.start(env={"GRAPHDRIVER_FAULT": f"{point}=kill"})
    with pytest.raises(grpc.RpcError) as exc:
        if point.startswith("containerd.commit"):
            vfs.commit("done", "a")
        else:
            vfs.prepare("half", "base")
    assert code(exc.value) == grpc.StatusCode.UNAVAILABLE
    assert vfs.wait_dead() == -signal.SIGKILL
    vfs.start()
    if outcome == "gone":
        assert _fails(vfs.stat, "half") == grpc.StatusCode.NOT_FOUND
        assert len(vfs.layers()) == 2
        vfs.prepare("half", "base")  # the key is free again
    else:
        assert vfs.stat("done").kind == 3
        assert _fails(vfs.stat, "a") == grpc.StatusCode.NOT_FOUND
        vfs.prepare("on-top", "done")
    assert len(vfs.layers()) == 3


def test_refuses_a_path_that_is_not_a_socket_and_a_root_already_served(
    vfs: Proxy, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    elsewhere = Proxy(tmp_path / "other-store", "vfs", plain)
    done = subprocess.run(
        elsewhere.command("serve", "containerd", "--address", str(plain)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"graphdriver: error: {plain} exists and is not a socket; choose another --address"
    ]
    other = Proxy(vfs.root, "vfs", plain)
    second = tmp_path / "second.sock"
    done = subprocess.run(
        other.command("serve", "containerd", "--address", str(second)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "another proxy (pid" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = subprocess.run(
        other.command("serve", "containerd", "--address", str(vfs.address)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "another proxy" in done.stderr
    assert plain.read_text() == "x"
    vfs.prepare("still-works")  # the first proxy is unharmed


def test_a_stale_socket_of_a_killed_proxy_is_replaced(vfs: Proxy) -> None:
    assert vfs.stop(signal.SIGKILL) == -signal.SIGKILL
    assert vfs.address.exists()
    vfs.start()
    vfs.prepare("after")


# ---------------------------------------------------------------------------- packaging


def test_the_core_cli_never_imports_grpc() -> None:
    probe = (
        "import sys\n"
        "from graphdriver import cli\n"
        "try:\n"
        "    cli.cli.main(['serve', '--help'], prog_name='graphdriver', standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('grpc' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "containerd" in done.stdout  # listed from the entry point, not imported
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_generated_code_is_fresh() -> None:
    if not Path("/usr/share/gocode/src/github.com/containerd/containerd/api").is_dir():
        pytest.fail("containerd's .proto files are missing: scripts/setup installs them")
    done = subprocess.run(
        [sys.executable, str(REPO / "integrations/containerd/scripts/generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
