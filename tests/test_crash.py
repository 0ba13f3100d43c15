"""Crash safety: the daemon is SIGKILLed at chosen points (BUFFYFS_CRASH_AT, from inside
the process, so each test is deterministic) or from outside (mid-tag), then restarted on
the same cache, and the cache is checked: every committed version readable with its
right hash, no blob without a version, no stale partial file, ``buffyfs check`` happy."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading

import pytest

from tests.conftest import is_mounted, unmount, wait_for
from tests.test_mount import read, status, write_control

KILL_TIMEOUT = 20.0


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_names(cache) -> set[str]:
    return {f.name for f in (cache / "blobs").glob("*/*") if f.is_file()}


def part_files(cache) -> list[str]:
    return sorted(p.name for p in (cache / "partial").glob("*.part"))


def crashing_mount(monkeypatch, mount_factory, point: str):
    """A mount whose daemon kills itself at crash point ``point``. The variable is only
    in the daemon's environment: later CLI runs and mounts go without it."""
    monkeypatch.setenv("BUFFYFS_CRASH_AT", point)
    try:
        return mount_factory()
    finally:
        monkeypatch.delenv("BUFFYFS_CRASH_AT")


def wait_killed(m) -> None:
    """The daemon died by SIGKILL (bounded wait); its dead mount is cleared."""
    wait_for(lambda: m.proc.poll() is not None, KILL_TIMEOUT, what="the daemon to be killed")
    assert m.proc.returncode == -signal.SIGKILL, \
        f"daemon exited {m.proc.returncode}, not by SIGKILL:\n{m.log_text()[-3000:]}"
    unmount(m.path)
    assert not is_mounted(m.path)


def check_cache(m, cli) -> dict[str, list[dict]]:
    """Everything a restarted mount on the crashed cache must satisfy.

    Returns each source's versions (from its @status)."""
    cache = m.cache
    by_source: dict[str, list[dict]] = {}
    shas: set[str] = set()
    for src in status(m / "@status")["sources"]:
        name = src["name"]
        versions = status(m / name / "@status")["versions"]
        by_source[name] = versions
        for v in versions:
            data = read(m / name / "@versions" / v["id"])
            assert sha(data) == v["sha256"], f"{name}/{v['id']}: wrong bytes"
            assert len(data) == v["size"]
            tags = v["tags"]
            assert len(tags) == len(set(tags)), f"{name}/{v['id']}: tags {tags}"
            assert not {"valid", "failed"} <= set(tags), f"{name}/{v['id']}: tags {tags}"
            shas.add(v["sha256"])
    # Every version's blob is in place (it was read above) and no other blob remains:
    # orphans are swept when the mount starts.
    try:
        wait_for(lambda: blob_names(cache) == shas, 10, what="the orphan sweep")
    except AssertionError:
        raise AssertionError(
            f"after 10 s: orphan blobs {sorted(blob_names(cache) - shas)}, "
            f"missing blobs {sorted(shas - blob_names(cache))}") from None
    # Nothing is downloading now, so no partial file may remain.
    wait_for(lambda: part_files(cache) == [], 10,
             what=f"no partial files (found {part_files(cache)})")
    done = cli("check")
    assert done.returncode == 0, f"check with the mount running: {done.stdout}{done.stderr}"
    return by_source


def check_offline(m, cli) -> None:
    """``buffyfs check`` also passes with no mount running."""
    m.close()
    done = cli("check")
    assert done.returncode == 0, f"check without a mount: {done.stdout}{done.stderr}"


def test_crash_mid_download_resumes_after_restart(origin, cli, mount_factory, monkeypatch):
    body = os.urandom(4 << 20)
    res = origin.set("/d", body, etag=True)
    res.chunk_delay = 0.02  # the body takes a moment: the add returns long before the kill
    m = crashing_mount(monkeypatch, mount_factory, "download-mid-body")
    write_control(m / "@control", f"add d {origin.url('/d')}")
    wait_killed(m)
    assert blob_names(m.cache) == set()  # nothing half-written is visible
    partial = m.cache / "partial" / "d.part"
    assert partial.exists() and partial.stat().st_blocks > 0  # some bytes were written
    res.chunk_delay = 0
    again = mount_factory()
    assert read(again / "d/latest") == body  # waits for the download the restart finishes
    versions = check_cache(again, cli)["d"]
    assert [v["sha256"] for v in versions] == [sha(body)]
    check_offline(again, cli)
    # Killed after the first batch: no segment was whole and in the map, so none is
    # trusted and the restart fetches the body again (test_downloads has the resume
    # of whole segments).
    assert not [r for r in origin.seen("/d") if "Range" in r.headers]


