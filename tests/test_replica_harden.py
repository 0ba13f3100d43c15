"""Replicas under a misbehaving hub, cache or disk (issue 15, the review's items): a
damaged mirrored blob fetched again, a blob answer cut off at its size, evicted
mirrored versions kept listed, failover on refusals and on answers that are no feed,
forwarded writes racing the feed, and prune on a replica. The hub is ``buffyfs
serve`` on 127.0.0.1; ``HubFront`` stands for a cache in between that misbehaves."""

from __future__ import annotations

import errno
import json
import os
import signal
import time

import pytest

from tests.conftest import http_request, run_cli, wait_for
from tests.hubproxy import FORWARDED, HubProxy
from tests.test_replica import (
    PROPAGATION,
    blob_file,
    hub_add,
    hub_config,
    hub_control,
    hub_status,
    status,
)

TOKEN = "hub-ctl-5ecret"


class HubFront(HubProxy):
    """An HTTP front of a hub that passes requests on, unless told to misbehave:
    ``feed`` answers ``/@changes`` itself ("401", "403", "404": that status; "html":
    a page; "malformed": JSON that is no feed); ``poll_delay`` holds each long-poll's
    answer that long; ``reread_fails`` answers 502 to every other read; ``endless``
    sends each blob answer without a length and runs on past its end (unless asked
    with no-cache); ``edit_feed`` rewrites the feed's JSON; ``page_delay`` holds each
    answer of a feed's later page (``&after=``) that long."""

    JUNK = 32 << 20  # bytes an endless answer sends past the blob at most

    protocol_version = "HTTP/1.1"

    def __init__(self, hub_url):
        self.feed = None
        self.poll_delay = 0.0
        self.reread_fails = False
        self.endless = False
        self.edit_feed = None
        self.page_delay = 0.0
        self.seen = []  # (method, path, feed mode) of every request
        self.blob_sent = []  # bytes sent of each blob answer
        super().__init__(hub_url)

    def get(self, h):
        path, mode = h.path, self.feed
        self.seen.append(("GET", path, mode))
        if path.startswith("/@changes") and mode is not None:
            body = {"html": b"<html><body>Welcome to nginx!</body></html>",
                    "malformed": b'{"serial": "twelve", "sources": 3}'}.get(mode, b"no")
            status = int(mode) if mode.isdigit() else 200
            kind = "text/html" if mode == "html" else "application/json"
            return self.send(h, status, {"Content-Type": kind}, body)
        polling = path.startswith("/@changes") and "wait=0&" not in path
        if self.reread_fails and not polling:
            return self.send(h, 502, {}, b"bad gateway")
        if path.startswith("/@blobs/") and self.endless \
                and h.headers.get("Cache-Control") != "no-cache":
            return self._run_on(h)
        status, headers, body = self._fetch(h)
        if polling and self.poll_delay:
            time.sleep(self.poll_delay)
        if path.startswith("/@changes") and "&after=" in path and self.page_delay:
            time.sleep(self.page_delay)
        if path.startswith("/@changes") and self.edit_feed and status == 200:
            body = json.dumps(self.edit_feed(json.loads(body))).encode()
        self.send(h, status, headers, body)

    def post(self, h, data):
        self.seen.append(("POST", h.path, None))
        status, headers, body = self._fetch(h, "POST", data)
        self.send(h, status, headers, body)

    def _fetch(self, h, method="GET", data=None):
        return self.forward(h, method, data, FORWARDED + ("cache-control",))

    def _run_on(self, h):
        """The blob, then junk until the reader hangs up (or JUNK bytes): no length,
        the end of the answer is the end of the connection."""
        _, headers, body = self._fetch(h)
        h.close_connection = True
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Connection", "close")
        h.end_headers()
        sent = 0
        try:
            h.wfile.write(body)
            sent = len(body)
            junk = b"\0" * 65536
            while sent < len(body) + self.JUNK:
                h.wfile.write(junk)
                sent += len(junk)
        except OSError:
            pass
        self.blob_sent.append(sent)


