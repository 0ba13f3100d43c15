"""The mount as users touch it: ordinary file calls on a real FUSE mount, against
the test origin on 127.0.0.1."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import threading

import pytest

from tests.conftest import run_cli, wait_for

SOURCE_DIR = ["@control", "@status", "@valid", "@versions", "latest"]


def status(path) -> dict:
    with open(path) as f:
        return json.load(f)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_control(path, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def control_error(path, text: str | bytes) -> int:
    with pytest.raises(OSError) as e:
        write_control(path, text)
    return e.value.errno


def test_layout_cat_and_inodes(origin, cli, mnt):
    origin.set("/data.txt", b"hello buffy\n")
    cli("add", "demo", origin.url("/data.txt"), check=True)
    assert read(mnt / "demo/latest") == b"hello buffy\n"  # waits for the first download
    assert {"@status", "@control", "demo"} <= set(os.listdir(mnt.path))
    assert sorted(os.listdir(mnt / "demo")) == sorted([*SOURCE_DIR, "newest"])  # has a version
    (vid,) = os.listdir(mnt / "demo/@versions")
    latest, version = os.stat(mnt / "demo/latest"), os.stat(mnt / f"demo/@versions/{vid}")
    assert latest.st_ino == version.st_ino
    assert latest.st_size == 12
    assert read(mnt / f"demo/@versions/{vid}") == b"hello buffy\n"
    st = status(mnt / "demo/@status")
    assert st["latest"] == vid and st["state"] == "idle"
    assert st["versions"][0]["sha256"] == hashlib.sha256(b"hello buffy\n").hexdigest()
    assert vid.endswith("-" + st["versions"][0]["sha256"][:8])


def test_first_open_waits_for_slow_download(origin, mnt):
    res = origin.set("/slow", b"x" * 200_000)
    res.chunk_delay = 0.05  # about one second for the whole body
    write_control(mnt / "@control", f"add slow {origin.url('/slow')}\n")
    assert read(mnt / "slow/latest") == b"x" * 200_000


def test_first_open_fails_with_eio_and_status_names_error(origin, mnt):
    write_control(mnt / "@control", f"add missing {origin.url('/nothing-here')}\n")
    with pytest.raises(OSError) as e:
        read(mnt / "missing/latest")
    assert e.value.errno == errno.EIO
    st = status(mnt / "missing/@status")
    assert st["latest"] is None
    assert "404" in st["last_error"]["message"]
    assert st["consecutive_failures"] == 1


def test_listing_never_waits_on_the_network(origin, mnt):
    origin.set("/stall", b"y" * 100_000)
    origin.fail("/stall", ("stall", 8))
    write_control(mnt / "@control",
                  f"add stall {origin.url('/stall')} attempt_timeout=20s max_attempts=1\n")
    wait_for(lambda: status(mnt / "stall/@status")["state"] == "fetching", 5, what="fetching")
    assert sorted(os.listdir(mnt / "stall")) == SOURCE_DIR
    assert os.listdir(mnt / "stall/@versions") == []
    assert "stall" in os.listdir(mnt.path)
    # the download is still under way: listing did not wait for it
    assert status(mnt / "stall/@status")["state"] == "fetching"


def test_new_version_and_open_handle_stays_bound(origin, mnt):
    origin.set("/f", b"version one")
    write_control(mnt / "@control", f"add f {origin.url('/f')}")
    with open(mnt / "f/latest", "rb") as old:
        assert old.read(7) == b"version"
        # the open may return while the first version still downloads (it streams)
        first = wait_for(lambda: status(mnt / "f/@status")["latest"], 10, what="version one")
        origin.set("/f", b"version two, longer")
        write_control(mnt / "f/@control", "refresh\n")
        wait_for(lambda: status(mnt / "f/@status")["latest"] != first, 10, what="new version")
        assert read(mnt / "f/latest") == b"version two, longer"
        assert old.read() == b" one"  # the open handle still reads the version it opened
    st = status(mnt / "f/@status")
    assert [v["id"] for v in st["versions"]][1] == first
    assert sorted(os.listdir(mnt / "f/@versions")) == sorted(v["id"] for v in st["versions"])


def test_same_content_makes_no_new_version(origin, mnt):
    origin.set("/same", b"unchanging")
    write_control(mnt / "@control", f"add same {origin.url('/same')}")
    read(mnt / "same/latest")
    before = status(mnt / "same/@status")
    n_requests = len(origin.seen("/same"))
    write_control(mnt / "same/@control", "refresh")
    wait_for(lambda: len(origin.seen("/same")) > n_requests
             and status(mnt / "same/@status")["state"] == "idle", 10, what="the check")
    after = status(mnt / "same/@status")
    assert len(after["versions"]) == 1
    assert after["latest"] == before["latest"]


def test_conditional_request_and_304(origin, mnt):
    origin.set("/cond", b"validated body", etag=True, last_modified=True)
    write_control(mnt / "@control", f"add cond {origin.url('/cond')}")
    read(mnt / "cond/latest")
    etag = origin.resources["/cond"].etag
    write_control(mnt / "cond/@control", "refresh")
    wait_for(lambda: len(origin.seen("/cond")) >= 2, 10, what="the second request")
    second = origin.seen("/cond")[1]
    assert second.headers.get("If-None-Match") == etag
    assert second.headers.get("If-Modified-Since") == origin.resources["/cond"].last_modified
    wait_for(lambda: status(mnt / "cond/@status")["state"] == "idle", 10, what="idle")
    assert len(status(mnt / "cond/@status")["versions"]) == 1


def test_extended_attributes(origin, mnt):
    origin.set("/x.json", b'{"a": 1}', etag=True, content_type="application/json")
    url = origin.url("/x.json").replace("http://", "http://alice:s3cret@")
    write_control(mnt / "@control", f"add xa {url}")
    path = mnt / "xa/latest"
    read(path)
    st = status(mnt / "xa/@status")
    attrs = {name: os.getxattr(path, name).decode() for name in os.listxattr(path)}
    assert attrs["user.buffy.source"] == "xa"
    assert attrs["user.buffy.version"] == st["latest"]
    assert attrs["user.buffy.sha256"] == st["versions"][0]["sha256"]
    assert attrs["user.buffy.url"] == origin.url("/x.json")  # credentials removed
    assert attrs["user.buffy.etag"] == origin.resources["/x.json"].etag
    assert attrs["user.buffy.content_type"] == "application/json"
    assert attrs["user.buffy.fetched_at"] == st["versions"][0]["fetched_at"]
    assert attrs["user.buffy.tags"] == ""
    assert "s3cret" not in json.dumps(st) and "s3cret" not in json.dumps(status(mnt / "@status"))
    assert origin.seen("/x.json")[0].headers.get("Authorization", "").startswith("Basic ")
    with pytest.raises(OSError) as missing:
        os.getxattr(path, "user.buffy.nothing")
    assert missing.value.errno == errno.ENODATA
    for name in ("system.posix_acl_access", "security.selinux", "trusted.x"):
        with pytest.raises(OSError) as unsupported:  # no ACLs, no labels: the whole mount
            os.getxattr(path, name)
        assert unsupported.value.errno == errno.EOPNOTSUPP, name


def test_ls_l_asks_for_acls_and_labels_once_per_mount(origin, mnt):
    """ls -l caches "not supported" per device: one ACL and one label request in all,
    instead of three requests per file (the cost of ls -l on 10,000 sources)."""
    for i in range(5):
        write_control(mnt / "@control", f"add ls{i} {origin.url('/ls')} refresh=never")
    trace = subprocess.run(["strace", "-f", "-e", "trace=getxattr,lgetxattr", "ls", "-l",
                            str(mnt.path)], capture_output=True, text=True, timeout=30)
    assert trace.returncode == 0, trace.stderr
    calls = [line for line in trace.stderr.splitlines() if "getxattr(" in line]
    assert len(calls) <= 3, calls


def test_everything_but_control_is_read_only(origin, mnt):
    origin.set("/ro", b"read only")
    write_control(mnt / "@control", f"add ro {origin.url('/ro')}")
    latest = mnt / "ro/latest"
    read(latest)
    denied = (errno.EROFS, errno.EACCES, errno.EPERM)
    attempts = [
        lambda: open(latest, "wb"),
        lambda: open(latest, "ab"),
        lambda: open(mnt / "newfile", "w"),
        lambda: open(mnt / "ro/@versions/new", "w"),
        lambda: os.unlink(latest),
        lambda: os.mkdir(mnt / "dir"),
        lambda: os.rmdir(mnt / "ro"),
        lambda: os.rename(latest, mnt / "ro/other"),
        lambda: os.setxattr(latest, "user.x", b"1"),
        lambda: os.truncate(latest, 0),
        lambda: os.symlink("/etc/passwd", mnt / "ro/link"),
        lambda: open(mnt / "ro/@status", "w"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno in denied
    assert read(latest) == b"read only"


def test_unknown_names_are_enoent(origin, mnt):
    origin.set("/k", b"k")
    write_control(mnt / "@control", f"add k {origin.url('/k')}")
    read(mnt / "k/latest")
    for path in ("nope", "k/nope", "k/@versions/20990101T000000Z-00000000", "@nope",
                 "k/@versions/..x", "..x"):
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / path)


@pytest.mark.parametrize("line", [
    "add ../x http://127.0.0.1/",
    "add a/b http://127.0.0.1/",
    "add @x http://127.0.0.1/",
    "add .x http://127.0.0.1/",
    "add " + "n" * 200 + " http://127.0.0.1/",
    "add good file:///etc/passwd",
    "add good ftp://example.org/x",
    "add good http://127.0.0.1/ refresh=sometimes",
    "add good http://127.0.0.1/ colour=blue",
    "garbage",
    "add",
    "remove nosuchsource",
    "add 'unbalanced http://127.0.0.1/",
])
def test_bad_root_control_lines_change_nothing(mnt, line):
    before = os.listdir(mnt.path)
    assert control_error(mnt / "@control", line + "\n") == errno.EINVAL
    assert os.listdir(mnt.path) == before
    assert status(mnt / "@status")["last_control_error"]


def test_bad_write_applies_no_line(origin, mnt):
    origin.set("/ok", b"ok")
    text = f"add first {origin.url('/ok')}\nadd second {origin.url('/ok')}\nfrobnicate\n"
    assert control_error(mnt / "@control", text) == errno.EINVAL
    assert "line 3" in status(mnt / "@status")["last_control_error"]
    assert not {"first", "second"} & set(os.listdir(mnt.path))
    assert control_error(mnt / "@control", b"add \xff\xfe http://x/\n") == errno.EINVAL
    assert control_error(mnt / "@control", b"add a\0b http://x/\n") == errno.EINVAL
    # a good write then clears the error and applies every line
    write_control(mnt / "@control", text.replace("frobnicate\n", ""))
    assert {"first", "second"} <= set(os.listdir(mnt.path))
    assert status(mnt / "@status")["last_control_error"] is None


def test_source_control(origin, mnt):
    origin.set("/s", b"s")
    write_control(mnt / "@control", f"add s {origin.url('/s')}")
    read(mnt / "s/latest")
    assert control_error(mnt / "s/@control", "tagg latest valid") == errno.EINVAL
    assert "unknown command" in status(mnt / "s/@status")["last_control_error"]
    assert control_error(mnt / "s/@control", "refresh now") == errno.EINVAL
    write_control(mnt / "s/@control", "set refresh=6h max_attempts=2")
    assert status(mnt / "s/@status")["refresh"] == "6h"
    assert status(mnt / "s/@status")["last_control_error"] is None
    assert read(mnt / "s/@control").startswith(b"# buffyfs control file")  # a help text


def test_add_and_remove_through_control(origin, mnt):
    origin.set("/r", b"r")
    write_control(mnt / "@control", f"add gone {origin.url('/r')}")
    assert "gone" in os.listdir(mnt.path)  # in effect when the write returns
    assert read(mnt / "gone/latest") == b"r"
    write_control(mnt / "@control", "remove gone")
    assert "gone" not in os.listdir(mnt.path)
    assert not os.path.exists(mnt / "gone")
    assert "gone" not in [s["name"] for s in status(mnt / "@status")["sources"]]


def test_command_line_changes_show_in_the_mount(origin, cli, mnt):
    origin.set("/c", b"from the cli")
    cli("add", "viacli", origin.url("/c"), check=True)
    wait_for(lambda: "viacli" in os.listdir(mnt.path), 2.0, what="the new source")
    assert read(mnt / "viacli/latest") == b"from the cli"
    first = status(mnt / "viacli/@status")["latest"]
    origin.set("/c", b"changed from the cli")
    cli("refresh", "viacli", check=True)
    wait_for(lambda: status(mnt / "viacli/@status")["latest"] != first, 10, what="refresh")
    assert read(mnt / "viacli/latest") == b"changed from the cli"
    cli("remove", "viacli", check=True)
    wait_for(lambda: "viacli" not in os.listdir(mnt.path), 2.0, what="removal")


def test_cli_fetch_while_mounted_moves_latest(origin, cli, mnt):
    origin.set("/cf", b"one")
    cli("add", "cf", origin.url("/cf"), check=True)
    wait_for(lambda: "cf" in os.listdir(mnt.path), 2.0, what="source")
    assert read(mnt / "cf/latest") == b"one"
    origin.set("/cf", b"two!")
    out = cli("fetch", "cf", check=True)
    assert "new version" in out.stdout
    wait_for(lambda: read(mnt / "cf/latest") == b"two!", 2.0, what="latest to move")


def test_status_files(origin, mnt):
    origin.set("/st", b"st")
    write_control(mnt / "@control", f"add st {origin.url('/st')} refresh=30m")
    read(mnt / "st/latest")
    root = status(mnt / "@status")
    assert set(root) >= {"version", "cache", "cache_size", "max_cache_size",
                         "last_control_error", "sources"}
    assert root["cache"] == str(mnt.cache)
    assert root["cache_size"] == 2
    (entry,) = root["sources"]
    assert set(entry) == {"name", "url", "latest", "state", "consecutive_failures",
                          "stale", "latest_fetched_at", "progress"}  # the last three ours
    src = status(mnt / "st/@status")
    assert set(src) == {"name", "url", "refresh", "pinned", "state", "latest", "progress",
                        "last_check", "last_success", "next_check", "consecutive_failures",
                        "last_error", "last_control_error", "versions", "stale", "options",
                        "attempt", "queued"}
    assert src["refresh"] == "30m" and src["next_check"] > src["last_check"]
    assert set(src["versions"][0]) == {"id", "size", "sha256", "fetched_at", "tags",
                                       "held_until", "kept"}  # kept: ours
    assert src["options"]["refresh"] == "30m" and src["options"]["max_attempts"] == 5


def test_concurrent_readers(origin, mnt):
    body = os.urandom(3 << 20)
    origin.set("/big", body)
    write_control(mnt / "@control", f"add big {origin.url('/big')}")
    results: list[bytes] = []

    def reader() -> None:
        results.append(read(mnt / "big/latest"))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 4 and all(r == body for r in results)


def test_restart_serves_cache_offline(origin, cli, mount_factory, cache_dir):
    origin.set("/off", b"cached bytes")
    cli("add", "off", origin.url("/off"), "--refresh", "2s", check=True)
    cli("fetch", "off", check=True)
    origin.stop()  # the origin is gone for good
    mnt = mount_factory()
    assert read(mnt / "off/latest") == b"cached bytes"
    wait_for(lambda: status(mnt / "off/@status")["consecutive_failures"] >= 1, 30,
             what="a failed check")
    assert read(mnt / "off/latest") == b"cached bytes"


def test_one_mount_per_cache(origin, mnt, tmp_path, cache_dir):
    other = tmp_path / "other"
    other.mkdir()
    done = run_cli("mount", str(other), "--foreground", cache=cache_dir, timeout=30)
    assert done.returncode == 1
    assert "in use by another mount" in done.stderr
    assert "Traceback" not in done.stderr
    assert not os.path.ismount(other)


def test_duration_policy_rechecks_by_itself(origin, mnt):
    origin.set("/tick", b"tick")
    write_control(mnt / "@control", f"add tick {origin.url('/tick')} refresh=1s")
    assert read(mnt / "tick/latest") == b"tick"
    origin.set("/tick", b"tock")
    wait_for(lambda: read(mnt / "tick/latest") == b"tock", 10, what="the scheduled check")
    assert len(status(mnt / "tick/@status")["versions"]) == 2


def test_never_policy_downloads_once(origin, cli, mount_factory):
    origin.set("/once", b"once")
    cli("add", "once", origin.url("/once"), "--refresh", "never", check=True)
    mnt = mount_factory()
    assert read(mnt / "once/latest") == b"once"
    st = status(mnt / "once/@status")
    assert st["next_check"] is None
    mnt.close()
    mnt = mount_factory()  # a restart does not download again
    assert read(mnt / "once/latest") == b"once"
    assert len(origin.seen("/once")) == 1
    write_control(mnt / "once/@control", "refresh")  # but an explicit refresh does
    wait_for(lambda: len(origin.seen("/once")) == 2, 10, what="the refresh")
