"""An HTTP front of a hub on 127.0.0.1 that passes requests on, for replica tests that
make the path between hub and replica misbehave (corrupt, cut, stall, refuse). A test's
front subclasses ``HubProxy`` and answers in ``get`` (and ``post``) with ``forward`` and
``send_head``/``send``."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# the request headers passed on to the hub
FORWARDED = ("range", "if-range", "authorization", "accept")
# the answer headers passed back (Content-Length is the body's own)
ANSWER_HEADERS = ("Content-Type", "Content-Range", "ETag", "Accept-Ranges")


class HubProxy:
    """Serves in a thread from the start; ``close`` ends it. ``url`` is its address."""

    protocol_version = "HTTP/1.0"

    def __init__(self, hub_url: str) -> None:
        self.hub_url = hub_url
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = front.protocol_version

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                front.get(self)

            def do_POST(self) -> None:
                front.post(self, self.rfile.read(int(self.headers.get("Content-Length", 0))))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def get(self, h: BaseHTTPRequestHandler) -> None:
        self.send(h, *self.forward(h))

    def post(self, h: BaseHTTPRequestHandler, data: bytes) -> None:
        self.send(h, *self.forward(h, "POST", data))

    def forward(self, h: BaseHTTPRequestHandler, method: str = "GET",
                data: bytes | None = None, keep: tuple[str, ...] = FORWARDED
                ) -> tuple[int, Mapping[str, str], bytes]:
        """The hub's answer to ``h``'s request: (status, headers, whole body)."""
        headers = {k: v for k, v in h.headers.items() if k.lower() in keep}
        req = urllib.request.Request(self.hub_url + h.path, data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=40) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    @staticmethod
    def send_head(h: BaseHTTPRequestHandler, status: int, headers: Mapping[str, str],
                  length: int) -> None:
        h.send_response(status)
        for k in ANSWER_HEADERS:
            if headers.get(k):
                h.send_header(k, headers[k])
        h.send_header("Content-Length", str(length))
        h.end_headers()

    def send(self, h: BaseHTTPRequestHandler, status: int, headers: Mapping[str, str],
             body: bytes) -> None:
        self.send_head(h, status, headers, len(body))
        h.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
