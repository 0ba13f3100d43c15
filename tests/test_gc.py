"""Garbage collection, the quota, ``buffyfs gc`` and ``buffyfs check``, through the
mount and the command line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest

from tests.conftest import run_cli, wait_for
from tests.test_mount import read, status, write_control


def blob_files(cache) -> set[str]:
    return {f.name for sub in (cache / "blobs").iterdir() for f in sub.iterdir()}


def make_versions(origin, mnt, name, bodies, options=""):
    """A source whose versions have ``bodies`` in order; returns their ids, oldest first."""
    origin.set(f"/{name}", bodies[0])
    write_control(mnt / "@control", f"add {name} {origin.url('/' + name)} {options}")
    assert read(mnt / f"{name}/latest") == bodies[0]
    ids = [status(mnt / f"{name}/@status")["latest"]]
    for body in bodies[1:]:
        origin.set(f"/{name}", body)
        write_control(mnt / f"{name}/@control", "refresh")
        wait_for(lambda: status(mnt / f"{name}/@status")["latest"] not in ids, 10,
                 what="a new version")
        ids.append(status(mnt / f"{name}/@status")["latest"])
    return ids


def test_retention_keeps_latest_valid_keep_and_the_newest_others(origin, mnt):
    a, b, c = make_versions(origin, mnt, "r", [b"A" * 1000, b"B" * 1000, b"C" * 1000])
    write_control(mnt / "r/@control", f"tag {a} keep\ntag {b} valid\nset keep_versions=1")
    # three more versions: only latest, the newest valid, keep, and 1 other may stay
    for body in (b"D" * 1000, b"E" * 1000, b"F" * 1000):
        origin.set("/r", body)
        before = status(mnt / "r/@status")["latest"]
        write_control(mnt / "r/@control", "refresh")
        wait_for(lambda old=before: status(mnt / "r/@status")["latest"] != old, 10,
                 what="version")
    wait_for(lambda: len(status(mnt / "r/@status")["versions"]) == 4, 10, what="collection")
    st = status(mnt / "r/@status")
    kept = [v["id"] for v in st["versions"]]
    assert a in kept and b in kept and c not in kept  # keep, valid stay; C, D collected
    assert kept[0] == st["latest"]  # F
    assert sorted(os.listdir(mnt / "r/@versions")) == sorted(kept)
    assert hashlib.sha256(b"C" * 1000).hexdigest() not in blob_files(mnt.cache)
    assert read(mnt / f"r/@versions/{a}") == b"A" * 1000


def test_open_version_is_not_collected_under_its_reader(origin, mnt):
    ids = make_versions(origin, mnt, "o", [b"old bytes"], "keep_versions=0")
    f = open(mnt / "o/latest", "rb")  # noqa: SIM115 (closed below)
    try:
        origin.set("/o", b"new bytes")
        write_control(mnt / "o/@control", "refresh")
        wait_for(lambda: status(mnt / "o/@status")["latest"] != ids[0], 10, what="version")
        assert run_cli("gc", cache=mnt.cache).returncode == 0
        assert ids[0] in [v["id"] for v in status(mnt / "o/@status")["versions"]]
        assert f.read() == b"old bytes"
        assert os.fstat(f.fileno()).st_size == len(b"old bytes")
    finally:
        f.close()
    done = run_cli("gc", cache=mnt.cache)
    assert "o: 1 version(s), freed" in done.stdout
    remaining = [v["id"] for v in status(mnt / "o/@status")["versions"]]
    assert len(remaining) == 1 and ids[0] not in remaining
    assert not os.path.exists(mnt / f"o/@versions/{ids[0]}")


def test_shared_blobs_go_with_their_last_user(origin, mnt, cli):
    origin.set("/same", b"shared content")
    write_control(mnt / "@control",
                  f"add s1 {origin.url('/same')}\nadd s2 {origin.url('/same')}")
    assert read(mnt / "s1/latest") == read(mnt / "s2/latest") == b"shared content"
    sha = hashlib.sha256(b"shared content").hexdigest()
    assert blob_files(mnt.cache) == {sha}  # stored once
    assert status(mnt / "@status")["cache_size"] == len(b"shared content")
    write_control(mnt / "@control", "remove s1")
    cli("gc", check=True)
    assert blob_files(mnt.cache) == {sha}  # s2 still uses it
    assert read(mnt / "s2/latest") == b"shared content"
    write_control(mnt / "@control", "remove s2")  # the mount collects at once
    wait_for(lambda: blob_files(mnt.cache) == set(), 10, what="the last user's blob gone")
    assert "total: freed 0 B" in cli("gc", check=True).stdout  # nothing left to collect
    assert status(mnt / "@status")["cache_size"] == 0


def test_gc_dry_run_changes_nothing(origin, cli, mount_factory):
    origin.set("/d", b"one")
    cli("add", "d", origin.url("/d"), "--keep-versions", "0", check=True)
    cli("fetch", "d", check=True)
    origin.set("/d", b"two")
    cli("fetch", "d", check=True)  # no mount runs: the command line collects nothing yet
    before = version_count(cli)
    out = cli("gc", "--dry-run", check=True).stdout
    assert "d: 1 version(s), would free 3 B" in out and "total: would free 3 B" in out
    assert version_count(cli) == before == 2
    out = cli("gc", check=True).stdout
    assert "total: freed 3 B" in out
    assert len(json.loads(cli("status", "d", "--json", check=True).stdout)["versions"]) == 1
    mnt = mount_factory()
    assert read(mnt / "d/latest") == b"two"


def version_count(cli) -> int:
    return len(json.loads(cli("status", "d", "--json", check=True).stdout)["versions"])


def test_quota_evicts_oldest_and_refuses_what_cannot_fit(origin, mount_factory):
    mnt = mount_factory("--max-cache-size", "350K")
    make_versions(origin, mnt, "q", [os.urandom(100_000) for _ in range(3)], "keep_versions=5")
    assert status(mnt / "@status")["max_cache_size"] == 350 * 1024
    before = [v["id"] for v in status(mnt / "q/@status")["versions"]]
    make_versions(origin, mnt, "q2", [os.urandom(100_000)])  # needs room: q's oldest goes
    after = [v["id"] for v in status(mnt / "q/@status")["versions"]]
    assert after == before[:-1]
    assert status(mnt / "@status")["cache_size"] <= 350 * 1024
    origin.set("/huge", os.urandom(400_000))
    write_control(mnt / "@control", f"add huge {origin.url('/huge')}")
    with pytest.raises(OSError):
        read(mnt / "huge/latest")
    assert "cache full" in status(mnt / "huge/@status")["last_error"]["message"]
    # nothing protected was evicted for it: every latest still reads
    assert len(read(mnt / "q/latest")) == 100_000 and len(read(mnt / "q2/latest")) == 100_000
    assert status(mnt / "@status")["cache_size"] <= 350 * 1024


def test_disk_full_fails_the_download_cleanly(origin, tmp_path, cli, mount_factory):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        cache = small / "cache"
        origin.set("/fits", b"f" * 10_000)
        origin.set("/toobig", os.urandom(3 << 20))
        mnt = mount_factory(cache=cache)
        write_control(mnt / "@control", f"add fits {origin.url('/fits')}")
        assert read(mnt / "fits/latest") == b"f" * 10_000
        write_control(mnt / "@control", f"add toobig {origin.url('/toobig')} max_attempts=1")
        with pytest.raises(OSError):
            read(mnt / "toobig/latest")
        assert "No space left" in status(mnt / "toobig/@status")["last_error"]["message"]
        assert read(mnt / "fits/latest") == b"f" * 10_000  # nothing else harmed
        assert not (cache / "partial" / "toobig.part").exists()  # space given back
        mnt.close()
    finally:
        subprocess.run(["umount", "-l", str(small)])


def test_check_finds_and_repairs(origin, cli, cache_dir):
    origin.set("/c", b"first body")
    cli("add", "c", origin.url("/c"), check=True)
    cli("fetch", "c", check=True)
    origin.set("/c", b"second body")
    cli("fetch", "c", check=True)
    assert cli("check").returncode == 0
    st = json.loads(cli("status", "c", "--json", check=True).stdout)
    newest = st["versions"][0]
    path = cache_dir / "blobs" / newest["sha256"][:2] / newest["sha256"]
    os.chmod(path, 0o644)
    path.write_bytes(b"rotten bits")  # corrupt the newest version
    orphan = cache_dir / "blobs" / "ab" / ("ab" + "0" * 62)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"nobody's")
    done = cli("check")
    assert done.returncode == 1
    assert f"corrupt blob: c {newest['id']}" in done.stdout
    assert "orphan: blobs/ab/" in done.stdout
    done = cli("check", "--repair")
    assert done.returncode == 0 and "repaired" in done.stdout
    assert cli("check").returncode == 0
    st = json.loads(cli("status", "c", "--json", check=True).stdout)
    assert [v["id"] for v in st["versions"]] == [st["latest"]] and st["latest"] != newest["id"]
    assert not orphan.exists() and not path.exists()


def test_check_reports_missing_blob(origin, cli, cache_dir):
    origin.set("/m", b"soon missing")
    cli("add", "m", origin.url("/m"), check=True)
    cli("fetch", "m", check=True)
    sha = hashlib.sha256(b"soon missing").hexdigest()
    (cache_dir / "blobs" / sha[:2] / sha).unlink()
    done = cli("check")
    assert done.returncode == 1 and "missing blob: m" in done.stdout
    assert cli("check", "--repair").returncode == 0
    assert json.loads(cli("status", "m", "--json", check=True).stdout)["versions"] == []
    assert cli("check").returncode == 0


def test_offline_start_serves_everything_at_once(origin, cli, mount_factory):
    origin.set("/a", b"cached a")
    cli("add", "a", origin.url("/a"), "--refresh", "1s", check=True)
    cli("fetch", "a", check=True)
    cli("add", "dns", "http://no-such-host.invalid/file", "--refresh", "1s", check=True)
    origin.stop()
    mnt = mount_factory()
    assert read(mnt / "a/latest") == b"cached a"
    assert sorted(os.listdir(mnt.path)) == ["@control", "@metrics", "@status", "a", "dns"]
    with pytest.raises(OSError):
        read(mnt / "dns/latest")
    assert "resolve" in status(mnt / "dns/@status")["last_error"]["message"]


def test_over_quota_still_collects_garbage(tmp_path):
    """A quota lowered below what protected versions take must not stop collection."""
    from buffyfs.store import gc
    from buffyfs.store.cache import Cache
    from buffyfs.store.index import now_utc

    cache = Cache(tmp_path / "c")
    cache.add_source("q", "http://127.0.0.1:9/", {"keep_versions": 0})
    for i in range(3):
        sha = hashlib.sha256(bytes([i])).hexdigest()
        cache.index.commit_version("q", {"sha256": sha, "size": 1000, "tags": []},
                                   now_utc())
    report = gc.collect_now(cache.index, cache.blobs, set(), 0, max_size=500)
    assert len(report.doomed) == 2  # retention garbage went, latest stays
    with pytest.raises(gc.CacheFull):
        gc.collect_now(cache.index, cache.blobs, set(), 10, max_size=500)


def test_cache_is_private_and_a_source_may_be_called_commit(origin, cli, cache_dir):
    origin.set("/c", b"commit me")
    cli("add", "commit", origin.url("/c"), "--header", "X-Token: abc", check=True)
    assert cli("fetch", "commit", check=True).stdout.startswith("commit: new version")
    assert (cache_dir / "index" / "data.mdb").stat().st_mode & 0o077 == 0
    fresh = cache_dir / "fresh"
    cli_fresh = run_cli("add", "x", "http://127.0.0.1:9/", cache=fresh)
    assert cli_fresh.returncode == 0 and fresh.stat().st_mode & 0o077 == 0


def test_quota_is_shared_by_downloads_under_way(origin, mount_factory):
    """Two bodies received at the same time cannot both take the same free space: the
    second is refused at its start, before the first is committed."""
    mnt = mount_factory("--max-cache-size", "300K")
    for name in ("slow1", "slow2"):
        origin.set(f"/{name}", os.urandom(200_000)).chunk_delay = 0.1  # ~2 s per body
    write_control(mnt / "@control", f"add slow1 {origin.url('/slow1')} max_attempts=1\n"
                                    f"add slow2 {origin.url('/slow2')} max_attempts=1")
    results = {}

    def fetch(name: str) -> None:
        try:
            results[name] = len(read(mnt / f"{name}/latest"))
        except OSError as e:
            results[name] = e

    threads = [threading.Thread(target=fetch, args=(n,)) for n in ("slow1", "slow2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    served = [n for n, r in results.items() if r == 200_000]
    refused = [n for n, r in results.items() if isinstance(r, OSError)]
    assert len(served) == 1 and len(refused) == 1, results
    message = status(mnt / f"{refused[0]}/@status")["last_error"]["message"]
    assert "cache full" in message and "held by other downloads under way" in message
    assert status(mnt / "@status")["cache_size"] <= 300 * 1024


def test_check_ignores_blobs_collected_while_it_runs(tmp_path):
    """Deterministic: the versions (and blobs) of all but ``latest`` are collected
    right after the first blob is hashed; what vanished is no damage."""
    from buffyfs.store import check, gc
    from buffyfs.store.cache import Cache
    from buffyfs.store.index import now_utc

    cache = Cache(tmp_path / "c")
    cache.add_source("q", "http://127.0.0.1:9/", {"keep_versions": 10})
    for i in range(6):
        body = bytes([i]) * 1000
        sha = hashlib.sha256(body).hexdigest()
        cache.blobs.path(sha).parent.mkdir(mode=0o700, exist_ok=True)
        cache.blobs.path(sha).write_bytes(body)
        cache.index.commit_version("q", {"sha256": sha, "size": len(body), "tags": []},
                                   now_utc())
    cache.set_options("q", {"keep_versions": 0})
    collected = []

    def collect_once(done: int, total: int) -> None:
        if not collected:
            collected.append(gc.collect_now(cache.index, cache.blobs, set()))

    found = check.check(cache.index, cache.blobs, collect_once)
    assert len(collected[0].doomed) == 5
    assert found.healthy, found
    assert not (found.missing or found.not_regular)
    assert check.check(cache.index, cache.blobs).checked == 1
    cache.close()


def test_check_racing_collection_never_fails_or_tracebacks(origin, cli, mount_factory):
    """``buffyfs check`` in a loop while new versions arrive and every old one is
    collected (keep_versions=0). Bounded: a fixed count of runs and of versions."""
    m = mount_factory()
    names = [f"race{i}" for i in range(4)]
    for name in names:
        origin.set(f"/{name}", os.urandom(4 << 20))
        write_control(m / "@control", f"add {name} {origin.url('/' + name)} keep_versions=0")
    for name in names:
        wait_for(lambda n=name: status(m / f"{n}/@status")["latest"], 20, what="a version")
    stop = threading.Event()

    def new_versions() -> None:
        for _ in range(200):
            for name in names:
                if stop.is_set():
                    return
                origin.set(f"/{name}", os.urandom(4 << 20))
                write_control(m / f"{name}/@control", "refresh")
            stop.wait(0.05)

    writer = threading.Thread(target=new_versions)
    writer.start()
    try:
        runs = [cli("check", timeout=30) for _ in range(25)]
    finally:
        stop.set()
        writer.join(timeout=30)
    assert m.log_text().count("(retention)") >= 10  # versions came and went meanwhile
    for done in runs:
        # stderr: nothing, or the hint that follows a finding (an orphan of the race)
        assert done.stderr in ("", "run buffyfs check --repair to repair\n"), done.stderr
        assert "missing blob" not in done.stdout and "corrupt blob" not in done.stdout, \
            done.stdout
        assert done.returncode == 0 or "orphan" in done.stdout, done.stdout
    wait_for(lambda: all(status(m / f"{n}/@status")["state"] == "idle" for n in names), 30,
             what="the downloads to end")
    done = cli("check")
    assert done.returncode == 0, done.stdout


# Plays a running mount for `buffyfs gc` in a process of its own (it holds the mount
# lock): answers the request after BATCHES progress steps STEP seconds apart; with
# "stall", it shows progress once and then nothing, and never answers.
SLOW_MOUNT = """
import sys, time
from pathlib import Path
from buffyfs.store.cache import Cache
cache = Cache(Path(sys.argv[1]))
fd = cache.claim_mount(None)
batches, step, stall = int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "stall"
print("mounted", flush=True)
deadline = time.monotonic() + 30
while True:
    with cache.index.read() as r:
        rid = (r.meta_json("gc_request") or {}).get("id")
    if rid or time.monotonic() > deadline:
        break
    time.sleep(0.02)
