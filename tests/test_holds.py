"""Holds (``hold``/``release``), the ``keep_for`` grace and why collection keeps a
version, through the mount and the command line (SPEC part 2, "Holding a version for
a pipeline run")."""

from __future__ import annotations

import errno
import os

import pytest

from buffyfs.store.records import Source, Version
from tests.conftest import run_cli, wait_for
from tests.test_gc import make_versions
from tests.test_mount import control_error, read, status, write_control


def versions(mnt, name) -> dict[str, dict]:
    return {v["id"]: v for v in status(mnt / f"{name}/@status")["versions"]}


def new_version(origin, mnt, name, body: bytes) -> str:
    """Serve ``body`` as the next version of ``name``; returns its id."""
    before = status(mnt / f"{name}/@status")["latest"]
    origin.set(f"/{name}", body)
    write_control(mnt / f"{name}/@control", "refresh")
    wait_for(lambda: status(mnt / f"{name}/@status")["latest"] != before, 10,
             what="a new version")
    return status(mnt / f"{name}/@status")["latest"]


def test_held_version_survives_gc_and_is_collected_when_the_hold_expires(origin, mnt):
    [a] = make_versions(origin, mnt, "h", [b"first"], "keep_versions=0")
    held = run_cli("hold", "h", "latest", "4s", cache=mnt.cache, check=True)
    assert held.stdout == a + "\n"  # only the id: V=$(buffyfs hold h latest 4s)
    assert versions(mnt, "h")[a]["held_until"] is not None
    assert "held until" in " ".join(versions(mnt, "h")[a]["kept"])
    b = new_version(origin, mnt, "h", b"second")
    run_cli("gc", cache=mnt.cache, check=True)
    assert a in versions(mnt, "h") and versions(mnt, "h")[b]["held_until"] is None
    assert read(mnt / f"h/@versions/{a}") == b"first"
    # no gc asked: the mount collects it once the hold has run out
    wait_for(lambda: a not in versions(mnt, "h"), 15, what="the expired hold collected")
    assert not os.path.exists(mnt / f"h/@versions/{a}")
    assert read(mnt / "h/latest") == b"second"


def test_hold_latest_resolves_now_extends_and_release_ends_it(origin, mnt, cli):
    [a] = make_versions(origin, mnt, "x", [b"one"], "keep_versions=0")
    write_control(mnt / "x/@control", "hold latest 3s")
    first = versions(mnt, "x")[a]["held_until"]
    write_control(mnt / "x/@control", f"hold {a} 1h")  # a later hold extends...
    extended = versions(mnt, "x")[a]["held_until"]
    assert extended > first
    write_control(mnt / "x/@control", f"hold {a} 2s")  # ...and never shortens
    assert versions(mnt, "x")[a]["held_until"] == extended
    b = new_version(origin, mnt, "x", b"two")  # latest moves on; the hold stays on a
    assert versions(mnt, "x")[a]["held_until"] == extended
    assert versions(mnt, "x")[b]["held_until"] is None
    run_cli("gc", cache=mnt.cache, check=True)
    assert a in versions(mnt, "x")
    # the command line's release goes through the mount, as a control write does: the
    # released version is collected at once, no `buffyfs gc` needed
    run_cli("release", "x", a, cache=mnt.cache, check=True)
    wait_for(lambda: list(versions(mnt, "x")) == [b], 10, what="the released version gone")
    # release on the control file, too
    write_control(mnt / "x/@control", "hold latest 1h\nrelease latest")
    assert versions(mnt, "x")[b]["held_until"] is None


def test_keep_for_keeps_a_superseded_version_then_lets_it_go(origin, mnt):
    [a] = make_versions(origin, mnt, "k", [b"old"], "keep_versions=0 keep_for=5s")
    new_version(origin, mnt, "k", b"new")
    run_cli("gc", cache=mnt.cache, check=True)
    kept = versions(mnt, "k")
    assert a in kept and kept[a]["held_until"] is None
    assert kept[a]["kept"][0].startswith("grace until ")
    wait_for(lambda: a not in versions(mnt, "k"), 15, what="the grace to end")
    # keep_for=0s (the default): collection as in part 1, at once
    [c] = make_versions(origin, mnt, "z", [b"zero"], "keep_versions=0")
    new_version(origin, mnt, "z", b"zero again")
    wait_for(lambda: c not in versions(mnt, "z"), 10, what="collection")


