"""A first download answered over HTTP while it runs (issue 16; http/first.py): through
the server's /NAME/latest and through the proxy, with curl, httpx and requests. Bytes
come before the origin finished, the end is the seal (a download that gives up or
fails validation leaves the client a truncated body, never a clean end), clients of
the same first download share it, HEAD and Range answer during it."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import httpx
import pytest

from tests.conftest import http_request, wait_for
from tests.origin import slow
from tests.test_proxy import curl, start

CLIENT_TIMEOUT = 60


def latest_id(server, name):
    status, _, body = http_request(server.url, f"/{name}/@status")
    return json.loads(body)["latest"] if status == 200 else None


def add(server, cli, origin, name, *options):
    cli("add", name, origin.url(f"/{name}"), *options, check=True)
    wait_for(lambda: http_request(server.url, f"/{name}/@status")[0] == 200,
             what="the source")


def first_bytes_then_rest(url: str, path: str, proxy: str | None = None
                          ) -> tuple[float, dict[str, str], bytes]:
    """GET with httpx, streaming: (seconds to the first body bytes, headers, body)."""
    began = time.monotonic()
    first_at = None
    data = bytearray()
    with httpx.Client(proxy=proxy, trust_env=False, timeout=CLIENT_TIMEOUT) as client, \
            client.stream("GET", url + path) as resp:
        assert resp.status_code == 200, resp.status_code
        for chunk in resp.iter_raw():
            if first_at is None and chunk:
                first_at = time.monotonic() - began
            data += chunk
    assert first_at is not None
    return first_at, {k.lower(): v for k, v in resp.headers.items()}, bytes(data)


def test_server_latest_streams_the_first_download_and_seals_it(server, cli, origin):
    body, _ = slow(origin, "/s", 4 << 20, 5.0, content_type="application/x-test")
    add(server, cli, origin, "s")
    began = time.monotonic()
    first_at, headers, got = first_bytes_then_rest(server.url, "/s/latest")
    took = time.monotonic() - began
    assert got == body
    assert first_at < 3.0 and took > 3.5, (first_at, took)  # bytes came as they arrived
    assert headers["x-buffy-streaming"] == "1" and headers["x-buffy-stale"] == "0"
    assert headers["content-length"] == str(len(body))
    assert headers["content-type"] == "application/x-test"
    assert "etag" not in headers and "x-buffy-version" not in headers
    # the last bytes came after the commit: the version is there as the answer ends
    assert latest_id(server, "s") is not None
    status, h, again = http_request(server.url, "/s/latest")
    assert status == 200 and again == body
    assert h["etag"] == f'"{hashlib.sha256(body).hexdigest()}"' and "x-buffy-streaming" not in h


def test_a_download_that_gives_up_is_a_truncated_answer(server, cli, origin):
    body = os.urandom(2 << 20)
    res = origin.set("/g", body, etag=True)
    res.ranges = False
    origin.fail("/g", "reset")  # half the body, then a TCP reset; no second attempt
    add(server, cli, origin, "g", "--max-attempts", "1")
    out = curl(server.url + "/g/latest")
    assert out.returncode == 18, (out.returncode, out.stderr)  # curl: partial file
    assert 0 < len(out.stdout) < len(body) and body.startswith(out.stdout)
    with pytest.raises(httpx.HTTPError):  # and so with httpx, on the next such download
        origin.set("/g2", body, etag=True).ranges = False
        origin.fail("/g2", "reset")
        add(server, cli, origin, "g2", "--max-attempts", "1")
        first_bytes_then_rest(server.url, "/g2/latest")
    assert latest_id(server, "g") is None


def test_a_version_failing_validation_is_a_truncated_answer(server, cli, origin):
    body, _ = slow(origin, "/v", 2 << 20, 2.0)
    add(server, cli, origin, "v", "--validate", "sha256=" + "0" * 64)
    out = curl(server.url + "/v/latest")
    assert out.returncode == 18, (out.returncode, out.stderr)
    assert len(out.stdout) < len(body) and body.startswith(out.stdout)


def test_proxy_first_request_streams_and_is_shared(serve_factory, tmp_path, origin):
    requests = pytest.importorskip("requests")
    body, _ = slow(origin, "/data/big", 4 << 20, 5.0)
    server = start(serve_factory, tmp_path, origin)
    url = origin.url("/data/big")
    results: dict[int, tuple[float, bytes]] = {}

    def fetch(i: int) -> None:
        session = requests.Session()
        session.trust_env = False
        began = time.monotonic()
        with session.get(url, proxies={"http": server.url}, stream=True,
                         timeout=CLIENT_TIMEOUT) as resp:
            assert resp.status_code == 200
            it = resp.iter_content(65536)
            first = next(it)
            first_at = time.monotonic() - began
            results[i] = (first_at, first + b"".join(it))

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CLIENT_TIMEOUT)
    assert sorted(results) == [0, 1, 2]
    for first_at, got in results.values():
        assert got == body
        assert first_at < 3.0, first_at
    assert len(origin.seen("/data/big")) == 1  # one download for the three of them


def test_proxy_first_request_that_gives_up_is_truncated(serve_factory, tmp_path, origin):
    body = os.urandom(2 << 20)
    origin.set("/data/cut", body, etag=True).ranges = False
    origin.fail("/data/cut", "reset")
    server = start(serve_factory, tmp_path, origin, extra="defaults = { max_attempts = 1 }\n")
    out = curl("-x", server.url, origin.url("/data/cut"))
    assert out.returncode == 18, (out.returncode, out.stderr)  # curl: partial file
    assert 0 < len(out.stdout) < len(body) and body.startswith(out.stdout)


def test_head_and_range_during_the_first_download(server, cli, origin):
    body, _ = slow(origin, "/h", 4 << 20, 5.0)
    add(server, cli, origin, "h")
    began = time.monotonic()
    status, headers, got = http_request(server.url, "/h/latest", method="HEAD")
    assert time.monotonic() - began < 3.0  # headers once the body started, not at its end
    assert status == 200 and got == b"" and headers["content-length"] == str(len(body))
    assert latest_id(server, "h") is None
    ranged = curl("-i", "-r", "100-199", server.url + "/h/latest")
    head, _, part = ranged.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 206") and part == body[100:200]
    assert f"content-range: bytes 100-199/{len(body)}".encode() in head.lower()
    wait_for(lambda: latest_id(server, "h"), 20, what="the version")


def test_without_a_length_the_answer_waits_for_the_version(server, cli, origin):
    body, res = slow(origin, "/c", 1 << 20, 2.0)
    res.chunked = True
    add(server, cli, origin, "c")
    status, headers, got = http_request(server.url, "/c/latest")
    assert status == 200 and got == body
    assert headers["etag"] == f'"{hashlib.sha256(body).hexdigest()}"'
    assert "x-buffy-streaming" not in headers
