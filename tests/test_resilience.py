"""Issue 11, items 4, 5, 6 and 8, through the mount and the command line: a resume
survives an origin that is down for a moment; the quota bounds partial files; slow
origins lose their slot; the errors of a refresh's attempts show while it retries."""

from __future__ import annotations

import hashlib
import os
import pty
import select
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

from tests.conftest import wait_for
from tests.test_mount import read, status, write_control


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def add(mnt, name, url, options=""):
    write_control(mnt / "@control", f"add {name} {url} {options}")


def part(mnt, name):
    return mnt.cache / "partial" / f"{name}.part"


def size_of(path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def in_future(stamp: str) -> float:
    """Seconds from now to an RFC 3339 time of @status."""
    when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return (when - datetime.now(UTC)).total_seconds()


# --- item 4: a resume survives an origin that is down for a moment -----------------------


def test_origin_down_mid_body_resumes_from_the_offset_reached(origin, mnt):
    body = os.urandom(8 << 20)
    res = origin.set("/down", body, etag=True)
    res.chunk_delay = 0.3  # about six seconds for the body
    add(mnt, "down", origin.url("/down"), "max_attempts=8")
    partial = part(mnt, "down")
    wait_for(lambda: size_of(partial) >= 2 << 20, 20, what="2 MiB of the body")
    origin.crash()
    wait_for(lambda: status(mnt / "down/@status")["state"] == "waiting", 10,
             what="the retry after the cut")
    reached = size_of(partial)
    assert 0 < reached < len(body)
    time.sleep(3)  # down for a few seconds: the attempts meanwhile cannot connect
    res.chunk_delay = 0
    origin.revive()
    assert read(mnt / "down/latest") == body
    requests = origin.seen("/down")
    assert "Range" not in requests[0].headers
    assert [r.headers.get("Range") for r in requests[1:]] == [f"bytes={reached}-"]
    assert requests[-1].headers["If-Range"] == res.etag
    assert "cannot connect" in mnt.log_text()  # there were failed attempts in between
    assert status(mnt / "down/@status")["versions"][0]["sha256"] == sha(body)


def test_a_refresh_whose_attempts_all_fail_keeps_the_partial_for_the_next(
        origin, cli, mount_factory):
    body = os.urandom(4 << 20)
    res = origin.set("/keep", body, etag=True)
    res.chunk_delay = 0.25
    cli("add", "keep", origin.url("/keep"), "--max-attempts", "2", check=True)
    mnt = mount_factory()
    partial = part(mnt, "keep")
    wait_for(lambda: size_of(partial) > 0, 15, what="some bytes")
    origin.crash()
    wait_for(lambda: status(mnt / "keep/@status")["consecutive_failures"] == 1, 20,
             what="the refresh to give up")
    kept = size_of(partial)
    assert 0 < kept < len(body)
    mnt.close()
    assert cli("gc", check=True).returncode == 0
    assert size_of(partial) == kept  # gc leaves a partial the source will resume
    res.chunk_delay = 0
    origin.revive()
    again = mount_factory()  # the restarted daemon resumes it at once
    assert read(again / "keep/latest") == body
    assert origin.seen("/keep")[-1].headers["Range"] == f"bytes={kept}-"
    assert status(again / "keep/@status")["versions"][0]["sha256"] == sha(body)


def test_fetch_says_when_the_download_starts_over(origin, cli, cache_dir):
    body = os.urandom(3 << 20)
    res = origin.set("/over", body, last_modified=True)
    res.ranges = False  # no resume possible: each attempt starts from byte 0
    origin.fail("/over", "reset")
    cli("add", "over", origin.url("/over"), check=True)
    code, shown = on_terminal("fetch", "over", cache=cache_dir)
    assert code == 0, shown
    assert "attempt 1/5" in shown and "retrying in" in shown  # above the bar
    assert "starting over from byte 0" in shown
    assert "Traceback" not in shown
    quiet = cli("fetch", "over")  # not a terminal: no bar, no notes
    assert quiet.returncode == 0 and quiet.stderr == ""


def on_terminal(*args: str, cache, timeout: float = 60.0) -> tuple[int, str]:
    """Run buffyfs with its stderr on a pseudo-terminal; (exit status, what it showed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "buffyfs", *args, "--cache", str(cache)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the process closed the terminal
                    break
                if not data:
                    break
                shown += data
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=10), shown.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# --- item 5: the quota bounds partial files ----------------------------------------------


def test_a_body_without_length_stops_at_the_quota(origin, mount_factory):
    res = origin.set("/endless", os.urandom(24 << 20))
    res.chunked, res.chunk_delay = True, 0.15  # no Content-Length, about three seconds
    mnt = mount_factory("--max-cache-size", "4M")
    partial = part(mnt, "endless")
    biggest = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            biggest[0] = max(biggest[0], size_of(partial))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        add(mnt, "endless", origin.url("/endless"))
        wait_for(lambda: status(mnt / "endless/@status")["consecutive_failures"] == 1, 20,
                 what="the download to fail")
    finally:
        stop.set()
        watcher.join(timeout=5)
    st = status(mnt / "endless/@status")
    assert "cache full" in st["last_error"]["message"]
    assert len(origin.seen("/endless")) == 1  # not retried
    assert 0 < biggest[0] <= 4 << 20
    assert not partial.exists()  # its bytes are given back


def test_remove_during_a_download_deletes_its_partial(origin, mnt):
    res = origin.set("/rm", os.urandom(4 << 20), etag=True)
    res.chunk_delay = 0.5  # about ten seconds
    add(mnt, "rm", origin.url("/rm"))
    partial = part(mnt, "rm")
    wait_for(lambda: size_of(partial) > 0, 15, what="some bytes")
    write_control(mnt / "@control", "remove rm")
    wait_for(lambda: not partial.exists(), 5, what="the partial to go")


def test_gc_sweeps_partials_no_download_owns(origin, cli, mnt):
    origin.set("/there", b"there")
    add(mnt, "there", origin.url("/there"))
    assert read(mnt / "there/latest") == b"there"
    stray = part(mnt, "ghost")  # no such source
    stray.write_bytes(b"x" * 1000)
    unowned = part(mnt, "there")  # a source with no resume point saved
    unowned.write_bytes(b"y" * 1000)
    done = cli("gc", check=True)
    assert not stray.exists() and not unowned.exists()
    assert "partial/ghost.part" in done.stdout


def test_sweep_partials_keeps_only_what_a_source_will_resume(tmp_path):
    from buffyfs.fetch.refresh import partial_key
    from buffyfs.store import gc
    from buffyfs.store.cache import Cache

    cache = Cache(tmp_path / "c")
    try:
        for name in ("keep", "moved"):
            cache.add_source(name, f"http://127.0.0.1:9/{name}", {})
            source = cache.index.get_source(name)
            cache.index.set_state(name, partial={"key": partial_key(source), "etag": '"e"',
                                                 "last_modified": None})
        for name in ("keep", "moved", "gone"):
            cache.blobs.partial_path(name).write_bytes(b"p")
        cache.blobs.lock_path("gone").write_bytes(b"")
        cache.set_options("moved", {"url": "http://127.0.0.1:9/elsewhere"})
        removed = gc.sweep_partials(cache.index, cache.blobs, partial_key)
        assert sorted(removed) == ["partial/gone.part", "partial/moved.part"]
        assert cache.blobs.partial_path("keep").exists()
        assert not cache.blobs.lock_path("gone").exists()
    finally:
        cache.close()


# --- item 6: slow origins lose their slot ------------------------------------------------


def test_a_too_slow_body_fails_and_the_next_refresh_resumes(origin, mnt):
    body = os.urandom(1 << 20)
    res = origin.set("/slow", body, etag=True)
    res.chunk_delay = 1.0  # about 50 KiB/s
    add(mnt, "slow", origin.url("/slow"), "min_speed=200K min_speed_time=2s max_attempts=1")
    wait_for(lambda: status(mnt / "slow/@status")["consecutive_failures"] == 1, 15,
             what="the slow attempt to fail")
    st = status(mnt / "slow/@status")
    assert "too slow" in st["last_error"]["message"]
    assert st["options"]["min_speed"] == "200K"
    kept = size_of(part(mnt, "slow"))
    assert kept > 0  # the resume point is kept
    res.chunk_delay = 0
    write_control(mnt / "slow/@control", "refresh")
    wait_for(lambda: status(mnt / "slow/@status")["latest"], 10, what="a version")
    assert read(mnt / "slow/latest") == body
    assert origin.seen("/slow")[-1].headers["Range"] == f"bytes={kept}-"


def test_an_attempt_longer_than_attempt_max_time_fails(origin, mnt):
    res = origin.set("/long", os.urandom(1 << 20), etag=True)
    res.chunk_delay = 0.5  # ten seconds, fast enough for min_speed
    started = time.monotonic()
    add(mnt, "long", origin.url("/long"), "attempt_max_time=2s max_attempts=1")
    wait_for(lambda: status(mnt / "long/@status")["consecutive_failures"] == 1, 15,
             what="the long attempt to fail")
    assert time.monotonic() - started < 8
    message = status(mnt / "long/@status")["last_error"]["message"]
    assert "longer than attempt_max_time (2s)" in message


def test_a_source_waiting_for_a_slot_says_it_is_queued(origin, mnt):
    for name in ("s1", "s2"):  # both slots of the host, for a while
        res = origin.set(f"/{name}", os.urandom(1 << 20))
        res.chunk_delay = 0.5
        add(mnt, name, origin.url(f"/{name}"))
    wait_for(lambda: origin.inflight == 2, 10, what="two downloads")
    add(mnt, "third", origin.url("/missing"))
    st = wait_for(lambda: (s := status(mnt / "third/@status"))["queued"] and s, 10,
                  what="the third source to be queued")
    assert st["state"] == "fetching" and st["progress"] is None
    assert "max_downloads_per_host" in st["queued"]
    assert "queued" in mnt.log_text()
    wait_for(lambda: status(mnt / "third/@status")["consecutive_failures"] == 1, 30,
             what="the 404 once a slot is free")
    assert status(mnt / "third/@status")["queued"] is None


def test_cli_add_takes_the_speed_options(cli):
    cli("add", "sp", "http://127.0.0.1:9/x", "--min-speed", "2K", "--min-speed-time", "10s",
        "--attempt-max-time", "1h", check=True)
    options = status_json(cli, "sp")["options"]
    assert (options["min_speed"], options["min_speed_time"], options["attempt_max_time"]) \
        == ("2K", "10s", "1h")
    bad = cli("add", "sq", "http://127.0.0.1:9/x", "--min-speed", "fast")
    assert bad.returncode == 2 and "invalid min_speed" in bad.stderr


def status_json(cli, name):
    import json

    return json.loads(cli("status", name, "--json", check=True).stdout)


# --- item 8: errors show while the attempts run ------------------------------------------


def test_the_last_attempt_error_shows_while_waiting_to_retry(origin, mnt):
    origin.set("/busy", b"at last")
    origin.fail("/busy", ("retry-after", 503, 4))
    add(mnt, "busy", origin.url("/busy"), "max_attempts=3")
    st = wait_for(lambda: (s := status(mnt / "busy/@status"))["state"] == "waiting" and s, 10,
                  what="the wait for a retry")
    message = st["last_error"]["message"]
    assert message.startswith("attempt 1/3: HTTP 503")
    assert "retrying after Retry-After: 4 s" in message
    assert st["last_error"]["at"]
    assert st["consecutive_failures"] == 0  # failed refreshes, not attempts
    assert st["attempt"] == 2
    assert 0 < in_future(st["next_check"]) <= 5
    assert read(mnt / "busy/latest") == b"at last"
    st = status(mnt / "busy/@status")
    assert st["last_error"] is None and st["attempt"] is None


def test_a_far_retry_after_says_so(origin, mnt):
    origin.set("/far", b"later")
    origin.fail("/far", ("retry-after", 429, 600))
    add(mnt, "far", origin.url("/far"), "max_attempts=2")
    st = wait_for(lambda: (s := status(mnt / "far/@status"))["state"] == "waiting" and s, 10,
                  what="the wait for a retry")
    assert "HTTP 429" in st["last_error"]["message"]
    assert "retrying after Retry-After: 600 s" in st["last_error"]["message"]
    assert 590 < in_future(st["next_check"]) <= 601
    write_control(mnt / "far/@control", "refresh")  # cut it short
    wait_for(lambda: status(mnt / "far/@status")["latest"], 10, what="the retry")
