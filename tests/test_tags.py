"""Tags, the auto-fallback of ``latest``, tag directories, pinning and validation,
through the mount and the command line."""

from __future__ import annotations

import errno
import json
import os

import pytest

from tests.conftest import wait_for
from tests.test_mount import control_error, read, status, write_control


def two_versions(origin, mnt, name="t", first=b"good old bytes", second=b"new broken bytes",
                 options=""):
    """A source with two versions; returns (older id, newer id)."""
    origin.set(f"/{name}", first)
    write_control(mnt / "@control", f"add {name} {origin.url('/' + name)} {options}")
    assert read(mnt / f"{name}/latest") == first
    older = status(mnt / f"{name}/@status")["latest"]
    origin.set(f"/{name}", second)
    write_control(mnt / f"{name}/@control", "refresh")
    wait_for(lambda: len(status(mnt / f"{name}/@status")["versions"]) == 2, 10,
             what="the second version")
    newer = status(mnt / f"{name}/@status")["versions"][0]["id"]
    return older, newer


def test_failed_tag_falls_back_at_once(origin, mnt):
    older, newer = two_versions(origin, mnt)
    assert read(mnt / "t/latest") == b"new broken bytes"
    with open(mnt / "t/latest", "rb") as held:  # open on the version about to fail
        write_control(mnt / "t/@control", "tag latest failed")
        assert read(mnt / "t/latest") == b"good old bytes"  # a fresh cat, no waiting
        assert held.read() == b"new broken bytes"  # the open handle keeps its version
    st = status(mnt / "t/@status")
    assert st["latest"] == older
    assert st["versions"][0]["tags"] == ["failed"]
    assert os.stat(mnt / "t/latest").st_ino == os.stat(mnt / f"t/@versions/{older}").st_ino
    assert os.getxattr(mnt / f"t/@versions/{newer}", "user.buffy.tags") == b"failed"
    # valid and failed exclude each other; untagging brings latest back
    write_control(mnt / "t/@control", f"tag {newer} valid")
    assert status(mnt / "t/@status")["versions"][0]["tags"] == ["valid"]
    assert read(mnt / "t/latest") == b"new broken bytes"


def test_every_version_failed_gives_eio(origin, mnt):
    older, newer = two_versions(origin, mnt)
    write_control(mnt / "t/@control", f"tag {newer} failed\ntag {older} failed\n")
    with pytest.raises(OSError) as e:
        read(mnt / "t/latest")
    assert e.value.errno == errno.EIO
    st = status(mnt / "t/@status")
    assert st["latest"] is None
    assert "failed" in st["last_error"]["message"]
    # the versions themselves stay readable by id
    assert read(mnt / f"t/@versions/{newer}") == b"new broken bytes"


def test_tag_directories(origin, mnt):
    older, newer = two_versions(origin, mnt)
    assert os.listdir(mnt / "t/@valid") == []  # always present, empty here
    write_control(mnt / "t/@control", f"tag {older} valid\ntag {older} gold\ntag {newer} gold")
    assert "@gold" in os.listdir(mnt / "t") and "@valid" in os.listdir(mnt / "t")
    assert sorted(os.listdir(mnt / "t/@gold")) == sorted(["latest", older, newer])
    assert os.stat(mnt / "t/@gold/latest").st_ino == os.stat(mnt / f"t/@versions/{newer}").st_ino
    assert os.stat(mnt / "t/@valid/latest").st_ino == os.stat(mnt / f"t/@versions/{older}").st_ino
    assert read(mnt / f"t/@gold/{older}") == b"good old bytes"
    write_control(mnt / "t/@control", f"untag {newer} gold")
    assert sorted(os.listdir(mnt / "t/@gold")) == sorted(["latest", older])
    assert read(mnt / "t/@gold/latest") == b"good old bytes"
    write_control(mnt / "t/@control", f"untag {older} gold")
    assert "@gold" not in os.listdir(mnt / "t")
    assert not os.path.exists(mnt / "t/@gold")
    assert os.getxattr(mnt / f"t/@versions/{older}", "user.buffy.tags") == b"valid"


