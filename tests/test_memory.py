"""Issue 12, daemon RSS: after bulk work the daemon gives back the index pages it
mapped and the heap it freed (store/memory.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench.common import cpu_seconds
from buffyfs.store import memory
from buffyfs.store.blobs import BlobStore
from buffyfs.store.index import Index
from tests.conftest import Mount, wait_for
from tests.test_stall import build


def mapped_kib(pid: int | str, path: Path) -> int:
    """KiB of ``path`` mapped in the RSS of process ``pid``."""
    target = os.path.realpath(path)
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                inside = len(fields) >= 6 and fields[5] == target
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def unpacker_looked_at_all(cache_dir: Path) -> bool:
    """The unpacker's start-up pass recorded what every blob is (a late pass would map
    the index pages again after the collection gave them back)."""
    index = Index(cache_dir / "index", readonly=True)
    try:
        with index.read() as r:
            return all(r.unpacked(sha) is not None for sha in r.blob_refs())
    finally:
        index.close()


def write_blobs(cache_dir: Path) -> None:
    """build() writes no blob files: without them the unpacker records nothing, and
    the end of its first pass could not be seen."""
    blobs = BlobStore(cache_dir)
    index = Index(cache_dir / "index", readonly=True)
    try:
        with index.read() as r:
            shas = list(r.blob_refs())
    finally:
        index.close()
    for sha in shas:
        blobs.path(sha).parent.mkdir(parents=True, exist_ok=True)
        blobs.path(sha).write_bytes(b"x" * 100)


def test_unmapping_the_index_keeps_it_readable(tmp_path: Path) -> None:
    build(tmp_path, sources=200)
    index = Index(tmp_path / "index")
    data = tmp_path / "index" / "data.mdb"
    try:
        with index.read() as r:
            before = [(n, [v.id for v in r.versions(n)]) for n in r.source_names()]
        assert mapped_kib("self", data) >= 256
        memory.unmap_index(index)
        assert mapped_kib("self", data) < 64
        with index.read() as r:  # mapped again as read: the same records
            assert [(n, [v.id for v in r.versions(n)]) for n in r.source_names()] == before
        memory.trim_heap()
    finally:
        index.close()


def test_a_collection_gives_back_the_index_pages(
        cache_dir: Path, mount_factory: Callable[..., Mount]) -> None:
    build(cache_dir, 300, 5)
    write_blobs(cache_dir)
    m = mount_factory("--scrub-interval", "never")
    data = cache_dir / "index" / "data.mdb"
    # the start-up work (the unpacker's first look at every source reads them too)
    # done first: else it maps pages again after the give-back
    wait_for(lambda: unpacker_looked_at_all(cache_dir), 60,
             what="the unpacker's first look at every blob")
    quiet: list[float] = []
    wait_for(lambda: quiet.append(cpu_seconds(m.proc.pid)) or
             len(quiet) > 6 and quiet[-1] == quiet[-7], 30, interval=0.05,
             what="the daemon's start-up work to end")

    def look_up_all() -> int:
        for i in range(300):  # every source looked up: their records mapped in the daemon
            os.stat(m / f"src{i}" / "latest")
        return mapped_kib(m.proc.pid, data)

    # again if the start-up sweep's own give-back came after the lookups (a slow start)
    looked = wait_for(lambda: (kib := look_up_all()) >= 512 and kib, 30,
                      what="the lookups to map the index pages")
    done = subprocess.run([sys.executable, "-m", "buffyfs", "gc", "--cache", str(cache_dir)],
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: mapped_kib(m.proc.pid, data) < looked // 4, 30,
             what="the daemon to unmap the index pages")
    assert os.stat(m / "src1" / "latest").st_size == 100  # read (and mapped) again


def test_an_index_opened_with_writemap_is_not_unmapped(tmp_path: Path, monkeypatch) -> None:
    """unmap_index assumes a map that is only read: an index whose writes go through
    its map (``writemap``, should a later change open it so) is refused, loudly."""
    import lmdb
    import pytest

    real_open = lmdb.open
    monkeypatch.setattr(lmdb, "open", lambda *a, **kw: real_open(*a, writemap=True, **kw))
    build(tmp_path, sources=50)
    index = Index(tmp_path / "index")
    data = tmp_path / "index" / "data.mdb"
    try:
        with index.read() as r:
            names = list(r.source_names())
        mapped = mapped_kib("self", data)
        with pytest.raises(ValueError, match="writemap"):
            memory.unmap_index(index)
        assert mapped_kib("self", data) >= mapped  # nothing dropped
        with index.read() as r:
            assert list(r.source_names()) == names
    finally:
        index.close()
