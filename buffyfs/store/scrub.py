"""The background scrub: re-hash every blob at a bounded rate, like a filesystem scrub.

Once per ``scrub_interval`` (counted from the end of the last pass, which the index
remembers across restarts: ``meta/scrub``), the mount reads every blob that versions
use and compares its size and sha256 with its name. A blob that is missing, has the
wrong size or the wrong hash is reported to ``on_damage`` (the filesystem marks it and
its versions damaged and has their sources download again: fs.BuffyFS.report_damage).

Reads are paced to at most ``rate`` bytes per second over the pass, one chunk at a
time in a worker thread, so the scrub neither blocks the event loop nor starves
readers of the disk. What it finds is reported in batches (``DAMAGE_BATCH``, and at the
end of the pass): a cache whose blobs were all deleted is one index transaction per
batch, in a worker thread, not one per blob on the loop; so are the pass's list of
blobs and its record. Blobs already marked damaged are skipped (they wait for fresh
bytes, not for another look).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import IO

import trio

from buffyfs.store.blobs import BlobStore
from buffyfs.store.index import Index, now_utc, parse_rfc3339, rfc3339
from buffyfs.store.metrics import Metrics

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read and hashed per worker-thread call
DAMAGE_BATCH = 256  # damaged blobs reported at once


@dataclass
class Pass:
    """What one scrub pass saw."""

    blobs: int = 0
    bytes: int = 0
    damaged: int = 0


class Scrubber:
    def __init__(self, index: Index, blobs: BlobStore, interval: float | None, rate: int,
                 on_damage: Callable[[dict[str, str], str], Awaitable[None]],
                 metrics: Metrics | None = None) -> None:
        self.index = index
        self.blobs = blobs
        self.interval = interval  # seconds between passes; None: no scrub
        self.rate = rate  # bytes per second, at most
        self.on_damage = on_damage  # ({sha256: reason}, check)
        self.metrics = metrics

    async def run(self) -> None:
        if self.interval is None:
            return
        while True:
            await trio.sleep(self.seconds_until_due())
            try:
                await self.scrub()
            except Exception:  # a scrub that cannot run must not end the mount
                log.exception("scrub failed; trying again in %ds", self.interval)
                await trio.sleep(self.interval)

    def seconds_until_due(self) -> float:
        assert self.interval is not None
        with self.index.read() as r:
            last = r.meta_json("scrub")
        if not last or not last.get("finished"):
            return 0.0
        due = parse_rfc3339(last["finished"]) + timedelta(seconds=self.interval)
        return max(0.0, (due - now_utc()).total_seconds())

    async def scrub(self) -> Pass:
        """One pass over every blob in use."""
        started = now_utc()
        blobs = await trio.to_thread.run_sync(self._blobs)
        seen = Pass()
        pace = _Pace(self.rate)
        found: dict[str, str] = {}  # sha256 -> why, not reported yet
        for sha, size in blobs:
            reason = await self._check(sha, size, pace)
            seen.blobs += 1
            if reason is None:
                continue
            with self.index.read() as r:
                entry = r.blob_ref(sha)
            if entry is None:
                continue  # collected while we looked: no damage
            seen.damaged += 1
            found[sha] = reason
            if len(found) >= DAMAGE_BATCH:
                await self.on_damage(found, "scrub")
                found = {}
        if found:
            await self.on_damage(found, "scrub")
        seen.bytes = pace.done
        finished = now_utc()
        record = {"started": rfc3339(started), "finished": rfc3339(finished),
                  "blobs": seen.blobs, "bytes": seen.bytes, "damaged": seen.damaged}
        await trio.to_thread.run_sync(self._record, record)
        if seen.blobs:
            log.log(logging.WARNING if seen.damaged else logging.INFO,
                    "scrub: %d blobs, %d bytes checked in %ds, %d damaged", seen.blobs,
                    seen.bytes, (finished - started).total_seconds(), seen.damaged)
        return seen

    def _blobs(self) -> list[tuple[str, int]]:
        """(sha256, size) of every blob in use and not known damaged, in order."""
        with self.index.read() as r:
            return sorted((sha, entry.size) for sha, entry in r.blob_refs().items()
                          if not entry.damaged)

    def _record(self, record: dict[str, object]) -> None:
        with self.index.write() as w:
            w.put_meta_json("scrub", record)

    async def _check(self, sha: str, size: int, pace: _Pace) -> str | None:
        """Why the blob is damaged, or None if its bytes hash to its name."""
        try:
            f = os.fdopen(self.blobs.open_blob(sha), "rb", buffering=0)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return "blob file missing"
            return f"blob file unreadable: {e.strerror}"
        with f:
            reason = await self._check_open(f, sha, size, pace)
            if reason and not self.blobs.is_current(sha, f.fileno()):
                return None  # a repair replaced the file meanwhile: the next pass looks
            return reason

    async def _check_open(self, f: IO[bytes], sha: str, size: int,
                          pace: _Pace) -> str | None:
        # read once, not to be kept: spare the page cache readers rely on (Linux 6.3+)
        with contextlib.suppress(OSError):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_NOREUSE)
        actual = os.fstat(f.fileno()).st_size
        if actual != size:
            return f"blob file has {actual} bytes, {size} expected"
        h = hashlib.sha256()
        while True:
            try:
                n = await trio.to_thread.run_sync(_hash_chunk, f, h)
            except OSError as e:
                return f"blob file unreadable: {e.strerror}"
            if n == 0:
                break
            if self.metrics:
                self.metrics.scrubbed_bytes.inc(n)
            await pace.wait(n)
        if h.hexdigest() != sha:
            return "blob content does not match its sha256"
        return None


def _hash_chunk(f: IO[bytes], h: hashlib._Hash) -> int:
    data = f.read(CHUNK)
    h.update(data)
    return len(data)


class _Pace:
    """Sleeps so that the bytes read over a pass stay under ``rate`` per second."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.start = trio.current_time()
        self.done = 0

    async def wait(self, n: int) -> None:
        self.done += n
        ahead = self.done / self.rate - (trio.current_time() - self.start)
        if ahead > 0:
            await trio.sleep(ahead)