@pytest.fixture
def front_factory():
    fronts = []

    def start(hub_url):
        fronts.append(HubFront(hub_url))
        return fronts[-1]

    yield start
    for f in fronts:
        f.close()


def versions(mnt, name):
    return {v["id"]: v for v in (status(mnt, name) or {"versions": []})["versions"]}


# --- 1. a damaged mirrored blob is fetched again ----------------------------------------

def test_a_damaged_mirrored_blob_is_fetched_again_never_served(server, cli, origin,
                                                               replica_factory):
    body = os.urandom(200_000)
    vid = hub_add(server, cli, origin, "a", body)
    replica = replica_factory(server.url)
    blob = blob_file(replica.cache, body)
    wait_for(lambda: blob.exists() and not versions(replica, "a")[vid].get("remote"),
             PROPAGATION, what="the prefetch")
    os.chmod(blob, 0o600)
    with open(blob, "r+b") as f:  # the disk lost its end
        f.truncate(100_000)
    assert (replica / "a" / "latest").read_bytes() == body  # fetched again, verified
    assert (replica / "a" / "@versions" / vid).read_bytes() == body
    v = versions(replica, "a")[vid]
    assert not v.get("damaged") and not v.get("remote"), v
    assert blob.stat().st_size == len(body)
    assert "is damaged" in replica.log_text()


def test_a_version_damaged_at_the_hub_is_not_fetched_until_mended(server, cli, origin,
                                                                  replica_factory):
    """The hub found its blob damaged (and cannot download it again yet): a replica not
    holding it shows it damaged and falls back, as the hub does; once the hub has the
    bytes again, so does the replica."""
    first = hub_add(server, cli, origin, "a", b"one" * 1000)
    origin.set("/a", b"two" * 1000)
    cli("refresh", "a", check=True)
    second = wait_for(lambda: (s := hub_status(server, "a")) and s["latest"] != first
                      and s["latest"], what="the hub's second version")
    replica = replica_factory(server.url, prefetch="none")
    wait_for(lambda: (status(replica, "a") or {}).get("latest") == second, PROPAGATION,
             what="the replica's latest")
    origin.fail("/a", *[503] * 50)  # the hub's downloads of it fail for a while
    hub_blob = blob_file(server.cache, b"two" * 1000)
    os.chmod(hub_blob, 0o600)
    with open(hub_blob, "r+b") as f:
        f.truncate(10)
    assert http_request(server.url, f"/a/@versions/{second}")[0] == 503  # found damaged
    wait_for(lambda: (status(replica, "a") or {}).get("latest") == first, PROPAGATION,
             what="the replica falling back")
    assert "damaged at the hub" in versions(replica, "a")[second]["damaged"]["reason"]
    assert (replica / "a" / "latest").read_bytes() == b"one" * 1000
    with pytest.raises(OSError) as e:
        (replica / "a" / "@versions" / second).read_bytes()
    assert e.value.errno == errno.EIO
    origin.resources["/a"].failures.clear()  # the hub downloads it again
    cli("refresh", "a", check=True)
    wait_for(lambda: (status(replica, "a") or {}).get("latest") == second, 20,
             what="the replica's latest once the hub mended it")
    assert (replica / "a" / "latest").read_bytes() == b"two" * 1000


# --- 2. a blob answer is cut off at its size --------------------------------------------

def test_a_blob_answer_running_past_its_size_is_cut_off(server, cli, origin,
                                                        replica_factory, front_factory):
    body = os.urandom(200_000)
    hub_add(server, cli, origin, "a", body)
    front = front_factory(server.url)
    front.endless = True
    replica = replica_factory(front.url)
    wait_for(lambda: blob_file(replica.cache, body).exists(), 20,
             what="the blob, fetched past the cache")
    assert (replica / "a" / "latest").read_bytes() == body
    assert front.blob_sent and front.blob_sent[0] < len(body) + HubFront.JUNK // 2, \
        front.blob_sent  # the replica hung up at the blob's size
    assert "more bytes than the blob's 200000" in replica.log_text()


