"""Unit tests of buffyfs.store.index: the LMDB index on a temporary directory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from buffyfs.errors import BadInput, CacheError, NotFound
from buffyfs.options import normalize_options
from buffyfs.store.index import (
    FIRST_DYNAMIC_INO,
    INODES_PER_SOURCE,
    Index,
    SourceInode,
    latest_of,
    newest_of,
    parse_rfc3339,
    resolve_latest,
    rfc3339,
    version_id,
)
from buffyfs.store.records import InodeRef, Version

ID_RE = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}")
T0 = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
OPTS = normalize_options({})


@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    return tmp_path / "index"


@pytest.fixture
def idx(index_dir: Path) -> Iterator[Index]:
    index = Index(index_dir)
    yield index
    index.close()


def record(content: bytes, **extra: object) -> dict:
    return {
        "sha256": hashlib.sha256(content).hexdigest(), "size": len(content),
        "url": "http://h/x", "etag": None, "last_modified": None, "content_type": None,
        "tags": [], **extra,
    }


def versions(idx: Index, name: str) -> list[dict]:
    with idx.read() as r:
        return r.versions(name)


def state(idx: Index, name: str) -> dict:
    with idx.read() as r:
        return r.state(name)


def run_in_other_process(index_dir: Path, code: str) -> str:
    script = textwrap.dedent(
        f"""
        import json, sys
        from pathlib import Path
        from buffyfs.store.index import Index
        idx = Index(Path({str(index_dir)!r}))
        """
    ) + textwrap.dedent(code)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# --- helpers -----------------------------------------------------------------------------


def test_version_id_format() -> None:
    sha = hashlib.sha256(b"x").hexdigest()
    vid = version_id(T0, sha)
    assert vid == "20240506T070809Z-" + sha[:8]
    assert ID_RE.fullmatch(vid)


def test_version_id_is_utc() -> None:
    sha = "ab" * 32
    local = T0.astimezone(timezone(timedelta(hours=5)))
    assert version_id(local, sha) == version_id(T0, sha)


def test_rfc3339_round_trip() -> None:
    assert rfc3339(T0) == "2024-05-06T07:08:09Z"
    assert parse_rfc3339(rfc3339(T0)) == T0


def _v(vid: str, tags: list[str]) -> Version:
    return Version(id=vid, sha256="ab" * 32, size=0, fetched_at="", tags=tags)


def test_latest_of_skips_failed() -> None:
    vs = [_v("3", ["failed"]), _v("2", ["valid"]), _v("1", [])]
    assert latest_of(vs).id == "2"
    assert latest_of([_v("1", [])]).id == "1"
    assert latest_of([_v("2", ["failed"]), _v("1", ["failed"])]) is None
    assert latest_of([]) is None


# --- sources -----------------------------------------------------------------------------


def test_add_and_get_source(idx: Index) -> None:
    assert idx.add_source("a", "http://h/a", OPTS) is True
    src = idx.get_source("a")
    assert src.url == "http://h/a"
    assert src.options == OPTS
    assert isinstance(src.ino, int)
    parse_rfc3339(src.added_at)
    with idx.read() as r:
        assert r.source_names() == ["a"]
        assert [n for n, _ in r.sources()] == ["a"]


def test_duplicate_add_is_bad_input_and_changes_nothing(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    with idx.read() as r:
        seq = r.seq()
    with pytest.raises(BadInput):
        idx.add_source("a", "http://h/other", OPTS)
    assert idx.get_source("a").url == "http://h/a"
    with idx.read() as r:
        assert r.seq() == seq


def test_add_replace(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    ino = idx.get_source("a").ino
    assert idx.add_source("a", "http://h/a", OPTS, replace=True) is False
    new_opts = normalize_options({"max_attempts": 2})
    assert idx.add_source("a", "http://h/b", new_opts, replace=True) is True
    src = idx.get_source("a")
    assert (src.url, src.options, src.ino) == ("http://h/b", new_opts, ino)


def test_remove_unknown_is_not_found(idx: Index) -> None:
    with pytest.raises(NotFound):
        idx.remove_source("nope")
    with pytest.raises(NotFound):
        idx.get_source("nope")


def test_remove_source_returns_versions_and_forgets_everything(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    v = idx.commit_version("a", record(b"one"), T0)
    idx.request_refresh("a")
    idx.record_failure("a", T0, "boom")
    removed = idx.remove_source("a")
    assert [x.id for x in removed] == [v.id]
    with pytest.raises(NotFound):
        idx.get_source("a")
    assert versions(idx, "a") == []
    assert state(idx, "a").consecutive_failures == 0
    assert idx.take_refresh_requests() == []
    with idx.read() as r:
        assert r.source_names() == []
        # the version waits as garbage (a reader may hold it) until collected
        assert r.version_by_inode(v.ino) == ("a", dataclasses.replace(v, source="a"))
        assert [g.id for g in r.garbage()] == [v.id]
        assert r.blob_ref(v.sha256).refs == 1
    with idx.write() as w:
        assert w.drop_version("a", dataclasses.replace(v, source="a")) is True  # its last user
    with idx.read() as r:
        assert r.inode(v.ino) is None and r.garbage() == []
        assert r.blob_ref(v.sha256) is None and r.blob_bytes() == 0


def test_inode_blocks_distinct(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    idx.add_source("b", "http://h/b", OPTS)
    a, b = idx.get_source("a").ino, idx.get_source("b").ino
    assert a >= FIRST_DYNAMIC_INO and b >= FIRST_DYNAMIC_INO
    assert abs(a - b) >= INODES_PER_SOURCE
    with idx.read() as r:
        for kind in SourceInode:
            assert r.inode(a + kind) == InodeRef(kind=kind.name, source="a")
            assert r.inode(b + kind) == InodeRef(kind=kind.name, source="b")


def test_inodes_never_reused_after_remove_and_re_add(idx: Index) -> None:
    used: set[int] = set()

    def block(name: str) -> set[int]:
        base = idx.get_source(name).ino
        return set(range(base, base + INODES_PER_SOURCE))

    idx.add_source("a", "http://h/a", OPTS)
    used |= block("a")
    v1 = idx.commit_version("a", record(b"one"), T0)
    assert v1.ino not in used
    used.add(v1.ino)
    idx.remove_source("a")
    idx.add_source("a", "http://h/a", OPTS)
    assert not block("a") & used
    used |= block("a")
    v2 = idx.commit_version("a", record(b"one"), T0)
    assert v2.ino not in used


def test_inode_counter_survives_reopen(index_dir: Path) -> None:
    first = Index(index_dir)
    first.add_source("a", "http://h/a", OPTS)
    a = first.get_source("a").ino
    first.remove_source("a")
    first.close()
    second = Index(index_dir)
    try:
        second.add_source("a", "http://h/a", OPTS)
        assert second.get_source("a").ino >= a + INODES_PER_SOURCE
    finally:
        second.close()


def test_update_source_options(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    idx.update_source_options("a", lambda o: {**o, "max_attempts": 9})
    assert idx.get_source("a").options["max_attempts"] == 9
    with pytest.raises(NotFound):
        idx.update_source_options("nope", lambda o: o)


# --- versions ----------------------------------------------------------------------------


def test_commit_version_assigns_id_and_inode(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    rec = record(b"hello", etag='"e"', content_type="text/plain")
    v = idx.commit_version("a", rec, T0)
    assert v is not None
    assert ID_RE.fullmatch(v.id)
    assert v.id == "20240506T070809Z-" + rec["sha256"][:8]
    assert v.fetched_at == "2024-05-06T07:08:09Z"
    assert v.sha256 == rec["sha256"] and v.size == 5
    assert v.etag == '"e"' and v.content_type == "text/plain"
    assert v.tags == []
    with idx.read() as r:
        assert r.inode(v.ino) == InodeRef(kind="version", source="a", id=v.id)
        assert r.version("a", v.id) == v
    st = state(idx, "a")
    assert st.last_check == st.last_success == "2024-05-06T07:08:09Z"


def test_commit_version_identical_content_records_check_only(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    v = idx.commit_version("a", record(b"same"), T0)
    later = T0 + timedelta(minutes=5)
    assert idx.commit_version("a", record(b"same"), later) is None
    assert [x.id for x in versions(idx, "a")] == [v.id]
    st = state(idx, "a")
    assert st.last_check == rfc3339(later)
    assert st.last_success == rfc3339(later)


def test_identical_content_to_failed_newest_creates_no_version(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    idx.commit_version("a", record(b"bad", tags=["failed"]), T0)
    assert idx.commit_version("a", record(b"bad"), T0 + timedelta(seconds=60)) is None
    assert len(versions(idx, "a")) == 1


def test_content_equal_to_an_older_version_makes_a_new_one(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    idx.commit_version("a", record(b"A"), T0)
    idx.commit_version("a", record(b"B"), T0 + timedelta(seconds=10))
    v = idx.commit_version("a", record(b"A"), T0 + timedelta(seconds=20))
    assert v is not None
    assert len(versions(idx, "a")) == 3


def test_a_b_a_in_the_same_second_gives_unique_ids(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    made = [idx.commit_version("a", record(c), T0) for c in (b"A", b"B", b"A")]
    assert all(made)
    ids = [v.id for v in made]
    assert len(set(ids)) == 3
    assert all(ID_RE.fullmatch(i) for i in ids)
    for v in made:
        assert v.id == version_id(parse_rfc3339(v.fetched_at), v.sha256)
    # newest first, and the newest is the last committed
    assert [v.id for v in versions(idx, "a")] == ids[::-1]


def test_clock_going_back_keeps_order(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    v1 = idx.commit_version("a", record(b"A"), T0)
    v2 = idx.commit_version("a", record(b"B"), T0 - timedelta(hours=1))
    assert v2.id != v1.id
    assert versions(idx, "a")[0].id == v2.id


def test_versions_newest_first_and_per_source(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    idx.add_source("a.b", "http://h/ab", OPTS)
    ids = []
    for i in range(4):
        ids.append(idx.commit_version("a", record(b"%d" % i), T0 + timedelta(hours=i)).id)
    other = idx.commit_version("a.b", record(b"x"), T0)
    got = [v.id for v in versions(idx, "a")]
    assert got == ids[::-1]
    assert [v.id for v in versions(idx, "a.b")] == [other.id]
    assert versions(idx, "nope") == []


def test_latest_skips_versions_tagged_failed(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    good = idx.commit_version("a", record(b"good"), T0)
    idx.commit_version("a", record(b"bad", tags=["failed"]), T0 + timedelta(seconds=1))
    vs = versions(idx, "a")
    assert vs[0].tags == ["failed"]
    assert latest_of(vs).id == good.id


def test_commit_on_removed_source_is_ignored(idx: Index) -> None:
    assert idx.commit_version("ghost", record(b"x"), T0) is None
    assert versions(idx, "ghost") == []


# --- state -------------------------------------------------------------------------------


def test_default_state(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    st = state(idx, "a")
    assert st.consecutive_failures == 0
    assert st.last_check is None and st.last_error is None


def test_record_failure_counts_and_commit_resets(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    assert idx.record_failure("a", T0, "HTTP 500") == 1
    assert idx.record_failure("a", T0 + timedelta(seconds=1), "HTTP 502") == 2
    st = state(idx, "a")
    assert st.consecutive_failures == 2
    assert st.last_error == {"at": "2024-05-06T07:08:10Z", "message": "HTTP 502"}
    assert st.last_check == "2024-05-06T07:08:10Z"
    idx.commit_version("a", record(b"x"), T0 + timedelta(seconds=2))
    st = state(idx, "a")
    assert st.consecutive_failures == 0
    assert st.last_error is None
    assert idx.record_failure("a", T0 + timedelta(seconds=3), "again") == 1


def test_unchanged_commit_also_resets_failures(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    idx.commit_version("a", record(b"x"), T0)
    idx.record_failure("a", T0 + timedelta(seconds=1), "boom")
    assert idx.commit_version("a", record(b"x"), T0 + timedelta(seconds=2)) is None
    assert state(idx, "a").consecutive_failures == 0


def test_record_failure_on_unknown_source(idx: Index) -> None:
    assert idx.record_failure("ghost", T0, "x") == 0


def test_record_check_and_set_state(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    idx.record_check("a", T0, last_success=rfc3339(T0))
    idx.set_state("a", state="fetching", progress={"bytes": 1, "total": 2})
    st = state(idx, "a")
    assert st.last_check == rfc3339(T0) == st.last_success
    assert st.state == "fetching" and st.progress == {"bytes": 1, "total": 2}
    idx.set_state("ghost", state="idle")  # no source: nothing written
    with idx.read() as r:
        assert r._get("state", b"ghost") is None


# --- changes and requests ----------------------------------------------------------------


def test_changes_since(idx: Index) -> None:
    seq0, names = idx.changes_since(0)
    assert names == set()
    idx.add_source("a", "http://h/a", OPTS)
    idx.add_source("b", "http://h/b", OPTS)
    seq1, names = idx.changes_since(seq0)
    assert seq1 > seq0
    assert names == {"a", "b", ""}
    assert idx.changes_since(seq1) == (seq1, set())
    idx.commit_version("a", record(b"x"), T0)
    seq2, names = idx.changes_since(seq1)
    assert names == {"a"}
    idx.record_failure("b", T0, "boom")
    _, names = idx.changes_since(seq2)
    assert names == {"b"}


def test_changes_since_future_seq_is_unknown(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    seq, _ = idx.changes_since(0)
    assert idx.changes_since(seq + 100) == (seq, None)


def test_refresh_requests(idx: Index) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    idx.add_source("b", "http://h/b", OPTS)
    seq, _ = idx.changes_since(0)
    idx.request_refresh("a")
    idx.request_refresh("a")
    idx.request_refresh("b")
    _, names = idx.changes_since(seq)
    assert names == {"a", "b"}
    assert sorted(idx.take_refresh_requests()) == ["a", "b"]
    assert idx.take_refresh_requests() == []
    with pytest.raises(NotFound):
        idx.request_refresh("ghost")


# --- format and multiple processes -------------------------------------------------------


def test_reopen_keeps_data(index_dir: Path) -> None:
    first = Index(index_dir)
    first.add_source("a", "http://h/a", OPTS)
    v = first.commit_version("a", record(b"x"), T0)
    first.close()
    second = Index(index_dir)
    try:
        assert [x.id for x in versions(second, "a")] == [v.id]
    finally:
        second.close()


def test_unknown_format_is_cache_error(index_dir: Path) -> None:
    first = Index(index_dir)
    with first.write() as w:
        w.txn.put(b"format", b"999", db=first.dbs["meta"])
    first.close()
    with pytest.raises(CacheError, match="format"):
        Index(index_dir)


def test_unusable_directory_is_cache_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheError):
        Index(blocker / "index")


def test_other_process_sees_committed_writes(idx: Index, index_dir: Path) -> None:
    idx.add_source("a", "http://h/a", OPTS)
    v = idx.commit_version("a", record(b"hello"), T0)
    idx.request_refresh("a")
    out = run_in_other_process(
        index_dir,
        """
        with idx.read() as r:
            print(json.dumps({"names": r.source_names(),
                              "versions": [v.id for v in r.versions("a")]}))
        print(json.dumps(idx.take_refresh_requests()))
        """,
    )
    seen, taken = (json.loads(line) for line in out.splitlines())
    assert seen["names"] == ["a"]
    assert seen["versions"] == [v.id]
    assert taken == ["a"]
    assert idx.take_refresh_requests() == []  # the other process took it


def test_open_index_sees_writes_of_other_process(idx: Index, index_dir: Path) -> None:
    seq, _ = idx.changes_since(0)
    run_in_other_process(
        index_dir,
        """
        from datetime import datetime, timezone
        from buffyfs.options import normalize_options
        idx.add_source("b", "http://h/b", normalize_options({}))
        idx.commit_version("b", {"sha256": "ab" * 32, "size": 1, "tags": []},
                           datetime(2024, 1, 1, tzinfo=timezone.utc))
        idx.request_refresh("b")
        """,
    )
    _, names = idx.changes_since(seq)
    assert names == {"b", ""}
    assert idx.get_source("b").url == "http://h/b"
    [v] = versions(idx, "b")
    assert v.id == "20240101T000000Z-abababab"
    assert idx.take_refresh_requests() == ["b"]
    # inodes allocated by the other process are not handed out again here
    idx.add_source("c", "http://h/c", OPTS)
    b_ino = idx.get_source("b").ino
    c_ino = idx.get_source("c").ino
    assert c_ino >= max(b_ino + INODES_PER_SOURCE, v.ino + 1)


@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 31)))
def test_parse_rfc3339_reads_what_rfc3339_wrote(t: datetime) -> None:
    """The fast path (fromisoformat) gives what the strict strptime gives."""
    text = rfc3339(t.replace(tzinfo=UTC))
    assert parse_rfc3339(text) == \
        datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert parse_rfc3339(text).utcoffset() == timedelta(0)


@pytest.mark.parametrize("bad", ["2026-13-01T00:00:00Z", "2026-01-01T00:00:0xZ",
                                 "2026-01-01 00:00:00Z", "abcd-01-01T00:00:00Z",
                                 "2026-01-01T00:00:00+0", "2026-01-01", "",
                                 "2024-W01-1T12:34:56Z"])
def test_parse_rfc3339_refuses_other_shapes(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(bad)


def test_changes_since_leaves_out_the_ranges_it_is_told_to_skip(idx: Index) -> None:
    seq0, _ = idx.changes_since(0)
    for name in "abcdef":
        idx.add_source(name, f"http://h/{name}", OPTS)
    now, every = idx.changes_since(seq0)
    with idx.read() as r, r.txn.cursor(db=idx.dbs["changes"]) as cur:
        assert cur.set_range((seq0 + 1).to_bytes(8, "big"))
        log = [(int.from_bytes(k, "big"), v.decode()) for k, v in cur]
    assert [n for _, n in log if n] == list("abcdef") and every == set("abcdef") | {""}
    seq_of = {n: s for s, n in log if n}
    # b and c in one skipped range, e in another, one that ended before seq0 too
    skip = [(seq_of["e"] - 1, seq_of["e"]), (seq_of["b"] - 1, seq_of["c"]), (0, seq0)]
    assert idx.changes_since(seq0, skip) == (now, every - {"b", "c", "e"})
    # a range reaching past what is asked for, and one over the last entries
    assert idx.changes_since(seq_of["b"], [(seq_of["a"], seq_of["d"])]) == \
        (now, {n for s, n in log if s > seq_of["d"]})
    assert idx.changes_since(seq0, [(seq_of["f"] - 1, now)])[1] == \
        {n for s, n in log if s < seq_of["f"]}
    # overlapping and nested ranges, unsorted; one past the end of the log
    assert idx.changes_since(seq0, [(seq_of["b"], seq_of["c"]), (seq_of["a"], seq_of["d"]),
                                    (seq_of["a"], seq_of["b"])])[1] == \
        {n for s, n in log if s <= seq_of["a"] or s > seq_of["d"]}
    assert idx.changes_since(seq0, [(seq_of["f"] - 1, now + 5)])[1] == \
        {n for s, n in log if s < seq_of["f"]}


VERSION_SETS = st.lists(st.tuples(st.sampled_from(["a", "a0", "ab", "b"]),  # key neighbours
                                  st.sampled_from([*range(1, 10), "5a"]),  # an id's tail
                                  st.sets(st.sampled_from(["failed", "valid", "x"])),
                                  st.booleans()),  # damaged
                        max_size=24)


@settings(max_examples=300, deadline=None)  # each example opens an index
@given(VERSION_SETS, st.dictionaries(st.sampled_from(["a", "a0", "ab", "b"]),
                                     st.sampled_from([f"v{i}" for i in range(1, 10)] + ["v5a"])),
       st.sampled_from(["v0", "v4", "v5", "v5a", "v9", "w"]))
@example([("a", 3, set(), False), ("a", 7, set(), False)], {"a": "v3"}, "v4")  # a pin
@example([("a0", 3, {"failed"}, False), ("a0", 2, set(), True), ("a0", 1, set(), False),
          ("a0", 5, set(), False)], {"a0": "v3"}, "v2")  # a pin that fails falls back
def test_latest_and_newest_read_lazily_as_from_every_version(
        entries: list[tuple[str, int | str, set[str], bool]], pins: dict[str, str],
        upto: str) -> None:
    """``Reader.latest``/``newest`` stop at the first version they want, reading newest
    first; they answer what the rules over the whole list answer (pins that exist and
    that do not, sources whose keys sort next to each other)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        idx = Index(Path(d) / "index")
        try:
            names = ["a", "a0", "ab", "b"]
            for name in names:
                idx.add_source(name, f"http://h/{name}", OPTS)
            with idx.write() as w:
                for n, (name, number, tags, damaged) in enumerate(entries):
                    w.put_version(name, Version(
                        id=f"v{number}", sha256=f"{n:064x}", size=1, fetched_at="t",
                        ino=1000 + n, tags=sorted(tags),
                        damaged={"at": "t", "reason": "r"} if damaged else None))
                for name, pin in pins.items():
                    w.set_pin(name, True, pin)
            with idx.read() as r:
                for name in names:
                    every = r.versions(name)
                    src = r.source(name)
                    assert src is not None
                    assert list(r.versions_newest_first(name)) == every
                    assert list(r.versions_newest_first(name, upto)) == \
                        [v for v in every if v.id <= upto]
                    assert r.latest(name) == resolve_latest(src, every)
                    assert r.newest(name) == newest_of(every)
                assert r.latest("nosuch") is None and r.newest("nosuch") is None
        finally:
            idx.close()
