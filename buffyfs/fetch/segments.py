"""Segmented partial downloads: the map of segments that arrived, and the live view of a
download that readers of a file still arriving wait on.

A partial download (``partial/NAME.part``, blobs.py) is a file of fixed-size segments
(``SEGMENT_SIZE``; the size is recorded with each download, so a map written with
another size still reads right). A segment written ahead of a hole leaves the file
sparse: only what arrived takes disk space, and the quota counts the blocks, not the
apparent size.

The map is kept in the source's state in the index (``partial``, index.py), beside the
resume validators::

    {"key", "etag", "last_modified",      the request and validators (refresh.py)
     "segment_size": 8388608,             bytes per segment, for this download
     "total": N | null,                   the body's length, if the origin gave it
     "segments": [[first, end], ...],     segment numbers that arrived: first..end-1
     "prefix": N}                         bytes from 0 on disk when an attempt ended

A segment enters the map only after every one of its bytes is in the file and the file
is fdatasync'd, so after a crash a segment in the map is whole, and one that is not is
fetched again: a restart resumes every complete segment, and never trusts a half-written
one. An attempt that fails fsyncs what it wrote and records it as ``prefix``, so a later
refresh loses nothing of it. The whole-file sha256 is computed as the contiguous prefix grows.

``LiveDownload`` is the in-memory side: which bytes of the file are written, whether the
download was sealed (committed as a version, validation passed) or failed for good.
Waiters are woken by ``Broadcast`` events, never by polling.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from buffyfs.store.records import Version

SEGMENT_SIZE = 8 << 20


class Broadcast:
    """Wake every task waiting for a change (a trio.Event renewed on each change)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    def waiter(self) -> trio.Event:
        """The event the next change sets: take it before checking, then wait on it."""
        return self._event


class ByteRanges:
    """Disjoint, sorted half-open byte ranges [start, end)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        i = bisect.bisect_left(self.ends, start)  # the first range that may touch
        j = bisect.bisect_right(self.starts, end)  # past the last one that may touch
        if i < j:
            start = min(start, self.starts[i])
            end = max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]

    def covers(self, start: int, end: int) -> bool:
        if end <= start:
            return True
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and self.ends[i] >= end

    def reach(self, offset: int) -> int:
        """The end of the last range starting at or before ``offset`` (0 if none)."""
        i = bisect.bisect_right(self.starts, offset) - 1
        return self.ends[i] if i >= 0 else 0

    def prefix(self) -> int:
        """The end of the range that starts at 0 (0 if none)."""
        return self.ends[0] if self.starts and self.starts[0] == 0 else 0

    def size(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends, strict=True))

    def clear(self) -> None:
        self.starts.clear()
        self.ends.clear()


def map_prefix(saved: dict[str, Any]) -> int | None:
    """Bytes of the contiguous prefix of whole segments a saved map vouches for; None
    for a resume point saved without a map (before segments: its file size counts)."""
    if "segments" not in saved:
        return None
    size = int(saved.get("segment_size") or SEGMENT_SIZE)
    first = next((end for start, end in saved["segments"] if start == 0), 0)
    prefix = max(first * size, int(saved.get("prefix") or 0))
    total = saved.get("total")
    return min(prefix, total) if total is not None else prefix


def segments_below(offset: int, total: int | None, size: int = SEGMENT_SIZE) -> int:
    """How many whole segments the first ``offset`` bytes hold (the last, shorter segment
    of a body counts once the body is complete)."""
    if total is not None and offset >= total:
        return -(-total // size)
    return offset // size


def segment_ranges(done: set[int]) -> list[list[int]]:
    """A set of segment numbers as the map's [[first, end], ...]."""
    out: list[list[int]] = []
    for s in sorted(done):
        if out and out[-1][1] == s:
            out[-1][1] = s + 1
        else:
            out.append([s, s + 1])
    return out


def saved_segments(saved: dict[str, Any]) -> set[int]:
    """The segments a saved map holds (none if it was written with another size)."""
    if int(saved.get("segment_size") or 0) != SEGMENT_SIZE:
        return set()
    return {s for first, end in saved.get("segments", []) for s in range(first, end)}


class StreamFailed(Exception):
    """The download a reader waits on gave up, failed validation, or started over with
    other bytes than the reader was given."""


