"""``buffyfs check``: verify the index against the blobs, and repair on request.

Finds: versions whose blob is missing, is not a regular file (a symlink...), or
whose bytes no longer hash to their name (corrupt), blob files no version uses
(orphans), partial files no download will resume, blob reference counts that
disagree with the versions, and unpacked views (unpack.py) whose derived files are
missing, of the wrong size or hash, or whose blob is gone. ``repair`` drops broken
versions (``latest`` then resolves anew), deletes corrupt, orphan and non-regular
entries, rewrites the reference counts, and forgets broken unpacked views (the next
mount unpacks them again).

It also reports stray files anywhere in the cache directory: entries of the store
that are not of its layout (in ``blobs/``, a name that is no sha256 or sits in the
wrong subdirectory; in ``partial/``, the partial file of a source that is gone), which
``repair`` removes; and entries buffyfs does not make (KNOWN_ENTRIES; in ``partial/``,
any other name), which are only reported: they may be the user's own, or a newer
buffyfs's.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from buffyfs.errors import CacheError
from buffyfs.safeio import NotRegularFile, describe, entry_kind
from buffyfs.store import gc
from buffyfs.store.blobs import BlobStore, hash_file
from buffyfs.store.index import Index
from buffyfs.store.records import BlobEntry, Version
from buffyfs.store.unpack import DerivedStore, data_sha256

ORPHAN_LOCK_WAIT = 2.0  # seconds to wait for downloads' commits before judging orphans

# What buffyfs makes in a cache directory, outside blobs/ and partial/ (cache.py,
# index.py, cli.py): directory -> names; anything else there is reported as unknown.
KNOWN_ENTRIES = {
    "": {"index", "blobs", "partial", "unpacked", "mount.lock", "mount.json", "buffyfs.log",
         "buffyfs.start-error", "upstream"},  # upstream/: a replica's blobs arriving
    "index": {"data.mdb", "lock.mdb"},
}
BLOB_NAME = re.compile(r"[0-9a-f]{64}")
PARTIAL_NAME = re.compile(r"(?P<source>[^/]+)\.(part|lock)")


@dataclass
class Findings:
    missing: list[tuple[str, str]] = field(default_factory=list)  # (source, version id)
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    not_regular: list[tuple[str, str, str]] = field(default_factory=list)  # (.., kind)
    orphans: list[str] = field(default_factory=list)  # paths under the cache
    bad_refs: list[str] = field(default_factory=list)  # sha256 with a wrong count
    strays: list[tuple[str, str]] = field(default_factory=list)  # (path, why): repair removes
    unknown: list[str] = field(default_factory=list)  # paths not of buffyfs's: left alone
    bad_unpacked: list[tuple[str, str]] = field(default_factory=list)  # (sha256, why)
    checked: int = 0

    @property
    def healthy(self) -> bool:
        return not (self.missing or self.corrupt or self.not_regular or self.orphans
                    or self.bad_refs or self.strays or self.bad_unpacked)


def _uses(index: Index) -> tuple[dict[str, list[tuple[str, Version]]], dict]:
    """sha256 -> [(source, version)] over live and garbage versions; and the ref table."""
    uses: dict[str, list[tuple[str, Version]]] = {}
    with index.read() as r:
        for name in r.source_names():
            for v in r.versions(name):
                if not v.remote:  # a replica's, bytes not fetched: uses no blob
                    uses.setdefault(v.sha256, []).append((name, v))
        for g in r.garbage():
            if not g.remote:
                uses.setdefault(g.sha256, []).append((g.source, g))
        refs = r.blob_refs()
    return uses, refs


def _blob_entries(blobs: BlobStore) -> dict[str, tuple[str, int]]:
    """sha256 -> (kind, size) of every entry under ``blobs/xx/``, links not followed."""
    entries = {}
    try:
        for sub in os.scandir(blobs.blob_dir):
            if sub.is_dir(follow_symlinks=False):
                for e in os.scandir(sub.path):
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:  # collected meanwhile
                        continue
                    entries[e.name] = (describe(st.st_mode), st.st_size)
    except OSError as e:
        raise CacheError(f"cannot list the blobs in {blobs.blob_dir}: {e.strerror}") from None
    return entries


def _still_used(index: Index, sha: str, users: list[tuple[str, Version]]
                ) -> list[tuple[str, str]]:
    """Which of ``users`` the index still holds: a blob that vanished because its
    versions were collected while we checked is no damage."""
    now = {(s, v.id) for s, v in _uses(index)[0].get(sha, [])}
    return [(s, v.id) for s, v in users if (s, v.id) in now]


def check(index: Index, blobs: BlobStore,
          progress: Callable[[int, int], None] | None = None) -> Findings:
    """Re-hash every blob and compare with the index. Blocking.

    Safe against a running mount: whatever looks missing (or orphaned) is read
    again from the index before it is reported, since a collection (or a download)
    may have changed both meanwhile.
    """
    found = Findings()
    uses, refs = _uses(index)
    entries = _blob_entries(blobs)
    total = sum(size for kind, size in entries.values() if kind == "regular file")
    done = 0
    for sha, users in sorted(uses.items()):
        kind, size = entries.get(sha, (None, 0))
        if kind == "regular file":
            try:
                intact = hash_file(blobs.path(sha)) == sha
            except FileNotFoundError:
                kind = None
            except NotRegularFile as e:  # replaced meanwhile
                kind = e.what
            except OSError:  # unreadable bytes are damaged bytes
                intact = False
        if kind is None:
            found.missing += _still_used(index, sha, users)
            continue
        if kind != "regular file":
            found.not_regular += [(s, vid, kind) for s, vid in _still_used(index, sha, users)]
            continue
        if not intact:
            found.corrupt += [(s, v.id) for s, v in users]
        done += size
        found.checked += 1
        if progress:
            progress(done, total)
        entry = refs.get(sha)
        if entry is None or entry.refs != len(users):
            found.bad_refs.append(sha)
    found.bad_refs += [sha for sha in refs if sha not in uses]
    found.orphans = _confirmed_orphans(index, blobs, sorted(
        sha for sha in entries if sha not in uses and BLOB_NAME.fullmatch(sha)))
    found.bad_unpacked, derived_orphans = check_unpacked(index, DerivedStore(blobs.root))
    found.orphans += derived_orphans
    found.strays, found.unknown = stray_files(index, blobs)
    return found


def stray_files(index: Index, blobs: BlobStore) -> tuple[list[tuple[str, str]], list[str]]:
    """(strays in the store with why, unknown entries elsewhere), as paths relative to
    the cache. Entries that are not regular files are ``stray_entries``' (swept too)."""
    root = blobs.root
    strays: list[tuple[str, str]] = []
    for path, kind in blobs.stray_entries():
        strays.append((str(path.relative_to(root)), f"a {kind}, not a regular file"))
    planted = {p for p, _ in strays}
    for sub in sorted(os.scandir(blobs.blob_dir), key=lambda e: e.name):
        rel = f"blobs/{sub.name}"
        if rel in planted:
            continue
        if not sub.is_dir(follow_symlinks=False):
            strays.append((rel, "not a blob directory"))
            continue
        for e in sorted(os.scandir(sub.path), key=lambda e: e.name):
            if f"{rel}/{e.name}" in planted:
                continue
            if not BLOB_NAME.fullmatch(e.name):
                strays.append((f"{rel}/{e.name}", "not named by a sha256"))
            elif not e.name.startswith(sub.name):
                strays.append((f"{rel}/{e.name}", f"belongs in blobs/{e.name[:2]}/"))
    with index.read() as r:
        sources = set(r.source_names())
    unknown = []
    for e in sorted(os.scandir(blobs.partial_dir), key=lambda e: e.name):
        rel = f"partial/{e.name}"
        m = PARTIAL_NAME.fullmatch(e.name)
        if rel in planted or e.name == ".commit.lock" or m and m["source"] in sources:
            continue
        if m:
            strays.append((rel, f"a partial file of no source ({m['source']!r})"))
        else:
            unknown.append(rel)
    for directory, names in KNOWN_ENTRIES.items():
        try:
            entries = sorted(os.listdir(root / directory))
        except OSError:
            continue
        unknown += [os.path.join(directory, n) for n in entries if n not in names]
    return strays, unknown


