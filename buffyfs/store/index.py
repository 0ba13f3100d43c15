"""The index: an LMDB environment under ``CACHE/index/``.

The mount and every command-line process open the same environment; LMDB makes
that safe (one writer at a time across processes, readers never blocked). Every
change that touches several keys is one write transaction, so a crash leaves
either all of it or none.

Named databases and their keys. This is every key any module writes, and only this
module and writes.py (through ``Writer``) write them. The records of ``sources``,
``versions``, ``garbage``, ``state``, ``inodes`` and ``blobs`` are the dataclasses of
records.py: their fields and the comments on them are the schema of those values (JSON,
optional keys left out while at their default; records.encode / records.decode).

``meta``
    ``format``    b"1", the layout version (a later layout migrates from it)
    ``scrub``     JSON ``{"started", "finished", "blobs", "bytes", "damaged"}``: the
                  last background scrub (scrub.py)
    ``last_reload_error`` JSON ``{"at", "message"}`` or null: why the mount's last
                  SIGHUP reload was refused (mount.py)
    ``seq``       8-byte big-endian counter, bumped by every change in ``changes``
    ``next_ino``  8-byte big-endian, the next unused inode number (never reused)
    ``blob_bytes`` 8-byte big-endian, the total size of the blobs in ``blobs``
                  (their unpacked bytes included; ``check`` counts it anew)
    ``mirror_serial`` 8-byte big-endian counter, bumped by every entry in ``mirror``
    ``max_cache_size`` JSON integer or null: the mount's quota, for the command line
                  and the status page (cache.py)
    ``gc_request`` JSON ``{"id", "dry_run"}``: the last ``buffyfs gc`` asked of the
                  running mount (cache.py); ``gc_result:ID`` JSON, the mount's answer
                  to request ID: ``{"id", "dry_run", "report", "error"}``, the report
                  ``{"versions": [{"source", "id", "reason"}], "freed": {SOURCE: bytes},
                  "total", "orphans", "kept": [{"source", "id", "reasons"}]}``; the last
                  ``GC_RESULTS_KEPT`` answers are kept, and ``gc_answered`` JSON
                  ``{"id", "dry_run"}`` names the newest (mount.py, mountctl.py)
    ``gc_progress`` JSON ``{"request", "round", "done", "of"}``: how far the mount's
                  collection is (``request``: the ``gc_request`` id it answers, or null;
                  ``done`` of ``of`` batches committed; written when a request's plan
                  starts and with each batch): ``buffyfs gc`` waits while it moves
                  (mountctl.py)
    ``last_control_error`` JSON string or null: why the last control write to the
                  root (``@control``, CLI, server) failed (cache.py); a source's is in
                  its ``state``
``sources``       NAME -> ``records.Source``
``versions``      NAME b"\\0" VERSION_ID -> ``records.Version``; ids sort by fetch time,
                  so a reverse prefix scan is newest first
``state``         NAME -> ``records.SourceState`` (absent: the defaults)
``inodes``        8-byte inode -> ``records.InodeRef``; a source owns INODES_PER_SOURCE
                  numbers from its ``ino`` (offsets: ``SourceInode``), a version one
``blobs``         SHA256 -> ``records.BlobEntry``
``garbage``       8-byte inode -> ``records.Version`` with its ``source`` set: versions
                  of removed sources (and of a hub's, dropped), kept until no reader
                  holds them (gc.py)
``changes``       8-byte seq -> NAME (b"" for the root): which source changed in a
                  way the mount must see (sources, versions, requests). Trimmed to
                  the last CHANGES_KEPT entries.
``requests``      NAME -> b"refresh": a command-line ``refresh`` for the mount
``mirror``        8-byte serial -> NAME: the change feed of the HTTP server
                  (``GET /@changes``): what a replica mirrors changed for NAME (the
                  source added, removed or its options changed; a version committed or
                  collected; a tag; a pin), not state or progress. The serial is
                  ``meta`` ``mirror_serial`` (8-byte big-endian); every process that
                  writes the index advances it (``Writer.mirrored``). Trimmed to the last
                  CHANGES_KEPT entries.
``checks``        NAME -> ``[[STARTED, RESULT], ...]``, oldest first: how the last
                  CHECKS_KEPT refreshes ended (STARTED: epoch seconds; RESULT as
                  refresh.Outcome: new_version, unchanged, not_modified, failed), for
                  the status page's chart (http/page.py); a separate table, so that
                  reading a source's state stays small
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import re
import struct
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import lmdb

from buffyfs.errors import BadInput, CacheError, NotFound
from buffyfs.store.records import (
    BlobEntry,
    InodeRef,
    Source,
    SourceState,
    Version,
    decode,
    encode,
    from_dict,
)

FORMAT = b"1"
FIRST_DYNAMIC_INO = 16
INODES_PER_SOURCE = 8
CHANGES_KEPT = 10_000
CHECKS_KEPT = 100
GC_RESULTS_KEPT = 8  # answers to `buffyfs gc` requests kept (meta gc_result:ID)
MAP_SIZE = 8 << 30  # virtual; the file grows only as needed


class SourceInode(enum.IntEnum):
    """Offsets from a source's base inode."""

    dir = 0
    status = 1
    control = 2
    versions = 3
    pending = 4  # `latest` while the source has no servable version
    onopen = 5  # `latest` of an on-open source: its open checks the origin first


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(s: str) -> datetime:
    """A time ``rfc3339`` wrote. The scheduler parses every source's times: the exact
    shape goes through ``fromisoformat`` (~1 us), anything else through the strict
    ``strptime`` (~10 us), which raises ValueError for what is not that shape."""
    if len(s) == 20 and s[4] == s[7] == "-" and s[10] == "T" and s[13] == s[16] == ":" \
            and s[19] == "Z" and s.isascii() and s[:4].isdigit():
        return datetime.fromisoformat(s)
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@functools.lru_cache(maxsize=8192)
def rfc3339_ns(s: str) -> int:
    """``parse_rfc3339`` as nanoseconds since the epoch, remembered: a version's
    timestamps in its attributes, on every lookup and getattr of it (strptime takes
    microseconds)."""
    return int(parse_rfc3339(s).timestamp()) * 1_000_000_000


