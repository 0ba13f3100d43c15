"""A test HTTP origin on 127.0.0.1 that tests control.

Each path serves a ``Resource``; tests change its body and validators, queue
failures (``fail``), and read back the requests the origin saw (``requests``).
Runs in a thread of the test process, so it serves the mount daemon's requests
while the test reads the mount.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Resource:
    body: bytes = b""
    etag: str | None = None
    last_modified: str | None = None
    content_type: str | None = "application/octet-stream"
    # failures served before the real response, one per request:
    #   an int: that HTTP status;  "reset": half the body, then a TCP reset;
    #   "short": a Content-Length larger than the body sent;  ("stall", secs): half the
    #   body, then silence for secs;  ("retry-after", status, value);
    #   ("reason", status, phrase): that status with that reason phrase
    failures: deque = field(default_factory=deque)
    # seconds between each twentieth of the body (a slow origin)
    chunk_delay: float = 0.0
    ranges: bool = True  # honour Range (guarded by If-Range); False: always send it all
    chunked: bool = False  # no Content-Length: the body in chunked transfer encoding
    lying_304: bool = False  # answer 304 to every conditional GET, changed body or not
    rate: int = 0  # bytes/s each answer is sent at (per connection; 0: as fast as it goes)
    ranges_as_200: bool = False  # says Accept-Ranges, yet answers a Range with all of it
    echo: bool = False  # the answer is the body followed by the request's body (POST)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = 0.0  # time.monotonic() when the request arrived


class Origin:
    def __init__(self) -> None:
        self.resources: dict[str, Resource] = {}
        self.requests: list[Seen] = []
        self.lock = threading.Lock()
        self.inflight = 0
        self.max_inflight = 0  # the most requests served at once: one counts from its
        # headers until its last byte is handed to the socket (``_handle``)
        self.connections: set[socket.socket] = set()  # the open ones, busy or idle (``crash``
        # cuts them)
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with origin.lock:  # idle keep-alive connections too: ``crash`` cuts them
                    origin.connections.add(self.connection)

            def finish(self) -> None:
                with origin.lock:
                    origin.connections.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:
                origin._handle(self, "GET")

            def do_POST(self) -> None:
                origin._handle(self, "POST")

            def do_HEAD(self) -> None:
                origin._handle(self, "HEAD")

        self.handler = Handler
        self._listen(0)

    def _listen(self, port: int) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self.handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # resets are on purpose
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> Origin:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def set(self, path: str, body: bytes, etag: bool | str = False,
            last_modified: bool | str = False, content_type: str | None = None) -> Resource:
        """Serve ``body`` at ``path``; ``etag``/``last_modified`` True derive them."""
        with self.lock:
            res = self.resources.setdefault(path, Resource())
            res.body = body
            res.etag = ('"' + hashlib.sha256(body).hexdigest()[:16] + '"') if etag is True \
                else (etag or None)
            res.last_modified = formatdate(time.time(), usegmt=True) if last_modified is True \
                else (last_modified or None)
            if content_type:
                res.content_type = content_type
            return res

    def fail(self, path: str, *failures: object) -> None:
        with self.lock:
            self.resources.setdefault(path, Resource()).failures.extend(failures)

    def seen(self, path: str) -> list[Seen]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    # --- serving ----------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        with self.lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            self._serve(h, method)
        finally:
            with self.lock:
                self.inflight -= 1

    def _serve(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body_in = h.rfile.read(length) if length else b""
        path = h.path.split("?")[0]
        with self.lock:
            self.requests.append(Seen(method, h.path, dict(h.headers.items()), body_in,
                                      time.monotonic()))
            res = self.resources.get(path)
            failure = res.failures.popleft() if res and res.failures else None
        if res is None:
            return self._simple(h, 404, b"not found")
        if isinstance(failure, int):
            return self._simple(h, failure, b"failure")
        if isinstance(failure, tuple) and failure[0] == "retry-after":
            return self._simple(h, failure[1], b"later", {"Retry-After": str(failure[2])})
        if isinstance(failure, tuple) and failure[0] == "reason":
            return self._simple(h, failure[1], b"failure", reason=failure[2])
        body = res.body + body_in if res.echo else res.body
        start, last = self._range_start(h, res), len(body) - 1
        if start is not None and isinstance(start, tuple):
            start, last = start[0], min(start[1], last)
        if start is not None:
            if start >= len(body) or last < start:
                return self._simple(h, 416, b"", {"Content-Range": f"bytes */{len(body)}"})
            piece = body[start:last + 1]
            h.send_response(206)
            h.send_header("Content-Length", str(len(piece)))
            h.send_header("Content-Range", f"bytes {start}-{last}/{len(body)}")
            self._validators(h, res)
            h.end_headers()
            return self._send_body(h, res, piece, failure, method)
        if res.lying_304 and (h.headers.get("If-None-Match") or
                              h.headers.get("If-Modified-Since")):
            return self._simple(h, 304, b"")
        if res.etag and h.headers.get("If-None-Match") == res.etag:
            return self._simple(h, 304, b"")
        if res.last_modified and not res.etag and \
                h.headers.get("If-Modified-Since") == res.last_modified:
            return self._simple(h, 304, b"")
        h.send_response(200)
        if res.chunked:
            h.send_header("Transfer-Encoding", "chunked")
        else:
            h.send_header("Content-Length", str(len(body)))
        self._validators(h, res)
        h.end_headers()
        return self._send_body(h, res, body, failure, method, res.chunked)

    @staticmethod
    def _range_start(h: BaseHTTPRequestHandler, res: Resource) -> int | tuple[int, int] | None:
        """The start (or (first, last) byte) of a Range request we serve as 206, or None
        for a full 200."""
        raw = h.headers.get("Range", "")
        if not res.ranges or res.ranges_as_200 or not raw.startswith("bytes="):
            return None
        guard = h.headers.get("If-Range")
        if guard is not None and guard not in (res.etag, res.last_modified):
            return None  # changed meanwhile: the whole new body
        first, _, last = raw[len("bytes="):].partition("-")
        try:
            return (int(first), int(last)) if last else int(first)
        except ValueError:
            return None

    @staticmethod
    def _validators(h: BaseHTTPRequestHandler, res: Resource) -> None:
        if res.content_type:
            h.send_header("Content-Type", res.content_type)
        if res.etag:
            h.send_header("ETag", res.etag)
        if res.last_modified:
            h.send_header("Last-Modified", res.last_modified)
        if res.ranges:
            h.send_header("Accept-Ranges", "bytes")

    def _send_body(self, h: BaseHTTPRequestHandler, res: Resource, body: bytes,
                   failure: object, method: str, chunked: bool = False) -> None:
        if method == "HEAD":
            return
        if failure == "reset":
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            time.sleep(0.3)  # let the client read it: a reset drops unread data
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()
            return
        if failure == "short":
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        if isinstance(failure, tuple) and failure[0] == "stall":
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            time.sleep(failure[1])
            h.close_connection = True
            return
        if res.rate and not chunked:
            step = max(1, res.rate // 20)  # twenty pieces a second
            began = time.monotonic()
            for i in range(0, len(body), step):
                h.wfile.write(body[i : i + step])
                h.wfile.flush()
                ahead = began + (i + step) / res.rate - time.monotonic()
                if ahead > 0 and i + step < len(body):  # no pause after the last piece:
                    time.sleep(ahead)  # the client has it all and may ask again at once
            return
        if res.chunk_delay or chunked:
            step = max(1, len(body) // 20)
            for i in range(0, len(body), step):
                piece = body[i : i + step]
                h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                h.wfile.flush()
                if chunked or i + step < len(body):  # (same as above)
                    time.sleep(res.chunk_delay)
            if chunked:
                h.wfile.write(b"0\r\n\r\n")
            return
        h.wfile.write(body)

    def _simple(self, h: BaseHTTPRequestHandler, status: int, body: bytes,
                headers: dict[str, str] | None = None, reason: str | None = None) -> None:
        h.send_response(status, reason)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if status != 304:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if status != 304:
            h.wfile.write(body)

    # --- an origin that goes down and comes back --------------------------------------

    def crash(self) -> None:
        """Go down at once: stop listening and cut every open connection mid-answer
        (new connections are refused until ``revive``)."""
        self.stop()
        with self.lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def revive(self) -> None:
        """Listen again, on the same port, with the same resources and request log."""
        self._listen(self.port)
        self.start()


def slow(origin: Origin, path: str, size: int, seconds: float, **kw):
    """A resource of ``size`` random bytes at ``path`` that ``origin`` sends over about
    ``seconds`` (with an ETag): returns (the bytes, the resource)."""
    body = os.urandom(size)
    res = origin.set(path, body, etag=True, **kw)
    res.chunk_delay = seconds / 20
    return body, res