@pytest.mark.parametrize("line", [
    "tag latest latest",          # reserved
    "tag latest versions",        # reserved
    "tag latest Bad",             # grammar
    "tag latest " + "x" * 33,     # too long
    "tag 20990101T000000Z-00000000 keep",  # unknown id
    "tag nonsense keep",
    "tag latest",
    "untag latest",
    "pin 20990101T000000Z-00000000",
    "pin latest extra",
    "unpin now",
])
def test_bad_tag_lines_change_nothing(origin, mnt, line):
    origin.set("/b", b"b")
    write_control(mnt / "@control", f"add b {origin.url('/b')}")
    read(mnt / "b/latest")
    before = status(mnt / "b/@status")
    assert control_error(mnt / "b/@control", f"tag latest keep\n{line}\n") == errno.EINVAL
    after = status(mnt / "b/@status")
    assert after["versions"] == before["versions"]  # the good first line was not applied
    assert after["pinned"] is None
    assert after["last_control_error"]


def test_pin_holds_latest_and_stops_checks(origin, mnt):
    older, newer = two_versions(origin, mnt)
    write_control(mnt / "t/@control", f"pin {older}")
    st = status(mnt / "t/@status")
    assert st["pinned"] == older and st["latest"] == older and st["next_check"] is None
    assert read(mnt / "t/latest") == b"good old bytes"
    seen = len(origin.seen("/t"))
    assert control_error(mnt / "t/@control", "refresh") == errno.EINVAL
    assert "pinned" in status(mnt / "t/@status")["last_control_error"]
    write_control(mnt / "t/@control", "set refresh=1s")
    origin.set("/t", b"third")
    import time

    time.sleep(2.5)  # a 1s policy would have checked twice by now
    assert len(origin.seen("/t")) == seen  # the origin was not contacted
    write_control(mnt / "t/@control", "unpin")
    assert status(mnt / "t/@status")["pinned"] is None
    wait_for(lambda: read(mnt / "t/latest") == b"third", 10, what="the policy to resume")


def test_pinned_source_without_versions_downloads_once(origin, cli, mnt):
    origin.set("/p", b"first")
    cli("add", "p", origin.url("/p"), "--pinned", "--refresh", "1s", check=True)
    wait_for(lambda: "p" in os.listdir(mnt.path), 2, what="the source")
    assert read(mnt / "p/latest") == b"first"
    st = status(mnt / "p/@status")
    assert st["pinned"] == st["latest"] is not None
    origin.set("/p", b"second")
    import time

    time.sleep(2.5)
    assert len(origin.seen("/p")) == 1
    assert read(mnt / "p/latest") == b"first"


@pytest.mark.parametrize("rules,passes", [
    ("validate.min_size=5", True),
    ("validate.min_size=1000", False),
    ("validate.content_type=text/plain", True),
    ("validate.content_type=application/json", False),
    ("validate.cmd=true", True),
    ("validate.cmd=false", False),
    ("validate.cmd='grep -q payload'", True),
    ("validate.cmd=/nonexistent/checker", False),
    ("validate.cmd='sleep 30' validate.timeout=1s", False),
])
def test_validation_tags_new_versions(origin, mnt, rules, passes):
    origin.set("/v", b"payload bytes", content_type="text/plain; charset=utf-8")
    write_control(mnt / "@control", f"add v {origin.url('/v')} {rules}")
    if passes:
        assert read(mnt / "v/latest") == b"payload bytes"
        st = status(mnt / "v/@status")
        assert st["versions"][0]["tags"] == ["valid"]
        assert os.listdir(mnt / "v/@valid") == ["latest", st["latest"]]
    else:
        with pytest.raises(OSError) as e:  # never the failed bytes
            read(mnt / "v/latest")
        assert e.value.errno == errno.EIO
        st = status(mnt / "v/@status")
        assert st["versions"][0]["tags"] == ["failed"]
        assert st["versions"][0]["validation"]
        assert "validation" in st["last_error"]["message"]