# --- 3. eviction keeps mirrored versions listed -----------------------------------------

def test_evicted_mirrored_versions_stay_listed_and_come_back(server, cli, origin,
                                                             replica_factory):
    bodies = [bytes([65 + i]) * 40_000 for i in range(3)]
    ids = [hub_add(server, cli, origin, "a", bodies[0])]
    for body in bodies[1:]:
        origin.set("/a", body)
        cli("refresh", "a", check=True)
        ids.append(wait_for(lambda: (s := hub_status(server, "a")) and s["latest"] not in ids
                            and s["latest"], what="the hub's next version"))
    replica = replica_factory(server.url, "--max-cache-size", "100K")
    wait_for(lambda: blob_file(replica.cache, bodies[2]).exists(), PROPAGATION,
             what="the latest's prefetch")
    assert (replica / "a" / "@versions" / ids[0]).read_bytes() == bodies[0]
    # the third 40K do not fit in 100K: the oldest, not latest, is evicted
    assert (replica / "a" / "@versions" / ids[1]).read_bytes() == bodies[1]
    assert not blob_file(replica.cache, bodies[0]).exists()
    listed = versions(replica, "a")
    assert sorted(listed) == sorted(ids), listed  # still listed, as the hub has it
    assert listed[ids[0]].get("remote") and not listed[ids[1]].get("remote")
    assert (replica / "a" / "@versions" / ids[0]).read_bytes() == bodies[0]  # back
    assert listed_ids(replica) == sorted(ids)
    assert (replica / "a" / "latest").read_bytes() == bodies[2]


def listed_ids(mnt):
    return sorted(os.listdir(mnt / "a" / "@versions"))


# --- 4. failover on refusals and answers that are no feed -------------------------------

def test_failover_on_refusals_and_non_feeds_and_writes_go_to_the_followed_hub(
        serve_factory, cli, origin, replica_factory, front_factory, tmp_path):
    config = hub_config(tmp_path)
    one = serve_factory("--config", str(config))
    hub_add(one, cli, origin, "a", b"from one")
    other_cache = tmp_path / "hub2-cache"
    two = serve_factory("--config", str(config), cache=other_cache)
    origin.set("/a2", b"from two")
    run_cli("add", "a", origin.url("/a2"), cache=other_cache, check=True)
    vid_two = wait_for(lambda: (hub_status(two, "a") or {}).get("latest"),
                       what="hub two's version")
    front = front_factory(one.url)
    alone = replica_factory(front.url)  # a replica with no second hub
    wait_for(lambda: status(alone, "a"), PROPAGATION, what="the source through the front")
    front.feed = "401"
    replica = replica_factory(f"{front.url},{two.url}", token=TOKEN)
    wait_for(lambda: (replica / "a" / "latest").exists()
             and (replica / "a" / "latest").read_bytes() == b"from two", PROPAGATION,
             what="failover to hub two")
    said = {"403": "HTTP 403", "404": "HTTP 404", "html": "not JSON",
            "malformed": "no change feed"}
    for mode, words in said.items():
        front.feed = mode
        st = wait_for(lambda w=words: (s := status(alone, "a")) and s["stale"]
                      and w in s["last_error"]["message"] and s, 15,
                      what=f"the lone replica stale with {words!r}")
        assert front.url in st["last_error"]["message"]
        assert (replica / "a" / "latest").read_bytes() == b"from two"
        assert not (replica / "a" / "@status").read_text().count("stale\": true")
    # a forwarded write goes to the hub followed (hub one would refuse this id)
    (replica / "a" / "@control").write_text(f"tag {vid_two} gold\n")
    assert "gold" in hub_status(two, "a")["versions"][0]["tags"]
    assert not any(m == "POST" for m, _, _ in front.seen)
    front.feed = None  # the front answers again: the lone replica catches up
    wait_for(lambda: (s := status(alone, "a")) and not s["stale"], 15,
             what="the lone replica fresh again")


