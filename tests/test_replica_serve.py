"""A serving replica (``mount --upstream HUB --serve``) answers a version it does not
hold yet as its bytes arrive from the hub (issue 15, http/app.py ``_send_remote``):
the headers and first bytes before the hub sent the whole blob, the end only once
the sha256 matched; a blob with other bytes leaves the client a truncated answer,
never a complete wrong one. Between the replica and the hub sits test_replica_stream's
GatedProxy: the first MiB of each blob answer, the rest when the test opens its gate."""

from __future__ import annotations

import hashlib
import http.client
import os
from urllib.parse import urlsplit

import pytest

from tests.conftest import http_request, served_url, wait_for
from tests.test_replica_stream import GATE_MAX, GatedProxy, hub_add, mirrored, status

BIG = 64 << 20  # a version as large as a parallel download's (the hub's answer is slow)
ANSWER_MAX = 8.0  # seconds an answer's headers or bytes may take (the gate holds 20)


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def open_answer(url: str, path: str, headers: dict[str, str] | None = None
                ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A GET whose body is read later; its headers within ANSWER_MAX."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=ANSWER_MAX)
    conn.request("GET", path, headers=headers or {})
    return conn, conn.getresponse()


def serving_replica(replica_factory, hub_url: str, name: str, vid: str):
    replica = replica_factory(hub_url, "--serve", "127.0.0.1:0", prefetch="none")
    url = wait_for(lambda: served_url(replica.log), what="the replica's server")
    mirrored(replica, name, vid)
    return replica, url


def test_a_remote_version_is_answered_as_it_arrives_from_the_hub(
        server, cli, origin, replica_factory):
    body = os.urandom(BIG)
    vid = hub_add(server, cli, origin, "a", body)
    proxy = GatedProxy(server.url)
    conns = []
    try:
        replica, url = serving_replica(replica_factory, proxy.url, "a", vid)
        paths = [f"/a/@versions/{vid}", "/a/latest", f"/@blobs/sha256/{sha(body)}"]
        answers = []
        for path in paths:  # before the hub's answer is through: headers, first bytes
            conn, resp = open_answer(url, path)
            conns.append(conn)
            answers.append(resp)
            assert resp.status == 200, (path, resp.status)
            assert resp.getheader("Content-Length") == str(BIG)
            assert resp.getheader("ETag") == f'"{sha(body)}"'
            assert resp.read(1000) == body[:1000]
        assert answers[0].getheader("X-Buffy-Version") == vid
        assert answers[0].getheader("Cache-Control") == "public, max-age=31536000, immutable"
        assert answers[1].getheader("Cache-Control") == "no-cache"
        ranged = open_answer(url, f"/a/@versions/{vid}", {"Range": "bytes=100-199"})
        conns.append(ranged[0])
        assert ranged[1].status == 206 and ranged[1].getheader("Content-Length") == "100"
        assert proxy.rests_sent == 0 and not proxy.timed_out  # long before the whole blob
        assert status(replica, "a")["versions"][0].get("remote")
        proxy.gate.set()
        for resp in answers:
            assert resp.read() == body[1000:]
        assert ranged[1].read() == body[100:200]
        assert len(proxy.blob_requests) == 1  # one download for every answer
        wait_for(lambda: not status(replica, "a")["versions"][0].get("remote"),
                 what="the version held")
        got = http_request(url, f"/a/@versions/{vid}")  # from the cache now
        assert got[0] == 200 and got[2] == body and "x-buffy-streaming" not in got[1]
        assert len(proxy.blob_requests) == 1
    finally:
        for conn in conns:
            conn.close()
        proxy.close()


def test_a_remote_blob_with_a_wrong_sha256_is_never_a_complete_answer(
        server, cli, origin, replica_factory):
    bad_once = os.urandom(4 << 20)
    bad_always = b"always wrong " * 300_000
    vid = hub_add(server, cli, origin, "a", bad_once)
    vid_b = hub_add(server, cli, origin, "b", bad_always)
    proxy = GatedProxy(server.url, corrupt={sha(bad_once): "cached",
                                            sha(bad_always): "always"})
    conns = []
    try:
        replica, url = serving_replica(replica_factory, proxy.url, "a", vid)
        conn, resp = open_answer(url, "/a/latest")
        conns.append(conn)
        assert resp.status == 200 and resp.read(1000) == bad_once[:1000]
        assert proxy.rests_sent == 0 and not proxy.timed_out  # before the whole blob
        proxy.gate.set()
        with pytest.raises(http.client.IncompleteRead) as cut:  # the last byte came wrong
            resp.read()
        partial = cut.value.partial  # bytes that came, never the end
        assert 1000 + len(partial) < len(bad_once) and bad_once[1000:].startswith(partial)
        # fetched again past the cache (no-cache): the next answer is the right bytes
        got = http_request(url, "/a/latest")
        assert got[0] == 200 and got[2] == bad_once
        assert [cc for _, cc in proxy.blob_requests] == [None, "no-cache"]
        # a hub (or cache) that always sends other bytes: never a complete answer
        mirrored(replica, "b", vid_b)
        for path in ("/b/latest", f"/@blobs/sha256/{sha(bad_always)}"):
            try:
                conn, resp = open_answer(url, path)
            except http.client.RemoteDisconnected:
                continue
            conns.append(conn)
            if resp.status == 200:
                with pytest.raises(http.client.IncompleteRead):
                    resp.read()
            else:
                assert resp.status == 503, resp.status
        assert status(replica, "b")["versions"][0].get("remote")
        assert "wrong sha256" in replica.log_text()
    finally:
        for conn in conns:
            conn.close()
        proxy.close()


assert GATE_MAX > 2 * ANSWER_MAX  # the unfixed server answers only after the gate