class LiveDownload:
    """A download under way, as its readers see it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.total: int | None = None  # the body's length, once the body started
        self.started = False  # the origin answered with a body
        self.content_type: str | None = None  # the origin's, for the server's answers
        self.generation = 0  # + 1 each time the bytes in the file are dropped
        self.written = ByteRanges()  # bytes of the file that are written
        self.sha256: str | None = None  # set when sealed
        self.version: Version | None = None
        self.error: str | None = None  # set when failed for good
        self.changed = Broadcast()
        # A download that starts over (an origin that ignores ranges, a reset) drops
        # the bytes readers may have been given. What each dropped generation held,
        # (length, sha256 of the file's first `length` bytes), is compared with the
        # new bytes when as many have arrived: the same bytes, and its readers go on.
        self.expected: dict[int, tuple[int, str]] = {}
        self.verdicts: dict[int, str] = {}  # generation -> "pending", "same" or "other"
        # Random access ahead (ranges.py): the If-Range validator of the body under way
        # (None: the origin serves no ranges), and the offsets readers wait for far
        # ahead of the bytes that arrived.
        self.guard: str | None = None
        self.wanted: list[int] = []
        self.wants = Broadcast()
        # A replica's blob arriving from its hub (replica.py): its file is not the
        # source's partial file, and its version exists already (its tags are the
        # hub's, no verdict of this download).
        self.path: Path | None = None
        self.mirrored = False

    @property
    def done(self) -> bool:
        return self.sha256 is not None or self.error is not None

    def body_starts(self, start: int, total: int | None,
                    dropped: tuple[int, str] | None = None) -> None:
        """A body starts at byte ``start``: what the file holds before it stays, the
        rest is dropped (a new generation if bytes were dropped). ``dropped``: the
        length and sha256 of the prefix the file held before, if known."""
        if self.written.size() > start or (self.total is not None and total != self.total):
            old = self.generation
            self.generation += 1
            if dropped is not None and dropped[0] > 0 and total == self.total:
                self.expected[old] = dropped
            for gen in self.expected:  # what they held must match the new bytes
                if self.verdicts.get(gen) != "other":
                    self.verdicts[gen] = "pending"
            if old not in self.expected:
                self.verdicts[old] = "other"
        self.written.clear()
        self.written.add(0, start)  # the downloader keeps the file's first bytes
        self.total = total
        self.started = True
        self.changed.notify()

    def drop(self) -> None:
        """Every byte in the file is dropped (a blob that failed its sha256): the
        readers given some fail, the others wait for the new ones."""
        if self.written.size():
            self.verdicts[self.generation] = "other"
            self.generation += 1
            self.written.clear()
            self.changed.notify()

    def want(self, offset: int) -> None:
        """A reader waits for ``offset``, far ahead of what arrived."""
        self.wanted.append(offset)
        self.wants.notify()

    def take_wanted(self) -> list[int]:
        wanted, self.wanted = self.wanted, []
        return wanted

    def pending_checks(self) -> list[tuple[int, int, str]]:
        """(generation, length, sha256) of dropped bytes still to compare."""
        return [(gen, *self.expected[gen]) for gen, v in self.verdicts.items()
                if v == "pending"]

    def checked(self, generation: int, same: bool) -> None:
        self.verdicts[generation] = "same" if same else "other"
        self.changed.notify()

    def standing(self, generation: int) -> str:
        """For a reader given bytes of ``generation``: "current" (read on), "pending"
        (wait: the new bytes are not compared yet) or "other" (they differ: fail)."""
        if generation == self.generation:
            return "current"
        verdict = self.verdicts.get(generation, "other")
        if verdict == "pending" and self.done:
            return "other"  # ended before the bytes could be compared
        return "current" if verdict == "same" else verdict

    def arrived(self, start: int, end: int) -> None:
        self.written.add(start, end)
        self.changed.notify()

    def seal(self, sha256: str, version: Version | None) -> None:
        """Committed: ``version`` is what it became (None: no servable version)."""
        self.sha256, self.version = sha256, version
        self.changed.notify()

    def fail(self, error: str) -> None:
        if not self.done:
            self.error = error
            self.changed.notify()

    async def wait_range(self, start: int, end: int, generation: int) -> None:
        """Wait until bytes [start, end) are in the file; StreamFailed if the download
        failed for good; returns early if it started over (see ``standing``)."""
        while True:
            waiter = self.changed.waiter()
            if self.generation != generation:
                return
            self.check_failed()
            if self.written.covers(start, end) or self.sha256 is not None:
                return
            await waiter.wait()

    async def wait_sealed(self, generation: int | None = None) -> Version | None:
        """Wait for the seal: the version committed, with its validation passed;
        StreamFailed if the download failed or the version failed validation. With
        ``generation``: None as soon as the bytes of that generation are dropped."""
        while True:
            waiter = self.changed.waiter()
            if generation is not None and generation != self.generation:
                return None
            self.check_failed()
            if self.version is not None:
                return self.version
            await waiter.wait()

    def check_failed(self) -> None:
        """StreamFailed if the download failed for good or its version failed."""
        if self.error is not None:
            raise StreamFailed(self.error)
        if self.sha256 is not None and (self.version is None or (
                not self.mirrored and "failed" in self.version.tags)):
            raise StreamFailed("the download did not become a valid version")
