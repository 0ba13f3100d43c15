"""Parallel ranges through the mount: a big body over several connections (each answer
a checked range), one connection when asked, one stream when the origin answers a range
with 200, the per-host cap across sources, and kill -9 with several segments in flight."""

from __future__ import annotations

import hashlib
import os
import re
import signal

from tests.conftest import unmount, wait_for
from tests.test_mount import read, status, write_control

BIG = 72 << 20  # at least 64 MiB: fetched in parallel


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def add(mnt, name, url, options=""):
    write_control(mnt / "@control", f"add {name} {url} {options}")


def ranges_asked(origin, path) -> list[str]:
    return [r.headers["Range"] for r in origin.seen(path) if "Range" in r.headers]


def test_a_big_body_comes_over_several_connections(origin, mnt):
    body = os.urandom(BIG)
    res = origin.set("/big", body, etag=True)
    res.rate = 16 << 20  # per connection
    add(mnt, "big", origin.url("/big"))
    assert read(mnt / "big/latest") == body
    assert origin.max_inflight >= 2
    bounded = [r for r in ranges_asked(origin, "/big") if re.fullmatch(r"bytes=\d+-\d+", r)]
    assert len(bounded) >= 2  # the parts of the other connections
    assert all(r.headers.get("If-Range") == res.etag for r in origin.seen("/big")[1:])
    assert status(mnt / "big/@status")["versions"][0]["sha256"] == sha(body)


def test_one_connection_when_asked(origin, mnt):
    body = os.urandom(BIG)
    origin.set("/one", body, etag=True).rate = 64 << 20
    add(mnt, "one", origin.url("/one"), "connections=1")
    assert read(mnt / "one/latest") == body
    assert origin.max_inflight == 1 and len(origin.seen("/one")) == 1


def test_an_origin_answering_a_range_with_200_gets_one_stream(origin, mnt):
    body = os.urandom(BIG)
    res = origin.set("/r200", body, etag=True)
    res.rate = 32 << 20
    res.ranges_as_200 = True  # says Accept-Ranges, answers every range with all of it
    add(mnt, "r200", origin.url("/r200"))
    assert read(mnt / "r200/latest") == body
    assert "answered a range with the whole body" in mnt.log_text()
    assert status(mnt / "r200/@status")["versions"][0]["sha256"] == sha(body)


def test_the_per_host_cap_holds_across_sources(origin, mount_factory, tmp_path):
    bodies = {name: os.urandom(BIG) for name in ("a", "b")}
    config = tmp_path / "buffyfs.toml"
    lines = ["[daemon]", "max_connections_per_host = 3", "max_downloads_per_host = 2"]
    for name, body in bodies.items():
        origin.set(f"/{name}", body, etag=True).rate = 16 << 20
        lines += [f"[sources.{name}]", f'url = "{origin.url("/" + name)}"']
    config.write_text("\n".join(lines) + "\n")
    mnt = mount_factory("--config", str(config))
    for name, body in bodies.items():
        assert read(mnt / f"{name}/latest") == body
    assert 2 <= origin.max_inflight <= 3


def test_kill_with_segments_in_flight_resumes_every_whole_one(origin, cli, mount_factory):
    body = os.urandom(BIG)
    res = origin.set("/k", body, etag=True)
    res.rate = 3 << 20  # per connection: about 12 MiB/s with four
    cli("add", "k", origin.url("/k"), check=True)
    mnt = mount_factory()
    wait_for(lambda: (status(mnt / "k/@status")["progress"] or {}).get("bytes", 0) > 44 << 20,
             30, what="a whole segment or more on each of four connections")
    assert origin.max_inflight >= 2
    mnt.proc.send_signal(signal.SIGKILL)
    mnt.proc.wait(timeout=10)
    unmount(mnt.path)
    res.rate = 0
    again = mount_factory()
    assert read(again / "k/latest") == body
    assert status(again / "k/@status")["versions"][0]["sha256"] == sha(body)
    kept = re.search(r"k: (\d+) of 9 segments already here", again.log_text())
    assert kept and int(kept.group(1)) >= 3  # the whole segments were kept


async def test_a_failed_parallel_attempt_hands_over_the_hash_of_its_whole_prefix(tmp_path):
    """The hash of the contiguous prefix a failed multi-connection attempt leaves goes
    to the next attempt, hashed up to its end even where the hash task lagged behind
    the writes. Without it, an origin that then answered the resume with the whole body
    failed every reader of the first bytes with EIO ("started over with other bytes"),
    although they were the same (test above, about 1 run in 8 before)."""
    from types import SimpleNamespace

    from buffyfs.fetch import downloader, parallel

    data = os.urandom(3 * parallel.HASH_BLOCK + 123)
    partial = tmp_path / "p.part"
    partial.write_bytes(data)
    plan = SimpleNamespace(segment_size=1 << 20, done=set())
    engine = parallel._Engine(None, None, partial, 0, len(data) + 4096,  # type: ignore[arg-type]
                              downloader.Resume(0, '"e"', None), plan)  # type: ignore[arg-type]
    try:
        engine.have.add(0, len(data))  # written; the hash task has hashed none of it yet
        handed = downloader.PrefixHash()
        await engine._hand_over_hash(handed)
    finally:
        engine.close()
    assert handed.length == len(data)
    assert handed.hasher.hexdigest() == hashlib.sha256(data).hexdigest()
