"""Collection speed: build an index with many versions, then time one collection.

    python -m bench.gc                 # 100,000 versions (1,000 sources x 100)
    python -m bench.gc --smoke         # 2,000 versions, to prove the script works

Versions are written straight into the index in one transaction (bench.common.populate;
no downloads, no blob files: unlinking a missing file costs what unlinking costs).
Prints the time of the plan-and-commit transaction and of the whole collection,
against the target of 10 s. ``python -m bench --only gc`` runs it three times.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/gc.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import populate  # noqa: E402
from buffyfs.store import gc  # noqa: E402
from buffyfs.store.blobs import BlobStore  # noqa: E402
from buffyfs.store.index import Index  # noqa: E402

TARGET = 10.0


def build(index: Index, sources: int, per_source: int) -> None:
    """``sources`` x ``per_source`` versions, each with its own (absent) blob; one in
    ten tagged ``valid``; keep_versions=5, so most of them are garbage."""
    populate(index, sources, per_source, size=1000, options={"keep_versions": 5},
             sha256=lambda s, i: hashlib.sha256(f"{s}-{i}".encode()).hexdigest())


def measure(sources: int, per_source: int, workdir: Path | None = None) -> dict[str, Any]:
    """Build a fresh index, plan once (dry run), then collect once; seconds of each."""
    work = Path(tempfile.mkdtemp(prefix="buffyfs-bench-gc-", dir=workdir or "/var/tmp"))
    try:
        index = Index(work / "index")
        blobs = BlobStore(work)
        t = time.perf_counter()
        build(index, sources, per_source)
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
        index.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"versions": sources * per_source, "sources": sources, "built": built,
            "planned": planned, "collected": collected, "doomed": len(report.doomed),
            "planned_doomed": len(plan.doomed), "left": left}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", type=int, default=1000)
    p.add_argument("--per-source", type=int, default=100)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.sources, args.per_source = 100, 20
    m = measure(args.sources, args.per_source)
    total, planned, collected = m["versions"], m["planned"], m["collected"]
    print(f"versions: {total:,} in {m['sources']:,} sources (built in {m['built']:.1f} s)")
    print(f"plan only (dry run):        {planned:6.2f} s   {total / planned:,.0f} versions/s")
    print(f"collection (plan+commit+unlink): {collected:6.2f} s   "
          f"target < {TARGET:.0f} s: {'PASS' if collected < TARGET else 'MISS'}")
    print(f"collected {m['doomed']:,} versions ({m['planned_doomed']:,} planned), "
          f"{m['left']:,} left")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