def version_id(fetched_at: datetime, sha256: str) -> str:
    return fetched_at.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + sha256[:8]


def servable(version: Version) -> bool:
    """May the version be served as a ``latest``: not tagged ``failed``, not damaged."""
    return "failed" not in version.tags and not version.damaged


def latest_of(versions: Iterable[Version]) -> Version | None:
    """The newest servable version (``versions`` newest first)."""
    for v in versions:
        if servable(v):
            return v
    return None


def newest_of(versions: Iterable[Version]) -> Version | None:
    """What the word ``newest`` names: the newest version that is not damaged, tagged
    ``failed`` or not (``versions`` newest first)."""
    return next((v for v in versions if not v.damaged), None)


def resolve_latest(source: Source, versions: list[Version]) -> Version | None:
    """What ``latest`` means for a source: its pinned version, else the newest servable
    one (not tagged ``failed``, not damaged).

    A pinned version tagged ``failed`` (or damaged) falls back like any other, but only
    to older versions: a pin never moves ``latest`` forward in time.
    """
    pin = source.pin
    if pin and any(v.id == pin for v in versions):
        return latest_of([v for v in versions if v.id <= pin])
    return latest_of(versions)


def tag_latest(versions: list[Version], tag: str) -> Version | None:
    """What ``@TAG/latest`` means: the newest version carrying ``tag`` that is not
    damaged (``versions`` newest first)."""
    return next((v for v in versions if tag in v.tags and not v.damaged), None)


def held_until(version: Version, now: datetime) -> str | None:
    """The end of the version's hold (RFC 3339), or None if it is not held at ``now``."""
    until = version.held_until
    return until if until is not None and until > rfc3339(now) else None


def tags_after(tags: list[str], add: str | None = None, remove: str | None = None) -> list[str]:
    """Tags with one added or removed; ``valid`` and ``failed`` exclude each other."""
    out = [t for t in tags if t != remove]
    if add and add not in out:
        other = {"valid": "failed", "failed": "valid"}.get(add)
        out = [t for t in out if t != other] + [add]
    return out


def _u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def _from_u64(b: bytes) -> int:
    return struct.unpack(">Q", b)[0]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _version_key(name: str, vid: str) -> bytes:
    return name.encode() + b"\0" + vid.encode()


# _dumps's encoding (str) without building an encoder per call (add_mirrored_sources)
_compact = json.JSONEncoder(separators=(",", ":")).encode


