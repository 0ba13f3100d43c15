"""The kernel's mount table, read in one place (``/proc/self/mountinfo``).

``os.path.ismount`` is no use for a FUSE mount whose daemon died (its ``stat`` fails),
and a ``stat`` of our own mount point from the daemon would wait for the daemon itself:
the table answers without touching the mount.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class MountEntry:
    """One line of the table (mountinfo fields 3, 5, 9 and 10, unescaped)."""

    device: str  # MAJOR:MINOR (the name of its /sys/class/bdi/ entry)
    mountpoint: str
    fstype: str  # e.g. fuse.buffyfs
    source: str  # e.g. buffyfs:CACHE for ours


def mounts_on(path: str) -> list[MountEntry]:
    """The mounts stacked on ``path``, the topmost last. Raises OSError when the table
    cannot be read."""
    target = os.path.abspath(path)  # realpath would stat the mount point
    out = []
    with open(MOUNTINFO) as f:
        for line in f:
            fields = [_unescape(x) for x in line.split()]
            try:
                tail = fields.index("-", 6)
                entry = MountEntry(fields[2], fields[4], fields[tail + 1], fields[tail + 2])
            except (IndexError, ValueError):
                continue  # not a line of the documented format
            if entry.mountpoint == target:
                out.append(entry)
    return out


def topmost(path: str) -> MountEntry | None:
    """The mount a lookup of ``path`` would see, None when nothing is mounted there."""
    stacked = mounts_on(path)
    return stacked[-1] if stacked else None


def is_mounted(path: str) -> bool:
    """From the table: also true for a mount whose daemon died."""
    return topmost(path) is not None


def _unescape(field: str) -> str:
    """Spaces, tabs, newlines and backslashes are written as ``\\OOO`` in the table."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
