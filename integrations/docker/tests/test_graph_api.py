"""The GraphDriver plugin's HTTP API through a real unix-socket client, as dockerd speaks it
(moby's daemon/graphdriver/proxy.go), on vfs in a temporary directory."""

from __future__ import annotations

import gzip
import io
import json
import signal
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from plugin_proc import GraphPlugin, UnixConnection, running_graph

from graphdriver.linux.mount import unmount_all_under
from graphdriver.testing import Backing, backing_or_skip

IMAGE = "1" * 64
INIT = "2" * 64 + "-init"
CONTAINER = "2" * 64
APPLIED = "3" * 64
TOP = "4" * 64
ACCEPT = {"Accept": "application/vnd.docker.plugins.v1.2+json"}


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[GraphPlugin]:
    try:
        with running_graph(tmp_path / "store", "vfs", "gd-graph", tmp_path / "g.sock") as plugin:
            yield plugin
    finally:
        unmount_all_under(tmp_path)


@pytest.fixture
def conn(plugin: GraphPlugin) -> Iterator[UnixConnection]:
    conn = plugin.connect()
    yield conn
    conn.close()


def ok(conn: UnixConnection, method: str, body: Any = None) -> dict[str, Any]:
    """Call GraphDriver.*method*; its answer, which must be a success."""
    status, answer = conn.call(f"GraphDriver.{method}", body)
    assert (status, answer["Err"]) == (200, ""), answer
    return dict(answer)


def err(conn: UnixConnection, method: str, body: Any = None) -> str:
    """Call GraphDriver.*method*; its Err, which must not be empty (HTTP 200, as dockerd
    expects for a driver's error)."""
    status, answer = conn.call(f"GraphDriver.{method}", body)
    assert status == 200 and answer["Err"], answer
    return str(answer["Err"])


def diff(conn: UnixConnection, layer: str, parent: str = "") -> bytes:
    """GraphDriver.Diff: the raw tar, read from the chunked answer."""
    conn.request(
        "POST",
        "/GraphDriver.Diff",
        body=json.dumps({"ID": layer, "Parent": parent}).encode(),
        headers=ACCEPT,
    )
    resp = conn.getresponse()
    data = resp.read()
    assert resp.status == 200
    assert resp.getheader("Transfer-Encoding") == "chunked"
    assert resp.getheader("Content-Type") == "application/x-tar"
    return data


def apply_diff(conn: UnixConnection, layer: str, parent: str, tar: bytes) -> tuple[int, Any]:
    """GraphDriver.ApplyDiff with the tar sent chunked, as dockerd's SendFile does."""
    conn.request(
        "POST",
        f"/GraphDriver.ApplyDiff?id={layer}&parent={parent}",
        body=iter([tar[i : i + 7000] for i in range(0, len(tar), 7000)]),
        headers={**ACCEPT, "Content-Type": "application/x-tar"},
        encode_chunked=True,
    )
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def names(tar: bytes) -> dict[str, bytes | None]:
    """Each member of *tar*: a file's data, None for anything else."""
    out: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf:
            f = tf.extractfile(m) if m.isfile() else None
            out[m.name.rstrip("/")] = f.read() if f else None
    return out


def test_activate_init_capabilities_status(plugin: GraphPlugin, conn: UnixConnection) -> None:
    assert conn.call("Plugin.Activate") == (200, {"Implements": ["GraphDriver"], "Err": ""})
    assert ok(conn, "Init", {"Home": "/var/lib/docker/x", "Opts": [], "UIDMaps": None}) == {
        "Err": ""
    }
    assert "--storage-opt" in err(conn, "Init", {"Home": "/h", "Opts": ["overlay2.size=1G"]})
    uid = [{"ContainerID": 0, "HostID": 100000, "Size": 65536}]
    assert "userns-remap" in err(conn, "Init", {"Home": "/h", "UIDMaps": uid})
    assert ok(conn, "Capabilities") == {
        "Capabilities": {"ReproducesExactDiffs": True},
        "Err": "",
    }
    status = ok(conn, "Status")["Status"]
    assert ["Storage Driver", "vfs"] in status
    assert ["Layers", "0"] in status
    assert all(isinstance(p, list) and len(p) == 2 for p in status)


