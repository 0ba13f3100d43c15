"""`buffyfs serve`: SPEC's URL space and HTTP semantics, through a real server process,
with http.client and curl as clients."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from email.utils import formatdate

import pytest

from tests.conftest import http_request, wait_for

BODY = bytes(range(256)) * 400  # 102400 bytes


def get(server, path, **kw):
    return http_request(server.url, path, **kw)


def source_status(server, name):
    status, _, body = get(server, f"/{name}/@status")
    return json.loads(body) if status == 200 else None


def add_source(server, cli, origin, name="t", body=BODY, *options):
    origin.set(f"/{name}", body, content_type="application/x-test")
    cli("add", name, origin.url(f"/{name}"), *options, check=True)
    return wait_for(lambda: (st := source_status(server, name)) and st["latest"],
                    what=f"the first version of {name}")


def test_latest_and_version_answers(server, cli, origin):
    vid = add_source(server, cli, origin)
    sha = hashlib.sha256(BODY).hexdigest()
    status, h, body = get(server, "/t/latest")
    assert status == 200 and body == BODY
    assert h["etag"] == f'"{sha}"'
    assert h["content-length"] == str(len(BODY))
    assert h["accept-ranges"] == "bytes"
    assert h["x-buffy-version"] == vid and h["x-buffy-stale"] == "0"
    assert h["cache-control"] == "no-cache"
    assert h["content-type"] == "application/x-test"
    fetched = source_status(server, "t")["versions"][0]["fetched_at"]
    assert h["last-modified"] == formatdate(
        time.mktime(time.strptime(fetched, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone, usegmt=True)
    cli("tag", "t", vid, "gold", check=True)
    for path in (f"/t/@versions/{vid}", f"/t/@gold/{vid}", f"/@blobs/sha256/{sha}"):
        status, h, body = get(server, path)
        assert status == 200 and body == BODY, path
        assert h["cache-control"] == "public, max-age=31536000, immutable", path
        assert h["etag"] == f'"{sha}"'
    status, h, body = get(server, "/t/@gold/latest")
    assert status == 200 and body == BODY and h["cache-control"] == "no-cache"
    # HEAD: the same headers, no body
    status, h, body = get(server, "/t/latest", method="HEAD")
    assert status == 200 and body == b"" and h["content-length"] == str(len(BODY))


def test_unknown_names_are_404(server, cli, origin):
    vid = add_source(server, cli, origin)
    for path in ("/nope/latest", "/t/@versions/20990101T000000Z-00000000", "/t/@gold/latest",
                 "/t/@gold/", f"/t/@gold/{vid}", "/t/nothing", "/@blobs/sha256/" + "0" * 64,
                 "/@blobs/sha256/xyz", "/t/@versions/..", "/..", "/t/%2e%2e/%2e%2e/etc",
                 "/%2e%2e%2fetc%2fpasswd", "/t%00/latest", "/.hidden/latest", "/t/@latest/",
                 "/@nope", "/t/latest/x"):
        status, _, body = get(server, path)
        assert status == 404, (path, status, body)


def test_listings_html_and_json(server, cli, origin):
    vid = add_source(server, cli, origin)
    status, h, body = get(server, "/t/", headers={"Accept": "application/json"})
    listing = json.loads(body)
    assert listing["latest"] == vid and "@versions/" in listing["entries"]
    assert "@valid/" in listing["entries"]
    status, h, body = get(server, "/t/@versions/", headers={"Accept": "application/json"})
    assert [v["id"] for v in json.loads(body)["versions"]] == [vid]
    status, h, body = get(server, "/t/@valid/", headers={"Accept": "application/json"})
    assert json.loads(body) == {"name": "t", "tag": "valid", "latest": None, "versions": []}
    status, h, body = get(server, "/t/@versions/")
    assert status == 200 and h["content-type"].startswith("text/html")
    assert f'href="/t/@versions/{vid}"'.encode() in body
    status, h, body = get(server, "/")
    assert status == 200 and b'href="/t/"' in body
    status, _, body = get(server, "/", headers={"Accept": "application/json"})
    assert [s["name"] for s in json.loads(body)["sources"]] == ["t"]


def test_status_and_metrics(server, cli, origin):
    vid = add_source(server, cli, origin)
    status, h, body = get(server, "/@status")
    assert status == 200 and json.loads(body)["sources"][0]["latest"] == vid
    st = source_status(server, "t")
    assert st["name"] == "t" and st["versions"][0]["id"] == vid
    status, h, body = get(server, "/@metrics")
    assert status == 200 and b"buffyfs_sources 1.0" in body


def test_ranges(server, cli, origin):
    add_source(server, cli, origin)
    size = len(BODY)
    cases = {
        "bytes=0-9": (0, 9), "bytes=100-": (100, size - 1), "bytes=-10": (size - 10, size - 1),
        f"bytes=0-{size + 100}": (0, size - 1), "bytes=-999999999": (0, size - 1),
        "bytes=5-5": (5, 5),
        # several ranges: answered as the one range that covers them
        "bytes=0-9, 20-29": (0, 29), "bytes=50-59,0-0": (0, 59),
        f"bytes=10-19,{size + 5}-": (10, 19),
    }
    for spec, (start, end) in cases.items():
        status, h, body = get(server, "/t/latest", headers={"Range": spec})
        assert status == 206, spec
        assert h["content-range"] == f"bytes {start}-{end}/{size}", spec
        assert body == BODY[start:end + 1] and h["content-length"] == str(end - start + 1)
    for spec in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0", "bytes=abc",
                 "bytes=9-5", "bytes=", "bytes=--1", "bytes=1-2-3",
                 "bytes=" + ",".join(["0-0"] * 100)):
        status, h, body = get(server, "/t/latest", headers={"Range": spec})
        assert status == 416, spec
        assert h["content-range"] == f"bytes */{size}" and body.strip(), spec
    # another unit is ignored (RFC 9110): the whole file
    status, _, body = get(server, "/t/latest", headers={"Range": "items=0-1"})
    assert status == 200 and body == BODY


def test_conditional_requests(server, cli, origin):
    add_source(server, cli, origin)
    _, h, _ = get(server, "/t/latest")
    etag, modified = h["etag"], h["last-modified"]
    for headers in ({"If-None-Match": etag}, {"If-None-Match": f'"x", W/{etag}'},
                    {"If-None-Match": "*"}, {"If-Modified-Since": modified},
                    {"If-Modified-Since": formatdate(time.time() + 3600, usegmt=True)}):
        status, h2, body = get(server, "/t/latest", headers=headers)
        assert status == 304 and body == b"", headers
        assert h2["etag"] == etag and "x-buffy-version" in h2
    for headers in ({"If-None-Match": '"other"'},
                    {"If-Modified-Since": formatdate(time.time() - 10 * 86400, usegmt=True)},
                    {"If-Modified-Since": "garbage"},
                    # If-None-Match wins over If-Modified-Since
                    {"If-None-Match": '"other"', "If-Modified-Since": modified}):
        status, _, body = get(server, "/t/latest", headers=headers)
        assert status == 200 and body == BODY, headers
    # If-Range: a matching validator keeps the range, another one gets the whole file
    for guard in (etag, modified):
        status, _, body = get(server, "/t/latest", headers={"Range": "bytes=0-1",
                                                            "If-Range": guard})
        assert status == 206 and body == BODY[:2]
    for guard in ('"other"', "W/" + etag, formatdate(time.time() - 86400, usegmt=True)):
        status, _, body = get(server, "/t/latest", headers={"Range": "bytes=0-1",
                                                            "If-Range": guard})
        assert status == 200 and body == BODY


def test_curl_resumes_a_download(server, cli, origin, tmp_path):
    add_source(server, cli, origin)
    out = tmp_path / "out"
    out.write_bytes(BODY[:1000])
    subprocess.run(["curl", "-sSf", "-C", "-", "-o", str(out), f"{server.url}/t/latest"],
                   check=True, timeout=30)
    assert out.read_bytes() == BODY
    done = subprocess.run(["curl", "-sSf", "-I", f"{server.url}/t/latest"], check=True,
                          capture_output=True, text=True, timeout=30)
    assert "x-buffy-version:" in done.stdout.lower()


def test_all_failed_latest_is_503_with_the_reason(server, cli, origin):
    vid = add_source(server, cli, origin)
    cli("tag", "t", vid, "failed", check=True)
    status, _, body = wait_for(lambda: (r := get(server, "/t/latest"))[0] == 503 and r,
                               what="latest to fail")
    assert b"every version is tagged failed" in body
    status, _, body = get(server, f"/t/@versions/{vid}")  # the version itself is still there
    assert status == 200 and body == BODY


def test_stale_header(server, cli, origin):
    add_source(server, cli, origin, "t", BODY, "--max-attempts", "1")
    origin.fail("/t", 500)
    cli("refresh", "t", check=True)
    wait_for(lambda: source_status(server, "t")["consecutive_failures"] == 1,
             what="the failed refresh")
    status, h, body = get(server, "/t/latest")
    assert status == 200 and body == BODY and h["x-buffy-stale"] == "1"


def test_a_new_source_latest_waits_for_the_first_download(server, cli, origin):
    origin.set("/slow", BODY)
    origin.resources["/slow"].chunk_delay = 0.05
    cli("add", "slow", origin.url("/slow"), check=True)
    wait_for(lambda: source_status(server, "slow"), what="the source")
    status, _, body = get(server, "/slow/latest")
    assert status == 200 and body == BODY


def test_control_all_or_nothing(server_with_tokens, cli, origin):
    server, tokens = server_with_tokens
    auth = {"Authorization": f"Bearer {tokens['control']}"}
    vid = add_source(server, cli, origin)
    status, _, body = get(server, "/t/@control", method="POST",
                          body=b"tag latest keep\ntag latest bogus!\n", headers=auth)
    assert status == 400 and b"line 2" in body
    assert source_status(server, "t")["versions"][0]["tags"] == []
    assert source_status(server, "t")["last_control_error"].startswith("line 2")
    status, _, body = get(server, "/t/@control", method="POST",
                          body=b"tag latest keep\ntag latest gold\n", headers=auth)
    assert status == 200
    assert source_status(server, "t")["versions"][0]["tags"] == ["keep", "gold"]
    status, _, body = get(server, f"/t/@gold/{vid}")
    assert status == 200 and body == BODY
    # the root's control file: add and remove
    status, _, body = get(server, "/@control", method="POST", headers=auth,
                          body=f"add u {origin.url('/t')}\nremove nope\n".encode())
    assert status == 400 and b"nope" in body
    assert get(server, "/u/")[0] == 404
    status, _, _ = get(server, "/@control", method="POST", headers=auth,
                       body=f"add u {origin.url('/t')}\n".encode())
    assert status == 200 and get(server, "/u/")[0] == 200
    assert get(server, "/nope/@control", method="POST", headers=auth, body=b"refresh")[0] == 404
    assert get(server, "/t/@control", headers=auth)[0] == 405
    assert get(server, "/t/latest", method="PUT", headers=auth, body=b"x")[0] == 405


def test_changes_long_poll(server_with_tokens, cli, origin):
    server, tokens = server_with_tokens
    auth = {"Authorization": f"Bearer {tokens['control']}"}
    add_source(server, cli, origin)
    _, _, body = get(server, "/@changes?since=0")
    first = json.loads(body)
    assert first["sources"] == ["t"] and first["serial"] > 0
    serial = first["serial"]
    # nothing changed: waits, and returns at the timeout
    began = time.monotonic()
    _, _, body = get(server, f"/@changes?since={serial}&wait=1.5")
    assert 1.4 <= time.monotonic() - began < 5
    assert json.loads(body) == {"serial": serial, "sources": [], "complete": True}
    # state and progress are no change: a refresh that fetches the same bytes
    checks = len(origin.seen("/t"))
    cli("refresh", "t", check=True)
    wait_for(lambda: len(origin.seen("/t")) > checks
             and source_status(server, "t")["state"] == "idle", what="the refresh")
    assert json.loads(get(server, f"/@changes?since={serial}")[2])["sources"] == []
    # a change (here a tag by the CLI, another process) wakes a waiting request promptly
    answer = {}

    def poll():
        began = time.monotonic()
        answer["body"] = json.loads(get(server, f"/@changes?since={serial}&wait=30")[2])
        answer["took"] = time.monotonic() - began

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(1.0)
    cli("tag", "t", "latest", "gold", check=True)
    t.join(timeout=20)
    assert answer["body"]["sources"] == ["t"] and answer["body"]["serial"] > serial
    assert answer["took"] < 1.0 + 3.0
    serial = answer["body"]["serial"]
    # a change through the server itself; a pin; a removal
    get(server, "/t/@control", method="POST", headers=auth, body=b"pin\n")
    _, _, body = get(server, f"/@changes?since={serial}&wait=5")
    assert json.loads(body)["sources"] == ["t"]
    assert get(server, "/@changes?since=x")[0] == 400


def test_changes_serial_survives_restarts(serve_factory, cli, origin):
    server = serve_factory()
    add_source(server, cli, origin)
    serial = json.loads(get(server, "/@changes")[2])["serial"]
    server.close()
    cli("tag", "t", "latest", "gold", check=True)  # no daemon: the CLI advances it
    server = serve_factory()
    again = json.loads(get(server, f"/@changes?since={serial}")[2])
    assert again["serial"] == serial + 1 and again["sources"] == ["t"]


@pytest.fixture
def server_with_tokens(serve_factory, tmp_path):
    tokens = {"read": "r-secret-1", "control": "c-secret-2"}
    config = tmp_path / "serve.toml"
    config.write_text('[serve]\nlisten = "127.0.0.1:0"\n'
                      f'control_tokens = ["{tokens["control"]}"]\n')
    return serve_factory("--config", str(config)), tokens


def test_newest_answers_when_every_version_failed(server, cli, origin):
    vid = add_source(server, cli, origin)
    cli("tag", "t", vid, "failed", check=True)
    assert get(server, "/t/latest")[0] == 503
    status, h, body = get(server, "/t/newest")
    assert status == 200 and body == BODY
    assert h["x-buffy-version"] == vid and h["cache-control"] == "no-cache"
    assert get(server, "/nope/newest")[0] == 404
