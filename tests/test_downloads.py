"""The stubborn downloader through the mount: retries, resume, integrity, refresh
policies, requests with bodies and headers, and secrets kept out of every output."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import threading
import time
from email.utils import formatdate

import pytest

from tests.conftest import unmount, wait_for
from tests.test_mount import read, status, write_control


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def add(mnt, name, url, options=""):
    write_control(mnt / "@control", f"add {name} {url} {options}")


def test_5xx_three_times_then_success(origin, mnt):
    origin.set("/r", b"eventually")
    origin.fail("/r", 500, 502, 503)
    add(mnt, "r", origin.url("/r"), "max_attempts=5")
    assert read(mnt / "r/latest") == b"eventually"
    assert len(origin.seen("/r")) == 4
    st = status(mnt / "r/@status")
    assert st["consecutive_failures"] == 0 and st["last_error"] is None
    assert mnt.log_text().count("attempt") >= 3  # each failed attempt logged


def test_reset_mid_body_resumes_with_range_and_if_range(origin, mnt):
    body = os.urandom(3 << 20)
    res = origin.set("/big", body, etag=True)
    origin.fail("/big", "reset")
    add(mnt, "big", origin.url("/big"))
    assert read(mnt / "big/latest") == body
    first, second = origin.seen("/big")[:2]
    assert "Range" not in first.headers
    assert second.headers["Range"].startswith("bytes=")
    offset = int(second.headers["Range"][len("bytes="):-1])
    assert 0 < offset <= len(body) // 2
    assert second.headers["If-Range"] == res.etag
    assert status(mnt / "big/@status")["versions"][0]["sha256"] == sha(body)


def test_origin_ignoring_range_restarts_cleanly(origin, mnt):
    body = os.urandom(1 << 20)
    res = origin.set("/nr", body, last_modified=True)
    res.ranges = False  # answers 200 with the whole body to a Range request
    origin.fail("/nr", "reset")
    add(mnt, "nr", origin.url("/nr"))
    assert read(mnt / "nr/latest") == body
    assert status(mnt / "nr/@status")["versions"][0]["sha256"] == sha(body)
    assert status(mnt / "nr/@status")["versions"][0]["size"] == len(body)


def test_resume_guard_rejects_a_changed_body(origin, mnt):
    """If-Range with an old ETag: the origin sends the new body whole; never a mix."""
    old = os.urandom(1 << 20)
    origin.set("/ch", old, etag=True)
    origin.fail("/ch", "short")
    add(mnt, "ch", origin.url("/ch"), "max_attempts=1")
    with pytest.raises(OSError):
        read(mnt / "ch/latest")
    new = os.urandom(1 << 20)
    origin.set("/ch", new, etag=True)
    write_control(mnt / "ch/@control", "refresh")
    wait_for(lambda: status(mnt / "ch/@status")["latest"], 10, what="a version")
    assert origin.seen("/ch")[1].headers.get("Range")  # it did try to resume
    assert read(mnt / "ch/latest") == new


def test_stall_longer_than_attempt_timeout(origin, mnt):
    body = os.urandom(1 << 20)
    origin.set("/st", body, etag=True)
    origin.fail("/st", ("stall", 4))
    add(mnt, "st", origin.url("/st"), "attempt_timeout=1s max_attempts=1")
    with pytest.raises(OSError) as e:
        read(mnt / "st/latest")
    assert e.value.errno == errno.EIO
    st = status(mnt / "st/@status")
    assert "stalled" in st["last_error"]["message"] and st["consecutive_failures"] == 1
    write_control(mnt / "st/@control", "refresh")  # the next refresh resumes
    wait_for(lambda: status(mnt / "st/@status")["latest"], 10, what="a version")
    assert read(mnt / "st/latest") == body
    assert origin.seen("/st")[-1].headers.get("Range")


def test_short_body_never_becomes_a_version(origin, mnt):
    body = os.urandom(200_000)
    origin.set("/sh", body)  # no validators: cannot resume, so each attempt starts over
    origin.fail("/sh", "short", "short")
    add(mnt, "sh", origin.url("/sh"), "max_attempts=2")
    with pytest.raises(OSError) as e:
        read(mnt / "sh/latest")
    assert e.value.errno == errno.EIO
    st = status(mnt / "sh/@status")
    assert st["versions"] == [] and st["latest"] is None
    assert st["last_error"]["message"]
    assert not any(origin.seen("/sh")[1].headers.get(k) for k in ("Range", "If-Range"))
    assert os.listdir(mnt.cache / "partial") == [] or \
        all(not p.endswith(".part") for p in os.listdir(mnt.cache / "partial"))


def test_429_retry_after_seconds_is_honoured(origin, mnt):
    origin.set("/rl", b"rate limited")
    origin.fail("/rl", ("retry-after", 429, 2))
    add(mnt, "rl", origin.url("/rl"), "max_attempts=3")
    assert read(mnt / "rl/latest") == b"rate limited"
    first, second = origin.seen("/rl")[:2]
    assert second.at - first.at >= 1.9


def test_503_retry_after_http_date_is_honoured(origin, mnt):
    origin.set("/rd", b"later")
    origin.fail("/rd", ("retry-after", 503, formatdate(time.time() + 3, usegmt=True)))
    add(mnt, "rd", origin.url("/rd"), "max_attempts=3")
    assert read(mnt / "rd/latest") == b"later"
    first, second = origin.seen("/rd")[:2]
    assert second.at - first.at >= 1.5  # the date has a one-second resolution


def test_404_fails_at_once(origin, mnt):
    add(mnt, "nf", origin.url("/missing"), "max_attempts=5")
    with pytest.raises(OSError) as e:
        read(mnt / "nf/latest")
    assert e.value.errno == errno.EIO
    assert len(origin.seen("/missing")) == 1
    assert "404" in status(mnt / "nf/@status")["last_error"]["message"]


def test_on_open_serves_cached_version_after_open_wait(origin, mnt):
    origin.set("/oo", b"first", etag=True)
    add(mnt, "oo", origin.url("/oo"), "refresh=on-open open_wait=1s")
    assert read(mnt / "oo/latest") == b"first"
    assert status(mnt / "oo/@status")["next_check"] is None
    n = len(origin.seen("/oo"))
    origin.set("/oo", b"second " * 1000, etag=True)
    origin.fail("/oo", ("stall", 6))
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(read(mnt / "oo/latest")))
               for _ in range(3)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [b"first"] * 3  # served the cached version after open_wait
    assert time.monotonic() - started < 5  # not after the stalled check
    assert len(origin.seen("/oo")) == n + 1  # concurrent opens shared one check
    assert status(mnt / "oo/@status")["state"] == "fetching"


def test_on_open_stat_and_listing_do_not_check(origin, mnt):
    origin.set("/os", b"cached", etag=True)
    add(mnt, "os", origin.url("/os"), "refresh=on-open open_wait=3s")
    assert read(mnt / "os/latest") == b"cached"
    n = len(origin.seen("/os"))
    origin.fail("/os", ("stall", 5))
    for _ in range(3):
        assert os.stat(mnt / "os/latest").st_size == len(b"cached")
        assert "latest" in os.listdir(mnt / "os")
        os.getxattr(mnt / "os/latest", "user.buffy.version")
    assert len(origin.seen("/os")) == n  # only an open checks the origin


def test_on_open_picks_up_a_new_version(origin, mnt):
    origin.set("/o2", b"one", etag=True)
    add(mnt, "o2", origin.url("/o2"), "refresh=on-open")
    assert read(mnt / "o2/latest") == b"one"
    origin.set("/o2", b"two", etag=True)
    assert read(mnt / "o2/latest") == b"two"  # the open waited for its check
    read(mnt / "o2/latest")
    assert origin.seen("/o2")[-1].headers.get("If-None-Match") == origin.resources["/o2"].etag


def test_daemon_killed_mid_download_resumes_after_restart(origin, cli, mount_factory):
    """kill -9 with several segments in: the restart resumes at the last whole segment
    of the map, never trusting bytes after it (here: garbage, as a crash may leave)."""
    segment = 8 << 20
    body = os.urandom(3 * segment + 12345)
    res = origin.set("/k", body, etag=True)
    res.chunk_delay = 0.5  # about 2.5 MiB/s: ten seconds for the body
    cli("add", "k", origin.url("/k"), check=True)
    mnt = mount_factory()
    partial = mnt.cache / "partial" / "k.part"

    def arrived() -> int:
        progress = status(mnt / "k/@status")["progress"]
        return progress["bytes"] if progress else 0

    wait_for(lambda: arrived() >= 18 << 20, 30, what="two segments and more")
    mnt.proc.send_signal(signal.SIGKILL)
    mnt.proc.wait(timeout=10)
    unmount(mnt.path)
    assert partial.stat().st_size > 2 * segment
    with open(partial, "r+b") as f:  # what came after the second segment is not trusted
        f.seek(2 * segment)
        f.write(b"\xff" * (segment // 2))
    res.chunk_delay = 0
    again = mount_factory()
    assert read(again / "k/latest") == body
    resumed = origin.seen("/k")[-1]
    assert resumed.headers["Range"] == f"bytes={2 * segment}-"
    assert resumed.headers["If-Range"] == res.etag
    assert status(again / "k/@status")["versions"][0]["sha256"] == sha(body)


def test_post_source_with_body(origin, mnt):
    origin.set("/api", b'{"result": 42}', content_type="application/json")
    write_control(mnt / "@control",
                  f"add api {origin.url('/api')} method=POST body='{{\"q\": 1}}' "
                  "headers.Content-Type=application/json")
    assert read(mnt / "api/latest") == b'{"result": 42}'
    seen = origin.seen("/api")[0]
    assert seen.method == "POST"
    assert seen.body == b'{"q": 1}'
    assert seen.headers["Content-Type"] == "application/json"


def test_set_with_an_empty_value_removes_a_header_and_the_body(origin, mnt):
    origin.set("/unset", b"same")
    write_control(mnt / "@control", f"add un {origin.url('/unset')} refresh=never "
                                    "method=POST body=q headers.X-Token=t0ken headers.X-Keep=1")
    read(mnt / "un/latest")
    first = origin.seen("/unset")[-1]
    assert first.headers.get("X-Token") == "t0ken" and first.body == b"q"
    write_control(mnt / "un/@control", "set headers.X-Token= body=\nrefresh")
    wait_for(lambda: len(origin.seen("/unset")) == 2, 10, what="the second request")
    second = origin.seen("/unset")[-1]
    assert "X-Token" not in second.headers and second.headers.get("X-Keep") == "1"
    assert second.body == b""
    options = status(mnt / "un/@status")["options"]
    assert set(options["headers"]) == {"X-Keep"} and options["body"] is None


def test_stale_is_visible(origin, mnt):
    origin.set("/sv", b"good")
    add(mnt, "sv", origin.url("/sv"), "max_attempts=1")
    assert read(mnt / "sv/latest") == b"good"
    assert os.getxattr(mnt / "sv/latest", "user.buffy.stale") == b"0"
    assert status(mnt / "sv/@status")["stale"] is False
    origin.fail("/sv", 500)
    write_control(mnt / "sv/@control", "refresh")
    wait_for(lambda: status(mnt / "sv/@status")["consecutive_failures"] == 1, 10,
             what="the failure")
    assert read(mnt / "sv/latest") == b"good"  # still served
    assert os.getxattr(mnt / "sv/latest", "user.buffy.stale") == b"1"
    assert status(mnt / "sv/@status")["stale"] is True
    write_control(mnt / "sv/@control", "refresh")
    wait_for(lambda: status(mnt / "sv/@status")["consecutive_failures"] == 0, 10,
             what="recovery")
    assert os.getxattr(mnt / "sv/latest", "user.buffy.stale") == b"0"


def test_per_host_limit(origin, cli, mount_factory):
    for i in range(4):
        res = origin.set(f"/p{i}", os.urandom(100_000))
        res.chunk_delay = 0.05
        cli("add", f"p{i}", origin.url(f"/p{i}"), check=True)
    mnt = mount_factory()
    for i in range(4):
        assert len(read(mnt / f"p{i}/latest")) == 100_000
    assert origin.max_inflight == 2  # max_downloads_per_host


def test_secrets_never_shown(origin, cli, mount_factory):
    token = "Bearer very-secret-token-xyz"
    password = "hunter2-secret-pw"
    origin.set("/sec", b"secret data")
    origin.set("/pw", b"password data")
    cli("add", "sec", origin.url("/sec"), "--header", f"Authorization: {token}",
        "--max-attempts", "1", check=True)
    cli("add", "pw", origin.url("/pw").replace("http://", f"http://user:{password}@"),
        check=True)
    mnt = mount_factory()
    assert read(mnt / "sec/latest") == b"secret data"
    assert read(mnt / "pw/latest") == b"password data"
    assert origin.seen("/sec")[0].headers["Authorization"] == token
    assert origin.seen("/pw")[0].headers["Authorization"].startswith("Basic ")
    origin.fail("/sec", 500)
    write_control(mnt / "sec/@control", "refresh")
    wait_for(lambda: status(mnt / "sec/@status")["consecutive_failures"] == 1, 10,
             what="the failure")
    # a refused control write that carries the secret
    with pytest.raises(OSError):
        write_control(mnt / "sec/@control", f"set headers.Authorization='{token} refresh=x")
    outputs = [
        (mnt / "sec/@status").read_text(), (mnt / "@status").read_text(),
        json.dumps({n: os.getxattr(mnt / "sec/latest", n).decode()
                    for n in os.listxattr(mnt / "sec/latest")}),
        cli("status", "--json", check=True).stdout, cli("status", "sec", "--json").stdout,
        cli("status", "sec").stdout, cli("status").stdout, cli("list").stdout,
        cli("versions", "sec").stdout, cli("fetch", "sec").stderr,
        (mnt / "pw/@status").read_text(),
        json.dumps({n: os.getxattr(mnt / "pw/latest", n).decode()
                    for n in os.listxattr(mnt / "pw/latest")}),
    ]
    mnt.close()
    outputs.append(mnt.log_text())
    for text in outputs:
        assert "very-secret-token" not in text
        assert password not in text


def test_refresh_cuts_a_backoff_short(origin, mnt):
    origin.set("/bo", b"after the wait")
    origin.fail("/bo", ("retry-after", 503, 60))
    add(mnt, "bo", origin.url("/bo"), "max_attempts=2")
    wait_for(lambda: status(mnt / "bo/@status")["state"] == "waiting", 10, what="backoff")
    write_control(mnt / "bo/@control", "refresh")
    wait_for(lambda: status(mnt / "bo/@status")["latest"], 10, what="the retry")
    assert read(mnt / "bo/latest") == b"after the wait"