for i in range(batches):
    time.sleep(step)
    if stall and i:
        continue
    with cache.index.write() as w:
        w.put_meta_json("gc_progress", {"request": rid, "done": i + 1, "of": batches})
if stall:
    sys.stdin.read()
else:
    with cache.index.write() as w:
        w.put_gc_result({"id": rid, "dry_run": False, "error": None, "report": {
            "versions": [], "freed": {}, "total": 0, "orphans": [], "kept": []}})
    sys.stdin.read()
"""


class SlowMount:
    def __init__(self, cache_dir, batches: int, step: float, stall: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_MOUNT, str(cache_dir), str(batches), str(step),
             "stall" if stall else "answer"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> SlowMount:
        assert self.proc.stdout.readline().strip() == "mounted"
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()  # it ends: the mount lock goes with it
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)


def run_gc_in_process(cache_dir, capsys) -> tuple[int, str]:
    """``buffyfs gc`` in this process (its test takes ``own_root_logger``)."""
    from buffyfs import cli

    code = cli.main(["gc", "--cache", str(cache_dir)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_gc_waits_while_the_mount_shows_progress(cache_dir, monkeypatch, capsys,
                                                own_root_logger):
    """A long collection (100,000 versions: a minute on a busy machine) is waited for
    as long as each of its batches commits within the bound."""
    from buffyfs import cli

    monkeypatch.setattr(cli, "GC_WAIT", 0.6)
    with SlowMount(cache_dir, batches=12, step=0.2):  # 2.4 s in all, 4x the bound
        code, out = run_gc_in_process(cache_dir, capsys)
    assert code == 0, out
    assert "total: freed 0 B" in out


def test_gc_gives_up_on_a_mount_that_shows_no_progress(cache_dir, monkeypatch, capsys,
                                                       own_root_logger):
    from buffyfs import cli

    monkeypatch.setattr(cli, "GC_WAIT", 0.6)
    with SlowMount(cache_dir, batches=3, step=0.2, stall=True):
        code, out = run_gc_in_process(cache_dir, capsys)
    assert code != 0
    assert out.strip() == ("buffyfs: error: the running mount did not answer the gc "
                           "request (no progress for 0.6s)")


def test_gc_stops_waiting_when_the_mount_stops(cache_dir, capsys, own_root_logger):
    with SlowMount(cache_dir, batches=3, step=0.2, stall=True) as mount:
        threading.Timer(1.0, mount.proc.stdin.close).start()  # it ends, not answering
        code, out = run_gc_in_process(cache_dir, capsys)
    assert code != 0
    assert out.strip() == "buffyfs: error: the mount stopped before answering the gc request"
