"""Never stalling (SPEC part 2): heavy work runs off the event loop, so a `stat` through
the mount is answered while a collection runs or `@status` is built.

The big caches are written straight into the index (bench.common.populate); their
blobs are absent, so the mounts run without the scrub (a stat never opens a blob).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.common import populate
from buffyfs.store import gc
from buffyfs.store.cache import Cache
from buffyfs.store.index import Index
from tests.conftest import Mount, wait_for
from tests.test_mount import status, write_control

SOURCES = 4000  # x 5 versions: a collection on the loop held it ~2-4 s here
STALL_BOUND = 1.0  # seconds: far above a loaded machine's noise, far below the old stalls


def build(cache_dir: Path, sources: int = SOURCES, per_source: int = 5) -> None:
    c = Cache(cache_dir)
    try:
        populate(c.index, sources, per_source, size=100,
                 options={"refresh": "never", "keep_versions": 1},
                 sha256=lambda s, i: hashlib.sha256(f"{s}-{i}".encode()).hexdigest())
    finally:
        c.close()


class Prober:
    """Stats SRC/latest of ever other sources (so that each stat reaches the daemon) in
    a thread, every 5 ms, and records the longest wait."""

    def __init__(self, mnt: Path, sources: int) -> None:
        self.mnt = mnt
        self.sources = sources
        self.stop = threading.Event()
        self.times: list[float] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            t = time.perf_counter()
            os.stat(self.mnt / f"src{1 + i % (self.sources - 1)}" / "latest")
            self.times.append(time.perf_counter() - t)
            i += 1
            time.sleep(0.005)

    def __enter__(self) -> Prober:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "a stat through the mount hung"


def slow_turns(m: Mount, *words: str) -> list[str]:
    """The loop monitor's warnings that mention any of ``words``."""
    return [line for line in m.log_text().splitlines()
            if "event loop" in line and any(w in line for w in words)]


@pytest.fixture
def big_mount(cache_dir: Path, mount_factory: Callable[..., Mount]) -> Mount:
    build(cache_dir)
    m = mount_factory("--scrub-interval", "never")
    os.stat(m / "src0" / "latest")
    return m


def test_stat_answers_while_the_mount_collects(big_mount: Mount) -> None:
    m = big_mount
    with Prober(m.path, SOURCES) as prober:
        time.sleep(0.2)
        done = subprocess.run([sys.executable, "-m", "buffyfs", "gc", "--cache", str(m.cache)],
                              capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        time.sleep(0.2)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("2 version(s)") == SOURCES  # keep_versions=1: 2 in 5 go
    worst = max(prober.times)
    assert len(prober.times) > 20
    assert worst < STALL_BOUND, f"a stat waited {worst:.2f} s during the collection"
    assert not slow_turns(m, "gc.", "Collector"), slow_turns(m, "gc.", "Collector")
    assert len(os.listdir(m / "src1" / "@versions")) == 3


STATUS_SOURCES = 10_000  # x 2 versions: building @status on the loop held it ~1 s here
STATUS_BOUND = 0.7  # seconds: below the old ~1 s; the figure itself is bench/stall's (0.4
# flaked at 0.44-0.57 s with five test runs sharing two cores: issue 12 has the rest)


def test_stat_answers_while_status_metrics_and_listings_are_built(
        cache_dir: Path, mount_factory: Callable[..., Mount]) -> None:
    build(cache_dir, STATUS_SOURCES, 2)
    m = mount_factory("--scrub-interval", "never")
    os.stat(m / "src0" / "latest")
    stop = threading.Event()
    built: list[int] = []

    def readers() -> None:
        while not stop.is_set():
            built.append(len((m / "@status").read_bytes()))
            built.append(len((m / "@metrics").read_bytes()))
            built.append(len(os.listdir(m.path)))

    reader = threading.Thread(target=readers, daemon=True)
    with Prober(m.path, STATUS_SOURCES) as prober:
        reader.start()
        wait_for(lambda: len(built) >= 9, timeout=120, what="three rounds of reading")
        stop.set()
        reader.join(timeout=60)
    assert not reader.is_alive()
    assert built[2] == STATUS_SOURCES + 3  # the root: its sources, @status, @control, @metrics
    worst = max(prober.times)
    assert worst < STATUS_BOUND, f"a stat waited {worst:.2f} s while @status was built"
    words = ("status", "metrics", "_list", "readdir")
    assert not slow_turns(m, *words), slow_turns(m, *words)


def test_unmount_kills_a_running_validation_command(origin, tmp_path: Path,
                                                   mnt: Mount) -> None:
    pidfile = tmp_path / "validator.pid"
    script = tmp_path / "validator"
    script.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    script.chmod(0o755)
    origin.set("/v", b"body to validate")
    write_control(mnt / "@control", f"add v {origin.url('/v')} validate.cmd={script} "
                  "validate.timeout=120s")
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 20,
             what="the validation command")
    pid = int(pidfile.read_text())
    try:
        t = time.monotonic()
        mnt.proc.send_signal(signal.SIGTERM)
        mnt.proc.wait(timeout=10)  # not the 60 s of the command
        assert time.monotonic() - t < 8
        wait_for(lambda: not _alive(pid), 10, what="the validation command to end")
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has ended
    except (FileNotFoundError, IndexError):
        return False