class Reader:
    """Typed reads inside one transaction (read or write)."""

    # state fields the mount has queued and not committed yet (writes.IndexWrites), by
    # source: a read transaction of the mount sees them over the index's (its own
    # writes, read back at once); None elsewhere, and in write transactions
    queued_state: dict[str, dict[str, Any]] | None = None

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self.txn = txn
        self.dbs = dbs

    def _get(self, db: str, key: bytes) -> Any:
        raw = self.txn.get(key, db=self.dbs[db])
        return None if raw is None else json.loads(raw)

    def _record(self, cls: Any, db: str, key: bytes) -> Any:
        raw = self.txn.get(key, db=self.dbs[db])
        return None if raw is None else decode(cls, raw)

    def source(self, name: str) -> Source | None:
        return self._record(Source, "sources", name.encode())

    def has_source(self, name: str) -> bool:
        """Whether ``name`` is a source (no JSON decoded: the change watcher asks it
        of every source a replica's sync adds)."""
        return self.txn.get(name.encode(), db=self.dbs["sources"]) is not None

    def sources(self) -> list[tuple[str, Source]]:
        with self.txn.cursor(db=self.dbs["sources"]) as cur:
            return [(k.decode(), decode(Source, v)) for k, v in cur]

    def mirrored_names(self) -> list[str]:
        """The names of a replica's mirrored sources (``"mirror": true``), each record
        decoded on its own: no list of every source's record at once (10,000)."""
        out = []
        with self.txn.cursor(db=self.dbs["sources"]) as cur:
            for key, raw in cur:
                if b'"mirror":true' in raw and decode(Source, raw).mirror:
                    out.append(key.decode())
        return out

    def source_names(self) -> list[str]:
        with self.txn.cursor(db=self.dbs["sources"]) as cur:
            return [k.decode() for k in cur.iternext(keys=True, values=False)]

    def versions(self, name: str) -> list[Version]:
        """All versions of a source, newest first."""
        return list(self.versions_newest_first(name))

    def versions_newest_first(self, name: str, upto: str | None = None
                              ) -> Iterator[Version]:
        """The versions of a source newest first (those with an id <= ``upto`` if
        given), read lazily: a caller that stops at the first it wants decodes only
        what it looked at (``latest`` of a source with 1,000 versions decoded them
        all, 2.5 ms on the loop). Use it inside the transaction."""
        prefix = name.encode() + b"\0"
        # the first key past the wanted ones; the one before it is the newest wanted
        past = prefix + upto.encode() + b"\0" if upto is not None else name.encode() + b"\1"
        with self.txn.cursor(db=self.dbs["versions"]) as cur:
            found = cur.prev() if cur.set_range(past) else cur.last()
            while found:
                if not cur.key().startswith(prefix):
                    return
                yield decode(Version, cur.value())
                found = cur.prev()

    def versions_after(self, name: str, vid: str) -> Iterator[Version]:
        """The versions of a source newer than ``vid``, oldest first, read lazily (use
        it inside the transaction; stop when you have what you need)."""
        prefix = name.encode() + b"\0"
        with self.txn.cursor(db=self.dbs["versions"]) as cur:
            if not cur.set_range(prefix + vid.encode() + b"\0"):  # the first key after
                return
            for k, v in cur:
                if not k.startswith(prefix):
                    break
                yield decode(Version, v)

    def has_versions(self, name: str) -> bool:
        prefix = name.encode() + b"\0"
        with self.txn.cursor(db=self.dbs["versions"]) as cur:
            return cur.set_range(prefix) and cur.key().startswith(prefix)

    def has_version(self, name: str, vid: str) -> bool:
        """Whether ``name`` has a version ``vid`` (nothing decoded)."""
        return self.txn.get(_version_key(name, vid), db=self.dbs["versions"]) is not None

    def version(self, name: str, vid: str) -> Version | None:
        return self._record(Version, "versions", _version_key(name, vid))

    def state(self, name: str) -> SourceState:
        queued = self.queued_state.get(name) if self.queued_state is not None else None
        if queued is not None:
            return dataclasses.replace(self._stored_state(name), **queued)
        return self._stored_state(name)

    def _stored_state(self, name: str) -> SourceState:
        return self._record(SourceState, "state", name.encode()) or SourceState()

    def inode(self, ino: int) -> InodeRef | None:
        return self._record(InodeRef, "inodes", _u64(ino))

    def raw_items(self, db: str) -> list[tuple[bytes, bytes]]:
        """Every key and value of a table, in key order, not decoded: a cheap scan for a
        reader that keeps what it decoded before and decodes only what changed (the
        status page: JSON decoding, not LMDB, is the cost of 10,000 sources)."""
        with self.txn.cursor(db=self.dbs[db]) as cur:
            return list(cur)

    def checks(self, name: str) -> list[list[Any]]:
        """The source's last checks ``[started, result]``, oldest first."""
        return self._get("checks", name.encode()) or []

    def seq(self) -> int:
        raw = self.txn.get(b"seq", db=self.dbs["meta"])
        return _from_u64(raw) if raw else 0

    def gc_result(self, rid: int) -> dict[str, Any] | None:
        """The mount's answer to ``buffyfs gc`` request ``rid``, if kept."""
        return self.meta_json(f"gc_result:{rid}")

    def meta_json(self, key: str) -> Any:
        return self._get("meta", key.encode())

    def mirror_serial(self) -> int:
        raw = self.txn.get(b"mirror_serial", db=self.dbs["meta"])
        return _from_u64(raw) if raw else 0

    def latest(self, name: str) -> Version | None:
        """``resolve_latest`` of the source, decoding only the versions it passes over
        (a pin that exists limits the look to it and older ones)."""
        src = self.source(name)
        if src is None:
            return None
        pin = src.pin if src.pin and self.has_version(name, src.pin) else None
        return latest_of(self.versions_newest_first(name, upto=pin))

    def newest(self, name: str) -> Version | None:
        """``newest_of`` the source's versions, decoding only those it passes over."""
        return newest_of(self.versions_newest_first(name))

    def version_by_inode(self, ino: int) -> tuple[str, Version] | None:
        """(source, version) of a version inode, including garbage not yet collected
        (a garbage version has its ``source`` set)."""
        ref = self.inode(ino)
        if ref is None or ref.kind != "version" or ref.id is None:
            return None
        v = self.version(ref.source, ref.id)
        if v is not None and v.ino == ino:
            return ref.source, v
        g = self._record(Version, "garbage", _u64(ino))
        return (g.source, g) if g else None

    def garbage(self) -> list[Version]:
        """The versions of removed sources (each with its ``source``)."""
        with self.txn.cursor(db=self.dbs["garbage"]) as cur:
            return [decode(Version, v) for v in cur.iternext(keys=False, values=True)]

    def blob_refs(self) -> dict[str, BlobEntry]:
        with self.txn.cursor(db=self.dbs["blobs"]) as cur:
            return {k.decode(): decode(BlobEntry, v) for k, v in cur}

    def version_count(self) -> int:
        return self.txn.stat(self.dbs["versions"])["entries"]

    def source_count(self) -> int:
        return self.txn.stat(self.dbs["sources"])["entries"]

    def blob_ref(self, sha256: str) -> BlobEntry | None:
        return self._record(BlobEntry, "blobs", sha256.encode())

    def unpacked(self, sha256: str) -> dict[str, Any] | None:
        """What the blob unpacks to (``blobs`` above), None if not looked at yet."""
        raw = self.txn.get(sha256.encode(), db=self.dbs["blobs"])
        if raw is None or b'"unpacked"' not in raw:  # most blobs: no JSON parse (@status)
            return None
        return decode(BlobEntry, raw).unpacked

    def blob_bytes(self) -> int:
        raw = self.txn.get(b"blob_bytes", db=self.dbs["meta"])
        return _from_u64(raw) if raw else 0

    def users_of_blob(self, sha256: str) -> list[tuple[str, Version, bool]]:
        """(source, version, live) of every version using the blob, garbage included.
        A scan of every version: for rare events (damage found), not for serving."""
        return self.users_of_blobs({sha256})[sha256]

    def users_of_blobs(self, shas: Collection[str]
                       ) -> dict[str, list[tuple[str, Version, bool]]]:
        """``users_of_blob`` of several blobs in one scan of every version."""
        out: dict[str, list[tuple[str, Version, bool]]] = {sha: [] for sha in shas}
        marker = re.compile(b"|".join(re.escape(sha.encode()) for sha in out) or b"(?!)")
        with self.txn.cursor(db=self.dbs["versions"]) as cur:
            for key, raw in cur:
                if marker.search(raw):  # cheap filter before the JSON parse
                    v = decode(Version, raw)
                    if v.sha256 in out:
                        out[v.sha256].append((key.split(b"\0", 1)[0].decode(), v, True))
        for g in self.garbage():
            if g.sha256 in out:
                out[g.sha256].append((g.source, g, False))
        return out


