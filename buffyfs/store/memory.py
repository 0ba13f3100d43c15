"""Giving memory back after bulk work, so that the daemon's RSS is what it holds.

- ``trim_heap``: freed Python objects (a collection's reports, a hub's pages, a burst
  of refreshes) leave glibc's heaps grown; malloc_trim returns their free pages.
- ``unmap_index``: the index is an mmap of ``data.mdb``, and every page the process
  reads stays mapped in its RSS, with up to 15 neighbours the kernel maps along
  ("fault-around", 64 KiB): a `stat` of each source once, or one pass over a table,
  maps nearly the whole file (100 MiB for 20,000 sources x 5 versions) however few
  pages the daemon's own code reads. madvise(MADV_DONTNEED) drops these mappings: the
  pages stay in the page cache (shared with the command line and the worker
  processes), and the next read maps what it needs again (a minor fault). Safe for
  LMDB without ``writemap``: its map is only read; writes go through the file. With
  ``writemap`` the writer writes its pages through the map, and dropping them under it
  is not what was reasoned about or tested: ``unmap_index`` refuses such an index.

Both are system calls (ctypes lets go of the GIL): run them in a worker thread. Off
glibc or Linux they do nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from buffyfs.store.index import Index

log = logging.getLogger(__name__)

MADV_DONTNEED = 4  # linux/mman.h

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6", use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):  # not glibc
            return None
    return _libc


def trim_heap() -> None:
    """Return glibc's free heap pages to the system."""
    libc = _c()
    if libc is not None:
        libc.malloc_trim(0)


def mappings_of(path: Path) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of the file ``path``."""
    target = os.path.realpath(path)
    out = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == target:
                    start, end = fields[0].split("-")
                    out.append((int(start, 16), int(end, 16)))
    except OSError:  # no /proc
        return []
    return out


def unmap_index(index: Index) -> None:
    """Drop this process's mapped pages of the index file (they stay cached). Refused
    (ValueError) for an index opened with ``writemap`` (its writes go through the map)."""
    if index.env.flags()["writemap"]:
        raise ValueError(f"the index in {index.path} is opened with writemap: its map "
                         "is written through, its pages are not dropped")
    libc = _c()
    if libc is None:
        return
    for start, end in mappings_of(index.path / "data.mdb"):
        if libc.madvise(start, end - start, MADV_DONTNEED) != 0:
            log.debug("madvise of the index map: %s", os.strerror(ctypes.get_errno()))
