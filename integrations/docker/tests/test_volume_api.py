"""The VolumeDriver plugin's HTTP API through a real unix-socket client, as dockerd speaks it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from plugin_proc import GRAPHDRIVER, UnixConnection, VolumePlugin, running

from graphdriver.linux.mount import is_mountpoint, unmount_all_under

ID_A = "a" * 64
ID_B = "b" * 64


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[VolumePlugin]:
    try:
        with running(tmp_path / "store", "gd-test", tmp_path / "plugin.sock") as plugin:
            yield plugin
    finally:
        unmount_all_under(tmp_path)


@pytest.fixture
def conn(plugin: VolumePlugin) -> Iterator[UnixConnection]:
    conn = plugin.connect()
    yield conn
    conn.close()


def test_activate_and_capabilities(conn: UnixConnection) -> None:
    assert conn.call("Plugin.Activate") == (200, {"Implements": ["VolumeDriver"], "Err": ""})
    assert conn.call("VolumeDriver.Capabilities") == (
        200,
        {"Capabilities": {"Scope": "local"}, "Err": ""},
    )


def test_volume_lifecycle(plugin: VolumePlugin, conn: UnixConnection) -> None:
    """Create, Get, List, Path, Mount by two IDs, Unmount, Remove: the data lands in the store's
    volume directory and the store's own CLI sees the volume come and go."""
    assert conn.call("VolumeDriver.Create", {"Name": "v1", "Opts": None}) == (200, {"Err": ""})
    data = plugin.root / "volumes" / "v1" / "_data"
    assert plugin.volumes() == ["v1"]
    status, got = conn.call("VolumeDriver.Get", {"Name": "v1"})
    assert status == 200 and got["Err"] == ""
    assert got["Volume"]["Name"] == "v1"
    assert got["Volume"]["Mountpoint"] == str(data)
    assert got["Volume"]["Status"]["MountCount"] == 0
    assert conn.call("VolumeDriver.List", {}) == (
        200,
        {"Volumes": [{"Name": "v1", "Mountpoint": str(data)}], "Err": ""},
    )
    assert conn.call("VolumeDriver.Path", {"Name": "v1"}) == (
        200,
        {"Mountpoint": str(data), "Err": ""},
    )

    for mount_id in (ID_A, ID_B):
        assert conn.call("VolumeDriver.Mount", {"Name": "v1", "ID": mount_id}) == (
            200,
            {"Mountpoint": str(data), "Err": ""},
        )
    (data / "f").write_text("x\n")
    assert conn.call("VolumeDriver.Get", {"Name": "v1"})[1]["Volume"]["Status"]["MountCount"] == 2

    assert conn.call("VolumeDriver.Unmount", {"Name": "v1", "ID": ID_A}) == (200, {"Err": ""})
    assert conn.call("VolumeDriver.Get", {"Name": "v1"})[1]["Volume"]["Status"]["MountCount"] == 1
    assert (data / "f").read_text() == "x\n"
    # dockerd asks for a Remove only once no container of its own uses the volume: ID_B is a
    # mount a dockerd killed meanwhile never unmounted (it sends no Unmount for the containers
    # it finds dead as it starts again): released, or the volume could never be removed
    assert conn.call("VolumeDriver.Remove", {"Name": "v1"}) == (200, {"Err": ""})
    assert not data.exists()
    assert "releasing dockerd mount ID bbbbbbbbbbbb, which was never unmounted" in plugin.output()
    assert plugin.volumes() == []
    assert conn.call("VolumeDriver.List", {}) == (200, {"Volumes": [], "Err": ""})


def test_create_is_idempotent_and_checks_options(conn: UnixConnection) -> None:
    """dockerd may create a name again: the same options answer success, others an Err."""
    assert conn.call("VolumeDriver.Create", {"Name": "v1", "Opts": {}})[1] == {"Err": ""}
    assert conn.call("VolumeDriver.Create", {"Name": "v1"})[1] == {"Err": ""}
    _, got = conn.call(
        "VolumeDriver.Create", {"Name": "v1", "Opts": {"type": "tmpfs", "device": "tmpfs"}}
    )
    assert "already exists" in got["Err"]
    _, got = conn.call("VolumeDriver.Create", {"Name": "v2", "Opts": {"colour": "red"}})
    assert "no option 'colour'" in got["Err"]
    _, got = conn.call(
        "VolumeDriver.Create", {"Name": "v2", "Opts": {"volume-driver": "nosuchdriver"}}
    )
    assert "nosuchdriver" in got["Err"]
    _, got = conn.call("VolumeDriver.Create", {"Name": "../etc"})
    assert "invalid volume name" in got["Err"]