class Writer(Reader):
    """Writes inside one write transaction; commits when the ``with`` block ends."""

    def _put(self, db: str, key: bytes, value: Any) -> None:
        self.txn.put(key, _dumps(value), db=self.dbs[db])

    def _put_record(self, db: str, key: bytes, record: Any) -> None:
        self.txn.put(key, encode(record), db=self.dbs[db])

    def changed(self, name: str) -> None:
        """Record that the mount must look at ``name`` again ("" for the root)."""
        seq = self.seq() + 1
        self.txn.put(b"seq", _u64(seq), db=self.dbs["meta"])
        self.txn.put(_u64(seq), name.encode(), db=self.dbs["changes"])
        if seq > CHANGES_KEPT:
            self.txn.delete(_u64(seq - CHANGES_KEPT), db=self.dbs["changes"])

    def mirrored(self, name: str) -> None:
        """Record that what a replica mirrors of ``name`` changed (``mirror`` above)."""
        serial = self.mirror_serial() + 1
        self.txn.put(b"mirror_serial", _u64(serial), db=self.dbs["meta"])
        self.txn.put(_u64(serial), name.encode(), db=self.dbs["mirror"])
        if serial > CHANGES_KEPT:
            self.txn.delete(_u64(serial - CHANGES_KEPT), db=self.dbs["mirror"])

    def alloc_inodes(self, count: int) -> int:
        raw = self.txn.get(b"next_ino", db=self.dbs["meta"])
        first = _from_u64(raw) if raw else FIRST_DYNAMIC_INO
        self.txn.put(b"next_ino", _u64(first + count), db=self.dbs["meta"])
        return first

    def put_state(self, name: str, **fields: Any) -> SourceState:
        """Change fields of the source's state (``SourceState``'s names)."""
        state = dataclasses.replace(self.state(name), **fields)
        self._put_record("state", name.encode(), state)
        return state

    def put_meta_json(self, key: str, value: Any) -> None:
        self._put("meta", key.encode(), value)

    def put_gc_result(self, value: dict[str, Any], report: bytes | None = None) -> None:
        """The mount's answer to ``buffyfs gc`` request ``value["id"]`` (``report``: the
        report's JSON, encoded already); answers older than ``GC_RESULTS_KEPT`` go."""
        rid = value["id"]
        if report is None:
            self.put_meta_json(f"gc_result:{rid}", value)
        else:
            self.put_meta_json_with(f"gc_result:{rid}", value, report=report)
        self.put_meta_json("gc_answered", {"id": rid, "dry_run": value["dry_run"]})
        self.txn.delete(f"gc_result:{rid - GC_RESULTS_KEPT}".encode(), db=self.dbs["meta"])

    def put_meta_json_with(self, key: str, value: dict[str, Any], **encoded: bytes) -> None:
        """``put_meta_json`` of ``value`` with more members, each given as JSON bytes
        already (a dry run's report, encoded in the worker process that planned it:
        the mount never decodes it)."""
        raw = _dumps(value)
        for name, member in encoded.items():
            raw = raw[:-1] + (b"," if raw != b"{}" else b"") + _dumps(name) + b":" + \
                member + b"}"
        self.txn.put(key.encode(), raw, db=self.dbs["meta"])

    def ref_blob(self, sha256: str, size: int) -> None:
        entry = self.blob_ref(sha256) or BlobEntry(size=size, refs=0)
        if entry.refs == 0:
            self._add_blob_bytes(size)
        self.put_blob_ref(sha256, dataclasses.replace(entry, refs=entry.refs + 1))

    def unref_blob(self, sha256: str) -> bool:
        """Drop one reference; True when it was the last (the file may then go)."""
        entry = self.blob_ref(sha256)
        if entry is None:
            return False
        if entry.refs > 1:
            self.put_blob_ref(sha256, dataclasses.replace(entry, refs=entry.refs - 1))
            return False
        self.txn.delete(sha256.encode(), db=self.dbs["blobs"])
        self._add_blob_bytes(-entry.size - (entry.unpacked or {}).get("size", 0))
        return True

    def put_unpacked(self, sha256: str, record: dict[str, Any]) -> bool:
        """Record what the blob unpacks to (its derived bytes counted in ``blob_bytes``);
        False when no version uses the blob any more (the derived data must go)."""
        entry = self.blob_ref(sha256)
        if entry is None:
            return False
        old = (entry.unpacked or {}).get("size", 0)
        self._add_blob_bytes(record.get("size", 0) - old)
        self.put_blob_ref(sha256, dataclasses.replace(entry, unpacked=record))
        return True

    def _add_blob_bytes(self, delta: int) -> None:
        self.set_blob_bytes(self.blob_bytes() + delta)

    def drop_version(self, source: str, version: Version) -> bool:
        """Delete a version (live or garbage) for good; True if its blob lost its last user."""
        live = self.version(source, version.id)
        if live is not None and live.ino == version.ino:
            self.txn.delete(_version_key(source, version.id), db=self.dbs["versions"])
            self.changed(source)
            self.mirrored(source)
        self.txn.delete(_u64(version.ino), db=self.dbs["garbage"])
        self.txn.delete(_u64(version.ino), db=self.dbs["inodes"])
        if version.remote:  # a replica's version never fetched holds no reference
            return False
        return self.unref_blob(version.sha256)

    # --- sources, tags and pins (the rules in commands.py call these) -----------------

    def put_source(self, name: str, record: Source) -> None:
        self._put_record("sources", name.encode(), record)

    def put_version(self, name: str, version: Version) -> None:
        self._put_record("versions", _version_key(name, version.id), version)

    def put_garbage(self, version: Version) -> None:
        """A version of a removed source (its ``source`` set), until it is collected."""
        self._put_record("garbage", _u64(version.ino), version)

    def put_inode(self, ino: int, ref: InodeRef) -> None:
        """What inode ``ino`` names (``inodes`` above)."""
        self._put_record("inodes", _u64(ino), ref)

    def put_blob_ref(self, sha256: str, entry: BlobEntry) -> None:
        """A blob's entry as it is (``check`` rebuilds them; ``ref_blob`` counts)."""
        self._put_record("blobs", sha256.encode(), entry)

    def drop_blob_ref(self, sha256: str) -> None:
        self.txn.delete(sha256.encode(), db=self.dbs["blobs"])

    def set_blob_bytes(self, total: int) -> None:
        """``meta`` ``blob_bytes`` as counted anew (``check``)."""
        self.txn.put(b"blob_bytes", _u64(max(0, total)), db=self.dbs["meta"])

    def add_source(
        self, name: str, url: str, options: dict[str, Any], replace: bool = False
    ) -> bool:
        """Register (or, with ``replace``, update) a source. Returns True if anything changed."""
        old = self.source(name)
        if old is not None:
            if not replace:
                raise BadInput(f"a source named {name!r} exists already")
            if old.url == url and old.options == options:
                return False
            rec = dataclasses.replace(old, url=url, options=options)
        else:
            base = self.alloc_inodes(INODES_PER_SOURCE)
            rec = Source(url=url, options=options, ino=base, added_at=rfc3339(now_utc()))
            for kind in SourceInode:
                self.put_inode(base + kind, InodeRef(kind=kind.name, source=name))
        self.put_source(name, rec)
        self.changed(name)
        self.changed("")
        self.mirrored(name)
        return True

    def remove_source(self, name: str) -> list[Version]:
        """Unregister a source; returns its versions (now garbage)."""
        src = self.source(name)
        if src is None:
            raise NotFound(f"no source named {name!r}")
        versions = self.versions(name)
        for v in versions:  # garbage now; collected when no reader holds them
            self.txn.delete(_version_key(name, v.id), db=self.dbs["versions"])
            self.put_garbage(dataclasses.replace(v, source=name))
        for kind in SourceInode:
            self.txn.delete(_u64(src.ino + kind), db=self.dbs["inodes"])
        for db in ("sources", "state", "requests", "checks"):
            self.txn.delete(name.encode(), db=self.dbs[db])
        self.changed(name)
        self.changed("")
        self.mirrored(name)
        return versions

    def change_tag(self, name: str, vid: str, add: str | None = None,
                   remove: str | None = None) -> Version:
        """Add or remove one tag of a version; returns the version as it is now."""
        v = self.version(name, vid)
        if v is None:
            raise NotFound(f"source {name!r} has no version {vid!r}")
        v = dataclasses.replace(v, tags=tags_after(v.tags, add, remove))
        self.put_version(name, v)
        self.changed(name)
        self.mirrored(name)
        return v

    def hold(self, name: str, vid: str, until: datetime) -> Version:
        """Hold a version until ``until``, or longer if an earlier hold reaches further
        (a hold only ever extends); returns the version as it is now."""
        v = self.version(name, vid)
        if v is None:
            raise NotFound(f"source {name!r} has no version {vid!r}")
        stamp = rfc3339(until)
        if v.held_until is None or v.held_until < stamp:  # RFC 3339 UTC sorts
            v = dataclasses.replace(v, held_until=stamp)
            self.put_version(name, v)
            self.changed(name)
            self.mirrored(name)  # replicas show holds
        return v

    def release(self, name: str, vid: str) -> Version:
        """End a version's hold (none: nothing to do); returns the version as it is now."""
        v = self.version(name, vid)
        if v is None:
            raise NotFound(f"source {name!r} has no version {vid!r}")
        if v.held_until is not None:
            v = dataclasses.replace(v, held_until=None)
            self.put_version(name, v)
            self.changed(name)
            self.mirrored(name)
        return v

    def set_pin(self, name: str, pinned: bool, vid: str | None) -> None:
        """Pin ``latest`` of ``name`` at ``vid`` (None: the first version to come), or unpin."""
        src = self.source(name)
        if src is None:
            raise NotFound(f"no source named {name!r}")
        self.put_source(name, dataclasses.replace(
            src, options={**src.options, "pinned": pinned}, pin=vid if pinned else None))
        self.changed(name)
        self.mirrored(name)

    def mark_damaged(self, reasons: dict[str, str], at: datetime | None = None
                     ) -> dict[str, list[tuple[str, Version]]]:
        """``Index.mark_damaged_many`` inside this transaction."""
        stamp = rfc3339(at or now_utc())
        todo = {}
        for sha256, reason in reasons.items():
            entry = self.blob_ref(sha256)
            if entry is not None and not entry.damaged:
                todo[sha256] = {"at": stamp, "reason": reason}
                self.put_blob_ref(sha256, dataclasses.replace(entry, damaged=todo[sha256]))
        marked: dict[str, list[tuple[str, Version]]] = {}
        for sha256, users in self.users_of_blobs(todo).items() if todo else ():
            mark = todo[sha256]
            marked[sha256] = []
            for source, v, live in users:
                if v.remote:
                    continue  # a replica's version whose bytes are not here: not hit
                src = self.source(source) if live else None
                if src is not None and src.mirror:
                    self.make_remote(source, v)  # a replica fetches it from the hub again
                    marked[sha256].append((source, v))
                    continue
                v = dataclasses.replace(v, damaged=mark)
                if not live:
                    self.put_garbage(v)
                    continue
                self.put_version(source, v)
                self.put_state(source, last_error={
                    "at": mark["at"],
                    "message": f"version {v.id} is damaged in the cache "
                               f"({mark['reason']}); it is not served and is being "
                               "downloaded again"})
                self.changed(source)
                self.mirrored(source)  # replicas not holding it stop asking for it
                marked[sha256].append((source, v))
        return marked

    def record_refresh(self, name: str, record: dict[str, Any]) -> None:
        """``Index.record_refresh`` inside this transaction."""
        if self.source(name) is None:
            return
        self.put_state(name, last_refresh=record)
        if record.get("error") != "interrupted":  # a stop, not an answer of the origin
            checks = self.checks(name)[-(CHECKS_KEPT - 1):]
            self._put("checks", name.encode(), [*checks, [round(record["started"]),
                                                          record["result"]]])

    # --- a replica's mirrored sources (replica.py) ------------------------------------

    def add_mirrored_version(self, name: str, record: Version) -> Version:
        """Add a version a hub has, under the hub's id. Bytes this cache holds already
        (the same sha256) count at once; else the version is ``"remote"``: no blob
        reference until its bytes arrive (replica.Replica.hold)."""
        ino = self.alloc_inodes(1)
        version = dataclasses.replace(record, ino=ino)
        blob = self.blob_ref(version.sha256)
        if blob and blob.refs > 0 and not blob.damaged:
            self.ref_blob(version.sha256, version.size)
            # the hub's mark: these bytes are sound here
            version = dataclasses.replace(version, damaged=None)
        else:  # not here, or damaged here: fetched from the hub
            version = dataclasses.replace(version, remote=True)
        self.put_version(name, version)
        self.put_inode(ino, InodeRef(kind="version", source=name, id=version.id))
        return version

    def add_mirrored_sources(self, sources: list[dict[str, Any]]) -> None:
        """Add sources a hub has and this index has not, each ``{"name", "url",
        "options", "pin", "versions"}`` (versions as ``add_mirrored_version`` takes
        them), with their versions, in few operations: a replica's first sync writes a
        whole hub (10,000 sources) a page at a time. One inode range for them all, one
        ``changes`` and one ``mirror`` entry per source (and one root entry), each
        counter written once."""
        count = sum(INODES_PER_SOURCE + len(s["versions"]) for s in sources)
        ino = self.alloc_inodes(count) if sources else 0
        added_at = _compact(rfc3339(now_utc()))
        inodes, blobs = self.dbs["inodes"], self.dbs["blobs"]
        kinds = [(int(kind), kind.name) for kind in SourceInode]
        options, options_json = None, ""  # most sources of a hub share their options
        for s in sources:
            name = s["name"]
            key = name.encode()
            quoted = _compact(name)
            if s["options"] != options or repr(s["options"]) != repr(options):
                options, options_json = s["options"], _compact(s["options"])
            # the record put_source writes (records.Source), encoded by hand: 10,000 of
            # them in a sync (test_records checks it against the codec)
            self.txn.put(key, ('{"url":%s,"options":%s,"ino":%d,"added_at":%s,"pin":%s,'
                               '"mirror":true}' % (_compact(s["url"]), options_json, ino,
                                                   added_at, _compact(s["pin"]))).encode(),
                         db=self.dbs["sources"])
            for offset, kind in kinds:
                self.txn.put(_u64(ino + offset), ('{"kind":"%s","source":%s}'
                                                  % (kind, quoted)).encode(), db=inodes)
            ino += INODES_PER_SOURCE
            for record in s["versions"]:
                version = {**record, "ino": ino}
                sha = record["sha256"].encode()
                raw = self.txn.get(sha, db=blobs)  # bytes held already: they count at once
                blob = decode(BlobEntry, raw) if raw is not None else None
                if blob and blob.refs > 0 and not blob.damaged:
                    self.ref_blob(record["sha256"], record["size"])
                    version.pop("damaged", None)
                else:
                    version["remote"] = True
                self.txn.put(key + b"\0" + record["id"].encode(),
                             _compact(version).encode(), db=self.dbs["versions"])
                self.txn.put(_u64(ino), ('{"kind":"version","source":%s,"id":%s}'
                                         % (quoted, _compact(record["id"]))).encode(),
                             db=inodes)
                ino += 1
        names = [s["name"] for s in sources]
        self.changed_many([*names, ""] if names else [])
        self.mirrored_many(names)

    def changed_many(self, names: list[str]) -> None:
        """``changed`` of each of ``names``, in order, the counter written once."""
        self._log_many("changes", b"seq", self.seq(), names)

    def mirrored_many(self, names: list[str]) -> None:
        """``mirrored`` of each of ``names``, in order, the serial written once."""
        self._log_many("mirror", b"mirror_serial", self.mirror_serial(), names)

    def _log_many(self, db: str, counter: bytes, last: int, names: list[str]) -> None:
        """Append ``names`` to the feed ``db`` (``changes`` or ``mirror``) after entry
        ``last``, move ``meta`` ``counter`` on, and trim it to CHANGES_KEPT entries."""
        if not names:
            return
        table = self.dbs[db]
        for i, name in enumerate(names, last + 1):
            self.txn.put(_u64(i), name.encode(), db=table)
        now = last + len(names)
        self.txn.put(counter, _u64(now), db=self.dbs["meta"])
        for old in range(max(1, last + 1 - CHANGES_KEPT), now - CHANGES_KEPT + 1):
            self.txn.delete(_u64(old), db=table)

    def make_remote(self, name: str, version: Version) -> bool:
        """A replica's mirrored version whose bytes go here (evicted, or found damaged)
        stays listed as ``"remote"``: its bytes come from the hub again when wanted
        (replica.py). True if its blob lost its last user (the file may then go)."""
        self.put_version(name, dataclasses.replace(version, damaged=None, remote=True))
        self.changed(name)
        return self.unref_blob(version.sha256)

    def retire_version(self, name: str, version: Version) -> None:
        """A version the hub dropped: garbage now, collected when no reader holds it."""
        self.txn.delete(_version_key(name, version.id), db=self.dbs["versions"])
        self.put_garbage(dataclasses.replace(version, source=name))

    def request_refresh(self, name: str) -> None:
        """Ask the running mount to check ``name`` now (its change watcher takes it)."""
        if self.source(name) is None:
            raise NotFound(f"no source named {name!r}")
        self.txn.put(name.encode(), b"refresh", db=self.dbs["requests"])
        self.changed(name)


