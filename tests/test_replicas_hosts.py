"""Replicas across hosts (issue 15, SPEC part 2 "Replicas"): a hub, an nginx cache
(contrib/nginx/replica-cache.conf) and three replicas, each in a host of its own
(tests/hosts.py), each replica's daemon mounting its own FUSE filesystem inside its
host, read by the test with ordinary file calls."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.hosts import Network, network  # noqa: F401 (fixture)
from tests.hubs import Hub, NginxCache, Replica, nginx_exe

pytestmark = [
    pytest.mark.skipif(nginx_exe() is None, reason="nginx is not installed "
                       "(scripts/install.sh installs nginx-light)"),
    # a replica cut off from its hub says so in its log; that is what these tests do
    pytest.mark.allow_daemon_errors(r"upstream|hub|connect|unreachable"),
]

PROPAGATION = 5.0   # SPEC: a change at the hub shows on a replica within 5 s
CATCH_UP = 20.0     # a replica back on the network: its retry period plus the 5 s
# A cut link gives no error, only silence: a replica notices when its /@changes long
# poll (25 s) and the silence timeout after it (30 s) have run out. (A closed port or a
# killed hub is noticed at once.)
SILENT_LINK = 75.0
TOKEN = "hub-control-7oken"
V1, V2 = os.urandom(2 << 20), os.urandom(1 << 20)


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def status(replica: Replica, name: str) -> dict:
    try:
        return replica.status(name)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def on_all(replicas: list[Replica], name: str, check, timeout: float, what: str) -> float:
    """Seconds until ``check(status)`` holds on every replica (bounded by ``timeout``)."""
    started = time.monotonic()
    for r in replicas:
        left = max(0.1, timeout - (time.monotonic() - started))
        wait_for(lambda r=r: check(status(r, name)), left, 0.05,
                 what=f"{what} on {r.host.name}")
    return time.monotonic() - started


def hub_control(hub: Hub, name: str, line: str) -> None:
    status_code, _, body = hub.host.http(f"{hub.url}/{name}/@control", "--data-binary", line,
                                         "-H", f"Authorization: Bearer {TOKEN}")
    assert status_code == 200, body


def setup(network: Network, tmp_path: Path, replicas: int = 3, config: str = "",
          upstream: str | None = None):
    hub = Hub(network.add("hub"), tmp_path / "hub", f'control_tokens = ["{TOKEN}"]\n')
    cache = NginxCache(network.add("cache"), tmp_path / "nginx", hub.url)
    vid = hub.add("t", V1)
    hosts = [network.add(f"r{i}") for i in range(replicas)]
    mounts = [Replica(h, tmp_path / h.name, upstream or cache.url, config=config)
              for h in hosts]
    return hub, cache, mounts, vid


def test_mirroring_through_the_cache(network: Network, tmp_path: Path) -> None:
    hub, cache, replicas, v1 = setup(network, tmp_path)
    on_all(replicas, "t", lambda s: s.get("latest") == v1, PROPAGATION, "the hub's source")
    for r in replicas:
        assert (r / "t" / "latest").read_bytes() == V1
        assert (r / "t" / "@versions" / v1).read_bytes() == V1
    assert hub.count(f"GET /@blobs/sha256/{sha(V1)} 200", 1) == 1  # the cache fanned out
    # a new version: on every replica within 5 s, bytes from the cache
    v2 = hub.new_version("t", V2)
    took = on_all(replicas, "t", lambda s: s.get("latest") == v2, PROPAGATION,
                  "the new version")
    assert all((r / "t" / "latest").read_bytes() == V2 for r in replicas), took
    assert hub.count(f"GET /@blobs/sha256/{sha(V2)} 200", 1) == 1
    # a tag, a failed tag (every replica falls back), a pin
    hub_control(hub, "t", f"tag {v1} gold")
    on_all(replicas, "t", lambda s: any("gold" in v["tags"] for v in s.get("versions", [])),
           PROPAGATION, "the tag")
    assert all((r / "t" / "@gold" / v1).read_bytes() == V1 for r in replicas)
    hub_control(hub, "t", f"tag {v2} failed")
    on_all(replicas, "t", lambda s: s.get("latest") == v1, PROPAGATION, "the fallback")
    assert all((r / "t" / "latest").read_bytes() == V1 for r in replicas)
    hub_control(hub, "t", f"untag {v2} failed")
    hub_control(hub, "t", f"pin {v1}")
    on_all(replicas, "t", lambda s: s.get("pinned") == v1, PROPAGATION, "the pin")
    assert all((r / "t" / "latest").read_bytes() == V1 for r in replicas)


def test_a_corrupting_cache_is_caught(network: Network, tmp_path: Path) -> None:
    hub = Hub(network.add("hub"), tmp_path / "hub")
    cache = NginxCache(network.add("cache"), tmp_path / "nginx", hub.url)
    vid = hub.add("t", V1)
    client = network.add("client")
    blob = f"{cache.url}/@blobs/sha256/{sha(V1)}"
    assert client.http(blob)[2] == V1
    [entry] = cache.entries()
    data = bytearray(entry.read_bytes())
    data[-4096:] = bytes(4096)  # the body's end: zeros
    entry.write_bytes(bytes(data))
    assert client.http(blob)[2] != V1  # the cache now serves corrupted bytes
    replica = Replica(network.add("r0"), tmp_path / "r0", cache.url)
    wait_for(lambda: status(replica, "t").get("latest") == vid, PROPAGATION,
             what="the source on the replica")
    try:  # never the corrupted bytes as a whole file: a read that got some fails (EIO)
        assert (replica / "t" / "latest").read_bytes() == V1
    except OSError as e:
        assert e.errno == errno.EIO
    assert (replica / "t" / "latest").read_bytes() == V1
    # the replica asked again with no-cache: the cache went to the hub and healed
    assert hub.count(f"GET /@blobs/sha256/{sha(V1)} 200", 2) == 2
    assert client.http(blob)[2] == V1


@pytest.mark.timeout(300)  # two silent-link waits
def test_link_down_and_back_hub_killed_and_back(network: Network, tmp_path: Path) -> None:
    hub, cache, replicas, v1 = setup(network, tmp_path)
    on_all(replicas, "t", lambda s: s.get("latest") == v1, PROPAGATION, "the hub's source")
    assert all((r / "t" / "latest").read_bytes() == V1 for r in replicas)  # held now
    cut, others = replicas[0], replicas[1:]
    cut.host.link_down()
    v2 = hub.new_version("t", V2)
    on_all(others, "t", lambda s: s.get("latest") == v2, PROPAGATION, "the new version")
    # the cut replica serves what it holds and says it is stale, with the hub's error
    st = wait_for(lambda: (s := status(cut, "t")) and s.get("stale") and s, SILENT_LINK,
                  what="stale on the cut replica")
    assert st["latest"] == v1 and st["last_error"]
    assert (cut / "t" / "latest").read_bytes() == V1
    cut.host.link_up()
    wait_for(lambda: status(cut, "t").get("latest") == v2, CATCH_UP,
             what="the cut replica catching up")
    assert (cut / "t" / "latest").read_bytes() == V2
    wait_for(lambda: not status(cut, "t").get("stale"), CATCH_UP, what="stale cleared")
    # the hub killed: every replica serves what it holds, stale; back: caught up
    hub.stop()
    on_all(replicas, "t", lambda s: s.get("stale"), CATCH_UP, "stale")
    assert all((r / "t" / "latest").read_bytes() == V2 for r in replicas)
    hub.start()
    hub_control(hub, "t", f"tag {v2} gold")
    on_all(replicas, "t", lambda s: any("gold" in v["tags"] for v in s.get("versions", [])),
           CATCH_UP, "the tag after the hub came back")


@pytest.mark.timeout(300)  # a silent-link wait
def test_failover_to_a_second_hub(network: Network, tmp_path: Path) -> None:
    hub = Hub(network.add("hub"), tmp_path / "hub", f'control_tokens = ["{TOKEN}"]\n')
    v1 = hub.add("t", V1)
    hub.stop()  # the second hub starts from a copy of the first one's cache
    shutil.copytree(hub.cache, tmp_path / "hub2" / "cache")
    hub.start()
    hub2 = Hub(network.add("hub2"), tmp_path / "hub2", f'control_tokens = ["{TOKEN}"]\n')
    replicas = [Replica(network.add(f"r{i}"), tmp_path / f"r{i}", f"{hub.url},{hub2.url}")
                for i in range(3)]
    on_all(replicas, "t", lambda s: s.get("latest") == v1, PROPAGATION, "the hub's source")
    hub.host.link_down()  # the first hub gone from the network
    hub_control(hub2, "t", f"tag {v1} gold")
    on_all(replicas, "t", lambda s: any("gold" in v["tags"] for v in s.get("versions", [])),
           SILENT_LINK, "the second hub's tag")
    assert all((r / "t" / "@gold" / v1).read_bytes() == V1 for r in replicas)


def test_control_forwarding_with_and_without_a_token(network: Network,
                                                     tmp_path: Path) -> None:
    hub, cache, replicas, v1 = setup(network, tmp_path, replicas=2)
    with_token = Replica(network.add("rt"), tmp_path / "rt", cache.url,
                         config=f'[daemon]\nupstream_token = "{TOKEN}"\n')
    everyone = [*replicas, with_token]
    on_all(everyone, "t", lambda s: s.get("latest") == v1, PROPAGATION, "the hub's source")
    with pytest.raises(OSError) as e:
        (replicas[0] / "t" / "@control").write_text(f"tag {v1} gold\n")
    assert e.value.errno == errno.EACCES
    assert "upstream_token" in status(replicas[0], "t")["last_control_error"]
    assert "gold" not in hub.status("t")["versions"][0]["tags"]
    (with_token / "t" / "@control").write_text(f"tag {v1} gold\n")  # through the cache
    assert "gold" in hub.status("t")["versions"][0]["tags"]  # applied when write returns
    on_all(everyone, "t", lambda s: any("gold" in v["tags"] for v in s.get("versions", [])),
           PROPAGATION, "the forwarded tag")
    for r in everyone:
        assert TOKEN not in r.log.read_text(errors="replace")
        assert TOKEN not in (r / "@status").read_text()


def test_upstream_sources(network: Network, tmp_path: Path) -> None:
    hub = Hub(network.add("hub"), tmp_path / "hub")
    cache = NginxCache(network.add("cache"), tmp_path / "nginx", hub.url)
    team = hub.add("team-a", V2)
    hub.add("other", b"not mirrored")
    replica = Replica(network.add("r0"), tmp_path / "r0", cache.url,
                      config='[daemon]\nupstream_sources = ["team-*"]\n')
    wait_for(lambda: status(replica, "team-a").get("latest") == team, PROPAGATION,
             what="the matching source")
    assert (replica / "team-a" / "latest").read_bytes() == V2
    names = {s["name"] for s in replica.status()["sources"]}
    assert names == {"team-a"}
    assert not (replica / "other").exists()


def test_restart_with_no_network(network: Network, tmp_path: Path) -> None:
    hub, cache, [replica], v1 = setup(network, tmp_path, replicas=1)
    wait_for(lambda: status(replica, "t").get("latest") == v1, PROPAGATION,
             what="the hub's source")
    assert (replica / "t" / "latest").read_bytes() == V1
    replica.stop()
    replica.host.link_down()
    replica.start()
    st = wait_for(lambda: (s := status(replica, "t")) and s.get("stale") and s, CATCH_UP,
                  what="stale after an offline start")
    assert st["latest"] == v1 and st["last_error"]
    assert (replica / "t" / "latest").read_bytes() == V1
    assert (replica / "t" / "@versions" / v1).read_bytes() == V1
    replica.host.link_up()
    v2 = hub.new_version("t", V2)
    wait_for(lambda: status(replica, "t").get("latest") == v2, CATCH_UP,
             what="the replica catching up")
    assert (replica / "t" / "latest").read_bytes() == V2