def test_quota_evicts_grace_versions_last_and_held_ones_never(origin, mount_factory):
    mnt = mount_factory("--max-cache-size", "450K")
    g1, g2 = make_versions(origin, mnt, "g", [os.urandom(100_000) for _ in range(2)],
                           "keep_for=1h")
    e1, e2 = make_versions(origin, mnt, "e", [os.urandom(100_000) for _ in range(2)])
    assert versions(mnt, "g")[g1]["kept"][-1].startswith("grace until ")
    # room for n: the extra outside any grace goes, though newer than g's graced one
    make_versions(origin, mnt, "n", [os.urandom(100_000)])
    assert list(versions(mnt, "e")) == [e2]
    assert list(versions(mnt, "g")) == [g2, g1]
    # the only version left to evict is held: a download that does not fit fails
    write_control(mnt / "g/@control", f"hold {g1} 1h")
    origin.set("/m", os.urandom(100_000))
    write_control(mnt / "@control", f"add m {origin.url('/m')}")
    with pytest.raises(OSError):
        read(mnt / "m/latest")
    assert "cache full" in status(mnt / "m/@status")["last_error"]["message"]
    assert list(versions(mnt, "g")) == [g2, g1]
    # released, the graced version is the last thing left to evict: it goes
    write_control(mnt / "g/@control", f"release {g1}")
    write_control(mnt / "m/@control", "refresh")
    wait_for(lambda: status(mnt / "m/@status")["latest"], 10, what="m's first version")
    assert list(versions(mnt, "g")) == [g2]
    assert status(mnt / "@status")["cache_size"] <= 450 * 1024


def test_holds_survive_a_restart(origin, mount_factory):
    mnt = mount_factory()
    [a] = make_versions(origin, mnt, "r", [b"kept across"], "keep_versions=0")
    write_control(mnt / "r/@control", "hold latest 1h")
    until = versions(mnt, "r")[a]["held_until"]
    mnt.close()
    mnt = mount_factory()
    assert versions(mnt, "r")[a]["held_until"] == until
    new_version(origin, mnt, "r", b"newer")
    run_cli("gc", cache=mnt.cache, check=True)
    assert read(mnt / f"r/@versions/{a}") == b"kept across"


def test_bad_durations_and_unknown_versions_are_refused(origin, mnt):
    [a] = make_versions(origin, mnt, "b", [b"body"])
    ctl = mnt / "b/@control"
    for line in ("hold latest 0s", "hold latest 5x", "hold latest", f"hold {a}",
                 "hold latest 1h extra", "hold 20990101T000000Z-deadbeef 1h",
                 "release 20990101T000000Z-deadbeef", "release nonsense",
                 "set keep_for=soon"):
        assert control_error(ctl, line) == errno.EINVAL, line
        assert status(mnt / "b/@status")["last_control_error"]
    assert versions(mnt, "b")[a]["held_until"] is None
    assert control_error(mnt / "@control", "hold latest 1h") == errno.EINVAL  # not the root's
    cache = mnt.cache
    # bad durations and versions the source does not have: bad input (issue 20)
    for args in (("hold", "b", "latest", "0s"), ("hold", "b", "latest", "1y"),
                 ("hold", "b", "nonsense", "1h"), ("release", "b", "nonsense"),
                 ("hold", "b", "20990101T000000Z-deadbeef", "1h"),
                 ("release", "b", "20990101T000000Z-deadbeef")):
        done = run_cli(*args, cache=cache)
        assert done.returncode == 2 and "Traceback" not in done.stderr, args
        assert len(done.stderr.strip().splitlines()) == 1
    done = run_cli("hold", "nosuch", "latest", "1h", cache=cache)  # an unknown source: 1
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert versions(mnt, "b")[a]["held_until"] is None


