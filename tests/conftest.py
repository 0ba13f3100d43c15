"""Fixtures: a controllable origin, a cache directory, real mounts, the CLI.

Every mount is a ``buffyfs mount --foreground`` subprocess; teardown unmounts it
(``fusermount3 -u``, lazily if busy) and ends the process by its PID, so a failing
test leaves no mount and no process behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from buffyfs.daemon import is_mounted  # noqa: F401 (tests import it from here)
from buffyfs.store.index import Index
from tests.origin import Origin

MOUNT_TIMEOUT = 15.0
CLI_TIMEOUT = 60.0


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05,
             what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def origin() -> Iterator[Origin]:
    o = Origin().start()
    yield o
    o.stop()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    d = tmp_path / "cache"
    d.mkdir()
    return d


def run_cli(*args: str, cache: Path | None = None, check: bool = False,
            timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "buffyfs", *args]
    if cache is not None:
        cmd += ["--cache", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise AssertionError(f"buffyfs {' '.join(args)} failed ({done.returncode}): "
                             f"{done.stderr}")
    return done


@pytest.fixture
def cli(cache_dir: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``cli("add", "x", url)`` runs buffyfs on the test's cache directory."""
    def run(*args: str, check: bool = False, timeout: float = CLI_TIMEOUT):
        return run_cli(*args, cache=cache_dir, check=check, timeout=timeout)
    return run


@contextlib.contextmanager
def writer_held(index: Index) -> Iterator[Callable[[], None]]:
    """LMDB's writer lock taken through ``index`` by a thread (as another process holds
    it: the lock is the index file's) until the block ends, or earlier when the
    callable it gives is called."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with index.write():
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()

    def let_go() -> None:
        release.set()
        holder.join(10)

    try:
        assert held.wait(10), "the index's writer lock was not taken"
        yield let_go
    finally:
        let_go()

def unmount(path: Path) -> None:
    if is_mounted(path):
        if subprocess.run(["fusermount3", "-u", str(path)], capture_output=True).returncode:
            subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


DAEMON_LOGS: list[Path] = []  # the logs of this test's daemons


class Mount:
    """A running ``buffyfs mount --foreground`` on a fresh mount point."""

    def __init__(self, mountpoint: Path, cache: Path, log: Path, extra: list[str]) -> None:
        self.path = mountpoint
        self.cache = cache
        self.log = log
        DAEMON_LOGS.append(log)  # read after the test by check_daemon_logs
        mountpoint.mkdir(exist_ok=True)
        with open(log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "buffyfs", "mount", str(mountpoint), "--foreground",
                 "--cache", str(cache), "--log-level", "debug", *extra],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
            )
        try:
            wait_for(lambda: os.path.ismount(mountpoint) or self.proc.poll() is not None,
                     MOUNT_TIMEOUT, what="the mount")
            if self.proc.poll() is not None:
                raise AssertionError(f"mount exited {self.proc.returncode}: {self.log_text()}")
        except BaseException:
            self.close()
            raise

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        unmount(self.path)
        stop_process(self.proc)
        unmount(self.path)

    def __truediv__(self, other: str) -> Path:
        return self.path / other


@pytest.fixture
def mount_factory(tmp_path: Path, cache_dir: Path) -> Iterator[Callable[..., Mount]]:
    mounts: list[Mount] = []

    def start(*extra: str, cache: Path | None = None) -> Mount:
        m = Mount(tmp_path / f"mnt{len(mounts)}", cache or cache_dir,
                  tmp_path / f"mount{len(mounts)}.log", list(extra))
        mounts.append(m)
        return m

    yield start
    for m in mounts:
        m.close()


@pytest.fixture
def mnt(mount_factory: Callable[..., Mount]) -> Mount:
    return mount_factory()


@pytest.fixture(scope="session", autouse=True)
def no_leaked_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the session, no mount of this session's may remain (others' are not ours)."""
    yield
    base = str(tmp_path_factory.getbasetemp())
    leaked = [point for line in subprocess.run(["mount"], capture_output=True,
                                               text=True).stdout.splitlines()
              if " on " in line and " type " in line
              and (point := line.split(" on ")[1].split(" type ")[0]).startswith(base)]
    for point in leaked:  # clean up, then fail loudly
        subprocess.run(["fusermount3", "-uz", point])
    assert not leaked, f"mounts leaked by the tests: {leaked}"


# --- hidden failures: a daemon that logged a traceback fails the test ------------------

# A line of the daemon's log that is a bug whatever the test checks: a traceback (every
# log.exception, an "Exception ignored in", a crash) or an error logged as unexpected.
HIDDEN_FAILURE = re.compile(r"Traceback \(most recent call last\)"
                            r"|^\S+ (ERROR|CRITICAL) .*\bunexpected", re.MULTILINE)


def log_records(text: str) -> list[str]:
    """The records of a daemon log: a line and the indented lines that continue it (a
    logged traceback is folded so); a bare traceback ends at its exception line."""
    records: list[str] = []
    bare = False  # in a traceback printed as it is: it ends at its exception line
    for line in text.splitlines():
        if records and (line[:1].isspace() or bare):
            records[-1] += "\n" + line
            bare = bare and line[:1].isspace()
        else:
            records.append(line)
            bare = line.startswith("Traceback (")
    return records


