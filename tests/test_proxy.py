"""The proxy interface (issue 16, SPEC part 2 "The proxy interface"): a `buffyfs serve`
process as an HTTP proxy for real, unmodified clients — curl -x, http_proxy= with curl,
requests, urllib, wget, pip — against the test origin."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile

import pytest

from tests.conftest import http_request, wait_for

BODY = b"proxied bytes\n" * 1000
CLIENT_TIMEOUT = 60


def no_proxy_env(**extra: str) -> dict[str, str]:
    """The environment for a client: no proxy of the machine's, only the one we give."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()
           and not k.startswith("PIP_")}
    return {**env, **extra}


def start(serve_factory, tmp_path, origin, allow=None, extra: str = ""):
    """A server whose [proxy] allows the origin's URLs (or ``allow``)."""
    globs = allow if allow is not None else [f"http://127.0.0.1:{origin.port}/*"]
    config = tmp_path / "buffyfs.toml"
    config.write_text(f'[serve]\nlisten = "127.0.0.1:0"\n\n[proxy]\nallow = {json.dumps(globs)}\n'
                      + extra)
    return serve_factory("--config", str(config))


def sources(server, token: str | None = None) -> list[dict]:
    status, _, body = http_request(server.url, "/@status", headers={
        "Authorization": f"Bearer {token}"} if token else None)
    assert status == 200
    return json.loads(body)["sources"]


def auto_name(url: str, stem: str) -> str:
    return f"{stem}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def curl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", str(CLIENT_TIMEOUT), *args],
                          capture_output=True, env=env or no_proxy_env(),
                          timeout=CLIENT_TIMEOUT + 10)


