"""Garbage collection: the retention rules, the hard quota, and orphan sweeping.

Retention, per source: keep ``latest``, the pinned version, the newest ``valid``
version, every ``keep``-tagged version, every held one (``hold``, until its
``held_until``), the ``keep_versions`` newest others, and the versions inside their
``keep_for`` grace. Everything else is garbage, and so is every version of a removed
source (the ``garbage`` table; a hold does not outlive its source).

The quota (``max_cache_size``) may also evict what only ``keep_versions`` and the
grace keep: first the versions outside any grace, oldest first, then, only when
nothing else is left, those inside their grace, oldest first. It never evicts
``latest``, the pin, the newest ``valid``, a ``keep`` version, a held version, or a
version some reader has open: a download that cannot fit then fails (CacheFull).

The grace of a version starts when it stops being ``latest``, which is when the next
newer servable version was committed: that version's ``fetched_at``. Deriving it
(rather than stamping each version as it is superseded) needs no write on the many
paths that move ``latest`` and cannot go stale. Versions that never served as
``latest`` in that way get no grace: ``failed`` or damaged ones, and (seen from a
pin) the pin's predecessor when the pin moved ``latest`` back.

A replica's mirrored version is listed as long as its hub has it: what collects it
here drops its bytes only, and it turns ``"remote"`` again (Writer.make_remote).

``kept_reasons`` says why each version is kept; ``buffyfs gc --dry-run`` and
``@status`` show it.

Order of work, so that a crash at any point loses nothing committed:
  0. the plan reads a snapshot (a read transaction: no writer waits for it);
  1. short index transactions drop the doomed versions and their blob references,
     each re-checking that what it drops is still unprotected and not open (``commit``);
  2. then the blob files that lost their last reference are unlinked (in a worker
     thread: it may wait for the commit lock).
A crash between 1 and 2 leaves orphan blob files, which ``sweep_orphans`` removes.
Blob files are only unlinked under the exclusive commit lock (``CommitLock``), which
a download holds shared from the moment its blob is in place until its version is
committed, so a blob being committed is never mistaken for an orphan.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from buffyfs import crash
from buffyfs.errors import BuffyError
from buffyfs.options import human_size, parse_duration
from buffyfs.store.blobs import BlobStore, FileLock, SourceLock
from buffyfs.store.index import (
    Index,
    Reader,
    Writer,
    held_until,
    now_utc,
    parse_rfc3339,
    resolve_latest,
    rfc3339,
    servable,
)
from buffyfs.store.records import Source, Version
from buffyfs.store.unpack import DerivedStore

log = logging.getLogger(__name__)


class CacheFull(BuffyError):
    pass


@dataclass
class Doomed:
    source: str
    version: Version
    reason: str  # "retention", "source removed" or "quota"


@dataclass
class Kept:
    source: str
    id: str
    reasons: list[Why]


@dataclass
class Report:
    doomed: list[Doomed] = field(default_factory=list)
    freed: dict[str, int] = field(default_factory=dict)  # source -> bytes of blobs freed
    orphans: list[str] = field(default_factory=list)  # orphan blob files and partials removed
    unlink: list[str] = field(default_factory=list)  # blobs whose last user went
    kept: list[Kept] = field(default_factory=list)  # what stays and why (dry runs only)
    wake_at: str | None = None  # the earliest end of a hold or grace: collect again then
    # entries (after, upto] of the index's changes log that the commits wrote
    changes: list[tuple[int, int]] = field(default_factory=list)
    # (source, version id, reason) of what a commit in a worker process dropped: its
    # records stay there (``slim``), the mount needs no more (offload.py)
    gone: list[tuple[str, str, str]] = field(default_factory=list)
    # a dry run planned in a worker process: its whole report as ``report_json``'s JSON,
    # encoded there (the mount passes it on to ``buffyfs gc`` without decoding it)
    answer: bytes | None = None

    @property
    def total(self) -> int:
        return sum(self.freed.values())

    def collected(self) -> list[tuple[str, str, str]]:
        """(source, version id, reason) of every version dropped (or, in a plan, to
        drop)."""
        return [(d.source, d.version.id, d.reason) for d in self.doomed] + self.gone

    def slim(self) -> Report:
        """This report with its dropped versions as ``gone`` names, not records: what a
        worker process sends back (a few bytes per version, nothing to decode)."""
        return Report(freed=self.freed, orphans=self.orphans, unlink=self.unlink,
                      wake_at=self.wake_at, changes=self.changes, gone=self.collected())


def report_json(report: Report) -> dict[str, Any]:
    """The report as ``buffyfs gc`` gets it (``gc_result``'s ``report``)."""
    return {
        "versions": [{"source": source, "id": vid, "reason": reason}
                     for source, vid, reason in report.collected()],
        "freed": report.freed,
        "total": report.total,
        "orphans": report.orphans,
        "kept": [{"source": k.source, "id": k.id, "reasons": [str(w) for w in k.reasons]}
                 for k in report.kept],
    }


@dataclass(frozen=True)
class Why:
    """One reason a version is kept: latest, pinned, valid, keep tag, held (until),
    grace (until), keep_versions or open."""

    kind: str
    until: str | None = None  # RFC 3339, for held and grace

    def __str__(self) -> str:
        return f"{self.kind} until {self.until}" if self.until else self.kind


EVICTABLE = frozenset({"keep_versions", "grace"})  # the quota may evict these (grace last)


def grace_ends(src: Source, versions: list[Version]) -> dict[str, datetime]:
    """When the ``keep_for`` grace of each superseded servable version ends, by id
    (``versions`` newest first): ``keep_for`` after the ``fetched_at`` of the next
    newer servable version, the moment it took over as ``latest``."""
    keep_for = parse_duration(src.options.get("keep_for", "0s"), "keep_for",
                              allow_zero=True)
    if not keep_for:
        return {}
    ends: dict[str, datetime] = {}
    successor: str | None = None  # fetched_at of the oldest newer servable version
    for v in versions:
        if not servable(v):
            continue
        if successor is not None:
            ends[v.id] = parse_rfc3339(successor) + timedelta(seconds=keep_for)
        successor = v.fetched_at
    return ends


def kept_reasons(src: Source, versions: list[Version], now: datetime,
                 open_inos: Collection[int] = ()) -> dict[str, list[Why]]:
    """Why each version of a source is kept, by id (``versions`` newest first); an
    empty list: the version is garbage."""
    why: dict[str, list[Why]] = {v.id: [] for v in versions}
    latest = resolve_latest(src, versions)
    if latest:
        why[latest.id].append(Why("latest"))
    if src.pin in why:
        why[src.pin].append(Why("pinned"))
    newest_valid = next((v for v in versions if "valid" in v.tags), None)
    if newest_valid:
        why[newest_valid.id].append(Why("valid"))
    for v in versions:
        if "keep" in v.tags:
            why[v.id].append(Why("keep tag"))
        until = held_until(v, now)
        if until:
            why[v.id].append(Why("held", until))
    grace = grace_ends(src, versions)
    limit = src.options.get("keep_versions", 5)
    others = 0
    for v in versions:
        reasons = why[v.id]
        if reasons:
            continue  # kept whatever the counts say
        if others < limit:
            reasons.append(Why("keep_versions"))
        others += 1
        end = grace.get(v.id)
        if end is not None and end > now:
            reasons.append(Why("grace", rfc3339(end)))
    for v in versions:
        if v.ino in open_inos:
            why[v.id].append(Why("open"))
    return why


def protected_ids(source: Source, versions: list[Version],
                  now: datetime | None = None) -> set[str]:
    """Ids neither rule nor quota may collect: latest, the pin, the newest valid
    version, the keep-tagged and the held ones."""
    why = kept_reasons(source, versions, now or now_utc())
    return {vid for vid, reasons in why.items()
            if any(w.kind not in EVICTABLE for w in reasons)}


def _next_end(reasons: list[Why], soonest: str | None) -> str | None:
    """The earlier of ``soonest`` and the end of a hold or grace among ``reasons``: only
    of a version nothing else keeps (else its hold ending frees nothing, and a mount
    with ``keep_for`` everywhere would collect every few seconds)."""
    if any(w.until is None for w in reasons):
        return soonest
    for w in reasons:
        if w.until and (soonest is None or w.until < soonest):
            soonest = w.until
    return soonest


@dataclass
class Retention:
    doomed: list[Doomed]  # garbage by the retention rules
    extras: list[Doomed]  # what the quota may evict, in eviction order
    kept: list[Kept]  # every version kept, and why
    wake_at: str | None  # the earliest end of a hold or grace: collect again then


def retention_garbage(r: Reader, open_inos: set[int], now: datetime | None = None
                      ) -> Retention:
    """What the retention rules keep and drop, and what the quota may evict."""
    now = now or now_utc()
    doomed: list[Doomed] = []
    extras: list[tuple[bool, str, Doomed]] = []  # (in grace, fetched_at, candidate)
    kept: list[Kept] = []
    soonest: str | None = None
    for name, src in r.sources():
        versions = r.versions(name)
        why = kept_reasons(src, versions, now, open_inos)
        for v in versions:
            reasons = why[v.id]
            soonest = _next_end(reasons, soonest)
            kinds = {w.kind for w in reasons}
            if not kinds:
                if not v.remote:  # remote: a replica's, no bytes here to drop
                    doomed.append(Doomed(name, v, "retention"))
                continue
            kept.append(Kept(name, v.id, reasons))
            if kinds <= EVICTABLE and not v.remote:
                extras.append((("grace" in kinds), v.fetched_at, Doomed(name, v, "quota")))
    for g in r.garbage():
        if g.ino not in open_inos:
            doomed.append(Doomed(g.source, g, "source removed"))
    extras.sort(key=lambda e: (e[0], e[1]))
    return Retention(doomed, [d for _, _, d in extras], kept, soonest)


def seconds_until(stamp: str | None, longest: float) -> float:
    """Seconds from now until ``stamp`` (RFC 3339) has passed, at most ``longest``."""
    if stamp is None:
        return longest
    left = (parse_rfc3339(stamp) - datetime.now(UTC)).total_seconds()
    return min(longest, max(0.0, left) + 0.1)


def _freed_by(r: Reader, doomed: Iterable[Doomed]) -> dict[str, int]:
    """Bytes freed per source if ``doomed`` go (a blob counts when its last user goes)."""
    entries = r.blob_refs()
    refs = {sha: e.refs for sha, e in entries.items()}
    freed: dict[str, int] = {}
    for d in doomed:
        sha = d.version.sha256
        freed.setdefault(d.source, 0)
        if sha not in refs:
            continue
        refs[sha] -= 1
        if refs[sha] == 0:
            freed[d.source] += entries[sha].size
    return freed


def plan(r: Reader, open_inos: set[int], need: int = 0,
         max_size: int | None = None, now: datetime | None = None) -> Report:
    """What a collection would drop so that ``need`` more bytes fit under ``max_size``.

    Raises CacheFull when even evicting every unprotected version is not enough.
    """
    retention = retention_garbage(r, open_inos, now)
    doomed, extras = retention.doomed, retention.extras
    freed = _freed_by(r, doomed)
    if max_size is not None:
        used = r.blob_bytes() - sum(freed.values())
        while used + need > max_size and extras:
            doomed.append(extras.pop(0))
            freed = _freed_by(r, doomed)
            used = r.blob_bytes() - sum(freed.values())
        if used + need > max_size and need > 0:
            raise CacheFull(
                f"cache full: {human_size(need)} more do not fit in max_cache_size "
                f"{human_size(max_size)} ({human_size(used)} held by versions that may not "
                "be evicted: latest, the "
                "newest valid, keep-tagged, pinned or open ones)")
        if used > max_size:
            log.warning("cache over max_cache_size by %d bytes of protected versions",
                        used - max_size)
    evicted = {(d.source, d.version.id) for d in doomed if d.reason == "quota"}
    kept = [k for k in retention.kept if (k.source, k.id) not in evicted]
    return Report(doomed=doomed, freed=freed, kept=kept, wake_at=retention.wake_at)


class CommitLock(FileLock):
    """flock on ``partial/.commit.lock``: shared while a blob waits for its index
    commit, exclusive while blob files are unlinked."""

    def __init__(self, blobs: BlobStore) -> None:
        super().__init__(blobs.partial_dir / ".commit.lock")  # no source name starts with "."


COMMIT_BATCH = 256  # doomed versions per write transaction: each holds the writer briefly


def plan_snapshot(index: Index, open_inos: set[int], need: int = 0,
                  max_size: int | None = None) -> Report:
    """``plan`` in a read transaction: it never holds LMDB's writer lock, so it may take
    seconds (in a worker thread) while others write. What it dooms is re-checked by
    ``commit``."""
    with index.read() as r:
        return plan(r, open_inos, need, max_size)


def commit(index: Index, doomed: list[Doomed], open_inos: set[int] | None = None,
           progress: dict[str, Any] | None = None) -> Report:
    """Drop ``doomed`` (a plan made earlier, in a snapshot) in ONE write transaction,
    re-checking each version against the index as it is now: it must still exist (same
    inode), not be protected (latest, newest valid, keep, pin: ``protected_ids`` over
    the source's versions now) and not be in ``open_inos``. The others are skipped.

    Keep ``doomed`` short (``COMMIT_BATCH``): the transaction holds the writer lock.
    ``progress``, if given, is written as ``meta`` ``gc_progress`` in the same
    transaction (what a waiting ``buffyfs gc`` watches). Returns what was dropped,
    with the blob files to unlink (``unlink_blobs``).
    """
    report = Report()
    skipped = 0
    with index.write() as w:
        first = w.seq()
        protected: dict[str, set[str]] = {}  # source -> protected ids, now
        for d in doomed:
            v = d.version
            if open_inos is not None and v.ino in open_inos:
                skipped += 1
                continue
            if d.reason == "source removed":
                still = w.version_by_inode(v.ino)
                if still is None or still[0] != d.source:
                    skipped += 1  # collected meanwhile
                    continue
            else:
                now = w.version(d.source, v.id)
                if now is None or now.ino != v.ino:
                    skipped += 1
                    continue
                if d.source not in protected:
                    src = w.source(d.source)
                    protected[d.source] = protected_ids(src, w.versions(d.source)) \
                        if src else set()
                if v.id in protected[d.source]:
                    skipped += 1  # tagged keep, pinned, or latest again since the plan
                    continue
            entry = w.blob_ref(v.sha256)
            report.freed.setdefault(d.source, 0)
            if d.reason != "source removed" and getattr(w.source(d.source), "mirror", False):
                # a replica's version stays listed while the hub has it: its bytes go
                if not now.remote and w.make_remote(d.source, now):
                    report.unlink.append(v.sha256)
                    report.freed[d.source] += entry.size if entry else 0
                report.doomed.append(d)
                continue
            if w.drop_version(d.source, v):
                report.unlink.append(v.sha256)
                report.freed[d.source] += entry.size if entry else 0
            report.doomed.append(d)
        if progress is not None:
            w.put_meta_json("gc_progress", progress)
        report.changes.append((first, w.seq()))
    for d in report.doomed:
        log.info("%s: collected version %s (%s)", d.source, d.version.id, d.reason)
    if skipped:
        log.info("collection: %d version(s) kept after all (open, protected or gone "
                 "since the plan)", skipped)
    crash.point("gc-after-commit")  # orphans left here are swept on the next start
    return report


def merge(into: Report, part: Report) -> None:
    into.doomed += part.doomed
    into.gone += part.gone
    into.unlink += part.unlink
    into.changes += part.changes
    for source, n in part.freed.items():
        into.freed[source] = into.freed.get(source, 0) + n


def collect(index: Index, blobs: BlobStore, open_inos: set[int], need: int = 0,
            max_size: int | None = None, dry_run: bool = False) -> Report:
    """Decide and commit a collection (and room for ``need`` bytes under ``max_size``).

    The plan reads a snapshot; the commit is short write transactions of
    ``COMMIT_BATCH`` versions, each re-checking what it drops (``commit``), so no
    version protected meanwhile (tagged, pinned) is lost and other writers wait for
    one batch at most. The blob files that lost their last user are in
    ``report.unlink``: pass them to ``unlink_blobs`` (which may wait for a download's
    commit, so not on an event loop).
    """
    planned = plan_snapshot(index, open_inos, need, max_size)
    if dry_run:
        return planned
    report = Report(wake_at=planned.wake_at)
    for start in range(0, len(planned.doomed), COMMIT_BATCH):
        merge(report, commit(index, planned.doomed[start:start + COMMIT_BATCH], open_inos))
    return report


def unlink_blobs(index: Index, blobs: BlobStore, shas: list[str]) -> None:
    """Delete blob files that have no user, under the exclusive commit lock.

    A download may have committed a version of the same bytes since the collection
    decided (its blob rename found the file still there): such blobs are kept.
    """
    if not shas:
        return
    lock = CommitLock(blobs)
    lock.acquire(exclusive=True)
    try:
        with index.read() as r:
            still_unused = [sha for sha in shas if r.blob_ref(sha) is None]
        derived = DerivedStore(blobs.root)
        for sha in still_unused:  # string paths: pathlib's Python time holds the loop
            with contextlib.suppress(FileNotFoundError):
                os.unlink(blobs.path_str(sha))
            derived.remove(sha)  # its unpacked view goes with it
    finally:
        lock.release()


def collect_now(index: Index, blobs: BlobStore, open_inos: set[int], need: int = 0,
                max_size: int | None = None, dry_run: bool = False) -> Report:
    """``collect`` and ``unlink_blobs`` in one go, for the command line (blocking)."""
    report = collect(index, blobs, open_inos, need, max_size, dry_run)
    unlink_blobs(index, blobs, report.unlink)
    return report


def _drop(w: Writer, doomed: list[Doomed]) -> list[str]:
    gone = []
    for d in doomed:
        if w.drop_version(d.source, d.version):
            gone.append(d.version.sha256)
    return gone


def sweep_orphans(index: Index, blobs: BlobStore,
                  key_of: Callable[[Source], str] | None = None) -> list[str] | None:
    """Remove blob files no version uses and partial files no download will resume.

    Returns what it removed, or None when it had to skip: some download is between
    blob and commit right now (the caller tries again later).
    """
    lock = CommitLock(blobs)
    if not lock.acquire(exclusive=True, blocking=False):
        return None
    removed: list[str] = []
    try:
        sweep_strays(blobs)
        with index.read() as r:
            refs = set(r.blob_refs())
        for sub in sorted(blobs.blob_dir.iterdir()):
            for f in sorted(sub.iterdir()) if sub.is_dir() and not sub.is_symlink() else []:
                if f.name not in refs:
                    f.unlink(missing_ok=True)
                    removed.append(str(f.relative_to(blobs.root)))
        derived = DerivedStore(blobs.root)
        for sha in derived.stored():
            if sha not in refs:  # its blob's last version went before its unpack did
                derived.remove(sha)
                removed.append(str(derived.path(sha).relative_to(blobs.root)))
        for path in removed:
            log.info("removed orphan %s", path)
        removed += sweep_partials(index, blobs, key_of)
    finally:
        lock.release()
    return removed


def sweep_strays(blobs: BlobStore) -> list[str]:
    """Remove what is neither a regular file nor a blob directory from ``partial/``
    and ``blobs/`` (symlinks, fifos, devices...): buffyfs never makes such entries, so
    someone planted them; a version whose blob was one is then missing its blob."""
    removed = []
    for path, kind in blobs.stray_entries():
        name = str(path.relative_to(blobs.root))
        try:
            if kind == "directory":  # rmtree never follows the links inside
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)  # the entry itself, not what a link points to
        except OSError as e:
            log.warning("cannot remove %s from the cache (a %s): %s", name, kind, e.strerror)
            continue
        removed.append(name)
        log.warning("removed %s from the cache: a %s, not a regular file", name, kind)
    return removed