# --- the collection's commit re-checks its plan --------------------------------------------


def test_commit_skips_what_was_protected_or_opened_since_the_plan(tmp_path: Path) -> None:
    build(tmp_path, sources=3)
    index = Index(tmp_path / "index")
    try:
        planned = gc.plan_snapshot(index, set())
        doomed = {(d.source, d.version.id): d for d in planned.doomed}
        assert len(doomed) == 6  # 2 in each of 3 sources
        (s0, keep_id), (s1, open_id) = [k for k in doomed if k[0] == "src0"][0], \
            [k for k in doomed if k[0] == "src1"][0]
        index.change_tag(s0, keep_id, add="keep")  # tagged keep after the plan
        opened = doomed[(s1, open_id)].version.ino
        first = gc.commit(index, planned.doomed[:3], open_inos={opened})
        second = gc.commit(index, planned.doomed[3:], open_inos={opened})
        again = gc.commit(index, planned.doomed, open_inos=set())  # all gone or kept
        dropped = {(d.source, d.version.id) for d in first.doomed + second.doomed}
        assert dropped == set(doomed) - {(s0, keep_id), (s1, open_id)}
        assert [(d.source, d.version.id) for d in again.doomed] == [(s1, open_id)]
        with index.read() as r:
            assert r.version(s0, keep_id) is not None
            assert r.version(s1, open_id) is None
            # every blob reference counted once: the freed blobs are gone from the table
            assert all(r.blob_ref(d.version.sha256) is None
                       for d in first.doomed + second.doomed + again.doomed)
    finally:
        index.close()


def _hold_index_writer(cache_dir: Path, seconds: float, held: threading.Event) -> None:
    """Hold the index's write lock for ``seconds``, as a long CLI write does."""
    idx = Index(cache_dir / "index")
    try:
        with idx.write():
            held.set()
            time.sleep(seconds)
    finally:
        idx.close()