@pytest.mark.privileged
def test_local_driver_options_mount_a_tmpfs(plugin: VolumePlugin, conn: UnixConnection) -> None:
    """Opts reach the store's local driver: a tmpfs mounted for the first mount ID only, and
    unmounted after the last one."""
    opts = {"volume-driver": "local", "type": "tmpfs", "device": "tmpfs", "o": "size=4m"}
    assert conn.call("VolumeDriver.Create", {"Name": "t1", "Opts": opts})[1] == {"Err": ""}
    _, got = conn.call("VolumeDriver.Mount", {"Name": "t1", "ID": ID_A})
    mountpoint = Path(got["Mountpoint"])
    assert is_mountpoint(mountpoint)
    conn.call("VolumeDriver.Mount", {"Name": "t1", "ID": ID_B})
    _, got = conn.call("VolumeDriver.Get", {"Name": "t1"})
    del opts["volume-driver"]  # picks the driver, is not one of its options
    assert got["Volume"]["Status"]["Options"] == opts
    conn.call("VolumeDriver.Unmount", {"Name": "t1", "ID": ID_A})
    assert is_mountpoint(mountpoint)
    conn.call("VolumeDriver.Unmount", {"Name": "t1", "ID": ID_B})
    assert not is_mountpoint(mountpoint)
    assert conn.call("VolumeDriver.Remove", {"Name": "t1"})[1] == {"Err": ""}


def test_unknown_volume(conn: UnixConnection) -> None:
    for method, body in (
        ("Get", {"Name": "nope"}),
        ("Path", {"Name": "nope"}),
        ("Mount", {"Name": "nope", "ID": ID_A}),
        ("Unmount", {"Name": "nope", "ID": ID_A}),
        ("Remove", {"Name": "nope"}),
    ):
        status, got = conn.call(f"VolumeDriver.{method}", body)
        assert (status, got) == (200, {"Err": "volume 'nope' does not exist"}), method


def test_bad_requests(conn: UnixConnection) -> None:
    """Malformed JSON, a wrong type, a missing field: an Err each, the connection still good."""
    status, got = conn.call("VolumeDriver.Create", raw=b'{"Name": "v1",')
    assert status == 200 and "request body is not JSON" in got["Err"]
    _, got = conn.call("VolumeDriver.Create", raw=b"[1, 2]")
    assert "not a JSON object" in got["Err"]
    _, got = conn.call("VolumeDriver.Create", {"Name": 7})
    assert got["Err"] == "Name must be a string, not int"
    _, got = conn.call("VolumeDriver.Create", {"Name": "v1", "Opts": {"o": 1}})
    assert got["Err"] == "Opts must be an object of strings"
    _, got = conn.call("VolumeDriver.Mount", {"Name": "v1"})
    assert got["Err"] == "the request has no ID"
    assert conn.call("VolumeDriver.List") == (200, {"Volumes": [], "Err": ""})


def test_unknown_endpoint(conn: UnixConnection) -> None:
    status, got = conn.call("VolumeDriver.Frobnicate", {"Name": "v1"})
    assert status == 404 and "/VolumeDriver.Frobnicate: no such plugin endpoint" in got["Err"]
    status, got = conn.call("GraphDriver.Init", {"Home": "/x"})
    assert status == 404 and got["Err"]


