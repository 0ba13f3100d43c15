"""contrib/nginx/replica-cache.conf: nginx proxy_cache between a hub and its clients,
each in a host of its own (tests/hosts.py): the hub sends each blob once for many
concurrent clients, Range requests are answered from the cache, `latest` and `@changes`
always reach the hub, `Cache-Control: no-cache` replaces a corrupted cache entry, and a
token-protected hub's bytes are never served from the cache to a client without the
token."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.hosts import Network, network  # noqa: F401 (fixture)
from tests.hubs import (
    Hub,
    NginxCache,
    check_latest_status_changes_reach_the_hub,
    fetch_all,
    nginx_exe,
)

pytestmark = pytest.mark.skipif(nginx_exe() is None, reason="nginx is not installed "
                                "(scripts/install.sh installs nginx-light)")

BODY1 = os.urandom(3 << 20)
BODY2 = os.urandom(1 << 20)
CLIENTS = 8


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def setup(network: Network, tmp_path: Path, hub_config: str = ""):
    hub = Hub(network.add("hub"), tmp_path / "hub", hub_config)
    cache = NginxCache(network.add("cache"), tmp_path / "nginx", hub.url)
    return hub, cache, network.add("client")


def test_each_blob_sent_once_ranges_from_cache(network: Network, tmp_path: Path) -> None:
    hub, cache, client = setup(network, tmp_path)
    vid = hub.add("t", BODY1)
    blob = f"/@blobs/sha256/{sha(BODY1)}"
    hub.host.limit("40mbit")  # ~0.6 s for the blob: the clients' requests overlap
    bodies = fetch_all(client, cache.url + blob, tmp_path, CLIENTS)
    assert all(b == BODY1 for b in bodies)
    assert hub.count(f"GET {blob} 200", 1) == 1
    # a Range request of the cached blob: answered by the cache
    status, h, body = client.http(cache.url + blob, "-r", "1000-1999")
    assert (status, body, h["x-cache-status"]) == (206, BODY1[1000:2000], "HIT")
    # the version's own URL is cached too; a first Range request of it (a miss) is cut
    # out of one whole fetch, after which the whole answer is a hit
    status, h, body = client.http(f"{cache.url}/t/@versions/{vid}", "-r", "5-9")
    assert (status, body) == (206, BODY1[5:10])
    status, h, body = client.http(f"{cache.url}/t/@versions/{vid}")
    assert (status, body, h["x-cache-status"]) == (200, BODY1, "HIT")
    assert hub.count(f"GET /t/@versions/{vid} 200", 1) == 1
    assert hub.count(r"GET \S+ 206", 0) == 0  # the hub never had to cut a range


def test_latest_status_changes_reach_the_hub(network: Network, tmp_path: Path) -> None:
    hub, cache, client = setup(network, tmp_path)
    check_latest_status_changes_reach_the_hub(hub, cache.url, client, BODY1, BODY2)


def test_no_cache_replaces_a_corrupted_entry(network: Network, tmp_path: Path) -> None:
    hub, cache, client = setup(network, tmp_path)
    hub.add("t", BODY2)
    blob = f"{cache.url}/@blobs/sha256/{sha(BODY2)}"
    assert client.http(blob)[2] == BODY2
    [entry] = cache.entries()
    data = bytearray(entry.read_bytes())  # the body is the file's end
    data[-100:] = b"X" * 100
    entry.write_bytes(bytes(data))
    assert client.http(blob)[2] == BODY2[:-100] + b"X" * 100  # the cache serves it
    status, h, body = client.http(blob, "-H", "Cache-Control: no-cache")
    assert (status, body) == (200, BODY2)
    status, h, body = client.http(blob)
    assert (status, body, h["x-cache-status"]) == (200, BODY2, "HIT")  # stored anew
    assert hub.count(f"GET /@blobs/sha256/{sha(BODY2)} 200", 2) == 2


def test_tokens_are_part_of_the_key(network: Network, tmp_path: Path) -> None:
    hub, cache, client = setup(network, tmp_path,
                               'read_tokens = ["reader-1", "reader-2"]\n')
    hub.add("t", BODY2)
    blob = f"{cache.url}/@blobs/sha256/{sha(BODY2)}"
    auth = ["-H", "Authorization: Bearer reader-1"]
    assert client.http(blob, *auth)[:1] == (200,)
    status, h, body = client.http(blob, *auth)
    assert (status, body, h["x-cache-status"]) == (200, BODY2, "HIT")
    for refused in ([], ["-H", "Authorization: Bearer wrong"]):
        status, _, body = client.http(blob, *refused)
        assert status == 401 and BODY2[:64] not in body
    assert client.http(blob, "-H", "Authorization: Bearer reader-2")[2] == BODY2
    assert hub.count(f"GET /@blobs/sha256/{sha(BODY2)} 200", 2) == 2  # once per token
    # no token value in the logs the cache writes
    logs = b"".join(p.read_bytes() for p in (cache.prefix / "logs").iterdir())
    assert b"reader-1" not in logs


def test_cache_survives_nothing_leaks(network: Network, tmp_path: Path) -> None:
    """The processes of a test's hosts end with it (their PIDs are gone after close)."""
    hub, cache, client = setup(network, tmp_path)
    pids = [hub.proc.pid, hub.origin.pid, cache.proc.pid]
    network.close()
    time.sleep(0.2)
    alive = [p for p in pids if subprocess.run(["kill", "-0", str(p)],
                                               capture_output=True).returncode == 0]
    assert not alive