def test_layer_lifecycle(plugin: GraphPlugin, conn: UnixConnection) -> None:
    """An image layer, a container's init and rw layers on it; Get gives a directory that
    takes writes, counted per Get; Changes and Diff see the writes; Remove."""
    ok(conn, "Create", {"ID": IMAGE, "MountLabel": "", "StorageOpt": None})
    image_dir = Path(ok(conn, "Get", {"ID": IMAGE, "MountLabel": ""})["Dir"])
    (image_dir / "etc").mkdir()
    (image_dir / "etc" / "os-release").write_text("ID=test\n")
    (image_dir / "gone").write_text("x\n")
    ok(conn, "Put", {"ID": IMAGE})

    ok(conn, "CreateReadWrite", {"ID": INIT, "Parent": IMAGE, "StorageOpt": {}})
    ok(conn, "CreateReadWrite", {"ID": CONTAINER, "Parent": INIT})
    assert ok(conn, "Exists", {"ID": CONTAINER}) == {"Exists": True, "Err": ""}
    assert ok(conn, "Exists", {"ID": "9" * 64}) == {"Exists": False, "Err": ""}

    first = Path(ok(conn, "Get", {"ID": CONTAINER, "MountLabel": ""})["Dir"])
    second = Path(ok(conn, "Get", {"ID": CONTAINER})["Dir"])
    assert first == second
    assert (first / "etc" / "os-release").read_text() == "ID=test\n"
    (first / "etc" / "os-release").write_text("ID=changed\n")
    (first / "new").write_text("new\n")
    (first / "gone").unlink()
    meta = ok(conn, "GetMetadata", {"ID": CONTAINER})["Metadata"]
    assert meta["parent"] == INIT and meta["rw"] == "true" and meta["mount_count"] == "2"
    assert all(isinstance(v, str) for v in meta.values())
    ok(conn, "Put", {"ID": CONTAINER})
    ok(conn, "Put", {"ID": CONTAINER})
    assert "not mounted" in err(conn, "Put", {"ID": CONTAINER})
    assert ok(conn, "GetMetadata", {"ID": CONTAINER})["Metadata"]["mount_count"] == "0"

    changes = ok(conn, "Changes", {"ID": CONTAINER, "Parent": INIT})["Changes"]
    assert changes == [
        {"Path": "/etc", "Kind": 0},
        {"Path": "/etc/os-release", "Kind": 0},
        {"Path": "/gone", "Kind": 2},
        {"Path": "/new", "Kind": 1},
    ]
    tar = names(diff(conn, CONTAINER, INIT))
    assert tar["etc/os-release"] == b"ID=changed\n"
    assert tar["new"] == b"new\n"
    assert tar[".wh.gone"] == b""
    assert ["Layers", "3"] in ok(conn, "Status")["Status"]

    assert "has children" in err(conn, "Remove", {"ID": IMAGE})
    for layer in (CONTAINER, INIT, IMAGE):
        ok(conn, "Remove", {"ID": layer})
        assert ok(conn, "Exists", {"ID": layer})["Exists"] is False
    ok(conn, "Remove", {"ID": IMAGE})  # already gone: removed, as dockerd's own drivers say
    assert plugin.layers() == []
    ok(conn, "Cleanup")


