"""A control write is all or nothing, through the mount: every line is checked and
applied in one index transaction, against the state the earlier lines left."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time

from tests.conftest import wait_for
from tests.test_mount import control_error, read, status, write_control
from tests.test_tags import two_versions

UNKNOWN = "20990101T000000Z-00000000"


def tags(mnt, name="t"):
    """{version id: tags} of a source, from its @status."""
    return {v["id"]: v["tags"] for v in status(mnt / f"{name}/@status")["versions"]}


def test_failing_latest_on_a_later_line_applies_nothing(origin, mnt):
    older, newer = two_versions(origin, mnt)
    # the third `latest` finds no usable version: the two earlier lines are not applied
    assert control_error(mnt / "t/@control", "tag latest failed\n" * 3) == errno.EINVAL
    assert tags(mnt) == {older: [], newer: []}
    assert read(mnt / "t/latest") == b"new broken bytes"
    error = status(mnt / "t/@status")["last_control_error"]
    assert error.startswith("line 3: ") and "no usable version" in error
    write_control(mnt / "t/@control", "tag latest failed\n" * 2)  # two lines are fine
    assert tags(mnt) == {older: ["failed"], newer: ["failed"]}
    assert status(mnt / "t/@status")["last_control_error"] is None


def test_latest_on_a_line_is_latest_as_the_earlier_lines_left_it(origin, mnt):
    older, newer = two_versions(origin, mnt)
    write_control(mnt / "t/@control", "tag latest keep\ntag latest failed\ntag latest mytag\n")
    assert tags(mnt) == {newer: ["keep", "failed"], older: ["mytag"]}
    assert status(mnt / "t/@status")["latest"] == older
    assert read(mnt / "t/latest") == b"good old bytes"
    assert sorted(os.listdir(mnt / "t/@mytag")) == sorted(["latest", older])
    # a pin on a line holds latest for the lines after it
    write_control(mnt / "t/@control", f"untag {newer} failed\npin {older}\ntag latest gold\n")
    st = status(mnt / "t/@status")
    assert st["pinned"] == older and tags(mnt)[older] == ["mytag", "gold"]


def test_a_failing_last_line_applies_none_of_the_earlier_lines(origin, mnt):
    older, newer = two_versions(origin, mnt)
    before = status(mnt / "t/@status")
    # the last line fails only because of what the earlier lines did
    lines = "tag latest keep\nset max_attempts=2\ntag latest failed\ntag latest failed\npin\n"
    assert control_error(mnt / "t/@control", lines) == errno.EINVAL
    after = status(mnt / "t/@status")
    assert after["versions"] == before["versions"] and after["pinned"] is None
    assert after["options"]["max_attempts"] == before["options"]["max_attempts"]
    assert after["last_control_error"] == "line 5: source 't' has no usable version"
    earlier = f"tag latest keep\ntag {older} gold\npin {older}\nset max_attempts=2 refresh=6h\n"
    for last in (f"tag {UNKNOWN} keep",      # unknown version
                 "tag latest Bad",           # not a tag name (the parser)
                 "refresh",                  # refused: pinned by an earlier line
                 f"untag {UNKNOWN} gold"):
        assert control_error(mnt / "t/@control", earlier + last) == errno.EINVAL, last
        after = status(mnt / "t/@status")
        assert after["versions"] == before["versions"], last
        assert after["pinned"] is None and after["refresh"] == before["refresh"], last
        assert after["options"]["max_attempts"] == before["options"]["max_attempts"], last
        assert after["last_control_error"].startswith("line 5: "), after["last_control_error"]
    assert "@gold" not in os.listdir(mnt / "t")


def test_a_failing_root_line_adds_and_removes_nothing(origin, mnt):
    origin.set("/a", b"a")
    write_control(mnt / "@control", f"add keepme {origin.url('/a')} refresh=never")
    lines = (f"add a {origin.url('/a')}\nremove keepme\nadd b {origin.url('/a')}\n"
             "remove ghost\n")
    assert control_error(mnt / "@control", lines) == errno.EINVAL
    assert sorted(n for n in os.listdir(mnt.path) if not n.startswith("@")) == ["keepme"]
    st = status(mnt / "@status")
    assert [s["name"] for s in st["sources"]] == ["keepme"]
    assert st["last_control_error"] == "line 4: no source named 'ghost'"
    # a name added and removed in one write: each line sees the one before
    assert control_error(mnt / "@control",
                         f"add c {origin.url('/a')}\nadd c {origin.url('/a')}\n") == errno.EINVAL
    assert "line 2" in status(mnt / "@status")["last_control_error"]
    write_control(mnt / "@control", f"add c {origin.url('/a')}\nremove c\nremove keepme\n")
    assert [n for n in os.listdir(mnt.path) if not n.startswith("@")] == []
    assert status(mnt / "@status")["last_control_error"] is None


HOLD_WRITE = r"""
import sys
from buffyfs.store.index import Index
index = Index(__import__("pathlib").Path(sys.argv[1]))
with index.write() as w:
    newest = w.versions("t")[0]
    w.put_version("t", __import__("dataclasses").replace(newest, tags=["failed"]))
    w.changed("t")
    print("holding", flush=True)
    sys.stdin.readline()
print("committed", flush=True)
"""


def test_no_other_writer_slips_in_between_check_and_apply(origin, mnt):
    """Another process (a CLI) holds the index's write lock and fails the newest
    version meanwhile: the write's `latest` is resolved after that commit, in the
    write's own transaction, not before it; and the mount keeps answering while the
    write waits for the lock."""
    older, newer = two_versions(origin, mnt)
    time.sleep(1.0)  # the mount's change watcher has taken the changes so far (it writes)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE, str(mnt.cache / "index")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        write = _in_thread(lambda: write_control(mnt / "t/@control", "tag latest keep"))
        time.sleep(0.5)  # the write now waits for the lock
        assert not write.done.is_set(), "the write did not wait for the other writer"
        # the loop is free meanwhile: the wait is in a worker thread
        answered = _in_thread(lambda: (os.stat(mnt / "t/latest"),
                                       read(mnt / f"t/@versions/{older}")))
        assert answered.done.wait(1.0), "the mount stalled while a write waited for the lock"
        assert answered.result[1] == b"good old bytes"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "committed"
        assert write.done.wait(10) and write.error is None, write.error
    finally:
        holder.kill()  # the lock goes with it: a stalled mount resumes
        holder.wait(10)
    assert tags(mnt) == {newer: ["failed"], older: ["keep"]}
    wait_for(lambda: read(mnt / "t/latest") == b"good old bytes", 2, what="the fallback")


class _in_thread:
    """Run ``fn`` in a daemon thread (a FUSE call that may block); ``done`` is set when
    it returns, with ``result`` or ``error``."""

    def __init__(self, fn) -> None:
        self.done = threading.Event()
        self.result = self.error = None
        self.fn = fn
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            self.error = e
        self.done.set()
