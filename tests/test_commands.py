"""Unit tests of buffyfs.store.commands: the rules of the commands, shared by the control
files (Cache.run_control) and the command line (Cache.tag, pin...)."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from buffyfs.control import Command
from buffyfs.errors import BadInput, BuffyError, NotFound
from buffyfs.store import commands
from buffyfs.store.cache import Cache

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OLDER, NEWER = "20260101T000000Z-aaaaaaaa", "20260101T000100Z-bbbbbbbb"
UNKNOWN = "20990101T000000Z-00000000"


def make_cache(root: Path, versions: int = 2) -> Cache:
    """A cache with source ``t`` and ``versions`` versions (OLDER, then NEWER)."""
    cache = Cache(root)
    cache.add_source("t", "http://127.0.0.1:9/t", {"refresh": "never"})
    for i, sha in enumerate(["a" * 64, "b" * 64][:versions]):
        cache.index.commit_version("t", {
            "sha256": sha, "size": 1, "url": "http://127.0.0.1:9/t", "etag": None,
            "last_modified": None, "content_type": None, "tags": []},
            T0.replace(minute=i))
    return cache


def snapshot(cache: Cache) -> dict[str, Any]:
    """What the commands may change: sources (but their add time), versions, requests."""
    with cache.index.read() as r:
        return {name: (dataclasses.replace(src, added_at=None), r.versions(name))
                for name, src in r.sources()}


@pytest.fixture
def caches(tmp_path: Path):
    """Two identical caches: one for the CLI's calls, one for the control file."""
    pair = make_cache(tmp_path / "cli"), make_cache(tmp_path / "control")
    yield pair
    for c in pair:
        c.close()


# What `buffyfs tag/untag/pin/unpin` calls, and the same command as a control line.
CASES = [
    (lambda c: c.tag("t", "latest", "keep"), "tag latest keep"),
    (lambda c: c.tag("t", OLDER, "failed"), f"tag {OLDER} failed"),
    (lambda c: c.tag("t", NEWER, "valid"), f"tag {NEWER} valid"),
    (lambda c: c.untag("t", "latest", "keep"), "untag latest keep"),
    (lambda c: c.pin("t"), "pin"),
    (lambda c: c.pin("t", "latest"), "pin latest"),
    (lambda c: c.pin("t", OLDER), f"pin {OLDER}"),
    (lambda c: c.unpin("t"), "unpin"),
    (lambda c: c.set_options("t", {"pinned": "true", "max_attempts": "2"}),
     "set pinned=true max_attempts=2"),
]


@pytest.mark.parametrize("setup", ["", f"tag {NEWER} failed", f"pin {NEWER}",
                                   f"tag {NEWER} failed\ntag {OLDER} failed"])
@pytest.mark.parametrize("via_cli, line", CASES)
def test_cli_and_control_file_give_the_same_results_and_errors(caches, setup, via_cli, line):
    by_cli, by_control = caches
    for c in caches:
        c.run_control(setup.encode(), "t")
    try:
        result = via_cli(by_cli)
        cli_error = None
    except BuffyError as e:
        cli_error = e
    try:
        by_control.run_control(line.encode(), "t")
        control_error = None
    except BuffyError as e:
        control_error = e
    if cli_error is None:
        assert control_error is None, control_error
        if isinstance(result, dict):  # tag / untag: the version as tagged
            assert result in snapshot(by_cli)["t"][1]
    else:  # the same class (so the same exit status) and the same reason, with the line
        assert type(control_error) is type(cli_error)
        assert str(control_error) == f"line 1: {cli_error}"
    assert snapshot(by_cli) == snapshot(by_control)


def test_cli_and_control_file_refuse_the_same_unknowns(caches):
    by_cli, by_control = caches
    for call, line, kind, reason in [
        (lambda c: c.tag("t", UNKNOWN, "keep"), f"tag {UNKNOWN} keep", NotFound,
         f"source 't' has no version '{UNKNOWN}'"),
        (lambda c: c.pin("t", UNKNOWN), f"pin {UNKNOWN}", NotFound,
         f"source 't' has no version '{UNKNOWN}'"),
        (lambda c: c.tag("t", "latest", "status"), "tag latest status", BadInput,
         "invalid tag"),
    ]:
        with pytest.raises(kind) as cli_error:
            call(by_cli)
        with pytest.raises(kind) as control_error:
            by_control.run_control(line.encode(), "t")
        assert reason in str(cli_error.value)
        assert str(control_error.value) == f"line 1: {cli_error.value}"
    with pytest.raises(NotFound, match="no source named 'ghost'"):
        by_cli.tag("ghost", "latest", "keep")
    with pytest.raises(NotFound, match="no source named 'ghost'"):
        by_control.run_control(b"tag latest keep", "ghost")
    assert snapshot(by_cli) == snapshot(by_control)