def sweep_partials(index: Index, blobs: BlobStore,
                   key_of: Callable[[Source], str] | None = None) -> list[str]:
    """Remove the partial files no download owns and none will resume.

    A partial file ``partial/NAME.part`` is kept while its download runs (someone holds
    ``partial/NAME.lock``), and while source NAME exists with a saved resume point for
    the request it would make now (``key_of(source)``, refresh.partial_key): a refresh
    that failed keeps its partial so that the next one continues it. Anything else (a
    removed source, no resume point, a URL or request changed since) is swept, and so
    is the lock file of a removed source. Without ``key_of``, any saved resume point
    keeps its partial. Returns what it removed, relative to the cache directory.
    """
    removed: list[str] = []
    names = sorted({f.name.rsplit(".", 1)[0] for pattern in ("*.part", "*.lock")
                    for f in blobs.partial_dir.glob(pattern) if not f.name.startswith(".")})
    for name in names:
        partial = blobs.partial_path(name)
        lock = SourceLock(blobs.lock_path(name))
        if not lock.try_acquire():
            continue  # being downloaded right now
        try:
            with index.read() as r:  # read under the lock: no download starts meanwhile
                source = r.source(name)
                saved = r.state(name).partial if source is not None else None
            stale = key_of is not None and saved and saved.get("key") != key_of(source)
            present = partial.exists() or partial.is_symlink()
            if (source is None or not saved or stale) and present:
                partial.unlink(missing_ok=True)
                removed.append(str(partial.relative_to(blobs.root)))
            if source is None:  # unlinked while held: a new download makes a new one
                blobs.lock_path(name).unlink(missing_ok=True)
        finally:
            lock.release()
    for path in removed:
        log.info("removed %s: no download owns it or will resume it", path)
    return removed
