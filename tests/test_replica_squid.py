"""contrib/squid/replica-cache.conf: Squid as the HTTP cache between a hub and its
clients, each in a host of its own (tests/hosts.py), as tests/test_replica_cache.py does
for nginx: the hub sends each blob once for many concurrent clients, Range requests are
answered from the cache, `latest` and `@changes` always reach the hub (validators
included), `Cache-Control: no-cache` replaces a corrupted entry, Squid checks a
token-protected hub's token itself, and a replica mirrors its hub through Squid."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.hosts import Host, Network, network, wait_listening  # noqa: F401 (fixture)
from tests.hubs import (
    CACHE_PORT,
    START_TIMEOUT,
    Hub,
    Replica,
    check_latest_status_changes_reach_the_hub,
    fetch_all,
)

CONTRIB_SQUID = Path(__file__).resolve().parent.parent / "contrib" / "squid" / \
    "replica-cache.conf"


def squid_exe() -> str | None:
    return shutil.which("squid") or ("/usr/sbin/squid" if Path("/usr/sbin/squid").exists()
                                     else None)


pytestmark = pytest.mark.skipif(squid_exe() is None, reason="squid is not installed "
                                "(scripts/install.sh installs it)")

BODY1 = os.urandom(3 << 20)
BODY2 = os.urandom(1 << 20)
CLIENTS = 8
TOKEN = "squid-reader-1"


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class SquidCache:
    """contrib/squid/replica-cache.conf as shipped but for the hub's address, the
    listening address, a small store and a quick shutdown; in a directory of Squid's
    own user (it drops root), removed when the network closes."""

    def __init__(self, host: Host, hub_url: str, token: str | None = None) -> None:
        self.host = host
        self.work = Path(tempfile.mkdtemp(prefix="buffyfs-squid-"))
        host.network.finalizers.append(lambda: shutil.rmtree(self.work, ignore_errors=True))
        user = pwd.getpwnam("proxy")
        hub_host, hub_port = hub_url.split("://", 1)[1].split(":")
        conf = CONTRIB_SQUID.read_text()
        conf = conf.replace("http_port 8632 ", f"http_port {host.address}:{CACHE_PORT} ")
        conf = conf.replace("cache_peer hub.example parent 8631 ",
                            f"cache_peer {hub_host} parent {hub_port} ")
        conf = conf.replace("/var/spool/squid-buffyfs 100000 16 256",
                            f"{self.work}/store 1000 4 16")
        if token is not None:
            conf = conf.replace("#acl buffyfs_token req_header Authorization ^Bearer\\ "
                                "READ-TOKEN$",
                                f"acl buffyfs_token req_header Authorization ^Bearer\\ {token}$")
            conf = conf.replace("#http_access deny !buffyfs_token",
                                "http_access deny !buffyfs_token")
            assert "#acl buffyfs_token" not in conf
        conf += (f"\ncache_effective_user proxy\npid_filename {self.work}/squid.pid\n"
                 f"cache_log {self.work}/cache.log\n"
                 f"access_log stdio:{self.work}/access.log\ncoredump_dir {self.work}\n"
                 "shutdown_lifetime 0 seconds\n")
        self.conf = self.work / "squid.conf"
        self.conf.write_text(conf)
        (self.work / "store").mkdir()
        for path in (self.work, self.work / "store"):
            os.chown(path, user.pw_uid, user.pw_gid)
        host.run([squid_exe(), "-z", "-N", "-f", str(self.conf)], check=True)
        self.url = f"http://{host.address}:{CACHE_PORT}"
        self.proc = host.popen([squid_exe(), "-N", "-f", str(self.conf)],
                               log=self.work / "squid.out")
        wait_listening(host, CACHE_PORT, START_TIMEOUT)

    def logs(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.work.iterdir() if p.is_file()
                        and p.suffix in (".log", ".out"))


def setup(network: Network, tmp_path: Path, hub_config: str = "",
          token: str | None = None):
    hub = Hub(network.add("hub"), tmp_path / "hub", hub_config)
    cache = SquidCache(network.add("cache"), hub.url, token)
    return hub, cache, network.add("client")


def test_each_blob_sent_once_ranges_from_cache(network: Network, tmp_path: Path) -> None:
    hub, cache, client = setup(network, tmp_path)
    vid = hub.add("t", BODY1)
    blob = f"/@blobs/sha256/{sha(BODY1)}"
    hub.host.limit("40mbit")  # ~0.6 s for the blob: the clients' requests overlap
    bodies = fetch_all(client, cache.url + blob, tmp_path, CLIENTS)
    assert all(b == BODY1 for b in bodies)
    assert hub.count(f"GET {blob} 200", 1) == 1
    status, h, body = client.http(cache.url + blob, "-r", "1000-1999")
    assert (status, body) == (206, BODY1[1000:2000])
    assert h["x-cache"].startswith("HIT")
    # a first Range request of the version's own URL is cut out of one whole fetch
    status, h, body = client.http(f"{cache.url}/t/@versions/{vid}", "-r", "5-9")
    assert (status, body) == (206, BODY1[5:10])
    wait_for(lambda: client.http(f"{cache.url}/t/@versions/{vid}")[1]["x-cache"]
             .startswith("HIT"), 10, what="the version's answer stored whole")
    assert client.http(f"{cache.url}/t/@versions/{vid}")[2] == BODY1
    assert hub.count(f"GET /t/@versions/{vid} 200", 1) == 1
    assert hub.count(r"GET \S+ 206", 0) == 0  # the hub never had to cut a range


def test_latest_status_changes_reach_the_hub(network: Network, tmp_path: Path) -> None:
    hub, cache, client = setup(network, tmp_path)
    check_latest_status_changes_reach_the_hub(hub, cache.url, client, BODY1, BODY2,
                                              validators_counted=True)


def test_no_cache_replaces_a_corrupted_entry(network: Network, tmp_path: Path) -> None:
    hub, cache, client = setup(network, tmp_path)
    hub.add("t", BODY2)
    blob = f"{cache.url}/@blobs/sha256/{sha(BODY2)}"
    assert client.http(blob)[2] == BODY2
    wait_for(lambda: any(p.stat().st_size > len(BODY2) for p in stored(cache)), 10,
             what="the blob in Squid's store")
    [entry] = [p for p in stored(cache) if p.stat().st_size > len(BODY2)]
    data = bytearray(entry.read_bytes())  # the body is the file's end
    data[-100:] = b"X" * 100
    entry.write_bytes(bytes(data))
    served = client.http(blob)[2]
    if served == BODY2:  # still in Squid's memory cache: the stored file was not read
        pytest.skip("Squid answered from memory")  # pragma: no cover
    assert served == BODY2[:-100] + b"X" * 100  # the cache serves it
    status, h, body = client.http(blob, "-H", "Cache-Control: no-cache")
    assert (status, body) == (200, BODY2)
    status, h, body = client.http(blob)
    assert (status, body) == (200, BODY2) and h["x-cache"].startswith("HIT")  # stored anew
    assert hub.count(f"GET /@blobs/sha256/{sha(BODY2)} 200", 2) == 2


def stored(cache: SquidCache) -> list[Path]:
    return [p for p in (cache.work / "store").rglob("*") if p.is_file()
            and p.name != "swap.state"]


def test_squid_checks_the_token_itself(network: Network, tmp_path: Path) -> None:
    hub, cache, client = setup(network, tmp_path, f'read_tokens = ["{TOKEN}"]\n', TOKEN)
    hub.add("t", BODY2)
    blob = f"{cache.url}/@blobs/sha256/{sha(BODY2)}"
    auth = ["-H", f"Authorization: Bearer {TOKEN}"]
    assert client.http(blob, *auth)[:1] == (200,)
    status, h, body = client.http(blob, *auth)
    assert (status, body) == (200, BODY2) and h["x-cache"].startswith("HIT")
    for refused in ([], ["-H", "Authorization: Bearer wrong"]):
        status, _, body = client.http(blob, *refused)
        assert status == 403 and BODY2[:64] not in body
    assert hub.count(f"GET /@blobs/sha256/{sha(BODY2)} 200", 1) == 1
    assert TOKEN.encode() not in cache.logs().replace(cache.conf.read_bytes(), b"")


def test_a_replica_mirrors_its_hub_through_squid(network: Network, tmp_path: Path) -> None:
    hub, cache, _ = setup(network, tmp_path)
    hub.add("t", BODY1)
    replicas = [Replica(network.add(f"r{i}"), tmp_path / f"r{i}", cache.url)
                for i in range(2)]
    for replica in replicas:
        wait_for(lambda r=replica: (r / "t/latest").exists(), 20, what="the mirrored source")
        assert (replica / "t/latest").read_bytes() == BODY1
    assert hub.count(f"GET /@blobs/sha256/{sha(BODY1)} 200", 1) == 1
    hub.new_version("t", BODY2)
    for replica in replicas:
        wait_for(lambda r=replica: (r / "t/latest").read_bytes() == BODY2, 20,
                 what="the new version on the replica")
    start = time.monotonic()
    assert hub.count(f"GET /@blobs/sha256/{sha(BODY2)} 200", 1) == 1
    assert time.monotonic() - start < 30