def check_unpacked(index: Index, derived: DerivedStore
                   ) -> tuple[list[tuple[str, str]], list[str]]:
    """(sha256, what is wrong) of every finished unpack whose derived files do not
    match its record; and derived entries no blob has (orphans, under the cache)."""
    bad = []
    with index.read() as r:
        records = {sha: e.unpacked for sha, e in r.blob_refs().items() if e.unpacked}
    for sha, record in sorted(records.items()):
        if record["state"] != "done":
            continue
        why = None
        if "data_sha256" in record:
            data = derived.data_path(sha)
            kind = entry_kind(data)
            if kind is None:
                why = "derived file missing"
            elif kind != "regular file":
                why = f"derived file is a {kind}"
            elif os.lstat(data).st_size != record["file_size"]:
                why = f"derived file has {os.lstat(data).st_size} bytes, " \
                      f"{record['file_size']} expected"
            elif data_sha256(data) != record["data_sha256"]:
                why = "derived file is corrupt (wrong sha256)"
        if why is None and "members" in record and \
                entry_kind(derived.members_path(sha)) != "regular file":
            why = "member list missing"
        if why:
            with index.read() as r:  # collected while we looked: no damage
                still = (r.unpacked(sha) or {}).get("state") == "done"
            if still:
                bad.append((sha, why))
    with index.read() as r:
        orphans = [str(derived.path(sha).relative_to(derived.root))
                   for sha in derived.stored() if r.blob_ref(sha) is None]
    return bad, orphans


