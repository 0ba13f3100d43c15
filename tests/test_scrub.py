"""Damaged cache files are never served (issue 11 item 9): the background scrub and the
open-time check mark a damaged blob and every version using it, ``latest`` falls back
past them, and their sources download the bytes again, which replace the bad file."""

from __future__ import annotations

import errno
import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from buffyfs.store.blobs import BlobStore
from buffyfs.store.index import Index, resolve_latest
from buffyfs.store.scrub import Scrubber
from tests.conftest import wait_for
from tests.test_mount import read, status, write_control

T0 = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_file(cache: Path, digest: str) -> Path:
    return cache / "blobs" / digest[:2] / digest


def rewrite(path: Path, data: bytes) -> None:
    """Change a blob file behind buffyfs's back (it is 0444: make it writable first)."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate(len(data))
    os.chmod(path, 0o444)


def open_errno(path: Path) -> int | None:
    try:
        read(path)
    except OSError as e:
        return e.errno
    return None


def metric(mnt, line_start: str) -> float:
    for line in (mnt / "@metrics").read_text().splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {line_start}")


# --- through the mount ---------------------------------------------------------------------


def test_scrub_finds_a_corrupt_blob_latest_falls_back_and_the_source_repairs_it(
        origin, mount_factory):
    mnt = mount_factory("--scrub-interval", "1s")
    first, second = b"first version\n" * 1000, b"second version\n" * 1000
    origin.set("/c", first, etag=True)
    write_control(mnt / "@control",
                  f"add c {origin.url('/c')} max_attempts=1 retry_backoff=1s")
    assert read(mnt / "c/latest") == first
    origin.set("/c", second, etag=True)
    write_control(mnt / "c/@control", "refresh")
    wait_for(lambda: status(mnt / "c/@status")["latest"].endswith(sha(second)[:8]), 10,
             what="the second version")
    new, old = status(mnt / "c/@status")["versions"]
    assert read(mnt / "c/latest") == second
    origin.fail("/c", 503, 503, 503)  # the first downloads again fail: the mark is seen
    rewrite(blob_file(mnt.cache, new["sha256"]), b"X" * len(second))  # same size: only
    # the hash tells

    st = wait_for(lambda: (s := status(mnt / "c/@status"))["versions"][0].get("damaged")
                  and s, 15, what="the scrub to find the damage")
    assert "does not match its sha256" in st["versions"][0]["damaged"]["reason"]
    assert st["latest"] == old["id"]  # latest falls back past the damaged version
    # last_error names the damage, until the first try to download again fails
    assert "damaged" in st["last_error"]["message"] or st["consecutive_failures"]
    assert "is damaged (blob content does not match its sha256" in mnt.log_text()
    assert open_errno(mnt / "c/@versions" / new["id"]) == errno.EIO  # never the bad bytes
    wait_for(lambda: read(mnt / "c/latest") == first, 5, what="latest to fall back")
    assert metric(mnt, 'buffyfs_damaged_blobs_found_total{check="scrub"}') == 1
    assert metric(mnt, "buffyfs_damaged_versions") == 1

    # the origin is back: the retries download the same bytes, which replace the bad file
    st = wait_for(lambda: (s := status(mnt / "c/@status"))["latest"] == new["id"] and s, 20,
                  what="the repair")
    assert not any(v.get("damaged") for v in st["versions"])
    assert [v["id"] for v in st["versions"]] == [new["id"], old["id"]]  # no new version
    assert sha(blob_file(mnt.cache, new["sha256"]).read_bytes()) == new["sha256"]
    assert "If-None-Match" not in origin.seen("/c")[-1].headers  # a 304 repairs nothing
    wait_for(lambda: read(mnt / "c/latest") == second, 5, what="latest to move back")
    assert read(mnt / "c/@versions" / new["id"]) == second
    assert metric(mnt, "buffyfs_damaged_versions") == 0
    scrub = status(mnt / "@status")["scrub"]
    assert scrub["finished"] and scrub["blobs"] >= 1


def test_a_deleted_blob_gives_eio_shows_in_status_and_is_downloaded_again(
        origin, mount_factory):
    mnt = mount_factory("--scrub-interval", "never")  # the open-time check alone
    body = b"precious\n" * 500
    origin.set("/d", body)
    write_control(mnt / "@control",
                  f"add d {origin.url('/d')} max_attempts=1 retry_backoff=1s")
    assert read(mnt / "d/latest") == body
    [v] = status(mnt / "d/@status")["versions"]
    origin.fail("/d", 503)
    blob_file(mnt.cache, v["sha256"]).unlink()

    assert open_errno(mnt / "d/@versions" / v["id"]) == errno.EIO
    st = status(mnt / "d/@status")
    if st["versions"][0].get("damaged"):  # (unless the repair was quicker than us)
        assert st["versions"][0]["damaged"]["reason"] == "blob file missing"
        assert st["latest"] is None
        assert "damaged" in st["last_error"]["message"] or st["consecutive_failures"]
    wait_for(lambda: status(mnt / "d/@status")["latest"] == v["id"], 20,
             what="the download again")
    assert read(mnt / "d/latest") == body
    assert read(mnt / "d/@versions" / v["id"]) == body
    assert blob_file(mnt.cache, v["sha256"]).read_bytes() == body
    assert metric(mnt, 'buffyfs_damaged_blobs_found_total{check="open"}') == 1
    assert len(origin.seen("/d")) == 3  # first download, the failed retry, the repair


def test_a_truncated_blob_is_caught_at_open_by_its_size(origin, cli, mount_factory):
    mnt = mount_factory("--scrub-interval", "never")
    body = os.urandom(300_000)
    origin.set("/t", body)
    origin.set("/t2", body)  # another source, the same bytes: one shared blob
    write_control(mnt / "@control",
                  f"add t {origin.url('/t')} max_attempts=1 retry_backoff=1s\n"
                  f"add t2 {origin.url('/t2')} max_attempts=1 retry_backoff=1s")
    assert read(mnt / "t/latest") == body
    assert read(mnt / "t2/latest") == body
    [v] = status(mnt / "t/@status")["versions"]
    [v2] = status(mnt / "t2/@status")["versions"]
    assert v["sha256"] == v2["sha256"]
    origin.fail("/t", 503, 503, 503)  # (long enough to look at the marks)
    origin.fail("/t2", 503, 503, 503)
    os.truncate(blob_file(mnt.cache, v["sha256"]), 1000)

    assert open_errno(mnt / "t/@versions" / v["id"]) == errno.EIO  # not 1000 bytes
    st2 = status(mnt / "t2/@status")  # the other source's version shares the blob
    assert st2["versions"][0]["damaged"]["reason"] == "blob file has 1000 bytes, 300000 expected"
    assert open_errno(mnt / "t2/@versions" / v2["id"]) == errno.EIO
    assert "damaged: blob file has 1000 bytes" in cli("versions", "t2").stdout
    for name, version in (("t", v), ("t2", v2)):
        wait_for(lambda n=name, ver=version: status(mnt / f"{n}/@status")["latest"] == ver["id"],
                 20, what=f"{name} repaired")
        assert read(mnt / f"{name}/latest") == body
    assert os.path.getsize(blob_file(mnt.cache, v["sha256"])) == len(body)


def test_a_blob_truncated_under_an_open_handle_gives_eio_not_a_short_file(
        origin, mount_factory):
    mnt = mount_factory("--scrub-interval", "never")
    body = os.urandom(1 << 20)
    origin.set("/h", body)
    write_control(mnt / "@control", f"add h {origin.url('/h')} max_attempts=1")
    v = wait_for(lambda: (status(mnt / "h/@status")["versions"] or [None])[0], 10,
                 what="the version")
    fd = os.open(mnt / "h/@versions" / v["id"], os.O_RDONLY)  # not read yet: nothing cached
    try:
        os.truncate(blob_file(mnt.cache, v["sha256"]), 1000)
        with pytest.raises(OSError) as e:
            os.pread(fd, len(body), 0)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert metric(mnt, 'buffyfs_damaged_blobs_found_total{check="read"}') == 1
    wait_for(lambda: read(mnt / "h/latest") == body, 20, what="the download again")


def test_scrub_settings_are_checked(cli, tmp_path):
    (tmp_path / "m").mkdir()
    done = cli("mount", str(tmp_path / "m"), "--scrub-interval", "weekly")
    assert done.returncode == 2 and "scrub_interval" in done.stderr
    config = tmp_path / "c.toml"
    config.write_text('[daemon]\nscrub_rate = "0"\n')
    done = cli("mount", str(tmp_path / "m"), "--config", str(config))
    assert done.returncode == 2 and "scrub_rate" in done.stderr
    assert "Traceback" not in done.stderr


# --- the pieces ----------------------------------------------------------------------------


def _index_with_shared_blob(tmp_path: Path) -> tuple[Index, str]:
    index = Index(tmp_path / "index")
    digest = sha(b"shared")
    for name in ("a", "b", "gone"):
        index.add_source(name, f"http://h/{name}", {"refresh": "1d"})
        if name == "a":
            index.commit_version(name, {"sha256": sha(b"older"), "size": 5, "tags": []},
                                 T0.replace(hour=11))
        index.commit_version(name, {"sha256": digest, "size": 6, "tags": []}, T0)
    index.remove_source("gone")  # its version is garbage, still using the blob
    return index, digest


def test_mark_damaged_marks_every_user_of_the_blob(tmp_path):
    index, digest = _index_with_shared_blob(tmp_path)
    marked = index.mark_damaged(digest, "blob file missing", T0)
    assert sorted(s for s, _ in marked) == ["a", "b"]  # live users only: they download
    assert index.mark_damaged(digest, "again") is None  # once
    with index.read() as r:
        a, b = r.versions("a"), r.versions("b")
        assert a[0].damaged == {"at": "2026-11-30T12:00:00Z", "reason": "blob file missing"}
        assert resolve_latest(r.source("a"), a).sha256 == sha(b"older")  # falls back
        assert resolve_latest(r.source("b"), b) is None
        assert [g.damaged["reason"] for g in r.garbage()] == ["blob file missing"]
        assert "damaged" in r.state("b").last_error["message"]
    # a new version of the same bytes (another source) is damaged with them
    index.add_source("c", "http://h/c", {"refresh": "1d"})
    assert index.commit_version("c", {"sha256": digest, "size": 6, "tags": []}, T0).damaged
    assert index.blob_damaged(digest)
    assert sorted(index.clear_damage(digest)) == ["a", "b", "c"]
    with index.read() as r:
        assert not any(v.damaged for n in "abc" for v in r.versions(n))
        assert not any(g.damaged for g in r.garbage())
    assert not index.blob_damaged(digest)
    assert index.mark_damaged(sha(b"no such blob"), "blob file missing") is None
    index.close()


def test_scrubber_reports_damage_and_keeps_to_its_rate(tmp_path):
    index = Index(tmp_path / "index")
    blobs = BlobStore(tmp_path)
    contents = {name: os.urandom(256 << 10) for name in ("good", "corrupt", "short", "gone")}
    for name, data in contents.items():
        partial = blobs.partial_path(name)
        partial.write_bytes(data)
        blobs.commit_partial(partial, sha(data))
        index.add_source(name, f"http://h/{name}", {"refresh": "1d"})
        index.commit_version(name, {"sha256": sha(data), "size": len(data), "tags": []}, T0)
    rewrite(blobs.path(sha(contents["corrupt"])), os.urandom(256 << 10))
    os.truncate(blobs.path(sha(contents["short"])), 10)
    blobs.path(sha(contents["gone"])).unlink()
    found: dict[str, str] = {}

    async def report(reasons: dict[str, str], check: str) -> None:
        found.update(reasons)

    scrubber = Scrubber(index, blobs, 1.0, 1 << 20, report)

    async def main() -> tuple[object, float]:
        start = trio.current_time()
        seen = await scrubber.scrub()
        return seen, trio.current_time() - start

    seen, took = trio.run(main)
    assert found == {
        sha(contents["corrupt"]): "blob content does not match its sha256",
        sha(contents["short"]): f"blob file has 10 bytes, {256 << 10} expected",
        sha(contents["gone"]): "blob file missing",
    }
    assert (seen.blobs, seen.damaged) == (4, 3)
    assert seen.bytes == 2 * (256 << 10)  # the two files of the right size were read
    assert took >= 0.45  # 512 KiB at 1 MiB/s
    with index.read() as r:
        assert r.meta_json("scrub")["damaged"] == 3
    assert 0.9 <= scrubber.seconds_until_due() <= 1.0  # the next pass: an interval later
    index.close()


def test_no_scrub_when_never(tmp_path):
    index = Index(tmp_path / "index")
    scrubber = Scrubber(index, BlobStore(tmp_path), None, 1, None)  # type: ignore[arg-type]
    trio.run(scrubber.run)  # returns at once
    index.close()