def raw_request(server, request: bytes) -> bytes:
    """Send bytes as they are (targets no client library would send) and read the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):  # the request says Connection: close
            data += chunk
    return data


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# --- the forms, with real clients ----------------------------------------------------------


def test_curl_x_and_http_proxy_register_one_source_and_answer_from_it(
        serve_factory, tmp_path, origin):
    origin.set("/data/a.txt", BODY, etag=True, content_type="text/plain")
    server = start(serve_factory, tmp_path, origin)
    url = origin.url("/data/a.txt")
    first = curl("-i", "-x", server.url, url)
    assert first.returncode == 0, first.stderr
    head, _, body = first.stdout.partition(b"\r\n\r\n")
    assert body == BODY
    assert head.startswith(b"HTTP/1.1 200")
    headers = head.decode().lower()
    # the first answer streamed the download: no ETag nor version known yet (first.py)
    assert "x-buffy-streaming: 1" in headers and "etag:" not in headers
    cached = curl("-i", "-x", server.url, url)
    headers = cached.stdout.partition(b"\r\n\r\n")[0].decode().lower()
    assert f'etag: "{hashlib.sha256(BODY).hexdigest()}"' in headers
    assert "x-buffy-version: " in headers and "x-buffy-stale: 0" in headers
    # the same URL through http_proxy= (curl's environment): the same source, from cache
    again = curl(url, env=no_proxy_env(http_proxy=server.url))
    assert again.returncode == 0 and again.stdout == BODY
    name = auto_name(url, f"127.0.0.1_{origin.port}_data_a.txt")
    assert [s["name"] for s in sources(server)] == [name]
    assert len(origin.seen("/data/a.txt")) == 1  # the second answer came from the cache
    # the source is an ordinary one: its bytes under its name too
    status, _, body = http_request(server.url, f"/{name}/latest")
    assert status == 200 and body == BODY
    # the server's own URLs through the proxy (a client whose HTTP_PROXY is the server)
    own = curl("-x", server.url, f"{server.url}/{name}/latest")
    assert own.returncode == 0 and own.stdout == BODY
    # HEAD through the proxy: the headers, no body
    head_only = curl("-I", "-x", server.url, url)
    assert b"content-length: %d" % len(BODY) in head_only.stdout.lower()


def test_requests_urllib_and_wget_as_proxy_clients(serve_factory, tmp_path, origin):
    requests = pytest.importorskip("requests")
    origin.set("/data/r.bin", BODY)
    server = start(serve_factory, tmp_path, origin)
    url = origin.url("/data/r.bin") + "?v=1&x=a%2Fb"  # an encoded slash in a query is fine
    session = requests.Session()
    session.trust_env = False  # only the proxy given here
    got = session.get(url, proxies={"http": server.url}, timeout=CLIENT_TIMEOUT)
    assert got.status_code == 200 and got.content == BODY
    assert got.headers["X-Buffy-Stale"] == "0"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": server.url}))
    with opener.open(url, timeout=CLIENT_TIMEOUT) as resp:
        assert resp.status == 200 and resp.read() == BODY
    if shutil.which("wget"):
        out = subprocess.run(["wget", "-q", "-O", "-", "--timeout", str(CLIENT_TIMEOUT),
                              "--tries", "1", url], capture_output=True, timeout=CLIENT_TIMEOUT,
                             env=no_proxy_env(http_proxy=server.url))
        assert out.returncode == 0 and out.stdout == BODY, out.stderr
    assert len(sources(server)) == 1
    assert len(origin.seen("/data/r.bin?v=1&x=a%2Fb")) == 1
    # Range through the proxy, with requests: 206 from the cache
    part = session.get(url, proxies={"http": server.url}, headers={"Range": "bytes=5-9"},
                       timeout=CLIENT_TIMEOUT)
    assert part.status_code == 206 and part.content == BODY[5:10]
    assert part.headers["Content-Range"] == f"bytes 5-9/{len(BODY)}"
    # a conditional request: 304
    etag = part.headers["ETag"]  # (the first answer streamed: it had none)
    cond = session.get(url, proxies={"http": server.url}, headers={"If-None-Match": etag},
                       timeout=CLIENT_TIMEOUT)
    assert cond.status_code == 304


def tiny_wheel() -> tuple[str, bytes]:
    name = "tinypkg-1.0-py3-none-any.whl"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("tinypkg/__init__.py", "VALUE = 1\n")
        z.writestr("tinypkg-1.0.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n")
        z.writestr("tinypkg-1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr("tinypkg-1.0.dist-info/RECORD", "")
    return name, buf.getvalue()


def test_pip_download_through_the_rewrite_form(serve_factory, tmp_path, origin):
    wheel, data = tiny_wheel()
    sha = hashlib.sha256(data).hexdigest()
    page = (f'<!doctype html><html><body><a href="../../packages/{wheel}#sha256={sha}">'
            f"{wheel}</a></body></html>\n").encode()
    origin.set("/simple/tinypkg/", page, content_type="text/html")
    origin.set(f"/packages/{wheel}", data, content_type="application/octet-stream")
    server = start(serve_factory, tmp_path, origin)
    index = f"{server.url}/@proxy/http/127.0.0.1:{origin.port}/simple/"
    dest = tmp_path / "dl"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "--isolated", "download", "--no-deps", "--no-cache-dir",
         "--disable-pip-version-check", "--timeout", "30", "--retries", "0",
         "--index-url", index, "-d", str(dest), "tinypkg"],
        capture_output=True, text=True, timeout=120,
        env=no_proxy_env(PIP_CONFIG_FILE=os.devnull))
    assert out.returncode == 0, out.stdout + out.stderr
    assert (dest / wheel).read_bytes() == data
    names = sorted(s["name"] for s in sources(server))
    assert names == sorted([
        auto_name(origin.url(f"/packages/{wheel}"),
                  f"127.0.0.1_{origin.port}_packages_tinypkg-1.0-py3-none-any.whl"),
        auto_name(origin.url("/simple/tinypkg/"), f"127.0.0.1_{origin.port}_simple_tinypkg"),
    ])


# --- what is served, and under which name ---------------------------------------------------


def test_allow_globs_connect_and_methods(serve_factory, tmp_path, origin):
    origin.set("/data/ok", BODY)
    origin.set("/secret/no", BODY)
    server = start(serve_factory, tmp_path, origin,
                   allow=[f"http://127.0.0.1:{origin.port}/data/*"])
    assert curl("-x", server.url, origin.url("/data/ok")).stdout == BODY
    denied = curl("-i", "-x", server.url, origin.url("/secret/no"))
    assert denied.stdout.startswith(b"HTTP/1.1 403")
    # https through a proxy is a CONNECT: refused, and the answer names the rewrite form
    answer = raw_request(server, f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n"
                         f"Host: 127.0.0.1:{origin.port}\r\nConnection: close\r\n\r\n".encode())
    assert status_of(answer) == 405 and b"/@proxy/https/" in answer
    tunnel = curl("-x", server.url, f"https://127.0.0.1:{origin.port}/data/ok")
    assert tunnel.returncode != 0 and b"405" in tunnel.stderr
    # POST without allow_post, and other methods: 405
    post = curl("-i", "-x", server.url, "--data", "q=1", origin.url("/data/ok"))
    assert post.stdout.startswith(b"HTTP/1.1 405")
    put = curl("-i", "-x", server.url, "-X", "DELETE", origin.url("/data/ok"))
    assert put.stdout.startswith(b"HTTP/1.1 405")
    assert len(sources(server)) == 1
    assert origin.seen("/secret/no") == []


def test_no_allow_means_no_proxy(serve_factory, tmp_path, origin):
    origin.set("/data/ok", BODY)
    server = start(serve_factory, tmp_path, origin, allow=[])
    out = curl("-i", "-x", server.url, origin.url("/data/ok"))
    assert out.stdout.startswith(b"HTTP/1.1 403") and b"[proxy] allow" in out.stdout
    assert sources(server) == [] and origin.seen("/data/ok") == []


def test_an_already_registered_url_uses_its_source(serve_factory, tmp_path, origin, cli):
    origin.set("/data/mine", BODY)
    cli("add", "mine", origin.url("/data/mine"), check=True)
    server = start(serve_factory, tmp_path, origin)
    wait_for(lambda: any(s["latest"] for s in sources(server)), what="mine's first version")
    out = curl("-i", "-x", server.url, origin.url("/data/mine"))
    assert out.stdout.endswith(BODY)
    assert [s["name"] for s in sources(server)] == ["mine"]
    assert len(origin.seen("/data/mine")) == 1


def test_long_urls_give_valid_names_and_the_rewrite_form_is_the_same_source(
        serve_factory, tmp_path, origin):
    path = "/data/" + "/".join(["segment-of-a-long-path"] * 10) + "/f.gz"
    origin.set(path, BODY)
    server = start(serve_factory, tmp_path, origin)
    assert curl("-x", server.url, origin.url(path)).stdout == BODY
    status, _, body = http_request(server.url, f"/@proxy/http/127.0.0.1:{origin.port}{path}")
    assert status == 200 and body == BODY
    [src] = sources(server)
    name = src["name"]
    assert len(name) <= 128 and name.startswith(f"127.0.0.1_{origin.port}_data_segment")
    assert name.endswith("-" + hashlib.sha256(origin.url(path).encode()).hexdigest()[:8])
    assert len(origin.seen(path)) == 1


def test_post_bodies_are_sources_of_their_own(serve_factory, tmp_path, origin):
    res = origin.set("/api/q", b"answer to ")
    res.echo = True
    server = start(serve_factory, tmp_path, origin, extra="allow_post = true\n")
    url = origin.url("/api/q")
    one = curl("-x", server.url, "--data-binary", '{"q": 1}', url)
    two = curl("-x", server.url, "--data-binary", '{"q": 2}', url)
    assert one.stdout == b'answer to {"q": 1}' and two.stdout == b'answer to {"q": 2}'
    again = curl("-x", server.url, "--data-binary", '{"q": 1}', url)
    assert again.stdout == one.stdout
    names = sorted(s["name"] for s in sources(server))
    expected = sorted(
        f"127.0.0.1_{origin.port}_api_q-"
        + hashlib.sha256(f"POST {url}\n{body}".encode()).hexdigest()[:8]
        for body in ('{"q": 1}', '{"q": 2}'))
    assert names == expected
    assert sorted(r.body for r in origin.seen("/api/q")) == [b'{"q": 1}', b'{"q": 2}']
    assert all(r.method == "POST" for r in origin.seen("/api/q"))


# --- the origin's trouble ------------------------------------------------------------------


def test_first_request_failures_carry_the_origins_status(serve_factory, tmp_path, origin):
    with socket.socket() as s:  # a port with nothing listening: connection refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    server = start(serve_factory, tmp_path, origin,
                   allow=[f"http://127.0.0.1:{origin.port}/*", f"http://127.0.0.1:{closed}/*"],
                   extra="defaults = { max_attempts = 1, attempt_timeout = \"5s\" }\n")
    missing = curl("-i", "-x", server.url, origin.url("/data/missing"))
    assert missing.stdout.startswith(b"HTTP/1.1 404") and b"HTTP 404" in missing.stdout
    down = curl("-i", "-x", server.url, f"http://127.0.0.1:{closed}/data/x")
    assert down.stdout.startswith(b"HTTP/1.1 502") and b"cannot connect" in down.stdout


def test_origin_down_serves_the_cached_version_as_stale(serve_factory, tmp_path, origin):
    origin.set("/data/s", BODY)
    server = start(serve_factory, tmp_path, origin, extra=(
        'defaults = { refresh = "on-open", open_wait = "5s", max_attempts = 1, '
        'attempt_timeout = "2s" }\n'))
    url = origin.url("/data/s")
    first = curl("-i", "-x", server.url, url)
    assert first.stdout.endswith(BODY) and b"x-buffy-stale: 0" in first.stdout.lower()
    origin.crash()
    try:
        stale = curl("-i", "-x", server.url, url)
        assert stale.stdout.startswith(b"HTTP/1.1 200") and stale.stdout.endswith(BODY)
        assert b"x-buffy-stale: 1" in stale.stdout.lower()
    finally:
        origin.revive()


# --- access and headers ----------------------------------------------------------------------


def test_a_token_protected_server_is_no_open_proxy(serve_factory, tmp_path, origin):
    origin.set("/data/t", BODY)
    config = tmp_path / "buffyfs.toml"
    config.write_text('[serve]\nlisten = "127.0.0.1:0"\nread_tokens = ["r3ad"]\n\n'
                      f'[proxy]\nallow = ["http://127.0.0.1:{origin.port}/*"]\n')
    server = serve_factory("--config", str(config))
    url = origin.url("/data/t")
    refused = curl("-i", "-x", server.url, url)
    assert refused.stdout.startswith(b"HTTP/1.1 407")
    assert b"proxy-authenticate: bearer" in refused.stdout.lower()
    wrong = curl("-i", "-x", server.url, "--proxy-header", "Proxy-Authorization: Bearer nope",
                 url)
    assert wrong.stdout.startswith(b"HTTP/1.1 407")
    rewrite = f"/@proxy/http/127.0.0.1:{origin.port}/data/t"
    assert http_request(server.url, rewrite)[0] == 401
    assert sources(server, token="r3ad") == [] and origin.seen("/data/t") == []
    ok = curl("-x", server.url, "--proxy-header", "Proxy-Authorization: Bearer r3ad", url)
    assert ok.stdout == BODY
    status, _, body = http_request(server.url, rewrite,
                                   headers={"Authorization": "Bearer r3ad"})
    assert status == 200 and body == BODY


def test_no_client_header_reaches_the_origin(serve_factory, tmp_path, origin):
    origin.set("/data/h", BODY)
    server = start(serve_factory, tmp_path, origin,
                   extra='defaults = { headers = { "X-Api-Key" = "k3y" } }\n')
    out = curl("-x", server.url, "-H", "Authorization: Bearer client-secret",
               "-H", "Cookie: session=s3cret", "-H", "X-Custom: 1", "-H", "Range: bytes=0-3",
               "-H", "Connection: keep-alive, X-Custom", "--proxy-header",
               "Proxy-Authorization: Bearer pr0xy", origin.url("/data/h"))
    assert out.stdout == BODY[:4]  # the Range is answered from the cache
    [seen] = origin.seen("/data/h")
    names = {k.lower() for k in seen.headers}
    assert not names & {"authorization", "cookie", "x-custom", "proxy-authorization",
                        "range", "proxy-connection"}
    assert seen.headers["X-Api-Key"] == "k3y"  # [proxy] defaults headers do


# --- hostile request targets ------------------------------------------------------------------


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:{port}/data/../secret",
    "http://127.0.0.1:{port}/data/%2e%2e/secret",
    "http://127.0.0.1:{port}/data/a%2Fb",
    "http://127.0.0.1:{port}/data/a%5cb",
    "http://127.0.0.1:{port}/data/a%0d%0aX-Injected:%201",
    "http://127.0.0.1:{port}/data/a%00",
    "http://127.0.0.1:{port}/data/%zz",
    "http://user:pw@127.0.0.1:{port}/data/a",
    "http://127.0.0.1:{port}/data/" + "x" * 3000,
    "http://127.0.0.1:99999/data/a",
    "http://[127.0.0.1:{port}/data/a",
    "/@proxy/https/127.0.0.1:{port}/data/../a",
    "/@proxy/ftp/127.0.0.1:{port}/data/a",
    "/@proxy/http/127.0.0.1:{port}%2F@evil/data/a",
])
def test_hostile_targets_are_refused_and_register_nothing(serve_factory, tmp_path, origin,
                                                          target):
    server = start(serve_factory, tmp_path, origin, allow=["*"])
    target = target.replace("{port}", str(origin.port))
    answer = raw_request(server, f"GET {target} HTTP/1.1\r\nHost: x\r\n"
                         "Connection: close\r\n\r\n".encode())
    assert 400 <= status_of(answer) < 500, answer[:300]
    assert b"Traceback" not in answer
    assert sources(server) == [] and origin.requests == []


def test_crlf_in_the_target_is_refused(serve_factory, tmp_path, origin):
    server = start(serve_factory, tmp_path, origin, allow=["*"])
    answer = raw_request(server, f"GET http://127.0.0.1:{origin.port}/a\r\nX-Injected: 1 "
                         "HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert answer == b"" or 400 <= status_of(answer) < 500
    assert sources(server) == [] and origin.requests == []
