"""Garbage collection: the retention rules, the hard quota, and orphan sweeping.

Retention, per source: keep ``latest``, the newest ``valid`` version, every
``keep``-tagged version and the ``keep_versions`` newest others. Everything else is
garbage, and so is every version of a removed source (the ``garbage`` table).
The quota (``max_cache_size``) may also evict the ``keep_versions`` extras, oldest
first; it never evicts ``latest``, the newest ``valid``, a ``keep`` version, or a
version some reader has open.

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

import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from buffyfs import crash
from buffyfs.blobs import BlobStore, FileLock, SourceLock
from buffyfs.errors import BuffyError
from buffyfs.index import Index, Reader, Writer, resolve_latest

log = logging.getLogger(__name__)


class CacheFull(BuffyError):
    pass


@dataclass
class Doomed:
    source: str
    version: dict[str, Any]
    reason: str  # "retention", "source removed" or "quota"


@dataclass
class Report:
    doomed: list[Doomed] = field(default_factory=list)
    freed: dict[str, int] = field(default_factory=dict)  # source -> bytes of blobs freed
    orphans: list[str] = field(default_factory=list)  # orphan blob files and partials removed
    unlink: list[str] = field(default_factory=list)  # blobs whose last user went

    @property
    def total(self) -> int:
        return sum(self.freed.values())


def protected_ids(source: dict[str, Any], versions: list[dict[str, Any]]) -> set[str]:
    """Ids no rule may collect: latest, the newest valid version, the keep-tagged ones,
    and the pinned one."""
    keep = {v["id"] for v in versions if "keep" in v.get("tags", ())}
    if source.get("pin"):
        keep.add(source["pin"])
    latest = resolve_latest(source, versions)
    if latest:
        keep.add(latest["id"])
    newest_valid = next((v for v in versions if "valid" in v.get("tags", ())), None)
    if newest_valid:
        keep.add(newest_valid["id"])
    return keep


def retention_garbage(r: Reader, open_inos: set[int]) -> tuple[list[Doomed], list[Doomed]]:
    """(garbage by the retention rules, quota candidates oldest first)."""
    doomed: list[Doomed] = []
    extras: list[Doomed] = []
    for name, src in r.sources():
        versions = r.versions(name)
        keep = protected_ids(src, versions)
        others = [v for v in versions if v["id"] not in keep]
        limit = src["options"].get("keep_versions", 5)
        for i, v in enumerate(others):
            if v["ino"] in open_inos:
                continue
            (extras if i < limit else doomed).append(
                Doomed(name, v, "quota" if i < limit else "retention"))
    for g in r.garbage():
        if g["ino"] not in open_inos:
            doomed.append(Doomed(g["source"], g, "source removed"))
    extras.sort(key=lambda d: d.version["fetched_at"])
    return doomed, extras


def _freed_by(r: Reader, doomed: Iterable[Doomed]) -> dict[str, int]:
    """Bytes freed per source if ``doomed`` go (a blob counts when its last user goes)."""
    refs = {sha: dict(e) for sha, e in r.blob_refs().items()}
    freed: dict[str, int] = {}
    for d in doomed:
        entry = refs.get(d.version["sha256"])
        freed.setdefault(d.source, 0)
        if entry is None:
            continue
        entry["refs"] -= 1
        if entry["refs"] == 0:
            freed[d.source] += entry["size"]
    return freed


def plan(r: Reader, open_inos: set[int], need: int = 0,
         max_size: int | None = None) -> Report:
    """What a collection would drop so that ``need`` more bytes fit under ``max_size``.

    Raises CacheFull when even evicting every unprotected version is not enough.
    """
    doomed, extras = retention_garbage(r, open_inos)
    freed = _freed_by(r, doomed)
    if max_size is not None:
        used = r.blob_bytes() - sum(freed.values())
        while used + need > max_size and extras:
            doomed.append(extras.pop(0))
            freed = _freed_by(r, doomed)
            used = r.blob_bytes() - sum(freed.values())
        if used + need > max_size and need > 0:
            raise CacheFull(
                f"cache full: {need} more bytes do not fit in max_cache_size {max_size} "
                f"({used} bytes held by versions that may not be evicted: latest, the "
                "newest valid, keep-tagged, pinned or open ones)")
        if used > max_size:
            log.warning("cache over max_cache_size by %d bytes of protected versions",
                        used - max_size)
    return Report(doomed=doomed, freed=freed)


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


def commit(index: Index, doomed: list[Doomed], open_inos: set[int] | None = None) -> Report:
    """Drop ``doomed`` (a plan made earlier, in a snapshot) in ONE write transaction,
    re-checking each version against the index as it is now: it must still exist (same
    inode), not be protected (latest, newest valid, keep, pin: ``protected_ids`` over
    the source's versions now) and not be in ``open_inos``. The others are skipped.

    Keep ``doomed`` short (``COMMIT_BATCH``): the transaction holds the writer lock.
    Returns what was dropped, with the blob files to unlink (``unlink_blobs``).
    """
    report = Report()
    skipped = 0
    with index.write() as w:
        protected: dict[str, set[str]] = {}  # source -> protected ids, now
        for d in doomed:
            v = d.version
            if open_inos is not None and v["ino"] in open_inos:
                skipped += 1
                continue
            if d.reason == "source removed":
                still = w.version_by_inode(v["ino"])
                if still is None or still[0] != d.source:
                    skipped += 1  # collected meanwhile
                    continue
            else:
                now = w.version(d.source, v["id"])
                if now is None or now["ino"] != v["ino"]:
                    skipped += 1
                    continue
                if d.source not in protected:
                    src = w.source(d.source)
                    protected[d.source] = protected_ids(src, w.versions(d.source)) \
                        if src else set()
                if v["id"] in protected[d.source]:
                    skipped += 1  # tagged keep, pinned, or latest again since the plan
                    continue
            entry = w.blob_ref(v["sha256"])
            report.freed.setdefault(d.source, 0)
            if w.drop_version(d.source, v):
                report.unlink.append(v["sha256"])
                report.freed[d.source] += entry["size"] if entry else 0
            report.doomed.append(d)
    for d in report.doomed:
        log.info("%s: collected version %s (%s)", d.source, d.version["id"], d.reason)
    if skipped:
        log.info("collection: %d version(s) kept after all (open, protected or gone "
                 "since the plan)", skipped)
    crash.point("gc-after-commit")  # orphans left here are swept on the next start
    return report


def merge(into: Report, part: Report) -> None:
    into.doomed += part.doomed
    into.unlink += part.unlink
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
    report = Report()
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
        for sha in still_unused:
            blobs.path(sha).unlink(missing_ok=True)
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
            gone.append(d.version["sha256"])
    return gone


def sweep_orphans(index: Index, blobs: BlobStore,
                  key_of: Callable[[dict[str, Any]], str] | None = None) -> list[str] | None:
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
                   key_of: Callable[[dict[str, Any]], str] | None = None) -> list[str]:
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
                saved = r.state(name).get("partial") if source is not None else None
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