def test_remove_releases_only_dockerds_mounts_and_cleanup_unmounts_nothing(
    plugin: GraphPlugin, conn: UnixConnection
) -> None:
    """Remove releases the Gets dockerd never put back (a dockerd that died), not a mount
    of someone else's (`graphdriver mount`), which still refuses it; Cleanup (dockerd's
    shutdown) unmounts nothing: it used to unmount every layer, whoever mounted it, and a
    layer mounted by the CLI could then be removed under its user."""
    ok(conn, "Create", {"ID": IMAGE})
    ok(conn, "Get", {"ID": IMAGE})
    ok(conn, "Get", {"ID": IMAGE})
    subprocess.run(plugin.command("mount", IMAGE), check=True, capture_output=True)
    ok(conn, "Cleanup")
    assert ok(conn, "GetMetadata", {"ID": IMAGE})["Metadata"]["mount_count"] == "3"
    assert "is mounted (1 reference(s))" in err(conn, "Remove", {"ID": IMAGE})
    assert ok(conn, "GetMetadata", {"ID": IMAGE})["Metadata"]["mount_count"] == "1"
    assert "never put back" in plugin.output()
    assert "is mounted (1 reference(s))" in err(conn, "Remove", {"ID": IMAGE})  # again
    assert ok(conn, "GetMetadata", {"ID": IMAGE})["Metadata"]["mount_count"] == "1"  # the CLI's
    subprocess.run(plugin.command("umount", IMAGE), check=True)
    ok(conn, "Remove", {"ID": IMAGE})
    assert plugin.layers() == []
    ok(conn, "Create", {"ID": IMAGE})  # the same id again: no Get of the old one counts
    ok(conn, "Get", {"ID": IMAGE})
    ok(conn, "Put", {"ID": IMAGE})
    assert "not mounted" in err(conn, "Put", {"ID": IMAGE})
    ok(conn, "Remove", {"ID": IMAGE})


def test_gets_of_a_boot_before_are_not_dockerds_any_more(plugin: GraphPlugin) -> None:
    """A reboot took dockerd's mounts: a mount taken since (`graphdriver mount`) is not one
    of them, and still refuses the removal (dockerd's Gets of the boot before released it)."""
    import sqlite3

    with plugin.connect() as conn:
        ok(conn, "Create", {"ID": IMAGE})
        ok(conn, "Get", {"ID": IMAGE})
    assert plugin.stop() == 0
    with sqlite3.connect(plugin.root / "docker" / "graph-vfs.db") as db:
        db.execute("UPDATE gets SET boot='a boot before'")  # what a reboot makes of them
    subprocess.run(plugin.command("cleanup"), check=True)  # (what the reboot took)
    subprocess.run(plugin.command("mount", IMAGE), check=True, capture_output=True)
    plugin.start()
    with plugin.connect() as conn:
        assert "is mounted (1 reference(s))" in err(conn, "Remove", {"ID": IMAGE})
    subprocess.run(plugin.command("umount", IMAGE), check=True)


def test_diff_then_apply_diff_round_trip(plugin: GraphPlugin, conn: UnixConnection) -> None:
    """Diff of a layer, ApplyDiff of that tar (chunked, ?id=&parent=) into a fresh layer:
    Size is the bodies' bytes, DiffSize those and the symlinks' targets, and the applied
    layer's Diff is the uploaded tar byte for byte."""
    ok(conn, "Create", {"ID": IMAGE})
    root = Path(ok(conn, "Get", {"ID": IMAGE})["Dir"])
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    (root / "bin" / "tool").chmod(0o755)
    (root / "link").symlink_to("bin/tool")
    ok(conn, "Put", {"ID": IMAGE})
    tar = diff(conn, IMAGE)
    assert set(names(tar)) == {"bin", "bin/tool", "link"}

    ok(conn, "Create", {"ID": APPLIED})
    status, answer = apply_diff(conn, APPLIED, "", tar)
    assert (status, answer["Err"]) == (200, "")
    size = ok(conn, "DiffSize", {"ID": APPLIED})["Size"]
    assert answer["Size"] == 4 + 256 * 40  # what the tar's bodies hold
    # a symlink counts its target too, as moby's ChangesSize and overlay2 count it (docker ps -s)
    assert size == 4 + 256 * 40 + len("bin/tool")
    assert ok(conn, "Capabilities")["Capabilities"]["ReproducesExactDiffs"] is True
    assert diff(conn, APPLIED) == tar

    # a child applied with its parent named in the URL
    ok(conn, "Create", {"ID": TOP, "Parent": APPLIED})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("bin/.wh.tool")
        tf.addfile(info, io.BytesIO(b""))
    status, answer = apply_diff(conn, TOP, APPLIED, buf.getvalue())
    assert (status, answer) == (200, {"Size": 0, "Err": ""})
    assert diff(conn, TOP, APPLIED) == buf.getvalue()  # the parent named, as dockerd does
    changes = ok(conn, "Changes", {"ID": TOP, "Parent": APPLIED})["Changes"]
    assert {"Path": "/bin/tool", "Kind": 2} in changes
    top = Path(ok(conn, "Get", {"ID": TOP})["Dir"])
    assert not (top / "bin" / "tool").exists() and (top / "bin").is_dir()
    ok(conn, "Put", {"ID": TOP})