def tags(cache: Cache) -> dict[str, list[str]]:
    return {v.id: v.tags for v in snapshot(cache)["t"][1]}


def test_latest_is_resolved_as_the_earlier_lines_left_it(tmp_path):
    cache = make_cache(tmp_path / "c")
    out = cache.run_control(b"tag latest keep\ntag latest failed\ntag latest mytag\n", "t")
    assert tags(cache) == {NEWER: ["keep", "failed"], OLDER: ["mytag"]}
    assert [v.id for v in out.results] == [NEWER, NEWER, OLDER]
    assert out.changed == ["t"] and out.refresh == [] and out.removed == []


def test_a_failing_line_aborts_the_whole_transaction(tmp_path):
    cache = make_cache(tmp_path / "c")
    before = snapshot(cache)
    with cache.index.read() as r:
        seq = r.seq()
    with pytest.raises(NotFound, match="^line 3: source 't' has no usable version$"):
        cache.run_control(b"tag latest failed\n" * 3, "t")
    assert snapshot(cache) == before
    with cache.index.read() as r:
        assert r.seq() == seq  # no change recorded (the error record is state only)
        assert r.state("t").last_control_error == \
            "line 3: source 't' has no usable version"
    cache.run_control(b"\n", "t")  # a write that succeeds clears it, in its transaction
    with cache.index.read() as r:
        assert r.state("t").last_control_error is None


def test_root_commands_see_each_other(tmp_path):
    cache = make_cache(tmp_path / "c")
    out = cache.run_control(b"add x http://127.0.0.1:9/x\nremove x\nremove t\n", None)
    assert snapshot(cache) == {}
    assert out.removed == ["x", "t"] and out.changed == ["x", "t"]
    with pytest.raises(BadInput, match="^line 2: a source named 'y' exists already$"):
        cache.run_control(b"add y http://127.0.0.1:9/y\nadd y http://127.0.0.1:9/y\n", None)
    assert snapshot(cache) == {}


def test_refresh_modes(tmp_path):
    cache = make_cache(tmp_path / "c")
    out = commands.run(cache.index, [Command("refresh", [])], "t", refresh="mount")
    assert out.refresh == ["t"]
    with cache.index.read() as r:
        assert r.state("t").state == "fetching"
    cache.request_refresh("t", "request")
    assert cache.index.take_refresh_requests() == ["t"]
    cache.request_refresh("t", "check")
    assert cache.index.take_refresh_requests() == []
    cache.pin("t")
    for by in ("mount", "request", "check"):
        with pytest.raises(BadInput, match="pinned: unpin it first"):
            cache.request_refresh("t", by)  # type: ignore[arg-type]
    # pinned by an earlier line of the same write: refused too
    cache.unpin("t")
    with pytest.raises(BadInput, match="^line 2: "):
        cache.run_control(b"pin\nrefresh\n", "t")


def test_commands_of_the_other_scope_are_refused(tmp_path):
    cache = make_cache(tmp_path / "c")
    with pytest.raises(BadInput):
        commands.run(cache.index, [Command("remove", ["t"])], "t")
    with pytest.raises(BadInput):
        commands.run(cache.index, [Command("tag", ["latest", "keep"])], None)
    assert "t" in snapshot(cache)


def test_concurrent_writes_each_see_the_other(tmp_path):
    """Writes from several threads are serialized by the index: each `tag latest
    failed` fails the next version, however they interleave."""
    cache = make_cache(tmp_path / "c")
    errors: list[BaseException] = []

    def write() -> None:
        try:
            cache.run_control(b"tag latest failed", "t")
        except BuffyError as e:
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert tags(cache) == {NEWER: ["failed"], OLDER: ["failed"]}
    assert len(errors) == 1 and "no usable version" in str(errors[0])