def test_keep_alive_after_a_failed_call(plugin: VolumePlugin) -> None:
    """A failed call with a body (Content-Length, then chunked) is answered and its body read
    to the end: the next request on the same connection is answered, not misparsed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(plugin.socket))
    reader = sock.makefile("rb")

    def answer() -> tuple[bytes, bytes]:
        status = reader.readline()
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, reader.read(length)

    try:
        junk = b'{"Name": "nope", "Pad": "' + b"z" * 70000 + b'"}'
        sock.sendall(
            b"POST /VolumeDriver.Path HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(junk), junk)
        )
        sock.sendall(
            b"POST /VolumeDriver.Nope HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5\r\n{"a":\r\n3;ext=1\r\n 1}\r\n0\r\nTrailer: t\r\n\r\n'
        )
        sock.sendall(
            b"POST /VolumeDriver.Create HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'4\r\n{"Na\r\nb\r\nme": "ok1"}\r\n0\r\n\r\n'
        )
        sock.sendall(b"POST /VolumeDriver.List HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        status, body = answer()
        assert status.startswith(b"HTTP/1.1 200") and b"does not exist" in body
        status, body = answer()
        assert status.startswith(b"HTTP/1.1 404") and b"no such plugin endpoint" in body
        assert answer() == (b"HTTP/1.1 200 OK\r\n", b'{"Err": ""}\n')
        status, body = answer()
        assert status.startswith(b"HTTP/1.1 200") and b'"Name": "ok1"' in body
    finally:
        reader.close()
        sock.close()


def test_broken_framing_closes_the_connection(plugin: VolumePlugin) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(plugin.socket))
    try:
        sock.sendall(
            b"POST /VolumeDriver.List HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\n{}\r\n0\r\n\r\n"
        )
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        assert got.startswith(b"HTTP/1.1 400") and b"bad chunk size" in got
    finally:
        sock.close()
    with plugin.connect() as conn:  # the server still serves
        assert conn.call("VolumeDriver.List")[0] == 200


def test_a_malformed_request_line_gets_err_in_json(plugin: VolumePlugin) -> None:
    """http.server's own refusals are JSON with Err like every other answer, not its HTML
    error page."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(plugin.socket))
    try:
        sock.sendall(b"NOT A REQUEST LINE AT ALL\r\n\r\n")
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    finally:
        sock.close()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"json" in head, got
    assert json.loads(body)["Err"].startswith("bad request: "), got


def test_restart_keeps_mount_counts(plugin: VolumePlugin) -> None:
    """A plugin killed with SIGKILL and started again still counts the mounts it gave out,
    until every ID has unmounted."""
    with plugin.connect() as conn:
        conn.call("VolumeDriver.Create", {"Name": "v1"})
        conn.call("VolumeDriver.Mount", {"Name": "v1", "ID": ID_A})
        conn.call("VolumeDriver.Mount", {"Name": "v1", "ID": ID_B})
    assert plugin.stop(signal.SIGKILL) == -signal.SIGKILL
    assert plugin.socket.is_socket()  # left behind by the killed plugin: replaced at start
    plugin.start()
    with plugin.connect() as conn:
        assert (
            conn.call("VolumeDriver.Get", {"Name": "v1"})[1]["Volume"]["Status"]["MountCount"] == 2
        )
        conn.call("VolumeDriver.Unmount", {"Name": "v1", "ID": ID_A})
    assert plugin.stop() == 0
    assert not plugin.socket.exists()
    plugin.start()
    with plugin.connect() as conn:
        assert (
            conn.call("VolumeDriver.Get", {"Name": "v1"})[1]["Volume"]["Status"]["MountCount"] == 1
        )
        conn.call("VolumeDriver.Unmount", {"Name": "v1", "ID": ID_B})
        assert conn.call("VolumeDriver.Remove", {"Name": "v1"}) == (200, {"Err": ""})


def test_serve_refusals(plugin: VolumePlugin, tmp_path: Path) -> None:
    """One plugin per root; a path that is not a socket, or a bad name, refused in one line."""

    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [GRAPHDRIVER, *args], capture_output=True, text=True, timeout=60, check=False
        )

    other = tmp_path / "other.sock"
    got = serve("--root", str(plugin.root), "serve", "docker-volume", "--name", "x",
                "--socket", str(other))  # fmt: skip
    assert got.returncode != 0 and "already serves" in got.stderr
    assert len(got.stderr.strip().splitlines()) == 1

    regular = tmp_path / "file.sock"
    regular.write_text("")
    got = serve("--root", str(tmp_path / "r2"), "serve", "docker-volume", "--name", "x",
                "--socket", str(regular))  # fmt: skip
    assert got.returncode != 0 and "is not a socket" in got.stderr
    assert regular.read_text() == ""

    got = serve("--root", str(tmp_path / "r2"), "serve", "docker-volume", "--name", "../x")
    assert got.returncode != 0 and "plugin name '../x'" in got.stderr

    got = serve("--root", str(tmp_path / "r2"), "serve", "docker-volume", "--name", "x",
                "--socket", str(plugin.socket))  # fmt: skip
    assert got.returncode != 0 and "in use" in got.stderr
    assert os.path.exists(plugin.socket)
