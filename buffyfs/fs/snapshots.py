"""Generated files (``@status``, ``@metrics``) as snapshots, so that ``stat`` and
``read`` agree.

Their content is built on demand and changes all the time, yet ``tar`` stores exactly
the size ``stat`` gave (and warns "file changed as we read it" when a later ``fstat``
differs), and ``cp``/``rsync`` size their copy by it. So a ``stat`` builds the
content, reports its real size, and keeps it as the file's current snapshot: opens
within SNAPSHOT_TTL of it read those very bytes unless the index changed meanwhile
(by any process: a command-line ``tag`` shows at once), and while one of them is
still open the snapshot stays current (up to SNAPSHOT_HELD_MAX), so the reader's
final ``fstat`` sees the size it read. A control write through the mount drops all
snapshots (fs.py): its effect shows in the next read. So the TTL only hides what
lives in the mount's memory, download progress between its index writes, open files
and counters, for at most a second.

The kernel must not answer ``stat`` from its attribute cache (fs.py gives these
files an attribute timeout of 0), and reads bypass the page cache (``direct_io``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

SNAPSHOT_TTL = 1.0  # seconds a snapshot serves new stats and opens
OPEN_AFTER_STAT = 0.5  # an open this soon after a stat reads what the stat saw
SNAPSHOT_HELD_MAX = 5.0  # an open reader keeps it current (for its fstat) at most this long


@dataclass
class Snapshot:
    data: bytes
    made: float  # time.monotonic() when built
    commit: int  # the index's last commit when built (Index.last_commit)
    mtime_ns: int  # wall-clock time when built: the file's mtime and ctime
    readers: int = 0  # open handles reading it


class Snapshots:
    """The current snapshot of each generated file, by inode."""

    def __init__(self) -> None:
        self.current: dict[int, Snapshot] = {}

    def usable(self, ino: int, commit: int, opening: bool = False) -> Snapshot | None:
        """The inode's snapshot if it may still be served, else None (``commit``: the
        index's last commit now). ``opening``: for an open, which the kernel precedes
        with a ``getattr`` (its permission check, the attributes never being cached):
        the snapshot that built stays good for OPEN_AFTER_STAT even if the index
        changed since (a download's progress), so stat and read see one content."""
        snap = self.current.get(ino)
        if snap is None:
            return None
        age = time.monotonic() - snap.made
        if snap.readers > 0 and age < SNAPSHOT_HELD_MAX:
            return snap
        if age < SNAPSHOT_TTL and (snap.commit == commit or opening and age < OPEN_AFTER_STAT):
            return snap
        return None

    async def get(self, ino: int, commit: int, build: Callable[[], Awaitable[bytes]],
                  opening: bool = False) -> Snapshot:
        """The usable snapshot of ``ino``, or a new one from ``build`` (off the loop: a
        worker thread, or a worker process for a big cache's, which takes seconds)."""
        snap = self.usable(ino, commit, opening)
        if snap is None:
            data = await build()
            snap = Snapshot(data, time.monotonic(), commit, time.time_ns())
            self._drop_stale()
            self.current[ino] = snap
        return snap

    def clear(self) -> None:
        """Something changed: the next stat or open builds afresh (so ``@status`` shows
        a control write as soon as it returns)."""
        self.current.clear()

    def _drop_stale(self) -> None:
        """Forget the snapshots nobody reads any more (a source's @status may be big)."""
        now = time.monotonic()
        for ino in [i for i, s in self.current.items()
                    if not s.readers and now - s.made >= SNAPSHOT_TTL]:
            del self.current[ino]