def test_failed_validation_keeps_serving_the_good_version(origin, mnt):
    origin.set("/g", b"good and long enough")
    write_control(mnt / "@control", f"add g {origin.url('/g')} validate.min_size=10")
    assert read(mnt / "g/latest") == b"good and long enough"
    origin.set("/g", b"short")
    write_control(mnt / "g/@control", "refresh")
    wait_for(lambda: len(status(mnt / "g/@status")["versions"]) == 2, 10, what="2nd version")
    st = status(mnt / "g/@status")
    assert st["versions"][0]["tags"] == ["failed"] and "min_size" in st["versions"][0]["validation"]
    assert read(mnt / "g/latest") == b"good and long enough"


def test_command_line_tags_and_pins(origin, cli, mnt):
    older, newer = two_versions(origin, mnt)
    out = cli("tag", "t", "latest", "failed", check=True)
    assert newer in out.stdout
    wait_for(lambda: read(mnt / "t/latest") == b"good old bytes", 2, what="the fallback")
    table = cli("versions", "t", check=True).stdout
    newer_line = next(line for line in table.splitlines() if newer in line)
    older_line = next(line for line in table.splitlines() if older in line)
    assert "failed" in newer_line and "latest" not in newer_line and "latest" in older_line
    cli("untag", "t", newer, "failed", check=True)
    wait_for(lambda: read(mnt / "t/latest") == b"new broken bytes", 2, what="untag")
    cli("pin", "t", older, check=True)
    wait_for(lambda: read(mnt / "t/latest") == b"good old bytes", 2, what="the pin")
    st = json.loads(cli("status", "t", "--json", check=True).stdout)
    assert st["pinned"] == older
    done = cli("refresh", "t")
    assert done.returncode == 2 and "pinned" in done.stderr
    cli("unpin", "t", check=True)
    wait_for(lambda: read(mnt / "t/latest") == b"new broken bytes", 2, what="unpin")
    bad = cli("tag", "t", "latest", "status")
    assert bad.returncode == 2 and "invalid tag" in bad.stderr
    unknown = cli("tag", "t", "20990101T000000Z-00000000", "keep")
    assert unknown.returncode == 1 and "no version" in unknown.stderr


def test_pin_then_refresh_in_one_write_is_refused(origin, mnt):
    origin.set("/pr", b"pr")
    write_control(mnt / "@control", f"add pr {origin.url('/pr')}")
    read(mnt / "pr/latest")
    seen = len(origin.seen("/pr"))
    assert control_error(mnt / "pr/@control", "pin\nrefresh\n") == errno.EINVAL
    assert status(mnt / "pr/@status")["pinned"] is None  # nothing applied
    write_control(mnt / "pr/@control", "pin\nunpin\nrefresh\n")  # the order counts
    wait_for(lambda: len(origin.seen("/pr")) > seen, 10, what="the refresh")


def test_validation_command_that_cannot_run(origin, mnt, tmp_path):
    script = tmp_path / "noshebang"
    script.write_text("exit 0\n")
    script.chmod(0o755)
    origin.set("/ns", b"body")
    write_control(mnt / "@control", f"add ns {origin.url('/ns')} validate.cmd={script}")
    with pytest.raises(OSError):
        read(mnt / "ns/latest")
    st = status(mnt / "ns/@status")
    assert st["versions"][0]["tags"] == ["failed"]
    assert "cannot run" in st["versions"][0]["validation"]
    assert len(origin.seen("/ns")) == 1  # one download, no loop


def test_pinned_version_is_never_collected(origin, mnt):
    from tests.test_gc import make_versions

    a, b = make_versions(origin, mnt, "pc", [b"pinned one", b"newer"])
    write_control(mnt / "pc/@control", f"pin {a}\ntag {a} failed")
    write_control(mnt / "pc/@control", "set keep_versions=0")
    from tests.conftest import run_cli

    assert run_cli("gc", cache=mnt.cache).returncode == 0
    ids = [v["id"] for v in status(mnt / "pc/@status")["versions"]]
    assert a in ids and status(mnt / "pc/@status")["pinned"] == a