def test_bad_input(plugin: GraphPlugin, conn: UnixConnection) -> None:
    """Unknown ids and parents, bad StorageOpt, a malformed body, a tar that is not one: an
    Err each, nothing made, and the next request on the same kept-alive connection is answered
    right."""
    unknown = "9" * 64
    assert "does not exist" in err(conn, "Get", {"ID": unknown})
    assert "does not exist" in err(conn, "Create", {"ID": IMAGE, "Parent": unknown})
    assert ok(conn, "Exists", {"ID": IMAGE})["Exists"] is False
    assert "invalid layer id" in err(conn, "Create", {"ID": "../etc"})
    assert "storage option 'quota'" in err(
        conn, "CreateReadWrite", {"ID": IMAGE, "StorageOpt": {"quota": "1"}}
    )
    assert "invalid size" in err(
        conn, "CreateReadWrite", {"ID": IMAGE, "StorageOpt": {"size": "x"}}
    )
    assert "cannot limit" in err(
        conn, "CreateReadWrite", {"ID": IMAGE, "StorageOpt": {"size": "10M"}}
    )
    assert ok(conn, "Exists", {"ID": IMAGE})["Exists"] is False
    status, answer = conn.call("GraphDriver.Create", raw=b"{not json")
    assert status == 200 and "not JSON" in answer["Err"]
    assert "does not exist" in err(conn, "Diff", {"ID": unknown})
    assert "does not exist" in err(conn, "Changes", {"ID": unknown})
    assert "does not exist" in err(conn, "DiffSize", {"ID": unknown})
    assert "does not exist" in err(conn, "GetMetadata", {"ID": unknown})

    ok(conn, "Create", {"ID": IMAGE})
    status, answer = apply_diff(conn, IMAGE, "", b"this is not a tar\n" * 5000)
    assert status == 200 and answer["Err"]
    assert ok(conn, "Exists", {"ID": IMAGE})["Exists"] is True
    assert ok(conn, "Changes", {"ID": IMAGE})["Changes"] == []
    assert ok(conn, "DiffSize", {"ID": IMAGE})["Size"] == 0

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        data = b"half" * 2000
        info = tarfile.TarInfo("kept-out")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    truncated = buf.getvalue()[:3000]  # the file's data cut short
    status, answer = apply_diff(conn, IMAGE, "", truncated)
    assert status == 200 and answer["Err"]
    assert ok(conn, "Changes", {"ID": IMAGE})["Changes"] == []
    status, answer = apply_diff(conn, IMAGE, "1" * 64, b"")
    assert "has no parent, not '1111" in answer["Err"]

    # the same connection still answers right
    assert ok(conn, "Exists", {"ID": IMAGE})["Exists"] is True
    assert conn.call("Plugin.Activate") == (200, {"Implements": ["GraphDriver"], "Err": ""})


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_apply_diff_refuses_what_its_diff_could_not_give_back(
    plugin: GraphPlugin, conn: UnixConnection
) -> None:
    """dockerd hashes the bytes it sends and, as the plugin reproduces exact diffs, expects
    Diff to give them back (`docker save` checks): a compressed tar (dockerd 20.10 passes a
    zstd import as it is), or one that names a path twice, is refused and rolled back, as
    dockerd's own drivers refuse them. They used to be unpacked, and `docker save` then
    failed: "could not verify layer data"."""
    plain = tar_of({"a": b"1"})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for data in (b"first", b"second"):  # f, then f again
            info = tarfile.TarInfo("f")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    twice = buf.getvalue()
    for tar, why in (
        (gzip.compress(plain), "uncompressed tar; this one is gzip-compressed"),
        (b"\x28\xb5\x2f\xfd" + plain, "uncompressed tar; this one is zstd-compressed"),
        (twice, "its diff could not be this tar again, byte for byte (a file of the tar"),
    ):
        ok(conn, "Create", {"ID": IMAGE})
        status, answer = apply_diff(conn, IMAGE, "", tar)
        assert status == 200 and why in answer["Err"], answer
        assert ok(conn, "Changes", {"ID": IMAGE})["Changes"] == []  # rolled back
        ok(conn, "Remove", {"ID": IMAGE})
    ok(conn, "Create", {"ID": IMAGE})
    assert apply_diff(conn, IMAGE, "", plain) == (200, {"Size": 1, "Err": ""})
    assert diff(conn, IMAGE) == plain


