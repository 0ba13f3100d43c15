"""Collection speed: build an index with many versions, then time one collection.

    python bench/gc.py                 # 100,000 versions (1,000 sources x 100)
    python bench/gc.py --smoke         # 2,000 versions, to prove the script works

Versions are written straight into the index (no downloads, no blob files: unlinking
a missing file costs what unlinking costs). Prints the time of the plan-and-commit
transaction and of the whole collection, against the target of 10 s.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from buffyfs import gc  # noqa: E402
from buffyfs.blobs import BlobStore  # noqa: E402
from buffyfs.index import Index, rfc3339, version_id  # noqa: E402
from buffyfs.options import normalize_options  # noqa: E402

TARGET = 10.0


def build(index: Index, sources: int, per_source: int) -> None:
    options = normalize_options({"keep_versions": 5})
    for s in range(sources):
        index.add_source(f"src{s}", f"http://127.0.0.1/{s}", options)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    with index.write() as w:
        for s in range(sources):
            name = f"src{s}"
            for i in range(per_source):
                sha = hashlib.sha256(f"{s}-{i}".encode()).hexdigest()
                when = t0 + timedelta(minutes=i)
                vid = version_id(when, sha)
                ino = w.alloc_inodes(1)
                tags = ["valid"] if i % 10 == 0 else []
                w._put("versions", name.encode() + b"\0" + vid.encode(), {
                    "id": vid, "sha256": sha, "size": 1000, "fetched_at": rfc3339(when),
                    "url": "http://127.0.0.1/", "etag": None, "last_modified": None,
                    "content_type": None, "ino": ino, "tags": tags})
                w._put("inodes", ino.to_bytes(8, "big"),
                       {"kind": "version", "source": name, "id": vid})
                w.ref_blob(sha, 1000)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", type=int, default=1000)
    p.add_argument("--per-source", type=int, default=100)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.sources, args.per_source = 100, 20
    work = Path(tempfile.mkdtemp(prefix="buffyfs-bench-gc-", dir="/var/tmp"))
    try:
        index = Index(work / "index")
        blobs = BlobStore(work)
        total = args.sources * args.per_source
        t = time.perf_counter()
        build(index, args.sources, args.per_source)
        built = time.perf_counter() - t
        t = time.perf_counter()
        with index.read() as r:
            plan = gc.plan(r, set())
        planned = time.perf_counter() - t
        t = time.perf_counter()
        report = gc.collect_now(index, blobs, set())
        collected = time.perf_counter() - t
        with index.read() as r:
            left = sum(len(r.versions(n)) for n in r.source_names())
        print(f"versions: {total:,} in {args.sources:,} sources (built in {built:.1f} s)")
        print(f"plan only (dry run):        {planned:6.2f} s   {total / planned:,.0f} versions/s")
        print(f"collection (plan+commit+unlink): {collected:6.2f} s   "
              f"target < {TARGET:.0f} s: {'PASS' if collected < TARGET else 'MISS'}")
        print(f"collected {len(report.doomed):,} versions ({len(plan.doomed):,} planned), "
              f"{left:,} left")
        index.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