def test_crash_mid_download_of_a_source_removed_meanwhile(origin, cli, mount_factory,
                                                          monkeypatch):
    """A partial file no download will resume (its source is gone) is swept on start."""
    res = origin.set("/r", os.urandom(3 << 20), etag=True)
    res.chunk_delay = 0.02
    m = crashing_mount(monkeypatch, mount_factory, "download-mid-body")
    write_control(m / "@control", f"add r {origin.url('/r')}")
    wait_killed(m)
    assert (m.cache / "partial" / "r.part").exists()
    cli("remove", "r", check=True)
    again = mount_factory()
    assert check_cache(again, cli) == {}
    wait_for(lambda: not (again.cache / "partial" / "r.lock").exists(), 10,
             what="the removed source's lock file swept")
    check_offline(again, cli)


def test_orphans_swept_on_start_even_while_a_commit_is_in_progress(origin, cli, cache_dir,
                                                                  mount_factory, monkeypatch):
    """The start-up sweep may meet a commit in progress (here a command-line fetch whose
    validation takes a while holds the commit lock): the orphans must still go."""
    lost = b"orphan " * 3000
    res = origin.set("/o", lost, etag=True)
    res.chunk_delay = 0.02
    m = crashing_mount(monkeypatch, mount_factory, "after-blob-rename")
    write_control(m / "@control", f"add o {origin.url('/o')}")
    wait_killed(m)
    assert sha(lost) in blob_names(cache_dir)
    cli("remove", "o", check=True)  # the orphan's bytes will never be downloaded again
    body = b"slowly validated " * 3000
    origin.set("/s", body, etag=True)
    cli("add", "s", origin.url("/s"), "--validate",
        "cmd=python3 -c 'import time; time.sleep(4)'", check=True)
    fetch = subprocess.Popen([sys.executable, "-m", "buffyfs", "fetch", "s", "--cache",
                              str(cache_dir)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # its blob is in place and it validates (the commit lock held) while the mount starts
        wait_for(lambda: sha(body) in blob_names(cache_dir), 15, what="the fetch's blob")
        again = mount_factory()
        assert fetch.wait(timeout=20) == 0, fetch.stderr.read() if fetch.stderr else ""
    finally:
        if fetch.poll() is None:
            fetch.kill()
            fetch.wait(timeout=10)
    versions = check_cache(again, cli)  # the orphan is swept, within 10 s
    assert [v["sha256"] for v in versions["s"]] == [sha(body)]
    assert sha(lost) not in blob_names(cache_dir)
    check_offline(again, cli)


@pytest.mark.parametrize("first", [True, False], ids=["first-download", "refresh"])
def test_crash_between_blob_rename_and_index_commit(origin, cli, mount_factory, monkeypatch,
                                                     first):
    one, two = b"one " * 5000, b"two " * 5000
    res = origin.set("/b", one, etag=True)
    if not first:
        cli("add", "b", origin.url("/b"), check=True)
        cli("fetch", "b", check=True)
    m = crashing_mount(monkeypatch, mount_factory, "after-blob-rename")
    res.chunk_delay = 0.02  # the control write returns before the download ends
    if first:
        write_control(m / "@control", f"add b {origin.url('/b')}")
        lost = one
    else:
        assert read(m / "b/latest") == one
        origin.set("/b", two, etag=True)
        write_control(m / "b/@control", "refresh")
        lost = two
    wait_killed(m)
    # The crash came after the complete blob was renamed into place, before its version.
    assert sha(lost) in blob_names(m.cache)
    res.chunk_delay = 0
    if first:
        origin.set("/b", two, etag=True)  # the restart downloads other bytes
    again = mount_factory()
    want = two if first else one
    assert read(again / "b/latest") == want
    versions = check_cache(again, cli)["b"]
    # The uncommitted blob was an orphan: swept; the committed version is untouched.
    assert [v["sha256"] for v in versions] == [sha(want)]
    assert sha(lost) not in blob_names(again.cache)
    check_offline(again, cli)


def test_crash_right_after_version_commit(origin, cli, mount_factory, monkeypatch):
    one, two = b"first version\n" * 1000, b"second version\n" * 1000
    res = origin.set("/c", one, etag=True)
    cli("add", "c", origin.url("/c"), check=True)
    cli("fetch", "c", check=True)
    m = crashing_mount(monkeypatch, mount_factory, "after-version-commit")
    assert read(m / "c/latest") == one
    origin.set("/c", two, etag=True)
    res.chunk_delay = 0.02
    write_control(m / "c/@control", "refresh")
    wait_killed(m)
    res.chunk_delay = 0
    again = mount_factory()
    st = status(again / "c/@status")
    # The committed version survived the crash and is latest.
    assert [v["sha256"] for v in st["versions"]] == [sha(two), sha(one)]
    assert st["latest"] == st["versions"][0]["id"]
    assert read(again / "c/latest") == two
    assert st["state"] == "idle"  # the crash left "fetching": reset before serving
    check_cache(again, cli)
    assert len(origin.seen("/c")) == 2  # no download needed after the restart
    check_offline(again, cli)


def test_crash_mid_collection_sweeps_orphans_on_restart(origin, cli, mount_factory,
                                                        monkeypatch):
    contents = [f"version {i}\n".encode() * 2000 for i in range(4)]
    origin.set("/g", contents[0], etag=True)
    origin.set("/h", contents[0], etag=True)  # another source sharing the first blob
    cli("add", "g", origin.url("/g"), "--keep-versions", "0", check=True)
    cli("add", "h", origin.url("/h"), check=True)
    cli("fetch", "h", check=True)
    for body in contents[:3]:  # the command line keeps them all (no quota)
        origin.set("/g", body, etag=True)
        cli("fetch", "g", check=True)
    assert len(status_versions(cli, "g")) == 3
    m = crashing_mount(monkeypatch, mount_factory, "gc-after-commit")
    assert read(m / "g/latest") == contents[2]
    origin.set("/g", contents[3], etag=True)
    write_control(m / "g/@control", "refresh")
    # the new version is committed, then its collection drops the three older ones
    # from the index and the daemon dies before unlinking their blobs
    wait_killed(m)
    assert {sha(c) for c in contents} <= blob_names(m.cache)
    again = mount_factory()
    versions = check_cache(again, cli)  # waits for the sweep of the orphans
    assert [v["sha256"] for v in versions["g"]] == [sha(contents[3])]
    assert [v["sha256"] for v in versions["h"]] == [sha(contents[0])]
    assert blob_names(again.cache) == {sha(contents[0]), sha(contents[3])}
    assert read(again / "h/latest") == contents[0]  # the shared blob was kept
    assert read(again / "g/latest") == contents[3]
    check_offline(again, cli)


def status_versions(cli, name: str) -> list[dict]:
    return json.loads(cli("status", name, "--json", check=True).stdout)["versions"]


TAG_OPS = [("tag", "valid"), ("tag", "failed"), ("untag", "valid"), ("untag", "failed"),
           ("tag", "keep"), ("untag", "keep"), ("tag", "gold"), ("untag", "gold")]


def after(tags: frozenset[str], word: str, tag: str) -> frozenset[str]:
    """The model of a tag command (valid and failed exclude each other)."""
    if word == "untag":
        return tags - {tag}
    other = {"valid": "failed", "failed": "valid"}.get(tag)
    return (tags - {other}) | {tag} if other else tags | {tag}


def test_kill_during_a_burst_of_tag_writes(origin, cli, mount_factory):
    origin.set("/t", b"")
    cli("add", "t", origin.url("/t"), check=True)
    for i in range(3):
        origin.set("/t", f"tagged {i}\n".encode() * 500)
        cli("fetch", "t", check=True)
    m = mount_factory()
    ids = [v["id"] for v in status(m / "t/@status")["versions"]]
    assert len(ids) == 3
    acked = {vid: frozenset() for vid in ids}  # the tags every returned write promised
    pending: dict[str, dict] = {}  # the model with the write in flight applied
    done = [0]
    errors: list[OSError] = []
    rng = random.Random(5)

    def burst() -> None:
        nonlocal acked
        while done[0] < 100_000:
            vid = rng.choice(ids)
            word, tag = rng.choice(TAG_OPS)
            pending["model"] = {**acked, vid: after(acked[vid], word, tag)}
            try:
                write_control(m / "t/@control", f"{word} {vid} {tag}")
            except OSError as e:
                errors.append(e)
                return
            acked = pending["model"]
            done[0] += 1

    writer = threading.Thread(target=burst, daemon=True)
    writer.start()
    wait_for(lambda: done[0] >= 30 or errors, 20, what="some tag writes")
    assert not errors, f"a tag write failed before the kill: {errors}"
    os.kill(m.proc.pid, signal.SIGKILL)
    wait_killed(m)
    writer.join(timeout=10)
    assert not writer.is_alive(), "a control write hung on the dead mount"
    assert errors and errors[0].errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO), \
        errors
    again = mount_factory()
    versions = check_cache(again, cli)["t"]
    assert sorted(v["id"] for v in versions) == sorted(ids)
    got = {v["id"]: frozenset(v["tags"]) for v in versions}
    # Every acknowledged write is there; the one in flight is all there or not at all.
    assert got in (acked, pending["model"]), (got, acked, pending["model"])
    check_offline(again, cli)
