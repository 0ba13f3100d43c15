"""The server's access rules: tokens and scopes, the cookie, --public, TLS; and that no
secret shows in an answer or a log line."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys

import pytest

from tests.conftest import http_request, served_url, wait_for
from tests.test_serve import BODY

READ, CONTROL = "read-tok-5ecret", "ctl-tok-5ecret"
HEADER_SECRET = "hdr-5ecret-value"


def write_config(tmp_path, extra=""):
    (tmp_path / "read.tokens").write_text(f"# readers\n\n{READ}   # the CI\n")
    config = tmp_path / "serve.toml"
    config.write_text('[serve]\nlisten = "127.0.0.1:0"\nread_token_files = ["read.tokens"]\n'
                      f'control_tokens = ["{CONTROL}"]\n{extra}')
    return config


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_tokens_and_scopes(serve_factory, cli, origin, tmp_path):
    server = serve_factory("--config", str(write_config(tmp_path)))
    origin.set("/t", BODY)
    cli("add", "t", origin.url("/t"), "--header", f"Authorization: {HEADER_SECRET}",
        check=True)
    wait_for(lambda: http_request(server.url, "/t/latest", headers=bearer(READ))[0] == 200,
             what="the first version")
    for path in ("/", "/t/latest", "/@status", "/t/@status", "/@metrics", "/@changes", "/t/"):
        status, h, _ = http_request(server.url, path)
        assert status == 401 and h["www-authenticate"].startswith("Bearer"), path
        assert http_request(server.url, path, headers=bearer("wrong"))[0] == 401, path
        assert http_request(server.url, path, headers=bearer(READ))[0] == 200, path
        assert http_request(server.url, path, headers=bearer(CONTROL))[0] == 200, path
    post = {"method": "POST", "body": b"tag latest gold\n"}
    assert http_request(server.url, "/t/@control", **post)[0] == 401
    assert http_request(server.url, "/t/@control", headers=bearer("x"), **post)[0] == 401
    status, _, body = http_request(server.url, "/t/@control", headers=bearer(READ), **post)
    assert status == 403 and b"read" in body
    assert http_request(server.url, "/t/@control", headers=bearer(CONTROL), **post)[0] == 200
    # secrets: never in an answer or the log
    answers = b"".join(http_request(server.url, p, headers=bearer(CONTROL))[2]
                       for p in ("/", "/t/", "/@status", "/t/@status", "/t/@versions/",
                                 "/@metrics"))
    for secret in (READ, CONTROL, HEADER_SECRET):
        assert secret.encode() not in answers
        assert secret not in server.log_text()


def test_the_token_cookie(serve_factory, tmp_path):
    server = serve_factory("--config", str(write_config(tmp_path)))
    status, h, _ = http_request(server.url, f"/?token={READ}")
    assert status == 303 and h["location"] == "/"
    cookie = h["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and READ in cookie
    jar = {"Cookie": cookie.split(";")[0]}
    assert http_request(server.url, "/@status", headers=jar)[0] == 200
    assert http_request(server.url, "/@status", headers={"Cookie": "buffy_token=nope"})[0] == 401
    assert http_request(server.url, "/?token=nope")[0] == 401
    # never a redirect to another site
    assert http_request(server.url, f"//evil.example/?token={READ}")[1]["location"] == \
        "/evil.example/"
    # a control token in a cookie opens reads only: control takes the header
    _, h, _ = http_request(server.url, f"/@status?token={CONTROL}&x=1")
    assert h["location"] == "/@status?x=1"
    jar = {"Cookie": h["set-cookie"].split(";")[0]}
    assert http_request(server.url, "/@control", method="POST", body=b"", headers=jar)[0] == 401
    assert READ not in server.log_text() and CONTROL not in server.log_text()


def test_open_reads_need_public_beyond_loopback(cache_dir, tmp_path, serve_factory):
    probe = socket.socket()
    probe.bind(("0.0.0.0", 0))
    port = probe.getsockname()[1]
    probe.close()
    done = subprocess.run([sys.executable, "-m", "buffyfs", "serve", "--cache", str(cache_dir),
                           "--listen", f"0.0.0.0:{port}"], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--public" in done.stderr
    with pytest.raises(ConnectionRefusedError):  # nothing was bound
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # loopback needs no flag; --public, or read tokens, open the rest
    assert serve_factory("--listen", "127.0.0.2:0", cache=tmp_path / "c1").url.startswith(
        "http://127.0.0.2:")
    public = serve_factory("--listen", "0.0.0.0:0", "--public", cache=tmp_path / "c2")
    assert http_request(f"http://127.0.0.1:{public.port}", "/@status")[0] == 200
    public.close()
    config = write_config(tmp_path).read_text().replace("127.0.0.1:0", "0.0.0.0:0")
    (tmp_path / "wide.toml").write_text(config)
    guarded = serve_factory("--config", str(tmp_path / "wide.toml"), cache=tmp_path / "c3")
    assert http_request(f"http://127.0.0.1:{guarded.port}", "/@status")[0] == 401


def test_bad_serve_settings_are_one_line_exit_2(cache_dir, tmp_path):
    bad = tmp_path / "bad.toml"
    for config, flags, words in (
        ('[serve]\nread_token_files = ["missing.tokens"]\n', [], "missing.tokens"),
        ('[serve]\npublik = true\n', [], "public"),
        ('[serve]\nread_tokens = ["two words"]\n', [], "one word"),
        ("", ["--listen", "nonsense"], "HOST:PORT"),
        ("", ["--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(tmp_path / "k")],
         "TLS"),
        ("", ["--tls-cert", str(bad)], "both"),
    ):
        bad.write_text(config)
        done = subprocess.run([sys.executable, "-m", "buffyfs", "serve", "--cache",
                               str(cache_dir), "--config", str(bad), *flags],
                              capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 2, (config, flags, done.stderr)
        assert done.stderr.count("\n") == 1 and words in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_an_address_in_use_is_exit_1(server, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    done = subprocess.run([sys.executable, "-m", "buffyfs", "serve", "--cache", str(other),
                           "--listen", f"127.0.0.1:{server.port}"], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and "cannot listen" in done.stderr
    assert done.stderr.count("\n") == 1


def test_one_daemon_per_cache(server, cache_dir):
    done = subprocess.run([sys.executable, "-m", "buffyfs", "serve", "--cache", str(cache_dir),
                           "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and "in use" in done.stderr and server.url in done.stderr


@pytest.fixture
def certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=30)
    return cert, key


def test_tls(serve_factory, cli, origin, certificate):
    cert, key = certificate
    server = serve_factory("--tls-cert", str(cert), "--tls-key", str(key))
    assert server.url.startswith("https://127.0.0.1:")
    origin.set("/t", BODY)
    cli("add", "t", origin.url("/t"), check=True)
    context = ssl.create_default_context(cafile=str(cert))
    wait_for(lambda: http_request(server.url, "/t/latest", context=context)[0] == 200,
             what="the first version over TLS")
    status, h, body = http_request(server.url, "/t/latest", context=context,
                                   headers={"Range": "bytes=10-19"})
    assert status == 206 and body == BODY[10:20]
    done = subprocess.run(["curl", "-sSf", "--cacert", str(cert), f"{server.url}/t/latest"],
                          capture_output=True, timeout=30, check=True)
    assert done.stdout == BODY
    # plain HTTP on the TLS port is refused, and the server stays up
    with pytest.raises(Exception):  # noqa: B017 (whatever http.client makes of it)
        http_request(server.url.replace("https", "http"), "/t/latest", timeout=5)
    assert http_request(server.url, "/@status", context=context)[0] == 200


def test_mount_serve(mount_factory, cli, origin, certificate):
    cert, key = certificate
    origin.set("/t", BODY)
    cli("add", "t", origin.url("/t"), check=True)
    mnt = mount_factory("--serve", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key))
    url = wait_for(lambda: served_url(mnt.log), what="the mount's server")
    context = ssl.create_default_context(cafile=str(cert))
    assert (mnt / "t/latest").read_bytes() == BODY
    status, h, body = http_request(url, "/t/latest", context=context)
    assert status == 200 and body == BODY
    assert h["x-buffy-version"] == json.loads((mnt / "t/@status").read_text())["latest"]
