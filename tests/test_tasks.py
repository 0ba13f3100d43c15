"""The mount's background tasks fail the same way (mount.start_task): an unexpected
error is logged with its traceback, the mount stays up, and the task starts again.

The bugs are planted in the daemon only, by a ``sitecustomize`` module on its
PYTHONPATH that wraps one function to raise the first time it is called."""

from __future__ import annotations

import os
import textwrap

import pytest

from tests.conftest import hidden_failures, log_records, wait_for

PLANT = """
import os, sys
sys.path.insert(0, os.getcwd())  # as `python -m buffyfs` will: the code under test
import buffyfs.mount
import {module} as target

for name in "{path}".split(".")[:-1]:  # a method: its class
    target = getattr(target, name)
buffyfs.mount.RESTART_PAUSE = 0.5
real = getattr(target, "{attr}")


def planted(*args, **kwargs):
    with open(os.environ["BUFFYFS_TEST_CALLS"], "a") as f:
        f.write("call\\n")
    if not os.environ.get("BUFFYFS_TEST_FAILED"):
        os.environ["BUFFYFS_TEST_FAILED"] = "1"
        raise RuntimeError("planted bug")
    return real(*args, **kwargs)


setattr(target, "{attr}", planted)
"""


def planted_mount(tmp_path, monkeypatch, mount_factory, target: str):
    """A mount whose ``target`` (``module:function`` or ``module:Class.method``) raises
    RuntimeError on its first call; returns the mount and a function counting the calls
    so far."""
    module, path = target.split(":")
    site = tmp_path / "plant"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(PLANT).format(
        module=module, path=path, attr=path.split(".")[-1]))
    calls = tmp_path / "calls"
    with monkeypatch.context() as env:  # only the daemon gets the plant
        env.setenv("PYTHONPATH", str(site))
        env.setenv("BUFFYFS_TEST_CALLS", str(calls))
        m = mount_factory()
    return m, lambda: len(calls.read_text().splitlines()) if calls.exists() else 0


def unexpected(m, what: str) -> list[str]:
    return [r for r in log_records(m.log_text()) if f"{what} failed unexpectedly" in r]


@pytest.mark.allow_daemon_errors("collector failed unexpectedly")
def test_a_failing_collector_is_logged_and_restarted_and_the_mount_stays_up(
        origin, cli, tmp_path, monkeypatch, mount_factory):
    origin.set("/a", b"one")
    cli("add", "a", origin.url("/a"), check=True)
    m, calls = planted_mount(tmp_path, monkeypatch, mount_factory, "buffyfs.store.gc:plan_snapshot")
    assert (m / "a/latest").read_bytes() == b"one"  # a new version: the collector runs
    wait_for(lambda: unexpected(m, "collector"), what="the collector's failure in the log")
    assert m.proc.poll() is None, "the mount ended with its collector"
    (record,) = unexpected(m, "collector")
    assert "Traceback" in record and "RuntimeError: planted bug" in record
    assert "restarting in 0.5s" in record
    # restarted: the next new version is collected, and nothing more goes wrong
    origin.set("/a", b"two")
    cli("refresh", "a", check=True)
    wait_for(lambda: (m / "a/latest").read_bytes() == b"two", what="the second version")
    wait_for(lambda: calls() >= 2, what="a collection after the restart")
    assert m.proc.poll() is None and len(unexpected(m, "collector")) == 1
    assert os.path.ismount(m.path)


@pytest.mark.allow_daemon_errors("scheduler failed unexpectedly")
def test_a_failing_scheduler_is_restarted_and_plans_every_source_again(
        origin, cli, tmp_path, monkeypatch, mount_factory):
    origin.set("/a", b"one")
    origin.set("/b", b"bee")
    cli("add", "a", origin.url("/a"), check=True)
    cli("add", "b", origin.url("/b"), check=True)
    m, calls = planted_mount(tmp_path, monkeypatch, mount_factory,
                             "buffyfs.fetch.scheduler:Scheduler._evaluate")
    # the first evaluation (of both sources) fails; the restarted scheduler plans them
    assert (m / "a/latest").read_bytes() == b"one"
    assert (m / "b/latest").read_bytes() == b"bee"
    assert m.proc.poll() is None and calls() >= 2
    assert len(unexpected(m, "scheduler")) == 1


def test_the_log_check_finds_tracebacks_and_unexpected_errors():
    log = textwrap.dedent("""\
        2026-01-01T00:00:00Z INFO buffyfs.mount: mounted
        2026-01-01T00:00:01Z ERROR buffyfs.fs.handlers: lookup failed unexpectedly
            Traceback (most recent call last):
              File "fs.py", line 1, in lookup
            KeyError: 'ino'
        2026-01-01T00:00:02Z ERROR buffyfs.fetch.refresh: a: HTTP 500
        2026-01-01T00:00:03Z WARNING buffyfs.fs.handlers: @control: refused: unexpected ':x'
        2026-01-01T00:00:04Z ERROR buffyfs.mount: scrub failed unexpectedly again (OSError)
        Exception ignored in: <function Foo.__del__>
        Traceback (most recent call last):
          File "x.py", line 2, in __del__
        ValueError: bare
        2026-01-01T00:00:05Z INFO buffyfs.mount: unmounted
        """)
    found = hidden_failures(log, [])
    assert [f.splitlines()[-1] for f in found] == [
        "    KeyError: 'ino'", "2026-01-01T00:00:04Z ERROR buffyfs.mount: scrub failed "
        "unexpectedly again (OSError)", "ValueError: bare"]
    assert len(hidden_failures(log, ["KeyError", "scrub failed"])) == 1
