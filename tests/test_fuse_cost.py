"""Issue 12, the per-file cost of the mount: what the kernel may cache, it caches (a
source's directory, ``latest`` naming a version: dropped from the kernel when they
change), and what the handlers read from the index is kept until the index changes.
The counts come from ``buffyfs_fuse_requests_total`` in ``@metrics``."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from buffyfs.fs.handlers import BuffyFS
from buffyfs.store.cache import Cache
from tests.conftest import Mount, wait_for
from tests.test_fs_api import CTX, cache, fs, lookup, put_version  # noqa: F401 (fixtures)
from tests.test_mount import write_control
from tests.test_stall import build


def requests(m: Mount) -> dict[str, float]:
    write_control(m / "@control", "# a write drops the snapshot of @metrics: rendered anew\n")
    text = (m / "@metrics").read_text()
    return {op: float(n) for op, n in
            re.findall(r'^buffyfs_fuse_requests_total\{op="(\w+)"\} (\S+)$', text, re.MULTILINE)}


SOURCES = 30


def test_a_second_stat_of_latest_a_while_later_reaches_no_handler(
        cache_dir: Path, mount_factory: Callable[..., Mount]) -> None:
    build(cache_dir, SOURCES, 2)
    m = mount_factory("--scrub-interval", "never")
    paths = [m / f"src{i}" / "latest" for i in range(SOURCES)]
    for p in paths:
        os.stat(p)
    time.sleep(1.5)  # past the 1 s the kernel kept these entries before
    before = requests(m)  # (reading @metrics makes a few requests of its own)
    for p in paths:
        os.stat(p)
    after = requests(m)
    # before: a lookup of each source's directory and of its latest, 60 in all
    assert after["lookup"] - before["lookup"] < 5, (before, after)


def test_latest_still_moves_at_once_and_for_other_processes_changes(
        origin, cli, mount_factory: Callable[..., Mount]) -> None:
    origin.set("/a", b"one")
    cli("add", "a", origin.url("/a"), "--refresh", "never", check=True)
    cli("fetch", "a", check=True)
    origin.set("/a", b"two")
    cli("fetch", "a", check=True)
    m = mount_factory("--scrub-interval", "never")
    assert (m / "a" / "latest").read_bytes() == b"two"
    write_control(m / "a" / "@control", "tag latest failed")  # through the mount: at once
    assert (m / "a" / "latest").read_bytes() == b"one"
    versions = sorted(os.listdir(m / "a" / "@versions"))  # ids sort by fetch time
    cli("untag", "a", versions[-1], "failed", check=True)  # another process: the watcher
    wait_for(lambda: (m / "a" / "latest").read_bytes() == b"two", 5,
             what="latest to move back after a command-line untag")
    cli("remove", "a", check=True)  # removed and added again: a new directory inode
    origin.set("/a", b"three")
    cli("add", "a", origin.url("/a"), "--refresh", "never", check=True)
    cli("fetch", "a", check=True)
    wait_for(lambda: (m / "a" / "latest").read_bytes() == b"three", 5,
             what="the source added again under the same name")


@contextmanager
def counted_reads(cache: Cache) -> Iterator[list[int]]:
    """Count the index's read transactions."""
    calls = [0]
    real = cache.index.read

    @contextmanager
    def read() -> Iterator[Any]:
        calls[0] += 1
        with real() as r:
            yield r

    cache.index.read = read  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        cache.index.read = real  # type: ignore[method-assign]


async def test_a_cached_latest_and_version_need_no_index_read(
        fs: BuffyFS, cache: Cache) -> None:  # noqa: F811 (the fixture)
    cache.add_source("s", "http://127.0.0.1:9/s", {})
    put_version(cache, "s", b"one", 0)
    v2 = put_version(cache, "s", b"two", 1)
    attr = await lookup(fs, "s", "latest")
    assert attr.st_ino == v2.ino
    info = await fs.open(attr.st_ino, os.O_RDONLY, CTX)
    await fs.release(info.fh)
    with counted_reads(cache) as reads:
        assert (await lookup(fs, "s", "latest")).st_ino == v2.ino
        info = await fs.open(v2.ino, os.O_RDONLY, CTX)
        await fs.release(info.fh)
        node_reads = reads[0]
    # the version's link count (its attributes) is read; the names and inodes are not
    assert node_reads == 1, node_reads
    cache.index.change_tag("s", v2.id, add="failed")  # a change: read afresh
    attr = await lookup(fs, "s", "latest")
    assert attr.st_ino != v2.ino


# --- a refresh burst without a quota -----------------------------------------------------