class Index:
    def __init__(self, path: Path, readonly: bool = False) -> None:
        """``readonly``: for a reader that must never wait for the writer lock, not
        even at open (a worker process of the mount, offload.py); the index exists."""
        self.path = path
        self.readonly = readonly
        try:
            if not readonly:
                path.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.env = lmdb.open(
                str(path), map_size=MAP_SIZE, max_dbs=12, max_readers=1024, subdir=True,
                mode=0o600, readonly=readonly
            )
        except (OSError, lmdb.Error) as e:
            raise CacheError(f"cannot open the index in {path}: {e}") from None
        names = ("meta", "sources", "versions", "state", "inodes", "changes", "requests",
                 "blobs", "garbage", "mirror", "checks")
        self.dbs = {n: self.env.open_db(n.encode(), create=not readonly) for n in names}
        # the mount's queued state (writes.IndexWrites): seen by its read transactions
        self.queued_state: dict[str, dict[str, Any]] | None = None
        self.queued_posts = 0  # changes of it so far
        if readonly:
            return
        with self.write() as w:
            fmt = w.txn.get(b"format", db=self.dbs["meta"])
            if fmt is None:
                w.txn.put(b"format", FORMAT, db=self.dbs["meta"])
            elif fmt != FORMAT:
                raise CacheError(
                    f"the index in {path} has format {fmt.decode(errors='replace')}, "
                    f"this buffyfs reads format {FORMAT.decode()}"
                )

    def close(self) -> None:
        self.env.close()

    def last_change(self) -> int:
        """``last_commit``, also moved by state the mount queued (``queued_state``)."""
        return self.last_commit() + self.queued_posts

    def last_commit(self) -> int:
        """The id of the last committed write transaction, by any process: it differs
        whenever anything in the index changed (cheap: no transaction)."""
        return self.env.info()["last_txnid"]

    @contextmanager
    def read(self) -> Iterator[Reader]:
        with self.env.begin(write=False) as txn:
            reader = Reader(txn, self.dbs)
            reader.queued_state = self.queued_state
            try:
                yield reader
            finally:
                # A Reader left bound to a variable (say in a suspended coroutine) must
                # not keep the transaction, and so an LMDB reader slot, alive.
                reader.txn = None  # type: ignore[assignment]

    @contextmanager
    def write(self) -> Iterator[Writer]:
        try:
            with self.env.begin(write=True) as txn:
                writer = Writer(txn, self.dbs)
                try:
                    yield writer
                finally:
                    writer.txn = None  # type: ignore[assignment]
        except lmdb.Error as e:
            raise CacheError(f"index write failed: {e}") from None

    # --- one-transaction conveniences -------------------------------------------------

    def source_names(self) -> list[str]:
        """Every source's name (20,000 take ~0.1 s: the mount reads them in a worker
        thread, not on its loop)."""
        with self.read() as r:
            return r.source_names()

    def get_source(self, name: str) -> Source:
        with self.read() as r:
            src = r.source(name)
        if src is None:
            raise NotFound(f"no source named {name!r}")
        return src

    def add_source(
        self, name: str, url: str, options: dict[str, Any], replace: bool = False
    ) -> bool:
        """Register (or, with ``replace``, update) a source. Returns True if anything changed."""
        with self.write() as w:
            return w.add_source(name, url, options, replace)

    def remove_source(self, name: str) -> list[Version]:
        """Unregister a source; returns its versions (now garbage)."""
        with self.write() as w:
            return w.remove_source(name)

    def update_source_options(
        self, name: str, update: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> None:
        with self.write() as w:
            src = w.source(name)
            if src is None:
                raise NotFound(f"no source named {name!r}")
            w.put_source(name, dataclasses.replace(src, options=update(src.options)))
            w.changed(name)
            w.mirrored(name)

    def commit_version(
        self, name: str, record: dict[str, Any], fetched_at: datetime
    ) -> Version | None:
        """Add a version and record the successful check, in one transaction.

        Returns the new version, or None when the content equals the newest
        version's (then only the check is recorded) or the source is gone.
        """
        with self.write() as w:
            src = w.source(name)
            if src is None:
                return None
            versions = w.versions(name)
            stamp = rfc3339(fetched_at)
            w.put_state(
                name, last_check=stamp, last_success=stamp, consecutive_failures=0,
                last_error=None, progress=None,
            )
            if versions and versions[0].sha256 == record["sha256"]:
                return None
            # Ids are unique within the source; content seen earlier in the same
            # second (A, B, A) moves the stamp on by a second.
            when = fetched_at
            if versions and versions[0].fetched_at >= rfc3339(when):
                when = parse_rfc3339(versions[0].fetched_at) + timedelta(seconds=1)
            vid = version_id(when, record["sha256"])
            ino = w.alloc_inodes(1)
            blob = w.blob_ref(record["sha256"])
            version = from_dict(Version, {
                **record, "id": vid, "fetched_at": rfc3339(when), "ino": ino,
                "tags": list(record.get("tags", [])),
                # every user of a damaged blob is damaged
                "damaged": blob.damaged if blob else None})
            w.put_version(name, version)
            w.put_inode(ino, InodeRef(kind="version", source=name, id=vid))
            w.ref_blob(version.sha256, version.size)
            if src.options.get("pinned") and not src.pin:
                # pinned before any version: the first one holds
                w.put_source(name, dataclasses.replace(src, pin=vid))
            w.changed(name)
            w.mirrored(name)
        return version

    def blob_damaged(self, sha256: str) -> bool:
        with self.read() as r:
            entry = r.blob_ref(sha256)
        return bool(entry and entry.damaged)

    def mark_damaged(self, sha256: str, reason: str, at: datetime | None = None
                     ) -> list[tuple[str, Version]] | None:
        """Mark a blob and every version using it (of any source) damaged, in one
        transaction, and name it in each source's ``last_error``.

        A replica's mirrored version is not marked: it turns ``"remote"`` again
        (``make_remote``), its bytes to be fetched from the hub.

        Returns the live (source, version) pairs marked: their sources should download
        again. None when nothing was marked: the blob is marked already, or no version
        uses it any more (collected meanwhile: a missing file is then no damage).
        """
        with self.write() as w:
            return w.mark_damaged({sha256: reason}, at).get(sha256)

    def mark_damaged_many(self, reasons: dict[str, str], at: datetime | None = None
                          ) -> dict[str, list[tuple[str, Version]]]:
        """``mark_damaged`` of several blobs (sha256 -> reason) in one transaction and
        one scan of the versions (a scrub pass); only the blobs marked now are in the
        answer."""
        with self.write() as w:
            return w.mark_damaged(reasons, at)

    def clear_damage(self, sha256: str) -> list[str]:
        """Fresh bytes replaced the blob file: drop the marks (blob and versions).
        Returns the live sources whose versions were marked."""
        sources = []
        with self.write() as w:
            entry = w.blob_ref(sha256)
            if entry is None or not entry.damaged:
                return []
            w.put_blob_ref(sha256, dataclasses.replace(entry, damaged=None))
            for source, v, live in w.users_of_blob(sha256):
                v = dataclasses.replace(v, damaged=None)
                if not live:
                    w.put_garbage(v)
                    continue
                w.put_version(source, v)
                w.changed(source)
                w.mirrored(source)
                sources.append(source)
        return sources

    def newest_sha256(self, name: str) -> str | None:
        with self.read() as r:
            newest = next(r.versions_newest_first(name), None)
            return newest.sha256 if newest else None

    def change_tag(self, name: str, vid: str, add: str | None = None,
                   remove: str | None = None) -> Version:
        """Add or remove one tag of a version, in one transaction."""
        with self.write() as w:
            return w.change_tag(name, vid, add, remove)

    def set_pin(self, name: str, pinned: bool, vid: str | None) -> None:
        with self.write() as w:
            w.set_pin(name, pinned, vid)

    def record_check(self, name: str, at: datetime, **fields: Any) -> None:
        with self.write() as w:
            if w.source(name) is not None:
                w.put_state(name, last_check=rfc3339(at), **fields)

    def record_failure(self, name: str, at: datetime, message: str) -> int:
        """Record a failed refresh; returns the count of consecutive failures."""
        with self.write() as w:
            if w.source(name) is None:
                return 0
            state = w.state(name)
            failures = state.consecutive_failures + 1
            w.put_state(
                name, last_check=rfc3339(at), consecutive_failures=failures,
                last_error={"at": rfc3339(at), "message": message}, progress=None,
            )
            w.changed(name)
        return failures

    def set_state(self, name: str, **fields: Any) -> None:
        with self.write() as w:
            if w.source(name) is not None:
                w.put_state(name, **fields)

    def record_refresh(self, name: str, record: dict[str, Any]) -> None:
        """Leave how a refresh ended as the state's ``last_refresh`` and append it to
        the source's bounded ``checks`` history, in one transaction."""
        with self.write() as w:
            w.record_refresh(name, record)

    def request_refresh(self, name: str) -> None:
        with self.write() as w:
            w.request_refresh(name)

    def take_refresh_requests(self) -> list[str]:
        with self.write() as w:
            with w.txn.cursor(db=self.dbs["requests"]) as cur:
                names = [k.decode() for k in cur.iternext(keys=True, values=False)]
            for n in names:
                w.txn.delete(n.encode(), db=self.dbs["requests"])
        return names

    def changes_since(self, seq: int, skip: Collection[tuple[int, int]] = ()
                      ) -> tuple[int, set[str] | None]:
        """The current seq and the names changed after ``seq``; None if too old to tell.
        Entries in the ranges (after, upto] of ``skip`` are left out unread: the cursor
        jumps over them (a collection writes thousands, whose pages the reader then
        neither maps nor walks)."""
        with self.read() as r:
            now = r.seq()
            if now == seq:
                return now, set()
            if now - seq > CHANGES_KEPT - 1 or seq > now:
                return now, None
            names = set()
            gaps = sorted((after, upto) for after, upto in skip if upto > seq)
            with r.txn.cursor(db=self.dbs["changes"]) as cur:
                pos = seq + 1  # the next entry to read
                for after, upto in [*gaps, (now, now)]:
                    if after >= pos and cur.set_range(_u64(pos)):
                        for k, v in cur:
                            if _from_u64(k) > after:
                                break
                            names.add(v.decode())
                    pos = max(pos, upto + 1)
            return now, names

    def mirror_changes_since(self, serial: int) -> tuple[int, set[str] | None]:
        """The current mirror serial and the sources whose mirrored state changed after
        ``serial``; None if that is too old (trimmed) or from another index to tell."""
        with self.read() as r:
            now = r.mirror_serial()
            if now == serial:
                return now, set()
            if now - serial > CHANGES_KEPT - 1 or serial > now or serial < 0:
                return now, None
            names = set()
            with r.txn.cursor(db=self.dbs["mirror"]) as cur:
                if cur.set_range(_u64(serial + 1)):
                    for _k, v in cur:
                        names.add(v.decode())
            return now, names
