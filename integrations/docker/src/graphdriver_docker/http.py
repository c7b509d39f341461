"""Docker's plugin protocol: RPC-style JSON over HTTP/1.1 on a unix socket.

dockerd (moby's pkg/plugins) POSTs to ``/<Kind>.<Method>`` with ``Accept:
application/vnd.docker.plugins.v1.2+json`` and a JSON body (empty for calls without
arguments), keeps the connection alive, and reads the answer as JSON whatever its
Content-Type; a driver's failure is ``{"Err": "message"}``. It begins with
``/Plugin.Activate`` -> ``{"Implements": [kinds]}``.

A :class:`PluginServer` serves the endpoints of any set of :class:`Plugin` s (one kind or
several on one socket). The whole request body is always read, also when the call fails or
the path is unknown, so that the next request on a kept-alive connection starts where it
should; a body that breaks HTTP's framing closes the connection instead. A JSON endpoint
parses the body with ``request.json()``; a streaming one (a raw tar, such as GraphDriver's
ApplyDiff) reads :class:`Body` itself, and may answer a :class:`RawResponse` (sent chunked,
such as GraphDriver's Diff).
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import logging
import socketserver
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from graphdriver import GraphDriverError

log = logging.getLogger(__name__)

#: what plugins answer with (Docker's plugin API documentation); dockerd sends
#: ``application/vnd.docker.plugins.v1.2+json`` and does not check what comes back
CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
#: the largest JSON request body read into memory (dockerd's are a few hundred bytes)
MAX_JSON_BODY = 1 << 20
#: the longest chunk-size or trailer line of a chunked body
MAX_LINE = 4096


class BadRequest(GraphDriverError):
    """The request's JSON is not what the endpoint takes (answered with ``Err``)."""


class FramingError(Exception):
    """The body breaks HTTP's framing: the connection cannot carry another request."""


class Body:
    """A request body, chunked or with a Content-Length, read at most once to its end."""

    def __init__(self, rfile: io.BufferedIOBase, length: int | None, chunked: bool) -> None:
        self._rfile = rfile
        self._chunked = chunked
        #: bytes left in the current chunk, or in the whole body when not chunked
        self._left = 0 if chunked else (length or 0)
        self._done = not chunked and not self._left

    def _line(self) -> bytes:
        line = self._rfile.readline(MAX_LINE + 1)
        if not line.endswith(b"\n") or len(line) > MAX_LINE:
            raise FramingError("the client closed the connection or sent a line too long")
        return line.rstrip(b"\r\n")

    def _next_chunk(self) -> None:
        size = self._line().split(b";", 1)[0].strip()
        try:
            self._left = int(size, 16)
        except ValueError:
            raise FramingError(f"bad chunk size {size[:40]!r}") from None
        if self._left < 0:
            raise FramingError(f"bad chunk size {size[:40]!r}")
        if not self._left:
            while self._line():  # trailers, then the empty line
                pass
            self._done = True

    def read(self, size: int = 65536) -> bytes:
        """Up to *size* bytes; b"" at the end of the body."""
        if self._done:
            return b""
        if self._chunked and not self._left:
            self._next_chunk()
            if self._done:
                return b""
        # what has come (read1): a reader gets the body as it arrives, not once *size* bytes
        # have (a stream's first bytes, peeked, would wait for a whole buffer)
        data = self._rfile.read1(min(size, self._left))
        if not data:
            raise FramingError("the client closed the connection in the middle of the body")
        self._left -= len(data)
        if not self._left:
            if self._chunked:
                if self._rfile.read(2) != b"\r\n":
                    raise FramingError("a chunk does not end with CRLF")
            else:
                self._done = True
        return data

    def read_all(self, limit: int) -> bytes:
        """The whole body; BadRequest (after reading it all) when it is over *limit* bytes."""
        parts: list[bytes] = []
        size = 0
        while chunk := self.read():
            size += len(chunk)
            if size <= limit:
                parts.append(chunk)
        if size > limit:
            raise BadRequest(f"request body of {size} bytes is over the {limit} this call takes")
        return b"".join(parts)

    def drain(self) -> None:
        while self.read():
            pass


@dataclass
class Request:
    path: str
    query: dict[str, str]
    body: Body

    def json(self) -> dict[str, Any]:
        """The body as a JSON object ({} for an empty body or ``null``)."""
        raw = self.body.read_all(MAX_JSON_BODY)
        if not raw.strip():
            return {}
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"{self.path}: request body is not JSON: {exc}") from None
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise BadRequest(f"{self.path}: request body is not a JSON object")
        return value


@dataclass
class RawResponse:
    """A non-JSON answer streamed to the client in chunks (a tar, for GraphDriver's Diff)."""

    chunks: Iterable[bytes]
    content_type: str = "application/x-tar"


#: what an endpoint returns: a JSON object (``Err`` is added) or a raw stream
Response = dict[str, Any] | RawResponse


#: ``/Kind.Method``'s handler: a JSON endpoint calls ``request.json()``, a streaming one reads
#: ``request.body``; whatever it leaves unread is drained after it
Handler = Callable[[Request], Response]