async def test_a_reservation_without_a_quota_scans_no_partial_files(
        cache: Cache) -> None:  # noqa: F811 (the fixture)
    """Each download reserves room under the quota, which scanned ``partial/`` (1,000
    files in a burst of 1,000 refreshes) on the loop even with no quota set."""
    from buffyfs.fetch.refresh import Refresher

    asked: list[int] = []
    refresher = Refresher(cache.index, cache.blobs, None,  # type: ignore[arg-type]
                          make_room=asked.append)
    scanned: list[str] = []

    def other_partials(name: str) -> int:
        scanned.append(name)
        return 0

    refresher._other_partials = other_partials  # type: ignore[method-assign]
    refresher.has_quota = lambda: False
    await refresher._reserve("a", 100)
    assert (scanned, asked) == ([], [])
    assert refresher.reserved["a"] == 100
    refresher.has_quota = lambda: True  # with a quota: as before
    await refresher._reserve("b", 100)
    assert scanned == ["b"] and asked[0] >= 100


# --- what one open and release of a cached version costs ---------------------------------


async def test_the_request_counters_children_are_made_once(
        fs: BuffyFS, cache: Cache, monkeypatch) -> None:  # noqa: F811 (the fixture)
    """``labels(op=...)`` on every request (a lock, a tuple of label values) was a few
    microseconds of each open and release: the children are kept."""
    cache.add_source("s", "http://127.0.0.1:9/s", {})
    v = put_version(cache, "s", b"one", 0)
    await lookup(fs, "s", "latest")
    info = await fs.open(v.ino, os.O_RDONLY, CTX)
    await fs.release(info.fh)
    made: list[dict[str, str]] = []
    real = fs.metrics.fuse_requests.labels
    monkeypatch.setattr(fs.metrics.fuse_requests, "labels",
                        lambda **kw: made.append(kw) or real(**kw))
    for _ in range(10):
        info = await fs.open(v.ino, os.O_RDONLY, CTX)
        await fs.release(info.fh)
    assert made == []
    assert fs.metrics.fuse_requests.labels(op="open")._value.get() == 11
    assert fs.metrics.fuse_requests.labels(op="release")._value.get() == 11


async def test_an_open_of_a_version_stats_its_blob_once(
        fs: BuffyFS, cache: Cache, monkeypatch) -> None:  # noqa: F811 (the fixture)
    """Opening a version checks that its blob is a regular file of the right size: one
    ``fstat`` answers both, and O_NONBLOCK is dropped with one ``fcntl``."""
    import fcntl

    cache.add_source("s", "http://127.0.0.1:9/s", {})
    v = put_version(cache, "s", b"one", 0)
    await lookup(fs, "s", "latest")
    calls: list[str] = []
    real_fstat, real_fcntl = os.fstat, fcntl.fcntl
    monkeypatch.setattr(os, "fstat", lambda fd: calls.append("fstat") or real_fstat(fd))
    monkeypatch.setattr(fcntl, "fcntl", lambda *a: calls.append("fcntl") or real_fcntl(*a))
    info = await fs.open(v.ino, os.O_RDONLY, CTX)
    monkeypatch.undo()
    try:
        assert os.pread(fs.handles[info.fh].fd, 10, 0) == b"one"
        assert not fcntl.fcntl(fs.handles[info.fh].fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        await fs.release(info.fh)
    assert calls == ["fstat", "fcntl"], calls


async def test_a_versions_timestamp_is_parsed_once_for_many_getattrs(
        fs: BuffyFS, cache: Cache, monkeypatch) -> None:  # noqa: F811 (the fixture)
    """A version's mtime comes from its RFC 3339 ``fetched_at``: strptime on every
    lookup and getattr of it was microseconds each; its answer is remembered."""
    from buffyfs.fs import handlers
    from buffyfs.store import index as index_module

    cache.add_source("s", "http://127.0.0.1:9/s", {})
    v = put_version(cache, "s", b"one", 0)
    fetched_ns = int(index_module.parse_rfc3339(v.fetched_at).timestamp()) * 10**9
    parsed: list[str] = []
    for module in (handlers, index_module):  # wherever the handlers call it from
        real = getattr(module, "parse_rfc3339", None)
        if real is not None:
            monkeypatch.setattr(module, "parse_rfc3339",
                                lambda s, real=real: parsed.append(s) or real(s))
    first = await lookup(fs, "s", "latest")
    for _ in range(10):
        attr = await fs.getattr(v.ino, CTX)
        assert attr.st_mtime_ns == first.st_mtime_ns
    assert first.st_mtime_ns == fetched_ns
    assert len(parsed) <= 1, parsed
