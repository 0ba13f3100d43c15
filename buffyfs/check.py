"""``buffyfs check``: verify the index against the blobs, and repair on request.

Finds: versions whose blob is missing or whose bytes no longer hash to their name
(corrupt), blob files no version uses (orphans), partial files no download will
resume, and blob reference counts that disagree with the versions. ``repair``
drops broken versions (``latest`` then resolves anew), deletes corrupt and orphan
files, and rewrites the reference counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from buffyfs import gc
from buffyfs.blobs import BlobStore, hash_file
from buffyfs.index import Index


@dataclass
class Findings:
    missing: list[tuple[str, str]] = field(default_factory=list)  # (source, version id)
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # paths under the cache
    bad_refs: list[str] = field(default_factory=list)  # sha256 with a wrong count
    checked: int = 0

    @property
    def healthy(self) -> bool:
        return not (self.missing or self.corrupt or self.orphans or self.bad_refs)


def _uses(index: Index) -> tuple[dict[str, list[tuple[str, dict[str, Any]]]], dict]:
    """sha256 -> [(source, version)] over live and garbage versions; and the ref table."""
    uses: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    with index.read() as r:
        for name in r.source_names():
            for v in r.versions(name):
                uses.setdefault(v["sha256"], []).append((name, v))
        for g in r.garbage():
            uses.setdefault(g["sha256"], []).append((g["source"], g))
        refs = r.blob_refs()
    return uses, refs


def check(index: Index, blobs: BlobStore,
          progress: Callable[[int, int], None] | None = None) -> Findings:
    """Re-hash every blob and compare with the index. Blocking."""
    found = Findings()
    uses, refs = _uses(index)
    files = {f.name: f for sub in blobs.blob_dir.iterdir() if sub.is_dir()
             for f in sub.iterdir()}
    total = sum(f.stat().st_size for f in files.values())
    done = 0
    for sha, users in sorted(uses.items()):
        path = files.get(sha)
        if path is None:
            found.missing += [(s, v["id"]) for s, v in users]
            continue
        size = path.stat().st_size
        if hash_file(path) != sha:
            found.corrupt += [(s, v["id"]) for s, v in users]
        done += size
        found.checked += 1
        if progress:
            progress(done, total)
        entry = refs.get(sha)
        if entry is None or entry["refs"] != len(users):
            found.bad_refs.append(sha)
    found.bad_refs += [sha for sha in refs if sha not in uses]
    found.orphans = [str(f.relative_to(blobs.root)) for name, f in sorted(files.items())
                     if name not in uses]
    return found


def repair(index: Index, blobs: BlobStore, found: Findings) -> None:
    broken = set(found.missing) | set(found.corrupt)
    uses, _ = _uses(index)
    with index.write() as w:
        for users in uses.values():
            for source, v in users:
                if (source, v["id"]) in broken:
                    w.drop_version(source, v)
        for sha in found.bad_refs:  # rebuild the counts from the versions
            w.txn.delete(sha.encode(), db=w.dbs["blobs"])
        total = 0
        for sha, users in uses.items():
            alive = [(s, v) for s, v in users if (s, v["id"]) not in broken]
            if alive:
                w._put("blobs", sha.encode(), {"size": alive[0][1]["size"], "refs": len(alive)})
                total += alive[0][1]["size"]
        w.txn.put(b"blob_bytes", total.to_bytes(8, "big"), db=w.dbs["meta"])
    for source, vid in found.corrupt:
        for sha, users in uses.items():
            if any(s == source and v["id"] == vid for s, v in users):
                blobs.path(sha).unlink(missing_ok=True)
    if gc.sweep_orphans(index, blobs) is None:
        for path in found.orphans:  # a download is committing: remove only what we saw
            sha = path.rsplit("/", 1)[-1]
            with index.read() as r:
                if r.blob_ref(sha) is None:
                    (blobs.root / path).unlink(missing_ok=True)
