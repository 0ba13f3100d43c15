"""Replicas (issue 15 items 1-4): a mount with --upstream following a hub started by
serve_factory on 127.0.0.1. The multi-host tests (network namespaces, a cache between
hub and replicas) are elsewhere; these cover the replica's own rules."""

from __future__ import annotations

import errno
import hashlib
import json
import os

import pytest

from tests.conftest import http_request, run_cli, served_url, wait_for
from tests.hubproxy import HubProxy

PROPAGATION = 5.0  # SPEC: a change at the hub shows in the replica within 5 s


def hub_add(server, cli, origin, name, body):
    origin.set(f"/{name}", body)
    cli("add", name, origin.url(f"/{name}"), check=True)
    return wait_for(lambda: (st := hub_status(server, name)) and st["latest"],
                    what=f"the hub's first version of {name}")


def hub_status(server, name):
    status, _, body = http_request(server.url, f"/{name}/@status")
    return json.loads(body) if status == 200 else None


def status(mnt, name):
    try:
        return json.loads((mnt / name / "@status").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def origin_hits(origin, name):
    return len(origin.seen(f"/{name}"))


def test_mirrors_sources_versions_and_bytes_without_the_origin(server, cli, origin,
                                                               replica_factory):
    vid = hub_add(server, cli, origin, "a", b"alpha " * 1000)
    hits = origin_hits(origin, "a")
    replica = replica_factory(server.url)
    st = wait_for(lambda: (s := status(replica, "a")) and s["latest"] == vid and s,
                  PROPAGATION, what="the source on the replica")
    assert st["versions"][0]["sha256"] == hashlib.sha256(b"alpha " * 1000).hexdigest()
    assert (replica / "a" / "latest").read_bytes() == b"alpha " * 1000
    assert (replica / "a" / "@versions" / vid).read_bytes() == b"alpha " * 1000
    # a new version at the hub shows within 5 s
    origin.set("/a", b"beta")
    cli("refresh", "a", check=True)
    new = wait_for(lambda: (s := hub_status(server, "a")) and s["latest"] != vid
                   and s["latest"], what="the hub's second version")
    hits = origin_hits(origin, "a")
    wait_for(lambda: (status(replica, "a") or {}).get("latest") == new, PROPAGATION,
             what="the new version on the replica")
    assert (replica / "a" / "latest").read_bytes() == b"beta"
    assert origin_hits(origin, "a") == hits  # the replica never asked the origin


def blob_file(cache, body):
    sha = hashlib.sha256(body).hexdigest()
    return cache / "blobs" / sha[:2] / sha


def hub_config(tmp_path, token="hub-ctl-5ecret"):
    config = tmp_path / "hub.toml"
    config.write_text(f'[serve]\nlisten = "127.0.0.1:0"\ncontrol_tokens = ["{token}"]\n')
    return config


def hub_control(server, name, line, token="hub-ctl-5ecret"):
    status, _, body = http_request(server.url, f"/{name}/@control", "POST", line.encode(),
                                   headers={"Authorization": f"Bearer {token}"})
    assert status == 200, body


def test_tags_pins_and_failed_propagate(serve_factory, cli, origin, replica_factory,
                                        tmp_path):
    server = serve_factory("--config", str(hub_config(tmp_path)))
    first = hub_add(server, cli, origin, "a", b"one")
    origin.set("/a", b"two")
    cli("refresh", "a", check=True)
    second = wait_for(lambda: (s := hub_status(server, "a")) and s["latest"] != first
                      and s["latest"], what="the hub's second version")
    replica = replica_factory(server.url)
    wait_for(lambda: (status(replica, "a") or {}).get("latest") == second, PROPAGATION,
             what="the replica's latest")
    hub_control(server, "a", f"tag {first} gold")
    wait_for(lambda: (replica / "a" / "@gold" / first).exists(), PROPAGATION,
             what="the tag on the replica")
    hub_control(server, "a", f"tag {second} failed")  # latest falls back at the hub...
    wait_for(lambda: (status(replica, "a") or {}).get("latest") == first, PROPAGATION,
             what="the replica's latest falling back")
    assert (replica / "a" / "latest").read_bytes() == b"one"
    hub_control(server, "a", f"untag {second} failed")
    hub_control(server, "a", f"pin {first}")
    wait_for(lambda: (status(replica, "a") or {}).get("pinned") == first, PROPAGATION,
             what="the pin on the replica")
    assert (replica / "a" / "latest").read_bytes() == b"one"
    hub_control(server, "a", f"hold {second} 1h")
    wait_for(lambda: (status(replica, "a") or {"versions": []})["versions"][0].get(
        "held_until"), PROPAGATION, what="the hold on the replica")


def test_control_forwarding_with_and_without_a_token(serve_factory, cli, origin,
                                                     replica_factory, tmp_path):
    server = serve_factory("--config", str(hub_config(tmp_path)))
    vid = hub_add(server, cli, origin, "a", b"one")
    no_token = replica_factory(server.url)
    wait_for(lambda: status(no_token, "a"), PROPAGATION, what="the source on the replica")
    with pytest.raises(OSError) as e:
        (no_token / "a" / "@control").write_text(f"tag {vid} gold\n")
    assert e.value.errno == errno.EACCES
    assert "upstream_token" in status(no_token, "a")["last_control_error"]
    assert "gold" not in hub_status(server, "a")["versions"][0]["tags"]
    done = run_cli("tag", "a", vid, "gold", cache=no_token.cache)  # the CLI: the same
    assert done.returncode == 1 and "upstream_token" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr

    wrong = replica_factory(server.url, token="not-the-token")
    wait_for(lambda: status(wrong, "a"), PROPAGATION, what="the source on the replica")
    with pytest.raises(OSError) as e:
        (wrong / "a" / "@control").write_text(f"tag {vid} gold\n")
    assert e.value.errno == errno.EACCES
    assert "not-the-token" not in wrong.log_text()

    good = replica_factory(server.url, token="hub-ctl-5ecret")
    wait_for(lambda: status(good, "a"), PROPAGATION, what="the source on the replica")
    (good / "a" / "@control").write_text(f"tag {vid} gold\n")
    # applied at the hub, and shown by the replica as soon as the write returned
    assert "gold" in hub_status(server, "a")["versions"][0]["tags"]
    assert "gold" in status(good, "a")["versions"][0]["tags"]
    assert status(good, "a")["last_control_error"] is None
    done = run_cli("tag", "a", vid, "silver", cache=good.cache)
    assert done.returncode == 0, done.stderr
    assert "silver" in hub_status(server, "a")["versions"][0]["tags"]
    # the hub's 400 comes back as EINVAL, with its reason
    with pytest.raises(OSError) as e:
        (good / "a" / "@control").write_text("tag 20990101T000000Z-00000000 gold\n")
    assert e.value.errno == errno.EINVAL
    assert "20990101T000000Z-00000000" in status(good, "a")["last_control_error"]
    # a source of the replica's own lives beside the mirrored ones, and stays local
    origin.set("/own", b"mine")
    (good / "@control").write_text(f"add own {origin.url('/own')}\n")
    assert (good / "own" / "latest").read_bytes() == b"mine"
    assert hub_status(server, "own") is None
    # one write for a mirrored source and a local one is refused as a whole
    with pytest.raises(OSError) as e:
        (good / "@control").write_text("remove a\nremove own\n")
    assert e.value.errno == errno.EINVAL
    assert (good / "own").exists() and hub_status(server, "a") is not None
    # remove of a mirrored source is the hub's: gone everywhere
    (good / "@control").write_text("remove a\n")
    assert hub_status(server, "a") is None
    assert not (good / "a").exists()
    assert "hub-ctl-5ecret" not in good.log_text()
    # without the replica's mount, a mirrored source is not changed in the index
    vid_b = hub_add(server, cli, origin, "b", b"bee")
    wait_for(lambda: (status(good, "b") or {}).get("latest") == vid_b, PROPAGATION,
             what="b on the replica")
    cache = good.cache
    good.close()
    done = run_cli("tag", "b", vid_b, "gold", cache=cache)
    assert done.returncode == 1 and "mirrored from a hub" in done.stderr, done.stderr
    done = run_cli("refresh", "b", cache=cache)
    assert done.returncode == 1 and "mirrored from a hub" in done.stderr, done.stderr


def test_hub_down_stale_offline_restart_and_catch_up(serve_factory, cli, origin,
                                                     replica_factory, tmp_path):
    server = serve_factory()
    vid = hub_add(server, cli, origin, "a", b"held bytes")
    port = server.port
    replica = replica_factory(server.url)
    wait_for(lambda: blob_file(replica.cache, b"held bytes").exists(), PROPAGATION,
             what="the prefetch of latest")
    server.close()
    st = wait_for(lambda: (s := status(replica, "a")) and s["stale"] and s, PROPAGATION,
                  what="stale")
    assert "unreachable" in st["last_error"]["message"]
    assert (replica / "a" / "latest").read_bytes() == b"held bytes"
    # a restart with the hub down: starts from its index, serves what it holds
    cache = replica.cache
    replica.close()
    replica = replica_factory(server.url, cache=cache)
    assert (replica / "a" / "@versions" / vid).read_bytes() == b"held bytes"
    wait_for(lambda: (status(replica, "a") or {}).get("stale"), PROPAGATION, what="stale")
    # the hub comes back (same port) with a new version: caught up without a restart
    origin.set("/a", b"newer")
    server = serve_factory("--listen", f"127.0.0.1:{port}")
    cli("refresh", "a", check=True)
    new = wait_for(lambda: (s := hub_status(server, "a")) and s["latest"] != vid
                   and s["latest"], what="the hub's new version")
    wait_for(lambda: (s := status(replica, "a")) and s["latest"] == new and not s["stale"],
             PROPAGATION, what="the catch-up")
    assert (replica / "a" / "latest").read_bytes() == b"newer"


def test_failover_to_the_next_hub(serve_factory, cli, origin, replica_factory, tmp_path):
    first = serve_factory()
    hub_add(first, cli, origin, "a", b"from one")
    other_cache = tmp_path / "hub2-cache"
    second = serve_factory(cache=other_cache)
    origin.set("/b", b"from two")
    run_cli("add", "b", origin.url("/b"), cache=other_cache, check=True)
    wait_for(lambda: (hub_status(second, "b") or {}).get("latest"), what="hub two's version")
    replica = replica_factory(f"{first.url},{second.url}")
    wait_for(lambda: status(replica, "a"), PROPAGATION, what="hub one's source")
    assert status(replica, "b") is None
    first.close()
    wait_for(lambda: status(replica, "b"), PROPAGATION, what="hub two's source")
    assert (replica / "b" / "latest").read_bytes() == b"from two"
    wait_for(lambda: status(replica, "a") is None, PROPAGATION,
             what="hub one's source gone (hub two has none)")


def test_upstream_sources_and_prefetch_modes(server, cli, origin, replica_factory):
    hub_add(server, cli, origin, "team-a", b"A" * 5000)
    hub_add(server, cli, origin, "other", b"O" * 5000)
    origin.set("/team-a", b"A2" * 5000)
    cli("refresh", "team-a", check=True)
    wait_for(lambda: len(hub_status(server, "team-a")["versions"]) == 2, what="two versions")
    none = replica_factory(server.url, sources=["team-*"], prefetch="none")
    every = replica_factory(server.url, sources=["team-*"], prefetch="all")
    latest = replica_factory(server.url, sources=["team-*"])
    for r in (none, every, latest):
        wait_for(lambda r=r: status(r, "team-a"), PROPAGATION, what="team-a")
        assert status(r, "other") is None and not (r / "other").exists()
    wait_for(lambda: blob_file(every.cache, b"A" * 5000).exists()
             and blob_file(every.cache, b"A2" * 5000).exists(), PROPAGATION,
             what="prefetch all")
    wait_for(lambda: blob_file(latest.cache, b"A2" * 5000).exists(), PROPAGATION,
             what="prefetch latest")
    assert not blob_file(latest.cache, b"A" * 5000).exists()
    assert not blob_file(none.cache, b"A2" * 5000).exists()
    assert all(v.get("remote") for v in status(none, "team-a")["versions"])
    done = run_cli("check", cache=none.cache)  # versions not fetched are no damage
    assert done.returncode == 0 and "unknown" not in done.stdout, done.stdout + done.stderr
    assert (none / "team-a" / "latest").read_bytes() == b"A2" * 5000  # fetched on read
    assert blob_file(none.cache, b"A2" * 5000).exists()


def hostile_feed(body):
    """The hub's feed with sources added that a broken or hostile hub could send: a
    name with a NUL (another source's key prefix), a sha256 that is a path, options of
    the wrong type, a size that is no number."""
    feed = json.loads(body)
    good = (feed.get("mirror") or {}).get("a")
    if good and good.get("versions"):
        def bad(name, **version):
            st = json.loads(json.dumps(good))
            st["versions"][0].update(version)
            feed["mirror"][name] = st
            feed["sources"].append(name)
            return st
        bad("a\u0000x")
        bad("evil", sha256="../../planted")
        bad("evil2")["options"]["keep_versions"] = "many"
        bad("evil3", size="big")
    return json.dumps(feed).encode()


class CorruptingProxy(HubProxy):
    """Forwards to the hub. ``flip``: flips one byte of every blob answer unless the
    request says ``Cache-Control: no-cache`` (as a stale cache would, until told to
    refresh). ``cut``: the first blob answer stops after half its body. ``hostile``:
    the change feed also carries malformed sources (hostile_feed)."""

    def __init__(self, hub_url, mode="flip"):
        self.mode = mode
        self.blob_requests = []
        self.ranges = []
        super().__init__(hub_url)

    def get(self, h):
        mode = self.mode
        status, rh, body = self.forward(h)
        cut = False
        if mode == "hostile" and h.path.startswith("/@changes") and status == 200:
            body = hostile_feed(body)
        if h.path.startswith("/@blobs/"):
            self.blob_requests.append(h.headers.get("Cache-Control"))
            self.ranges.append(h.headers.get("Range"))
            if mode == "flip" and h.headers.get("Cache-Control") != "no-cache" and body:
                body = bytes([body[0] ^ 0xFF]) + body[1:]
            cut = mode == "cut" and len(self.ranges) == 1
        self.send_head(h, status, rh, len(body))
        h.wfile.write(body[:len(body) // 2] if cut else body)
        if cut:
            h.wfile.flush()
            h.close_connection = True


def test_corrupted_bytes_are_caught_retried_past_the_cache_and_never_served(
        server, cli, origin, replica_factory):
    body = os.urandom(200_000)
    hub_add(server, cli, origin, "a", body)
    proxy = CorruptingProxy(server.url)
    try:
        replica = replica_factory(proxy.url, prefetch="none")
        wait_for(lambda: status(replica, "a"), PROPAGATION, what="the source")
        try:  # a first read streams: given the bad bytes as they came, it fails at the end
            assert (replica / "a" / "latest").read_bytes() == body
        except OSError as e:
            assert e.errno == errno.EIO
        assert (replica / "a" / "latest").read_bytes() == body
        assert proxy.blob_requests[0] is None and "no-cache" in proxy.blob_requests
        assert "wrong sha256" in replica.log_text()
    finally:
        replica.close()
        proxy.close()


def test_a_source_removed_at_the_hub_goes(server, cli, origin, replica_factory):
    hub_add(server, cli, origin, "a", b"bytes of a")
    replica = replica_factory(server.url)
    wait_for(lambda: blob_file(replica.cache, b"bytes of a").exists(), PROPAGATION,
             what="the prefetch")
    cli("remove", "a", check=True)
    wait_for(lambda: not (replica / "a").exists(), PROPAGATION, what="the removal")
    assert status(replica, "a") is None


def test_a_serving_replica(serve_factory, cli, origin, replica_factory, tmp_path):
    hub = serve_factory("--config", str(hub_config(tmp_path)))
    vid = hub_add(hub, cli, origin, "a", b"served by the replica")
    replica = replica_factory(hub.url, "--serve", "127.0.0.1:0", prefetch="none",
                              token="hub-ctl-5ecret")
    url = wait_for(lambda: served_url(replica.log), what="the replica's server")
    wait_for(lambda: http_request(url, "/a/@status")[0] == 200, PROPAGATION, what="a")
    got = http_request(url, f"/a/@versions/{vid}")
    assert got[0] == 200 and got[2] == b"served by the replica"
    # its control endpoint takes the replica's own control tokens (none here)
    assert http_request(url, "/a/@control", "POST", f"tag {vid} gold\n".encode())[0] == 401


def test_a_replica_of_a_replica_reads_what_its_hub_has_not_fetched(
        serve_factory, cli, origin, replica_factory, tmp_path):
    """The middle replica holds nothing (prefetch none): a blob its own replica asks it
    for is fetched from the hub, verified, and then served."""
    hub = serve_factory()
    body = os.urandom(300_000)
    hub_add(hub, cli, origin, "a", body)
    middle = replica_factory(hub.url, "--serve", "127.0.0.1:0", prefetch="none")
    url = wait_for(lambda: served_url(middle.log), what="the middle replica's server")
    wait_for(lambda: http_request(url, "/a/@status")[0] == 200, PROPAGATION, what="a")
    sha = hashlib.sha256(body).hexdigest()
    assert status(middle, "a")["versions"][0]["remote"] is True
    got = http_request(url, f"/@blobs/sha256/{sha}")
    assert got[0] == 200 and got[2] == body
    assert "remote" not in status(middle, "a")["versions"][0]  # now held
    # and a replica of the middle one, with nothing held anywhere below the hub
    hub_add(hub, cli, origin, "b", body[::-1])
    edge = replica_factory(url, prefetch="none")
    wait_for(lambda: (edge / "b/latest").exists(), 2 * PROPAGATION, what="b on the edge")
    assert (edge / "b/latest").read_bytes() == body[::-1]
    assert http_request(url, f"/@blobs/sha256/{'0' * 64}")[0] == 404


def test_an_interrupted_blob_resumes_with_a_range(server, cli, origin, replica_factory):
    body = os.urandom(300_000)
    hub_add(server, cli, origin, "a", body)
    proxy = CorruptingProxy(server.url, mode="cut")
    try:
        replica = replica_factory(proxy.url, prefetch="none")
        wait_for(lambda: status(replica, "a"), PROPAGATION, what="the source")
        assert (replica / "a" / "latest").read_bytes() == body
        assert proxy.ranges[0] is None
        assert proxy.ranges[1] and proxy.ranges[1].startswith("bytes=") \
            and not proxy.ranges[1].startswith("bytes=0-"), proxy.ranges
    finally:
        replica.close()
        proxy.close()


def test_a_hostile_hubs_malformed_sources_are_skipped(server, cli, origin, replica_factory):
    """Names, version ids, sha256s and options from the hub are checked before they
    reach the index: a sha256 that is a path never becomes a file, a name with a NUL
    never shows, and the well-formed sources beside them are mirrored as usual."""
    body = b"good bytes " * 100
    hub_add(server, cli, origin, "a", body)
    proxy = CorruptingProxy(server.url, mode="hostile")
    try:
        replica = replica_factory(proxy.url)
        wait_for(lambda: blob_file(replica.cache, body).exists(), PROPAGATION,
                 what="the prefetch of the good source")
        assert (replica / "a" / "latest").read_bytes() == body
        assert sorted(n for n in os.listdir(replica.path) if not n.startswith("@")) == ["a"]
        assert not (replica.cache / "planted.part").exists()
        assert not list(replica.cache.rglob("planted*"))
        assert "the hub's 'evil' skipped" in replica.log_text()
    finally:
        replica.close()
        proxy.close()


def test_an_upstream_url_with_credentials_is_refused(cli, tmp_path):
    (tmp_path / "mnt").mkdir()
    r = run_cli("mount", str(tmp_path / "mnt"), "--upstream", "http://user:pw@127.0.0.1:9",
                "--cache", str(tmp_path / "c"))
    assert r.returncode == 2, r
    assert "upstream_token" in r.stderr and "pw" not in r.stderr + r.stdout
