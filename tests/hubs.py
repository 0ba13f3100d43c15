"""A hub, an nginx cache and replicas, each in a host of tests/hosts.py: the pieces of
the replica tests (tests/test_replica_cache.py, tests/test_replicas_hosts.py) and of
bench/replicas.py.

The hub's origin is a plain HTTP file server on the hub host's own loopback, so the
hub is the only one that can reach it (as the sources' origins in SPEC's replica
setup). Every process is started with ``Host.popen`` and so ended by its PID when the
Network closes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from bench.common import nginx_conf
from tests.hosts import Host, wait_listening

CONTRIB_CACHE = Path(__file__).resolve().parent.parent / "contrib" / "nginx" / \
    "replica-cache.conf"
HUB_PORT = 8631
CACHE_PORT = 8632
ORIGIN_PORT = 8000
START_TIMEOUT = 20.0


def buffyfs(*args: str) -> list[str]:
    return [sys.executable, "-m", "buffyfs", *args]


class Hub:
    """``buffyfs serve --public`` on ``host`` (debug log: one line per request), with an
    origin serving ``work/origin`` on the host's loopback."""

    def __init__(self, host: Host, work: Path, config: str = "") -> None:
        self.host = host
        self.cache = work / "cache"
        self.files = work / "origin"
        self.files.mkdir(parents=True, exist_ok=True)
        self.log = work / "hub.log"
        self.url = f"http://{host.address}:{HUB_PORT}"
        self.config = work / "hub.toml"
        self.config.write_text(f'[daemon]\ncache = "{self.cache}"\n[serve]\n'
                               f'listen = "{host.address}:{HUB_PORT}"\n{config}')
        self.origin = host.popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                  str(ORIGIN_PORT), "--directory", str(self.files)])
        self.start()

    def start(self) -> None:
        public = [] if "read_tokens" in self.config.read_text() else ["--public"]
        self.proc = self.host.popen(buffyfs("serve", "--config", str(self.config),
                                            "--log-level", "debug", *public), log=self.log)
        from tests.conftest import DAEMON_LOGS
        if self.log not in DAEMON_LOGS:
            DAEMON_LOGS.append(self.log)  # a traceback in it fails the test
        wait_listening(self.host, HUB_PORT, START_TIMEOUT)

    def stop(self) -> None:
        self.host.stop(self.proc)

    def cli(self, *args: str, timeout: float = 60.0) -> str:
        """``buffyfs ARGS --cache HUBCACHE`` inside the hub's host (it reaches the origin)."""
        done = self.host.run(buffyfs(*args, "--cache", str(self.cache)), timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"hub: buffyfs {' '.join(args)}: {done.stderr.decode()}")
        return done.stdout.decode()

    def publish(self, name: str, body: bytes) -> None:
        """The origin's file ``name`` now holds ``body``; its mtime moves on by more
        than the second Last-Modified resolves, so the hub's check is no 304."""
        path = self.files / name
        old = path.stat().st_mtime if path.exists() else 0.0
        path.write_bytes(body)
        stamp = max(time.time(), old + 1.5)
        os.utime(path, (stamp, stamp))

    def add(self, name: str, body: bytes, *options: str) -> str:
        """Register ``name`` with ``body`` on the hub and wait for its first version."""
        self.publish(name, body)
        self.cli("add", name, f"http://127.0.0.1:{ORIGIN_PORT}/{name}", *options)
        return self.wait_latest(name, lambda v: v is not None)

    def new_version(self, name: str, body: bytes) -> str:
        old = self.status(name)["latest"]
        self.publish(name, body)
        self.cli("refresh", name)
        return self.wait_latest(name, lambda v: v is not None and v != old)

    def status(self, name: str) -> dict:
        return json.loads(self.cli("status", name, "--json"))

    def wait_latest(self, name: str, ok, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            latest = self.status(name)["latest"]
            if ok(latest):
                return latest
            if time.monotonic() > deadline:
                raise AssertionError(f"hub: {name}'s latest is still {latest}")
            time.sleep(0.1)

    def requests(self, pattern: str) -> int:
        """How many requests the hub answered whose ``METHOD PATH STATUS`` log line
        matches ``pattern`` (a regex)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        found = re.findall(r"DEBUG.* ((?:GET|HEAD|POST) \S+ \S+)$", text, re.MULTILINE)
        return sum(1 for line in found if re.search(pattern, line))

    def count(self, pattern: str, expected: int, timeout: float = 5.0) -> int:
        """``requests(pattern)`` once the log has caught up: it waits (bounded) for
        ``expected`` lines, and a little more for any beyond them."""
        deadline = time.monotonic() + timeout
        while self.requests(pattern) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        return self.requests(pattern)


def nginx_exe() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                     else None)


class NginxCache:
    """contrib/nginx/replica-cache.conf, as shipped but for the hub's address and the
    cache directory, run by nginx in ``host``."""

    def __init__(self, host: Host, work: Path, hub_url: str) -> None:
        exe = nginx_exe()
        if exe is None:
            raise AssertionError("nginx is not installed (scripts/install.sh installs it)")
        self.host = host
        self.prefix = work
        self.store = work / "store"
        for d in ("tmp", "logs", "store"):
            (work / d).mkdir(parents=True, exist_ok=True)
        site = CONTRIB_CACHE.read_text()
        site = site.replace("hub.example:8631", hub_url.split("://", 1)[1])
        site = site.replace("/var/cache/nginx/buffyfs", str(self.store))
        site = site.replace("listen 8632;", f"listen {host.address}:{CACHE_PORT};")
        (work / "site.conf").write_text(site)
        (work / "nginx.conf").write_text(nginx_conf(
            work, work / "site.conf", workers=2, user="root",
            access_log=f"{work}/logs/access.log"))
        self.url = f"http://{host.address}:{CACHE_PORT}"
        self.proc = host.popen([exe, "-p", f"{work}/", "-e", f"{work}/logs/error.log",
                                "-c", str(work / "nginx.conf")], log=work / "nginx.out")
        wait_listening(host, CACHE_PORT, START_TIMEOUT)

    def entries(self) -> list[Path]:
        return [p for p in self.store.rglob("*") if p.is_file()]


class Replica:
    """``buffyfs mount MNT --foreground --upstream URLS`` with its daemon in ``host``."""

    def __init__(self, host: Host, work: Path, upstream: str, *extra: str,
                 config: str = "") -> None:
        self.host = host
        self.work = work
        self.path = work / "mnt"
        self.cache = work / "cache"
        self.log = work / "replica.log"
        self.upstream = upstream
        self.extra = list(extra)
        self.config = config
        self.path.mkdir(parents=True, exist_ok=True)
        host.network.finalizers.append(self.stop)  # unmounted before the hosts go
        self.start()

    def start(self) -> None:
        from tests.conftest import DAEMON_LOGS, wait_for
        args = ["mount", str(self.path), "--foreground", "--cache", str(self.cache),
                "--log-level", "debug", "--upstream", self.upstream, *self.extra]
        if self.config:
            conf = self.work / "replica.toml"
            conf.write_text(self.config)
            args += ["--config", str(conf)]
        self.proc = self.host.popen(buffyfs(*args), log=self.log)
        if self.log not in DAEMON_LOGS:
            DAEMON_LOGS.append(self.log)
        wait_for(lambda: self.path.joinpath("@status").exists() or self.proc.poll() is not None,
                 START_TIMEOUT, what=f"the replica mount on {self.host.name}")
        if self.proc.poll() is not None:
            raise AssertionError(f"replica exited {self.proc.returncode}: "
                                 f"{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        from tests.conftest import unmount
        unmount(self.path)
        self.host.stop(self.proc)
        unmount(self.path)

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    def status(self, name: str | None = None) -> dict:
        path = self.path / name / "@status" if name else self.path / "@status"
        return json.loads(path.read_text())


def fetch_all(client: Host, url: str, out: Path, n: int, *curl_args: str) -> list[bytes]:
    """``n`` curl processes fetching ``url`` at once from ``client``; their bodies."""
    procs = [client.popen(["curl", "-sf", "--max-time", "60", *curl_args, "-o",
                           str(out / f"c{i}"), url]) for i in range(n)]
    for proc in procs:
        assert proc.wait(timeout=90) == 0
    return [(out / f"c{i}").read_bytes() for i in range(n)]


def check_latest_status_changes_reach_the_hub(hub: Hub, cache_url: str, client: Host,
                                              body1: bytes, body2: bytes,
                                              validators_counted: bool = False) -> None:
    """What an HTTP cache between hub and clients must pass through uncached: ``latest``
    (a client's validator included), ``@changes``, ``@status`` and POST; shared by the
    nginx and Squid tests. ``validators_counted``: also count the hub's 304 answers."""
    hub.add("t", body1)
    status, h, body = client.http(cache_url + "/t/latest")
    assert (status, body, h["cache-control"]) == (200, body1, "no-cache")
    etag = h["etag"]
    status, _, _ = client.http(cache_url + "/t/latest", "-H", f"If-None-Match: {etag}")
    assert status == 304  # the client's validator reached the hub
    if validators_counted:
        assert hub.requests(r"GET /t/latest 304") >= 1
    hub.new_version("t", body2)
    status, h, body = client.http(cache_url + "/t/latest")
    assert (status, body) == (200, body2)  # at once: nothing of latest was kept
    assert client.http(cache_url + "/t/latest", "-r", "0-3")[2] == body2[:4]
    before = hub.requests(r"GET /@changes")
    for _ in range(2):
        assert client.http(cache_url + "/@changes?since=0&wait=0")[0] == 200
    assert hub.count(r"GET /@changes", before + 2) == before + 2
    before = hub.requests(r"GET /t/@status")
    for _ in range(2):
        assert client.http(cache_url + "/t/@status")[0] == 200
    assert hub.count(r"GET /t/@status", before + 2) == before + 2
    # POST passes through (and is refused by the hub: no control token)
    assert client.http(cache_url + "/t/@control", "--data-binary", "refresh")[0] == 401