def test_gc_dry_run_and_status_say_why_each_version_is_kept(origin, mnt):
    a, b, c, d, e = make_versions(origin, mnt, "w", [b"A", b"B", b"C", b"D", b"E"],
                                  "keep_versions=1 keep_for=1h")
    write_control(mnt / "w/@control", f"tag {a} keep\ntag {e} valid\nhold {b} 1h")
    until = versions(mnt, "w")[b]["held_until"]
    with open(mnt / f"w/@versions/{c}", "rb"):
        out = run_cli("gc", "--dry-run", cache=mnt.cache, check=True).stdout
        kept = {v: versions(mnt, "w")[v]["kept"] for v in (a, b, c, d, e)}
    assert f"w: keeps {e} (latest, valid)" in out
    assert f"w: keeps {b} (held until {until})" in out
    assert f"w: keeps {a} (keep tag)" in out
    assert f"w: keeps {d} (keep_versions, grace until " in out
    assert f"w: keeps {c} (grace until " in out and "open)" in out
    assert kept[e] == ["latest", "valid"] and kept[a] == ["keep tag"]
    assert kept[b] == [f"held until {until}"]
    assert kept[d][0] == "keep_versions" and kept[d][1].startswith("grace until ")
    assert kept[c][0].startswith("grace until ") and kept[c][1] == "open"
    assert "total: would free 0 B" in out


# --- the retention rules, without a mount ------------------------------------------------


def record(vid_time: str, tags=(), **extra) -> Version:
    """A version record fetched at ``vid_time`` (HHMMSS on 2026-11-30)."""
    return Version(id=f"20261130T{vid_time}Z-0000000{len(tags)}", ino=int(vid_time),
                   fetched_at=f"2026-11-30T{vid_time[:2]}:{vid_time[2:4]}:{vid_time[4:]}Z",
                   tags=list(tags), sha256=vid_time * 6, size=1, **extra)


def test_grace_starts_when_the_next_servable_version_arrives():
    from datetime import UTC, datetime

    from buffyfs.store import gc

    src = Source(url="http://h/s", ino=16, options={"keep_versions": 0, "keep_for": "1h"})
    newest, failed, middle, oldest = (record("120000"), record("110000", ["failed"]),
                                      record("100000"), record("090000"))
    vs = [newest, failed, middle, oldest]
    now = datetime(2026, 11, 30, 12, 30, tzinfo=UTC)
    why = {vid: [str(w) for w in reasons]
           for vid, reasons in gc.kept_reasons(src, vs, now).items()}
    assert why[newest.id] == ["latest"]
    # middle stopped being latest when newest came (the failed one never took over)
    assert why[middle.id] == ["grace until 2026-11-30T13:00:00Z"]
    assert why[failed.id] == []  # never latest: no grace
    assert why[oldest.id] == []  # its grace ended at 11:00
    # keep_for=0s: no grace at all, as in part 1
    src0 = Source(url="http://h/s", ino=16, options={"keep_versions": 0, "keep_for": "0s"})
    assert gc.kept_reasons(src0, vs, now)[middle.id] == []
    # an expired hold is no hold
    held = record("080000", held_until="2026-11-30T12:29:59Z")
    assert gc.kept_reasons(src0, [newest, held], now)[held.id] == []


def test_release_on_the_control_file_collects_at_once(origin, mnt):
    """A `release` (like `untag`, `unpin`, `set`) wakes the mount's collector: the
    version goes within seconds, not at the next 10-minute round."""
    [a] = make_versions(origin, mnt, "r", [b"one"], "keep_versions=0")
    write_control(mnt / "r/@control", "hold latest 1h")
    b = new_version(origin, mnt, "r", b"two")
    assert a in versions(mnt, "r")  # held: the collection after the new version kept it
    write_control(mnt / "r/@control", f"release {a}")
    wait_for(lambda: list(versions(mnt, "r")) == [b], 5, what="the released version collected")