def test_client_gone_mid_apply_diff(plugin: GraphPlugin, conn: UnixConnection) -> None:
    """dockerd disconnects in the middle of an ApplyDiff's body: other calls are answered
    while it waits for the body, the layer is emptied again, the plugin keeps serving, and
    the layer then takes the whole tar."""
    tar = tar_of({"a": b"a" * 300_000, "b": b"b" * 10})
    ok(conn, "Create", {"ID": IMAGE})
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(plugin.socket))
        client.sendall(
            f"POST /GraphDriver.ApplyDiff?id={IMAGE}&parent= HTTP/1.1\r\n"
            f"Host: plugin\r\nContent-Length: {len(tar)}\r\n\r\n".encode()
            + tar[:100_000]
        )
        # wait until the store records the layer as being filled (its own CLI says it is not
        # ready), so that the next call is queued behind the apply
        deadline = time.monotonic() + 30
        while subprocess.run(plugin.command("exists", IMAGE), check=False).returncode == 0:
            assert time.monotonic() < deadline, "the apply did not start"
            time.sleep(0.05)
        # another call is answered meanwhile: the apply runs on a store of its own (on the
        # store thread, a stalled upload held up every call until it ended)
        with plugin.connect() as other:
            assert ok(other, "Exists", {"ID": TOP})["Exists"] is False
            ok(other, "Create", {"ID": TOP})
            assert ok(other, "Get", {"ID": TOP})["Dir"]
            ok(other, "Put", {"ID": TOP})
    finally:
        client.close()
    deadline = time.monotonic() + 30
    while subprocess.run(plugin.command("exists", IMAGE), check=False).returncode != 0:
        assert time.monotonic() < deadline, "the apply was not rolled back"
        time.sleep(0.05)
    with plugin.connect() as fresh:
        assert ok(fresh, "Changes", {"ID": IMAGE})["Changes"] == []
        assert ok(fresh, "Exists", {"ID": IMAGE})["Exists"] is True
        assert apply_diff(fresh, IMAGE, "", tar) == (200, {"Size": 300_010, "Err": ""})
        assert diff(fresh, IMAGE) == tar
    assert plugin.proc is not None and plugin.proc.poll() is None  # still serving


def test_client_gone_mid_diff(plugin: GraphPlugin, conn: UnixConnection) -> None:
    """dockerd disconnects in the middle of a Diff: the layer, held while its tar streams
    (Remove is refused), is released, and the plugin keeps serving."""
    ok(conn, "Create", {"ID": IMAGE})
    root = Path(ok(conn, "Get", {"ID": IMAGE})["Dir"])
    (root / "big").write_bytes(bytes(range(256)) * 32768)  # 8 MiB: more than socket buffers
    ok(conn, "Put", {"ID": IMAGE})
    conn.request("POST", "/GraphDriver.Diff", body=json.dumps({"ID": IMAGE}), headers=ACCEPT)
    resp = conn.getresponse()
    assert resp.status == 200 and len(resp.read(65536)) == 65536
    with plugin.connect() as other:
        assert "being read" in err(other, "Remove", {"ID": IMAGE})
        conn.close()
        deadline = time.monotonic() + 30
        while True:  # the plugin sees the disconnect at its next write
            status, answer = other.call("GraphDriver.Remove", {"ID": IMAGE})
            assert status == 200
            if not answer["Err"]:
                break
            assert "being read" in answer["Err"] and time.monotonic() < deadline, answer
            time.sleep(0.05)
        assert ok(other, "Exists", {"ID": IMAGE})["Exists"] is False
    assert plugin.layers() == []