def test_requests_answer_while_a_download_waits_for_the_index_writer(
        origin, cli, cache_dir: Path, mount_factory: Callable[..., Mount]) -> None:
    """A download's progress and state writes wait in a worker thread for the index's
    writer lock (held here by another process, say `buffyfs gc`), not on the loop."""
    origin.set("/a", b"a" * 1000)
    origin.set("/b", b"b" * 1000, etag=True)
    for name in ("a", "b"):
        cli("add", name, origin.url(f"/{name}"), "--refresh", "never", check=True)
        cli("fetch", name, check=True)
    m = mount_factory("--scrub-interval", "never")
    assert status(m / "a" / "@status")["name"] == "a"
    slow = origin.set("/b", b"c" * (8 << 20), etag=True)
    slow.chunk_delay = 0.25  # 20 pieces of 400 KiB: 5 s, a progress write each second
    write_control(m / "b" / "@control", "refresh")
    wait_for(lambda: status(m / "b" / "@status")["state"] == "fetching", 10,
             what="the download of b")
    held = threading.Event()
    holder = threading.Thread(target=_hold_index_writer, args=(cache_dir, 2.5, held))
    holder.start()
    try:
        assert held.wait(10)
        worst = 0.0
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            t = time.perf_counter()
            status(m / "a" / "@status")
            worst = max(worst, time.perf_counter() - t)
            time.sleep(0.02)
    finally:
        holder.join(timeout=30)
    assert worst < 0.5, f"a read of a/@status waited {worst:.2f} s for the index writer"
    wait_for(lambda: status(m / "b" / "@status")["state"] == "idle", 30,
             what="the end of the download of b")
    assert len(status(m / "b" / "@status")["versions"]) == 2


# --- issue 12, the rest of the loop (make_room, the scheduler) ---------------------------


def test_stat_answers_while_a_download_makes_room_under_the_quota(
        origin, cli, cache_dir: Path, mount_factory: Callable[..., Mount]) -> None:
    """A download that must evict under ``max_cache_size`` plans and commits that
    eviction off the loop: it is a collection like any other (make_room)."""
    build(cache_dir)  # 4,000 x 5 versions of 100 bytes: 2,000,000 bytes of blobs
    m = mount_factory("--scrub-interval", "never", "--max-cache-size", "2000K")
    os.stat(m / "src0" / "latest")
    origin.set("/big", b"x" * (200 << 10))  # fits only once the old versions go
    with Prober(m.path, SOURCES) as prober:
        time.sleep(0.2)
        cli("add", "big", origin.url("/big"), "--refresh", "never", check=True)
        wait_for(lambda: status(m / "big" / "@status")["latest"], 120,
                 what="the download of big")
        time.sleep(0.2)
    worst = max(prober.times)
    assert worst < STALL_BOUND, f"a stat waited {worst:.2f} s while a download made room"
    assert len(os.listdir(m / "src1" / "@versions")) == 3  # keep_versions=1: 2 in 5 went
    assert (m / "big" / "latest").read_bytes() == b"x" * (200 << 10)


def test_stat_answers_while_the_scheduler_plans_with_the_index_writer_held(
        origin, cli, cache_dir: Path, mount_factory: Callable[..., Mount]) -> None:
    """An open of an ``on-open`` source plans its check (a ``next_check`` write) while
    another process holds the index's writer: the write waits in a worker thread, and
    requests keep being answered."""
    origin.set("/a", b"a" * 1000)
    origin.set("/o", b"o" * 1000)
    cli("add", "a", origin.url("/a"), "--refresh", "never", check=True)
    cli("add", "o", origin.url("/o"), "--refresh", "on-open", "--open-wait", "1s",
        check=True)
    for name in ("a", "o"):
        cli("fetch", name, check=True)
    m = mount_factory("--scrub-interval", "never")
    assert status(m / "a" / "@status")["name"] == "a"
    held = threading.Event()
    holder = threading.Thread(target=_hold_index_writer, args=(cache_dir, 2.5, held))
    holder.start()
    try:
        assert held.wait(10)
        opener = threading.Thread(target=lambda: (m / "o" / "latest").read_bytes(),
                                  daemon=True)
        opener.start()  # kicks o: the scheduler plans it now
        worst = 0.0
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            t = time.perf_counter()
            os.stat(m / "a" / "latest")
            status(m / "a" / "@status")
            worst = max(worst, time.perf_counter() - t)
            time.sleep(0.02)
    finally:
        holder.join(timeout=30)
    opener.join(timeout=30)
    assert not opener.is_alive()
    assert worst < 0.5, f"a request waited {worst:.2f} s for the index writer"
