"""Reading `latest` while the first download runs (SPEC part 2): reads as bytes arrive,
the end of the file as the seal, EIO when the download cannot become a valid version,
retries invisible, no streaming without a length nor of a newer version; the quota
counts partial files by their blocks."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import time

import pytest

from tests.conftest import unmount, wait_for
from tests.origin import slow
from tests.test_mount import read, status, write_control


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def add(mnt, name, url, options=""):
    write_control(mnt / "@control", f"add {name} {url} {options}")


def test_reads_while_the_body_arrives_and_the_end_is_the_seal(origin, mnt):
    body, _ = slow(origin, "/t", 4 << 20, 5.0)
    add(mnt, "t", origin.url("/t"))
    started = time.monotonic()
    with open(mnt / "t/latest", "rb", buffering=0) as f:
        opened = time.monotonic() - started
        first = f.read(65536)
        assert first == body[:65536]
        during = status(mnt / "t/@status")
        assert during["latest"] is None  # still downloading: the first bytes came early
        assert opened < 3.0
        assert os.fstat(f.fileno()).st_size == len(body)  # the length is known
        progress = during["progress"]
        assert progress is not None and progress["total"] == len(body)
        assert 0 < progress["bytes"] < len(body)  # the bytes that arrived
        rest = f.read()
        # the read that reached the end returned after the commit: the version is there
        after = status(mnt / "t/@status")
        assert f.read() == b""
    assert first + rest == body
    assert after["latest"] is not None
    assert after["versions"][0]["sha256"] == sha(body)
    assert read(mnt / "t/latest") == body


def test_a_version_failing_validation_gives_eio_at_the_end(origin, mnt):
    body, _ = slow(origin, "/v", 2 << 20, 2.0)
    add(mnt, "v", origin.url("/v"), "validate.sha256=" + "0" * 64)
    with open(mnt / "v/latest", "rb", buffering=0) as f:
        assert f.read(4096) == body[:4096]  # bytes before the end are served
        with pytest.raises(OSError) as e:
            f.read()  # the end: the version fails its validation
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            f.read(10)  # and so does every later read of the handle
        assert e.value.errno == errno.EIO
    assert status(mnt / "v/@status")["latest"] is None


def test_a_download_that_gives_up_gives_eio(origin, mnt):
    body = os.urandom(2 << 20)
    res = origin.set("/g", body, etag=True)
    origin.fail("/g", "reset")  # half the body, then the connection is reset
    res.ranges = False
    add(mnt, "g", origin.url("/g"), "max_attempts=1")
    with open(mnt / "g/latest", "rb", buffering=0) as f:
        assert f.read(4096) == body[:4096]
        with pytest.raises(OSError) as e:
            f.read()  # waits for bytes that never come
        assert e.value.errno == errno.EIO
    assert status(mnt / "g/@status")["latest"] is None


def test_a_stall_and_a_reset_are_invisible_to_the_reader(origin, mnt):
    body, _ = slow(origin, "/s", 2 << 20, 1.0)
    origin.fail("/s", "reset", ("stall", 3))
    add(mnt, "s", origin.url("/s"), "attempt_timeout=1s")
    with open(mnt / "s/latest", "rb", buffering=0) as f:
        got = f.read()
    assert got == body
    assert len(origin.seen("/s")) >= 3  # it did retry, and resume
    assert any("Range" in r.headers for r in origin.seen("/s"))


def test_a_restart_with_the_same_bytes_is_invisible_another_gives_eio(origin, mnt):
    body = os.urandom(2 << 20)
    res = origin.set("/r", body, etag=True)
    res.ranges = False  # a retry gets the whole body again (a 200)
    origin.fail("/r", "reset")
    add(mnt, "r", origin.url("/r"))
    with open(mnt / "r/latest", "rb", buffering=0) as f:
        first = f.read(65536)
        assert f.read() == body[65536:]  # the same bytes again: the reader goes on
    assert first == body[:65536]

    other = os.urandom(2 << 20)
    res = origin.set("/r2", other, etag=True)
    res.ranges = False
    origin.fail("/r2", "reset")
    add(mnt, "r2", origin.url("/r2"))
    with open(mnt / "r2/latest", "rb", buffering=0) as f:
        assert f.read(65536) == other[:65536]
        changed = os.urandom(2 << 20)  # the retry gets other bytes: never a mix
        origin.set("/r2", changed, etag=True).ranges = False
        with pytest.raises(OSError) as e:
            f.read()
        assert e.value.errno == errno.EIO
    wait_for(lambda: status(mnt / "r2/@status")["latest"], 15, what="the new version")
    assert read(mnt / "r2/latest") == changed


def test_without_a_content_length_the_open_waits_for_the_whole(origin, mnt):
    body, res = slow(origin, "/c", 1 << 20, 2.0)
    res.chunked = True
    add(mnt, "c", origin.url("/c"))
    with open(mnt / "c/latest", "rb", buffering=0) as f:
        assert status(mnt / "c/@status")["latest"] is not None  # committed before the open
        assert f.read() == body


def test_a_newer_version_is_never_streamed(origin, mnt):
    old = os.urandom(1 << 20)
    origin.set("/n", old, etag=True)
    add(mnt, "n", origin.url("/n"))
    assert read(mnt / "n/latest") == old
    new, _ = slow(origin, "/n", 2 << 20, 4.0)
    write_control(mnt / "n/@control", "refresh")
    wait_for(lambda: (status(mnt / "n/@status")["progress"] or {}).get("bytes"), 10,
             what="the new body arriving")
    started = time.monotonic()
    assert read(mnt / "n/latest") == old  # the whole old version, at once
    assert time.monotonic() - started < 1.5
    wait_for(lambda: read(mnt / "n/latest") == new, 15, what="the new version")


def test_the_quota_counts_a_partial_file_by_its_blocks(origin, cli, mount_factory):
    """A partial file may be long (sparse: segments ahead of a hole) but take only what
    arrived; the quota counts that, so another download fits beside it."""
    big, res = slow(origin, "/big", 40 << 20, 16.0)
    cli("add", "big", origin.url("/big"), "--max-attempts", "1", check=True)
    m = mount_factory()
    wait_for(lambda: (status(m / "big/@status")["progress"] or {}).get("bytes", 0) > 10 << 20,
             20, what="a whole segment of the big body and more")
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(timeout=10)
    unmount(m.path)
    partial = m.cache / "partial" / "big.part"
    # sparse, as the segments fetched ahead of the prefix leave it: a hole to the end
    os.truncate(partial, len(big))
    assert partial.stat().st_blocks * 512 < 20 << 20
    origin.fail("/big", 503)  # the resume at start fails, keeping the partial file
    small = os.urandom(12 << 20)
    origin.set("/small", small, etag=True)
    again = mount_factory("--max-cache-size", "30M")
    wait_for(lambda: status(again / "big/@status")["consecutive_failures"], 10,
             what="the resume of big to fail")
    add(again, "small", origin.url("/small"))
    assert read(again / "small/latest") == small  # 12M + what big holds fits in 30M
    assert partial.exists()


def test_a_read_far_ahead_is_answered_by_a_ranged_request(origin, mnt):
    body = os.urandom(20 << 20)
    res = origin.set("/far", body, etag=True)
    res.rate = 1 << 20  # twenty seconds for the body
    add(mnt, "far", origin.url("/far"))
    with open(mnt / "far/latest", "rb", buffering=0) as f:
        started = time.monotonic()
        f.seek(len(body) - 5000)
        tail = f.read(4000)  # near the end, not the end: no seal needed
        took = time.monotonic() - started
    assert tail == body[-5000:-1000]
    assert took < 4.0
    first = (len(body) - 5000) // 65536 * 65536  # from just before the read
    asked = [r.headers.get("Range") for r in origin.seen("/far")]
    assert f"bytes={first}-{len(body) - 1}" in asked


def test_unzip_lists_a_zip_still_downloading(origin, mnt, tmp_path):
    import subprocess
    import zipfile

    path = tmp_path / "z.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for i in range(3):
            z.writestr(f"member{i}.bin", os.urandom(6 << 20))
    body = path.read_bytes()
    res = origin.set("/z.zip", body, etag=True)
    res.rate = 1 << 20
    add(mnt, "z", origin.url("/z.zip"))
    # the length is known (stat shows it) once the origin has answered
    wait_for(lambda: os.stat(mnt / "z/latest").st_size == len(body), 10, what="the answer")
    started = time.monotonic()
    done = subprocess.run(["unzip", "-l", str(mnt / "z/latest")], capture_output=True,
                          text=True, timeout=30)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "member2.bin" in done.stdout
    assert took < 6.0
    assert status(mnt / "z/@status")["latest"] is None  # still downloading


# --- the pieces, without a mount ---------------------------------------------------------

def test_byte_ranges_merge_and_cover():
    from buffyfs.fetch.segments import ByteRanges

    r = ByteRanges()
    r.add(10, 20)
    r.add(30, 40)
    assert not r.covers(15, 35) and r.covers(12, 20) and r.prefix() == 0
    r.add(20, 30)
    assert r.covers(10, 40) and r.size() == 30
    r.add(0, 5)
    assert r.prefix() == 5
    r.add(4, 11)
    assert r.prefix() == 40 and r.starts == [0]


def test_a_map_vouches_for_whole_segments_and_recorded_prefixes():
    from buffyfs.fetch.segments import SEGMENT_SIZE, map_prefix, segments_below

    assert map_prefix({"key": "k"}) is None  # saved before segments: the file size counts
    saved = {"segment_size": 1024, "total": 5000, "segments": [[0, 3], [4, 5]]}
    assert map_prefix(saved) == 3072  # segment 3 is missing: 4 is not a prefix
    assert map_prefix({**saved, "segments": [[0, 5]]}) == 5000  # capped at the length
    assert map_prefix({**saved, "prefix": 3500}) == 3500  # what a failed attempt fsynced
    assert segments_below(SEGMENT_SIZE + 1, None) == 1
    assert segments_below(2 * SEGMENT_SIZE + 5, 2 * SEGMENT_SIZE + 5) == 3  # complete