def test_restart_after_sigkill_keeps_layers_and_mounts(plugin: GraphPlugin) -> None:
    """A plugin killed with SIGKILL and started again: the layers and their mount counts are
    there, a second plugin on the same store is refused, and the next calls work."""
    with plugin.connect() as conn:
        ok(conn, "Create", {"ID": IMAGE})
        ok(conn, "CreateReadWrite", {"ID": CONTAINER, "Parent": IMAGE})
        merged = Path(ok(conn, "Get", {"ID": CONTAINER})["Dir"])
        (merged / "f").write_text("kept\n")
    assert plugin.stop(signal.SIGKILL) == -signal.SIGKILL
    plugin.start()
    second = GraphPlugin(plugin.root, "vfs", "gd-graph-2", plugin.socket.with_name("g2.sock"))
    refused = subprocess.run(second.serve_command(), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "already serves" in refused.stderr
    with plugin.connect() as conn:
        assert ok(conn, "Exists", {"ID": CONTAINER})["Exists"] is True
        assert ok(conn, "GetMetadata", {"ID": CONTAINER})["Metadata"]["mount_count"] == "1"
        assert Path(ok(conn, "Get", {"ID": CONTAINER})["Dir"]) == merged
        assert (merged / "f").read_text() == "kept\n"
        ok(conn, "Put", {"ID": CONTAINER})
        ok(conn, "Put", {"ID": CONTAINER})
        assert ok(conn, "Changes", {"ID": CONTAINER})["Changes"] == [{"Path": "/f", "Kind": 1}]
    assert plugin.layers() == sorted([IMAGE, CONTAINER])


@pytest.fixture(scope="module")
def xfs() -> Iterator[Backing]:
    yield from backing_or_skip("loop-xfs")


@pytest.mark.privileged
def test_overlay_lifecycle(xfs: Backing, request: pytest.FixtureRequest) -> None:
    """On overlay on loop-xfs: a layer applied from a tar, a container layer on it that Get
    mounts and that takes writes, its Changes and Diff, Remove."""
    root = xfs.root / request.node.name
    root.mkdir()
    with (
        running_graph(
            root / "store", "overlay", "gd-graph-ov", root / "g.sock", xfs.options
        ) as plugin,
        plugin.connect() as conn,
    ):
        tar = tar_of({"etc/hostname": b"image\n", "usr/lib/data": b"d" * 5000})
        ok(conn, "Create", {"ID": IMAGE})
        assert apply_diff(conn, IMAGE, "", tar) == (200, {"Size": 5006, "Err": ""})
        assert diff(conn, IMAGE) == tar
        ok(conn, "CreateReadWrite", {"ID": CONTAINER, "Parent": IMAGE})
        merged = Path(ok(conn, "Get", {"ID": CONTAINER})["Dir"])
        assert (merged / "etc" / "hostname").read_bytes() == b"image\n"
        (merged / "etc" / "hostname").write_bytes(b"container\n")
        (merged / "usr" / "lib" / "data").unlink()
        ok(conn, "Put", {"ID": CONTAINER})
        assert ok(conn, "Changes", {"ID": CONTAINER, "Parent": IMAGE})["Changes"] == [
            {"Path": "/etc", "Kind": 0},
            {"Path": "/etc/hostname", "Kind": 0},
            {"Path": "/usr", "Kind": 0},
            {"Path": "/usr/lib", "Kind": 0},
            {"Path": "/usr/lib/data", "Kind": 2},
        ]
        members = names(diff(conn, CONTAINER, IMAGE))
        assert members["etc/hostname"] == b"container\n"
        assert members["usr/lib/.wh.data"] == b""
        assert ["Storage Driver", "overlay"] in ok(conn, "Status")["Status"]
        for layer in (CONTAINER, IMAGE):
            ok(conn, "Remove", {"ID": layer})
        assert plugin.layers() == []
