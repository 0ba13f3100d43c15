"""The index's typed records and their codec (store/records.py), and that no module
writes the index's LMDB keys by hand (only store/index.py and store/writes.py)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from buffyfs.store.index import Index
from buffyfs.store.records import (
    BlobEntry,
    InodeRef,
    Source,
    SourceState,
    Version,
    decode,
    encode,
    from_dict,
    to_dict,
)

ROOT = Path(__file__).resolve().parent.parent
SHA = "ab" * 32


def _dumps(obj: object) -> bytes:
    """The bytes the code before typed records stored (index._dumps)."""
    return json.dumps(obj, separators=(",", ":")).encode()


FULL = [
    Source(url="http://h/a", options={"refresh": "1d", "pinned": True}, ino=16,
           added_at="2026-01-01T00:00:00Z", pin="20260101T000000Z-abababab", mirror=True),
    Version(id="20260101T000000Z-abababab", sha256=SHA, size=3,
            fetched_at="2026-01-01T00:00:00Z", url="http://h/a", etag='"e"',
            last_modified="Thu, 01 Jan 2026 00:00:00 GMT", content_type="text/plain",
            ino=24, tags=["valid", "keep"], damaged={"at": "2026-01-02T00:00:00Z",
                                                     "reason": "blob file missing"},
            held_until="2026-02-01T00:00:00Z", validation="too small", remote=True,
            source="a"),
    SourceState(last_check="2026-01-01T00:00:00Z", last_success="2026-01-01T00:00:00Z",
                next_check="2026-01-02T00:00:00Z", consecutive_failures=2,
                last_error={"at": "2026-01-01T00:00:00Z", "message": "HTTP 503"},
                last_control_error="line 1: no", progress={"bytes": 1, "total": 2},
                state="fetching", attempt=2, queued="max_downloads", force=True,
                partial={"key": "k", "etag": None, "last_modified": None,
                         "segment_size": 8388608, "total": 9, "segments": [[0, 1]]},
                last_refresh={"started": 1.5, "result": "failed", "version": None,
                              "error": "HTTP 503"}),
    InodeRef(kind="version", source="a", id="20260101T000000Z-abababab"),
    BlobEntry(size=3, refs=2, damaged={"at": "2026-01-02T00:00:00Z", "reason": "x"},
              unpacked={"state": "done", "kind": "gzip", "size": 10, "file_size": 10}),
]
MINIMAL = [
    Source(url="http://h/a", options={}, ino=16),
    Version(id="20260101T000000Z-abababab", sha256=SHA, size=3,
            fetched_at="2026-01-01T00:00:00Z"),
    SourceState(),
    InodeRef(kind="dir", source="a"),
    BlobEntry(size=3),
]


@pytest.mark.parametrize("record", FULL + MINIMAL, ids=lambda r: type(r).__name__)
def test_every_record_type_round_trips(record) -> None:
    raw = encode(record)
    assert decode(type(record), raw) == record
    assert json.loads(raw) == to_dict(record)
    assert from_dict(type(record), json.loads(raw)) == record


def test_optional_keys_at_their_default_are_left_out() -> None:
    """As the code before wrote them: ``damaged``, ``held_until``, ``validation``,
    ``remote`` and garbage's ``source`` only when set; a state's seven first keys
    always."""
    assert json.loads(encode(MINIMAL[1])) == {
        "id": "20260101T000000Z-abababab", "sha256": SHA, "size": 3,
        "fetched_at": "2026-01-01T00:00:00Z", "url": None, "etag": None,
        "last_modified": None, "content_type": None, "ino": 0, "tags": []}
    assert json.loads(encode(SourceState())) == {
        "last_check": None, "last_success": None, "next_check": None,
        "consecutive_failures": 0, "last_error": None, "last_control_error": None,
        "progress": None}
    assert json.loads(encode(MINIMAL[0])) == {"url": "http://h/a", "options": {},
                                              "ino": 16, "added_at": None, "pin": None}
    assert json.loads(encode(InodeRef(kind="dir", source="a"))) == {"kind": "dir",
                                                                    "source": "a"}


def test_old_records_with_missing_optional_keys_decode_with_defaults() -> None:
    v = decode(Version, b'{"id":"20260101T000000Z-abababab","sha256":"' + SHA.encode()
               + b'","size":3,"fetched_at":"2026-01-01T00:00:00Z"}')
    assert v.tags == [] and v.damaged is None and v.held_until is None
    assert v.remote is False and v.validation is None and v.ino == 0
    assert decode(SourceState, b"{}") == SourceState()
    assert decode(SourceState, b"{}").state == "idle"
    src = decode(Source, b'{"url":"http://h/a","options":{},"ino":16}')
    assert src.pin is None and src.added_at is None and src.mirror is False
    assert decode(BlobEntry, b'{"size":3}').refs == 0


def test_json_the_old_code_wrote_decodes_to_the_same_values() -> None:
    """Each value as the code before typed records wrote it (its key order, its nulls)
    decodes to the values it held, and encodes back to the same JSON object."""
    version = {"sha256": SHA, "size": 5, "url": "http://h/a", "etag": '"e"',
               "last_modified": None, "content_type": "text/plain", "tags": ["failed"],
               "validation": "too small", "id": "20260101T000000Z-abababab",
               "fetched_at": "2026-01-01T00:00:00Z", "ino": 24,
               "damaged": {"at": "2026-01-02T00:00:00Z", "reason": "blob file missing"},
               "held_until": "2026-02-01T00:00:00Z"}  # commit_version's order, then marks
    v = decode(Version, _dumps(version))
    assert (v.id, v.sha256, v.size, v.tags, v.validation, v.damaged["reason"], v.ino) == (
        "20260101T000000Z-abababab", SHA, 5, ["failed"], "too small", "blob file missing", 24)
    assert json.loads(encode(v)) == version
    garbage = {**version, "source": "gone"}
    assert decode(Version, _dumps(garbage)).source == "gone"
    assert json.loads(encode(decode(Version, _dumps(garbage)))) == garbage
    # a state the refresher left: nulls of keys that are optional now
    state = {"last_check": "2026-01-01T00:00:00Z", "last_success": None, "next_check": None,
             "consecutive_failures": 1, "last_error": {"at": "2026-01-01T00:00:00Z",
                                                       "message": "HTTP 503"},
             "last_control_error": None, "progress": None, "state": "idle",
             "attempt": None, "queued": None, "force": None, "partial": None,
             "last_refresh": {"started": 1767225600.5, "result": "failed",
                              "version": None, "error": "HTTP 503"}}
    s = decode(SourceState, _dumps(state))
    assert (s.consecutive_failures, s.last_error["message"], s.state, s.force) == (
        1, "HTTP 503", "idle", None)
    assert s.last_refresh["started"] == 1767225600.5
    again = json.loads(encode(s))  # the same, less optional keys at their default
    assert again.items() <= state.items()
    assert set(state) - set(again) == {"state", "attempt", "queued", "force", "partial"}
    assert decode(SourceState, encode(s)) == s
    source = {"url": "http://h/a", "options": {"refresh": "1d"}, "ino": 16,
              "added_at": "2026-01-01T00:00:00Z", "pin": None, "mirror": True}
    assert encode(decode(Source, _dumps(source))) == _dumps(source)  # the same bytes
    blob = {"size": 3, "refs": 1, "unpacked": {"state": "none", "kind": None}}
    assert encode(decode(BlobEntry, _dumps(blob))) == _dumps(blob)


def test_non_ascii_is_escaped_as_before() -> None:
    src = Source(url="http://h/caf\u00e9", options={}, ino=16)
    assert encode(src) == _dumps(to_dict(src))
    assert b"\\u00e9" in encode(src)


def test_unknown_keys_are_dropped() -> None:
    """Keys a newer buffyfs wrote are not kept (a record rewritten here loses them)."""
    raw = _dumps({"url": "http://h/a", "options": {}, "ino": 16, "added_at": None,
                  "pin": None, "colour": "blue"})
    src = decode(Source, raw)
    assert src == Source(url="http://h/a", options={}, ino=16)
    assert b"colour" not in encode(src)
    assert from_dict(Source, json.loads(raw)) == src


def test_a_value_of_the_wrong_type_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="bad Version record"):
        decode(Version, b'{"id":1,"sha256":"x","size":1,"fetched_at":""}')


def test_records_are_frozen() -> None:
    v = MINIMAL[1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.tags = ["x"]  # type: ignore[misc]
    assert dataclasses.replace(v, tags=["x"]).tags == ["x"] and v.tags == []


def test_an_index_the_old_code_wrote_reads_the_same(tmp_path: Path) -> None:
    """Values as the code before typed records stored them, read through the index."""
    idx = Index(tmp_path / "index")
    try:
        with idx.write() as w:
            w.txn.put(b"a", _dumps({"url": "http://h/a", "options": {"refresh": "1d"},
                                    "ino": 16, "added_at": "2026-01-01T00:00:00Z",
                                    "pin": None}), db=idx.dbs["sources"])
            w.txn.put(b"a\0" + b"20260101T000000Z-abababab", _dumps({
                "sha256": SHA, "size": 3, "url": "http://h/a", "etag": None,
                "last_modified": None, "content_type": None, "tags": [],
                "id": "20260101T000000Z-abababab", "fetched_at": "2026-01-01T00:00:00Z",
                "ino": 24}), db=idx.dbs["versions"])
            w.txn.put(b"a", _dumps({"last_check": None, "last_success": None,
                                    "next_check": None, "consecutive_failures": 0,
                                    "last_error": None, "last_control_error": None,
                                    "progress": None, "force": None, "attempt": None}),
                      db=idx.dbs["state"])
        with idx.read() as r:
            latest = r.latest("a")
            assert latest is not None and latest.id == "20260101T000000Z-abababab"
            assert r.state("a").force is None and r.state("a").state == "idle"
        with idx.write() as w:  # and writes on over them
            w.change_tag("a", "20260101T000000Z-abababab", add="keep")
            w.put_state("a", force=True)
        with idx.read() as r:
            assert r.version("a", "20260101T000000Z-abababab").tags == ["keep"]
            assert r.state("a").force is True
    finally:
        idx.close()


# --- nobody writes LMDB keys by hand --------------------------------------------------

WRITERS = {"buffyfs/store/index.py", "buffyfs/store/writes.py"}
BY_HAND = re.compile(r"\btxn\.(put|delete|replace|pop)\(|\.(put|delete)\([^)]*\bdb=|"
                     r"\b_put(_record)?\(|\.env\.begin\(")


def test_no_module_writes_index_keys_by_hand() -> None:
    """Only index.py (and writes.py, through index.Writer) put or delete LMDB keys:
    other modules and bench/ go through the Writer's functions."""
    found = []
    for path in sorted([*(ROOT / "buffyfs").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]):
        rel = str(path.relative_to(ROOT))
        if rel in WRITERS:
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if BY_HAND.search(line):
                found.append(f"{rel}:{lineno}: {line.strip()}")
    assert found == []