def hidden_failures(text: str, allowed: list[str]) -> list[str]:
    return [r for r in log_records(text) if HIDDEN_FAILURE.search(r)
            and not any(re.search(pattern, r) for pattern in allowed)]


@pytest.fixture(autouse=True)
def check_daemon_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if a daemon it started (``Mount``, or a detached ``buffyfs mount``
    logging into ``cache_dir``) logged a traceback or an unexpected error: such a bug
    hides behind a test that passes. A test that provokes one on purpose says so with
    ``@pytest.mark.allow_daemon_errors("regex", ...)``; a record matching one is allowed."""
    DAEMON_LOGS.clear()
    detached = (request.getfixturevalue("cache_dir") / "buffyfs.log"
                if "cache_dir" in request.fixturenames else None)
    yield  # the mounts' teardown (before ours) has stopped the daemons
    allowed = [p for mark in request.node.iter_markers("allow_daemon_errors")
               for p in mark.args]
    logs = DAEMON_LOGS + ([detached] if detached is not None and detached.exists() else [])
    DAEMON_LOGS.clear()
    found = [f"{log.name}:\n{record}" for log in logs
             for record in hidden_failures(log.read_text(errors="replace"), allowed)]
    if found:
        pytest.fail("the daemon logged a hidden failure:\n" + "\n".join(found)[-6000:],
                    pytrace=False)


# --- the HTTP server: `buffyfs serve` processes (issue 13; replicas, proxy and the
# status page reuse these) ---------------------------------------------------------------

SERVE_TIMEOUT = 15.0
SERVING_RE = re.compile(r"serving HTTP on (https?://\S+)")


def served_url(log: Path) -> str | None:
    """The URL a daemon logged it serves on (``--listen 127.0.0.1:0`` picks a port)."""
    found = SERVING_RE.search(log.read_text(errors="replace")) if log.exists() else None
    return found.group(1) if found else None


class Server:
    """A running ``buffyfs serve`` (the daemon without a mount) on 127.0.0.1, port
    chosen by the kernel; ``url`` is where it listens. Ended by its PID."""

    def __init__(self, cache: Path, log: Path, extra: list[str]) -> None:
        self.cache = cache
        self.log = log
        DAEMON_LOGS.append(log)
        listen = [] if "--listen" in extra or "--config" in extra else \
            ["--listen", "127.0.0.1:0"]
        with open(log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "buffyfs", "serve", "--cache", str(cache),
                 "--log-level", "debug", *listen, *extra],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        try:
            wait_for(lambda: served_url(log) or self.proc.poll() is not None, SERVE_TIMEOUT,
                     what="the server")
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.log_text()}")
        except BaseException:
            self.close()
            raise
        self.url = served_url(log) or ""

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def serve_factory(tmp_path: Path, cache_dir: Path) -> Iterator[Callable[..., Server]]:
    """``serve_factory("--config", str(f))`` starts ``buffyfs serve`` on the test's cache."""
    servers: list[Server] = []

    def start(*extra: str, cache: Path | None = None) -> Server:
        s = Server(cache or cache_dir, tmp_path / f"serve{len(servers)}.log", list(extra))
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def server(serve_factory: Callable[..., Server]) -> Server:
    return serve_factory()


def http_request(url: str, path: str, method: str = "GET", body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 30.0,
                 context: object = None) -> tuple[int, dict[str, str], bytes]:
    """One request with http.client: (status, headers lowercased, body)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=context)  # type: ignore[arg-type]
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


# --- replicas (issue 15): a mount following a hub started by serve_factory ---------------


@pytest.fixture
def replica_factory(tmp_path: Path, mount_factory: Callable[..., Mount]
                    ) -> Callable[..., Mount]:
    """``replica_factory(hub_url, token=..., sources=[...], prefetch=...)`` mounts a
    replica with a cache of its own (``cache=`` to reuse one, e.g. for a restart);
    ``hub_url`` may be several URLs joined by commas. Further arguments go to the mount."""
    made = [0]

    def start(hub_url: str, *extra: str, token: str | None = None,
              sources: list[str] | None = None, prefetch: str | None = None,
              cache: Path | None = None) -> Mount:
        made[0] += 1
        cache = cache or tmp_path / f"replica-cache{made[0]}"
        lines = ["[daemon]", f"cache = {str(cache)!r}"]
        if token is not None:
            lines.append(f"upstream_token = {token!r}")
        if sources is not None:
            lines.append(f"upstream_sources = {sources!r}")
        if prefetch is not None:
            lines.append(f"prefetch = {prefetch!r}")
        config = tmp_path / f"replica{made[0]}.toml"
        config.write_text("\n".join(lines) + "\n")
        return mount_factory("--upstream", hub_url, "--config", str(config), *extra,
                             cache=cache)

    return start


@pytest.fixture
def own_root_logger():
    """``log.setup`` and ``cli.main`` (quiet commands set the root logger to CRITICAL)
    change the root logger in-process: give its handlers and level back afterwards, or
    later tests' caplog sees nothing."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
