"""Issue 12, review leftovers: a collection's worker process that dies after its batch's
commit landed, before the mount got the list of the blobs it freed, leaves no blob
files behind while the mount runs (they were swept only at the next start)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from buffyfs.store.index import Index
from tests.conftest import Mount, wait_for
from tests.test_stall import build

SOURCES = 250  # 1,250 versions: the plan and its commits go to worker processes


def blob_names(cache: Path) -> set[str]:
    return {f.name for f in (cache / "blobs").glob("*/*") if f.is_file()}


def referenced_blobs(cache: Path) -> set[str]:
    index = Index(cache / "index", readonly=True)
    try:
        with index.read() as r:
            return set(r.blob_refs())
    finally:
        index.close()


def write_blobs(cache: Path) -> None:
    """A file for the blob of every version ``build`` wrote (it writes the index only)."""
    for s in range(SOURCES):
        for i in range(5):
            sha = hashlib.sha256(f"{s}-{i}".encode()).hexdigest()
            folder = cache / "blobs" / sha[:2]
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            (folder / sha).write_bytes(b"x" * 100)


def test_blobs_freed_by_a_commit_whose_worker_died_are_removed_while_mounted(
        cache_dir: Path, mount_factory: Callable[..., Mount], monkeypatch) -> None:
    build(cache_dir, SOURCES, 5)
    write_blobs(cache_dir)
    assert len(blob_names(cache_dir)) == 5 * SOURCES
    # each worker process that commits a batch is killed right after the commit; the
    # daemon's own thread (its second try) is not
    monkeypatch.setenv("BUFFYFS_CRASH_AT", "gc-worker-after-commit")
    try:
        m = mount_factory("--scrub-interval", "never")
    finally:
        monkeypatch.delenv("BUFFYFS_CRASH_AT")
    done = subprocess.run([sys.executable, "-m", "buffyfs", "gc", "--cache", str(m.cache)],
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert "a worker process failed" in m.log.read_text()
    kept = referenced_blobs(m.cache)
    assert len(kept) == 3 * SOURCES  # keep_versions=1: 2 in 5 went from the index
    wait_for(lambda: blob_names(m.cache) == kept, 60,
             what="the blobs of the collected versions to be removed")
    assert all(os.path.isdir(m / f"src{s}") for s in (0, SOURCES - 1))
