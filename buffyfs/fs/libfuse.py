"""What the libfuse under pyfuse3 lets the kernel do, said once at start-up.

One fact shapes how a busy mount answers: libfuse before 3.17.1 never tells the kernel
that the file system takes lookups in parallel (``FUSE_PARALLEL_DIROPS``: libfuse
enabled it by default but left it out of its INIT reply; commit c990534, "Pass
FUSE_PARALLEL_DIROPS to kernel"). The kernel then holds a lock per directory around
every lookup of a name it has not cached (``fuse_lock_inode``), so the first lookups of
different sources in the mount's root wait for one another, each for a full round trip
through the daemon. Debian 12 ships libfuse 3.14: there, of 4 lookups of different
names asked at once of a file system whose lookups take 0.3 s, the daemon holds one at
a time (``tests/test_libfuse.py``), and the `stall` benchmark's longest waits during
its refresh burst are `stat`s queued behind the burst's own first lookups in the root.
"""

from __future__ import annotations

import ctypes
import re

LIBRARY = "libfuse3.so.3"  # the soname pyfuse3 links (already loaded once it is imported)
PARALLEL_LOOKUPS_FROM = (3, 17, 1)


def version() -> str | None:
    """The libfuse version string (``fuse_pkgversion``), None if it cannot be asked."""
    try:
        pkgversion = ctypes.CDLL(LIBRARY).fuse_pkgversion
    except (OSError, AttributeError):
        return None
    pkgversion.restype = ctypes.c_char_p
    raw = pkgversion()
    return raw.decode("ascii", "replace") if raw else None


def parallel_lookups(text: str | None) -> bool | None:
    """Whether libfuse ``text`` lets the kernel look up names of one directory in
    parallel; None when ``text`` is not a version."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if m is None:
        return None
    return tuple(int(part or 0) for part in m.groups()) >= PARALLEL_LOOKUPS_FROM


def describe() -> str:
    """One line for the log: the libfuse version and whether lookups run in parallel."""
    text = version()
    parallel = parallel_lookups(text)
    if parallel is None:
        return "libfuse version unknown"
    if parallel:
        return f"libfuse {text}: the kernel looks up names in parallel"
    return (f"libfuse {text}: the kernel looks up the names of one directory one at a time "
            f"(parallel lookups need libfuse {'.'.join(map(str, PARALLEL_LOOKUPS_FROM))} "
            f"or later)")
