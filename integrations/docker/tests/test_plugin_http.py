"""The plugin HTTP layer on its own: what the GraphDriver plugin will also stand on (streamed
request bodies, raw chunked answers, several plugin kinds on one socket), with test plugins
served in-process on a real unix socket."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from plugin_proc import UnixConnection

from graphdriver_docker.http import MAX_JSON_BODY, Plugin, PluginServer, RawResponse, Request


def digest(request: Request) -> dict[str, object]:
    """A streaming endpoint: hashes the raw body, as ApplyDiff will read a tar."""
    h = hashlib.sha256()
    size = 0
    while chunk := request.body.read(4096):
        h.update(chunk)
        size += len(chunk)
    return {"Size": size, "Sha256": h.hexdigest(), "Id": request.query.get("id", "")}


def numbers(request: Request) -> RawResponse:
    """A raw answer, as Diff will stream a tar."""
    count = int(request.json().get("Count", 0))
    return RawResponse(b"%d\n" % i for i in range(count))


def broken_stream(request: Request) -> RawResponse:
    def chunks() -> Iterator[bytes]:
        yield b"first part\n"
        raise OSError("the layer went away")

    return RawResponse(chunks())


def bug(request: Request) -> dict[str, object]:
    raise ZeroDivisionError("a bug")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "plugin.sock"
    srv = PluginServer(
        str(path),
        [
            Plugin("GraphDriver", {"/GraphDriver.Digest": digest, "/GraphDriver.Numbers": numbers,
                                   "/GraphDriver.Broken": broken_stream, "/GraphDriver.Bug": bug}),
            Plugin("VolumeDriver", {"/VolumeDriver.Echo": lambda r: {"Got": r.json()}}),
        ],
    )  # fmt: skip
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(30)


def test_activate_lists_every_kind(server: Path) -> None:
    with UnixConnection(server) as conn:
        assert conn.call("Plugin.Activate") == (
            200,
            {"Implements": ["GraphDriver", "VolumeDriver"], "Err": ""},
        )
        assert conn.call("VolumeDriver.Echo", {"A": [1]}) == (200, {"Got": {"A": [1]}, "Err": ""})


def test_streamed_chunked_body_with_a_query(server: Path) -> None:
    """A body sent chunked (as dockerd sends a layer to ApplyDiff) reaches a streaming
    endpoint whole, with the URL's query; a second call follows on the same connection."""
    data = bytes(range(256)) * 5000
    parts = [data[i : i + 70001] for i in range(0, len(data), 70001)]
    with UnixConnection(server) as conn:
        conn.request(
            "POST", "/GraphDriver.Digest?id=abc&parent=", body=iter(parts), encode_chunked=True
        )
        got = json.loads(conn.getresponse().read())
        assert got == {
            "Size": len(data),
            "Sha256": hashlib.sha256(data).hexdigest(),
            "Id": "abc",
            "Err": "",
        }
        assert conn.call("VolumeDriver.Echo", {"B": 2}) == (200, {"Got": {"B": 2}, "Err": ""})


def test_raw_answer_is_chunked(server: Path) -> None:
    with UnixConnection(server) as conn:
        conn.request("POST", "/GraphDriver.Numbers", body=b'{"Count": 1000}')
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "application/x-tar"
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.read() == b"".join(b"%d\n" % i for i in range(1000))
        assert conn.call("VolumeDriver.Echo", {})[0] == 200  # kept alive after it


def test_raw_answer_that_fails_is_cut_short(server: Path) -> None:
    """A stream that fails after its status was sent ends without its last chunk: the client
    sees an incomplete answer, never a complete wrong one; the server goes on."""
    with UnixConnection(server) as conn:
        conn.request("POST", "/GraphDriver.Broken", body=b"{}")
        resp = conn.getresponse()
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
    with UnixConnection(server) as conn:
        assert conn.call("VolumeDriver.Echo", {})[0] == 200


def test_a_bug_is_a_500_with_err(server: Path) -> None:
    with UnixConnection(server) as conn:
        status, got = conn.call("GraphDriver.Bug", {"Pad": "x" * 10000})
        assert status == 500 and "ZeroDivisionError" in got["Err"]
        assert conn.call("VolumeDriver.Echo", {"C": 3}) == (200, {"Got": {"C": 3}, "Err": ""})


def test_oversized_json_body_is_read_and_refused(server: Path) -> None:
    with UnixConnection(server) as conn:
        status, got = conn.call("VolumeDriver.Echo", raw=b" " * (MAX_JSON_BODY + 10))
        assert status == 200 and "over the" in got["Err"]
        assert conn.call("VolumeDriver.Echo", {"D": 4}) == (200, {"Got": {"D": 4}, "Err": ""})


def test_client_gone_mid_body(server: Path) -> None:
    """A client that disconnects in the middle of a body it announced leaves the server
    serving the next one."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(server))
    sock.sendall(
        b"POST /GraphDriver.Digest HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc"
    )
    sock.close()
    with UnixConnection(server) as conn:
        assert conn.call("VolumeDriver.Echo", {})[0] == 200


def test_a_burst_of_connections_is_queued_not_refused(tmp_path: Path) -> None:
    """dockerd (and any Go client: its dialer reports EAGAIN as an error) may open many
    connections at once: they wait in the backlog. socketserver's default backlog of 5
    refused all but the first few while the server was busy."""
    path = tmp_path / "plugin.sock"
    srv = PluginServer(str(path), [Plugin("VolumeDriver", {})])  # not serving yet: all queue
    clients = []
    try:
        for _ in range(64):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            clients.append(client)
            client.connect(str(path))  # BlockingIOError (EAGAIN) once the backlog is full
    finally:
        for client in clients:
            client.close()
        srv.server_close()