def _confirmed_orphans(index: Index, blobs: BlobStore, candidates: list[str]) -> list[str]:
    """The candidates that are still there and still unused, looked at under the commit
    lock when it can be had soon (a download holds it from blob to index commit)."""
    if not candidates:
        return []
    lock = gc.CommitLock(blobs)
    deadline = time.monotonic() + ORPHAN_LOCK_WAIT
    while not (locked := lock.acquire(exclusive=True, blocking=False)) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        with index.read() as r:
            unused = [sha for sha in candidates if r.blob_ref(sha) is None]
        return [str(blobs.path(sha).relative_to(blobs.root)) for sha in unused
                if entry_kind(blobs.path(sha)) is not None]
    finally:
        if locked:
            lock.release()


def repair(index: Index, blobs: BlobStore, found: Findings) -> None:
    broken = set(found.missing) | set(found.corrupt) | \
        {(source, vid) for source, vid, _ in found.not_regular}
    uses, _ = _uses(index)
    with index.write() as w:
        for users in uses.values():
            for source, v in users:
                if (source, v.id) in broken:
                    if w.version(source, v.id) == v and getattr(w.source(source), "mirror",
                                                                 False):
                        w.make_remote(source, v)  # a replica fetches it from the hub again
                    else:
                        w.drop_version(source, v)
        unpacked = {sha: e.unpacked for sha, e in w.blob_refs().items()
                    if e.unpacked and sha not in dict(found.bad_unpacked)}
        for sha in found.bad_refs:  # rebuild the counts from the versions
            w.drop_blob_ref(sha)
        total = 0
        for sha, users in uses.items():
            alive = [(s, v) for s, v in users if (s, v.id) not in broken]
            if alive:
                # a sound unpack stays (a broken one is done again)
                w.put_blob_ref(sha, BlobEntry(size=alive[0][1].size, refs=len(alive),
                                              unpacked=unpacked.get(sha)))
                total += alive[0][1].size + unpacked.get(sha, {}).get("size", 0)
        w.set_blob_bytes(total)
    for source, vid in found.corrupt:
        for sha, users in uses.items():
            if any(s == source and v.id == vid for s, v in users):
                blobs.path(sha).unlink(missing_ok=True)
    derived = DerivedStore(blobs.root)
    for sha, _why in found.bad_unpacked:
        derived.remove(sha)
    gc.sweep_strays(blobs)  # blobs that were not regular files (the versions are gone)
    for path, _why in found.strays:  # misnamed or misplaced blob files
        target = blobs.root / path
        if path.startswith("blobs/") and entry_kind(target) == "regular file":
            target.unlink(missing_ok=True)
    gc.sweep_partials(index, blobs)  # those of no source (never one a download holds)
    if gc.sweep_orphans(index, blobs) is None:
        for path in found.orphans:  # a download is committing: remove only what we saw
            sha = path.rsplit("/", 1)[-1]
            with index.read() as r:
                if r.blob_ref(sha) is None:
                    (blobs.root / path).unlink(missing_ok=True)
