"""The server under load and abuse (a request in a version of HTTP it does not speak
gets 505, every other malformed one a 4xx): 200 concurrent clients, a client reading 1 byte a
second, malformed requests, and a version collected while a response sends it."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

from tests.conftest import http_request, wait_for
from tests.test_serve import add_source, source_status

MiB = 1 << 20


def body_of(size: int, seed: bytes = b"") -> bytes:
    block = hashlib.sha256(seed).digest() * (MiB // 32)
    return (block * (size // len(block) + 1))[:size]


def raw_request(server, data: bytes, rcvbuf: int | None = None,
                timeout: float = 10.0) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect(("127.0.0.1", server.port))
    s.sendall(data)
    return s


def read_head(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, the body bytes read with them) of a raw answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (li.partition(":") for li in lines[1:])}
    return int(lines[0].split()[1]), headers, rest


def test_200_concurrent_clients(server, cli, origin):
    data = body_of(MiB)
    add_source(server, cli, origin, "t", data)
    results: list[object] = []
    start = threading.Barrier(200)

    def client() -> None:
        try:
            start.wait(timeout=30)
            status, _, body = http_request(server.url, "/t/latest", timeout=60)
            results.append((status, hashlib.sha256(body).digest()))
        except Exception as e:  # reported below
            results.append(e)

    threads = [threading.Thread(target=client) for _ in range(200)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert len(results) == 200
    assert set(results) == {(200, hashlib.sha256(data).digest())}, \
        [r for r in results if not isinstance(r, tuple)][:3]
    assert time.monotonic() - began < 60


def test_a_slow_reader_holds_up_no_one(server, cli, origin):
    data = body_of(16 * MiB)
    add_source(server, cli, origin, "t", data)
    slow = raw_request(server, b"GET /t/latest HTTP/1.1\r\nHost: x\r\n\r\n", rcvbuf=4096)
    status, _, got = read_head(slow)
    assert status == 200
    stop = threading.Event()

    def trickle() -> None:  # 1 byte a second
        while not stop.is_set():
            slow.recv(1)
            stop.wait(1.0)

    reader = threading.Thread(target=trickle)
    reader.start()
    try:
        time.sleep(1.0)  # the server is now blocked sending to it
        began = time.monotonic()
        for _ in range(5):
            status, _, body = http_request(server.url, "/t/latest", timeout=20)
            assert status == 200 and len(body) == len(data)
        assert http_request(server.url, "/@status")[0] == 200
        assert time.monotonic() - began < 15
    finally:
        stop.set()
        reader.join(timeout=5)
        slow.close()


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"\x00\x01\x02\x03\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),  # a TLS hello
    b"GET /t/latest HTTP/1.1\r\n\r\n",  # no Host
    b"GET /t/latest HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /t/lat\x00est HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /t/latest HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    b"GET /t/latest HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
    b"GET /t/latest HTTP/1.1\r\nHost: x\r\n" + b"X-Many: 1\r\n" * 20_000 + b"\r\n",
    b"GET /" + b"a" * 50_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /@control HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /@control HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"GET /t/latest HTTP/1.1\r\nHost: x\r\nRange: bytes=99999999999999999999999-\r\n\r\n",
    b"GET /t/latest HTTP/1.1\r\nHost: x\r\nRange: bytes=\xff\xfe-1\r\n\r\n",
    b"GET /t/latest?since=%ff%00&token=%00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /@changes?since=1e999&wait=nan HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /@changes?wait=1e999 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://evil.example/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /t/%ff%fe/latest HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /t/@versions/..%2f..%2f..%2fetc%2fpasswd HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /@blobs/sha256/../../index/data.mdb HTTP/1.1\r\nHost: x\r\n\r\n",
]


def test_malformed_requests_get_a_clear_4xx(server, cli, origin):
    data = body_of(100_000)
    add_source(server, cli, origin, "t", data)
    for request in MALFORMED:
        s = raw_request(server, request)
        try:
            status, _, _ = read_head(s)
        finally:
            s.close()
        assert 400 <= status < 500 or status == 505 and b"HTTP/9" in request, \
            (request[:60], status)
        status, _, body = http_request(server.url, "/t/latest")  # still serving
        assert status == 200 and body == data
    # half requests and abrupt closes
    for _ in range(50):
        raw_request(server, b"GET /t/lat").close()
    assert http_request(server.url, "/t/latest")[2] == data


def test_a_version_collected_during_a_response_keeps_sending(server, cli, origin, cache_dir):
    old = body_of(16 * MiB, b"old")
    vid = add_source(server, cli, origin, "t", old, "--keep-versions", "0")
    sha = hashlib.sha256(old).hexdigest()
    s = raw_request(server, f"GET /t/@versions/{vid} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                    rcvbuf=4096, timeout=30)
    status, headers, got = read_head(s)
    assert status == 200 and int(headers["content-length"]) == len(old)
    # a new version: the old one is no longer latest, and keep_versions=0 collects it
    origin.set("/t", body_of(MiB, b"new"))
    cli("refresh", "t", check=True)
    blob = cache_dir / "blobs" / sha[:2] / sha
    wait_for(lambda: [v["id"] for v in source_status(server, "t")["versions"]] != [vid]
             and vid not in [v["id"] for v in source_status(server, "t")["versions"]]
             and not blob.exists(), timeout=30, what="the old version to be collected")
    assert http_request(server.url, f"/t/@versions/{vid}")[0] == 404
    h = hashlib.sha256(got)
    total = len(got)
    while total < len(old):
        chunk = s.recv(1 << 20)
        assert chunk, f"the answer ended after {total} of {len(old)} bytes"
        h.update(chunk)
        total += len(chunk)
    s.close()
    assert total == len(old) and h.hexdigest() == sha