@dataclass
class Plugin:
    """A plugin kind: its name in ``Implements`` and its endpoints by path."""

    implements: str
    endpoints: Mapping[str, Handler] = field(default_factory=dict)


def field_str(args: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    """The string ``args[key]``; BadRequest if it is missing (when *required*) or not one."""
    value = args.get(key)
    if value is None or value == "":
        if required:
            raise BadRequest(f"the request has no {key}")
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string, not {type(value).__name__}")
    return value


def field_map(args: Mapping[str, Any], key: str) -> dict[str, str]:
    """The string map ``args[key]`` ({} when missing or null)."""
    value = args.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest(f"{key} must be an object of strings")
    return value


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as dockerd's client expects
    #: what a request line that cannot be parsed is answered in (http.server's 0.9: a bare body)
    default_request_version = "HTTP/1.1"
    server: PluginServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s", format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, a header too long) answered
        as every other one is, with ``Err`` in JSON, not an HTML page; the connection closes."""
        self.close_connection = True
        with contextlib.suppress(OSError):  # the client is gone
            self._send_json(code, {"Err": f"bad request: {message or explain or code}"})

    def _send(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_json(self, status: int, body: Mapping[str, Any]) -> None:
        self._send(status, CONTENT_TYPE, json.dumps(body).encode() + b"\n")

    def _send_raw(self, response: RawResponse) -> None:
        self.send_response(200)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in response.chunks:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            log.info("%s: the client left before the end of the answer", self.path)
            self.close_connection = True
            return
        except Exception:
            # the status is sent: cutting the stream short (no last chunk) is how the client
            # learns of the failure
            log.exception("%s failed while streaming its answer", self.path)
            self.close_connection = True
            return
        finally:
            # a generator stopped early releases what it holds now, not when it is collected
            close = getattr(response.chunks, "close", None)
            if close is not None:
                close()
        self.wfile.write(b"0\r\n\r\n")

    def _body(self) -> Body:
        encoding = self.headers.get("Transfer-Encoding", "").lower()
        if encoding and encoding != "identity":
            if encoding.split(",")[-1].strip() != "chunked":
                raise FramingError(f"Transfer-Encoding {encoding!r} is not chunked")
            return Body(self.rfile, None, chunked=True)
        length = self.headers.get("Content-Length") or "0"
        try:
            size = int(length)
        except ValueError:
            raise FramingError(f"bad Content-Length {length[:40]!r}") from None
        if size < 0:
            raise FramingError(f"bad Content-Length {length!r}")
        return Body(self.rfile, size, chunked=False)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            body = self._body()
        except FramingError as exc:
            self.close_connection = True
            self._send_json(400, {"Err": f"bad request: {exc}"})
            return
        request = Request(url.path, query, body)
        endpoint = self.server.endpoints.get(url.path)
        status, answer = 200, None
        try:
            if self.command != "POST":
                body.drain()
                status = 405
                answer = {"Err": f"{self.command} {url.path}: plugin calls are POSTs"}
            elif endpoint is None:
                body.drain()
                status = 404
                answer = {"Err": f"{url.path}: no such plugin endpoint"}
            else:
                result = endpoint(request)
                body.drain()
                if isinstance(result, RawResponse):
                    self._send_raw(result)
                    return
                answer = {"Err": "", **result}
        except FramingError as exc:
            self.close_connection = True
            self._send_json(400, {"Err": f"bad request: {exc}"})
            return
        except GraphDriverError as exc:
            answer = {"Err": str(exc)}
        except Exception as exc:  # a bug: answered, logged, and the server keeps serving
            log.exception("%s failed", url.path)
            status, answer = 500, {"Err": f"internal error in {url.path}: {exc!r}"}
        try:
            body.drain()  # what a failed handler left unread
        except FramingError as exc:
            self.close_connection = True
            answer = {"Err": answer.get("Err") or f"bad request: {exc}"}
        if answer["Err"]:
            log.info("%s: %s", url.path, answer["Err"])
        self._send_json(status, answer)

    do_POST = do_GET = do_PUT = do_DELETE = _dispatch


class PluginServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The plugins' endpoints on one unix socket, a thread per connection."""

    daemon_threads = True  # a connection dockerd keeps open never holds up the exit
    #: listen(2)'s backlog: socketserver's 5 refused a burst of connections (EAGAIN, which
    #: Go's dialer reports as an error); the kernel caps it at net.core.somaxconn
    request_queue_size = 4096

    def __init__(self, address: str, plugins: Iterable[Plugin]) -> None:
        plugins = list(plugins)
        implements = [p.implements for p in plugins]
        self.endpoints: dict[str, Handler] = {
            "/Plugin.Activate": lambda _request: {"Implements": implements}
        }
        for plugin in plugins:
            self.endpoints.update(plugin.endpoints)
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed outside a call (the client went away mid-request or
        mid-answer): logged, not printed; the server goes on."""
        log.debug("connection dropped", exc_info=True)