# --- 5. forwarded writes racing the feed; validation dropped; prune ---------------------

def test_forwarded_writes_are_not_undone_by_an_older_feed_answer(
        serve_factory, cli, origin, replica_factory, front_factory, tmp_path):
    hub = serve_factory("--config", str(hub_config(tmp_path)))
    vid = hub_add(hub, cli, origin, "a", b"one")
    front = front_factory(hub.url)
    replica = replica_factory(front.url, token=TOKEN)
    wait_for(lambda: status(replica, "a"), PROPAGATION, what="the source")
    front.poll_delay = 3.0  # long-poll answers travel slowly
    time.sleep(1.0)  # a long-poll is under way

    def tags():
        return versions(replica, "a").get(vid, {}).get("tags", [])

    hub_control(hub, "a", f"tag {vid} silver")  # the long-poll answer: silver, no gold
    time.sleep(1.0)  # ...taken at the hub, still travelling
    (replica / "a" / "@control").write_text(f"tag {vid} gold\n")
    assert "gold" in tags()
    deadline = time.monotonic() + 5.0  # the older answer lands meanwhile: ignored
    while time.monotonic() < deadline:
        assert "gold" in tags(), tags()
        time.sleep(0.05)
    wait_for(lambda: "silver" in tags(), PROPAGATION, what="silver")
    # a write the hub applied whose re-read fails is no failure
    front.poll_delay = 0.0
    front.reread_fails = True
    (replica / "a" / "@control").write_text(f"tag {vid} bronze\n")
    assert "bronze" in hub_status(hub, "a")["versions"][0]["tags"]
    assert status(replica, "a")["last_control_error"] is None
    front.reread_fails = False
    wait_for(lambda: "bronze" in tags(), PROPAGATION + 10, what="bronze through the feed")


def test_a_validation_dropped_at_the_hub_is_dropped(serve_factory, cli, origin,
                                                    replica_factory, front_factory, tmp_path):
    hub = serve_factory("--config", str(hub_config(tmp_path)))
    vid = hub_add(hub, cli, origin, "a", b"one")
    front = front_factory(hub.url)

    def with_validation(feed):
        for st in (feed.get("mirror") or {}).values():
            for v in (st or {}).get("versions", []):
                v["validation"] = "smaller than min_size"
        return feed

    front.edit_feed = with_validation
    replica = replica_factory(front.url)
    wait_for(lambda: versions(replica, "a").get(vid, {}).get("validation"), PROPAGATION,
             what="the validation")
    front.edit_feed = None
    hub_control(hub, "a", f"tag {vid} gold")  # a change: the feed carries `a` again
    wait_for(lambda: "gold" in versions(replica, "a").get(vid, {}).get("tags", []),
             PROPAGATION, what="the change")
    assert "validation" not in versions(replica, "a")[vid]


def test_prune_on_a_replica_keeps_mirrored_sources(server, cli, origin, replica_factory):
    vid = hub_add(server, cli, origin, "a", b"one")
    replica = replica_factory(server.url, "--prune")
    wait_for(lambda: status(replica, "a"), PROPAGATION, what="the source")
    replica.proc.send_signal(signal.SIGHUP)  # reload the config: it declares no source
    wait_for(lambda: "reloaded" in replica.log_text(), 10, what="the reload")
    assert status(replica, "a")["latest"] == vid
    assert (replica / "a" / "latest").read_bytes() == b"one"
    replica.close()
    again = replica_factory("http://127.0.0.1:9", "--prune", cache=replica.cache)
    wait_for(lambda: status(again, "a"), 10, what="the source, offline, after a prune")
    assert (again / "a" / "latest").read_bytes() == b"one"
