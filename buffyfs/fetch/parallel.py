"""Parallel ranges: one body over several connections, into the segmented partial file.

A body of at least ``MIN_SIZE`` bytes from an origin that serves ranges (Accept-Ranges
and a validator for If-Range), with the source option ``connections`` above 1, is
fetched like aria2 does: the first answer (``bytes=START-``) keeps streaming from the
start, and up to ``connections - 1`` more connections each take a part of what is
left, split at segment boundaries (``Range: bytes=A-B``, guarded by ``If-Range``, each
answer checked against its ``Content-Range``). A connection that finishes its part
takes the back half of the largest part left; the file is written with ``pwrite`` at
each part's place. Every connection holds one of the host's connections
(``[daemon] max_connections_per_host``, across all downloads): when none is free, the
body makes do with fewer.

What is trusted: the bytes before START, the segments the map already had (``done``),
and what the connections write now. Whole segments go into the map (``on_map``, after
an fdatasync, at most every ``RECORD_EVERY`` seconds), so a restart keeps every one
of them. The sha256 follows the contiguous prefix as it grows, reading back (from the
page cache) the bytes other connections wrote ahead of it.

Each connection retries its own failures (connection errors, stalls, 5xx, 408, 429)
with the refresh's backoff and Retry-After, up to ``CONNECTION_TRIES`` in a row; then
the attempt fails, keeping everything that arrived. A ``200`` to a range (an origin
that says it serves ranges but does not, or a body that changed) fails the attempt
with ``RangesRefused``: the next attempt uses one stream.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from buffyfs.fetch import downloader
from buffyfs.fetch.downloader import AttemptError, Downloaded, Request, Resume
from buffyfs.fetch.segments import ByteRanges, LiveDownload
from buffyfs.safeio import open_file

log = logging.getLogger(__name__)

MIN_SIZE = 64 << 20  # bodies smaller than this use one connection
BATCH = 1 << 20  # bytes a connection gathers before it writes them
HASH_BLOCK = 4 << 20  # bytes the hash reads back at a time
CONNECTION_TRIES = 5  # failures in a row of one connection before the attempt fails
RECORD_EVERY = 0.5  # seconds: the least time between two writes of the map


class RangesRefused(AttemptError):
    """The origin answered a range with the whole body: use one stream from now on."""


@dataclass
class Part:
    pos: int  # the next byte this part's connection writes
    end: int  # the byte after the part (moves back when another connection takes a half)
    busy: bool = False


@dataclass
class Plan:
    """What a refresh lets one attempt do with ranges."""

    connections: int
    limiter: trio.CapacityLimiter  # the host's connections (the first one is held)
    segment_size: int
    done: set[int]  # segments the map holds; grows as the engine records more
    on_map: Callable[[set[int]], None]  # records the map (after the fdatasync)
    backoff: Callable[[int, float | None], float]  # (failure number, Retry-After)
    live: LiveDownload
    on_progress: Callable[[int, int | None], None] | None = None  # (bytes had, total)


def wanted(plan: Plan | None, start: int, total: int) -> bool:
    """Whether a body of ``total`` bytes starting at ``start`` is fetched in parallel."""
    if plan is None:
        return False
    ahead = any(s * plan.segment_size >= start for s in plan.done)  # segments past a hole
    return ahead or (plan.connections > 1 and total - start >= MIN_SIZE)


async def receive(client: httpx.AsyncClient, req: Request, first: httpx.Response,
                  partial: Path, start: int, total: int, point: Resume, plan: Plan,
                  prefix_hash: downloader.PrefixHash | None = None) -> Downloaded:
    """Fetch bytes [start, total) of the body, ``first`` streaming from ``start``, over
    up to ``plan.connections`` connections; the whole file's sha256 in the result."""
    engine = _Engine(client, req, partial, start, total, point, plan)
    try:
        await engine.run(first, prefix_hash)
    finally:
        engine.close()
    return Downloaded(sha256=engine.hasher.hexdigest(), size=total, etag=point.etag,
                      last_modified=point.last_modified,
                      content_type=first.headers.get("Content-Type"), resumed_from=start)


def _first_failure(group: BaseExceptionGroup) -> BaseException:
    """What the attempt fails with when several connections failed at once: a refused
    range first, else the first failure (a bug or a disk error wins over them all)."""
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup) -> None:
        for e in g.exceptions:
            walk(e) if isinstance(e, BaseExceptionGroup) else leaves.append(e)

    walk(group)
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if not real or any(not isinstance(e, AttemptError) for e in real):
        return downloader._single(group)
    return next((e for e in real if isinstance(e, RangesRefused)), real[0])


class _Engine:
    def __init__(self, client: httpx.AsyncClient, req: Request, partial: Path, start: int,
                 total: int, point: Resume, plan: Plan) -> None:
        self.client, self.req, self.partial = client, req, partial
        self.start, self.total, self.point, self.plan = start, total, point, plan
        self.size = plan.segment_size
        self.guard = point.if_range()
        self.fd = open_file(partial, os.O_RDWR | os.O_CREAT, 0o600, replace=True)
        self.have = ByteRanges()  # bytes trusted: the prefix, the map, what we wrote
        self.have.add(0, start)
        for s in plan.done:
            self.have.add(s * self.size, min(total, (s + 1) * self.size))
        self.parts: list[Part] = []
        self.changed = trio.Event()  # something was written (the hash and map follow)
        self.hasher: Any = hashlib.sha256()
        self.hashed = 0
        self.mapped = set(plan.done)

    def close(self) -> None:
        os.close(self.fd)

    async def run(self, first: httpx.Response,
                  prefix_hash: downloader.PrefixHash | None) -> None:
        if prefix_hash is not None and prefix_hash.length == self.start and \
                prefix_hash.hasher is not None:
            self.hasher, self.hashed = prefix_hash.hasher.copy(), self.start
        holes = self._holes()
        if self.plan.done:
            log.info("%s: %d of %d segments already here; fetching the rest over up to %d "
                     "connections", self.plan.live.name, len(self.plan.done),
                     -(-self.total // self.size), self.plan.connections)
        self.parts = [Part(a, b) for a, b in holes]
        if not self.parts or self.parts[0].pos != self.start:
            self.parts.insert(0, Part(self.start, self.start))  # nothing to stream there
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._hash)
                    nursery.start_soon(self._record)
                    self.parts[0].busy = True
                    nursery.start_soon(self._connection, self.parts[0], first, None)
                    self._spread(nursery)
                    await self._wait_done()
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                raise _first_failure(group) from None
        except AttemptError as e:
            await trio.to_thread.run_sync(os.fsync, self.fd)  # what arrived is kept
            failed = self._failed(e)
            await self._hand_over_hash(prefix_hash)
            raise failed from None
        await trio.to_thread.run_sync(os.fsync, self.fd)
        if self.hashed != self.total:  # cannot be: every byte was written and hashed
            raise AttemptError("the body's hash did not reach its end", True)

    def _failed(self, e: AttemptError) -> AttemptError:
        """The attempt failed: keep what arrived (the map is written by the caller's
        next attempt from ``plan.done``), resume after the contiguous prefix. The file
        was just fsynced."""
        self._map_now()
        kind = type(e)
        return kind(str(e), e.retryable, e.retry_after,
                    resume=Resume(self.have.prefix(), self.point.etag,
                                  self.point.last_modified),
                    restart=False)

    async def _hand_over_hash(self, prefix_hash: downloader.PrefixHash | None) -> None:
        """After a failed attempt: the hash of the contiguous prefix the next one resumes
        after goes to it. If that one starts over instead, the bytes readers were given
        are checked against this hash (segments.LiveDownload.body_starts): without it
        every reader of the first bytes failed with EIO although the bytes were the same.
        The hash task may lag behind what was written: the rest is hashed here."""
        if prefix_hash is None:
            return
        self.hashed = await trio.to_thread.run_sync(
            downloader.hash_range, self.fd, self.hasher, self.hashed, self.have.prefix())
        prefix_hash.length, prefix_hash.hasher = self.hashed, self.hasher.copy()

    def _holes(self) -> list[tuple[int, int]]:
        """The byte ranges of [start, total) not yet had."""
        holes, at = [], self.start
        for s, e in zip(self.have.starts, self.have.ends, strict=True):
            if e <= at:
                continue
            if s > at:
                holes.append((at, s))
            at = max(at, e)
        if at < self.total:
            holes.append((at, self.total))
        return holes

    async def _wait_done(self) -> None:
        while self.hashed < self.total or any(p.pos < p.end for p in self.parts):
            waiter = self.changed
            await waiter.wait()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # --- connections -------------------------------------------------------------------

    def _spread(self, nursery: trio.Nursery) -> None:
        """Start connections, up to ``connections``, while a host connection is free and
        there is a part without one or one worth halving."""
        while sum(p.busy for p in self.parts) < self.plan.connections:
            part = self._next_part()
            if part is None:
                return
            borrower = object()  # a token per connection (tasks may hold one already)
            try:
                self.plan.limiter.acquire_on_behalf_of_nowait(borrower)
            except trio.WouldBlock:
                self._unsplit(part)
                return
            part.busy = True
            nursery.start_soon(self._connection, part, None, borrower)

    def _next_part(self) -> Part | None:
        idle = [p for p in self.parts if not p.busy and p.pos < p.end]
        if idle:
            return idle[0]
        busy = [p for p in self.parts if p.busy and p.end - p.pos >= 2 * self.size]
        if not busy:
            return None
        big = max(busy, key=lambda p: p.end - p.pos)
        mid = big.pos + (big.end - big.pos) // 2
        mid -= mid % self.size  # at a segment boundary: one writer per segment
        if mid <= big.pos:
            return None
        part = Part(mid, big.end)
        big.end = mid
        self.parts.append(part)
        return part

    def _unsplit(self, part: Part) -> None:
        """Give a half back to the part it came from (no connection for it)."""
        for p in self.parts:
            if p is not part and p.end == part.pos and p.busy:
                p.end = part.end
                self.parts.remove(part)
                return

    async def _connection(self, part: Part, response: httpx.Response | None,
                          borrower: object | None) -> None:
        """Fetch ``part`` (``response``: the first answer, already streaming from it);
        then take more work while there is some. Each connection but the first (the
        download's own) holds a host connection, for ``borrower``."""
        try:
            while True:
                await self._fetch_part(part, response)
                response = None
                part.busy = False
                self._notify()
                next_part = self._next_part()
                if next_part is None:
                    return
                part = next_part
                part.busy = True
        finally:
            if borrower is not None:
                self.plan.limiter.release_on_behalf_of(borrower)

    async def _fetch_part(self, part: Part, response: httpx.Response | None) -> None:
        failures = 0
        while part.pos < part.end:
            try:
                if response is not None:
                    await self._receive(response, part)
                else:
                    headers = {**self.req.headers, "Range": f"bytes={part.pos}-{part.end - 1}"}
                    if self.guard:
                        headers["If-Range"] = self.guard
                    async with self.client.stream(
                        self.req.method, self.req.url, headers=headers,
                        content=self.req.body.encode() if self.req.body is not None else None,
                        timeout=httpx.Timeout(self.req.attempt_timeout),
                    ) as answer:
                        self._check(answer, part)
                        await self._receive(answer, part)
                failures = 0
            except (httpx.HTTPError, AttemptError) as e:
                if isinstance(e, RangesRefused) or \
                        isinstance(e, AttemptError) and not e.retryable:
                    raise
                failures += 1
                message = downloader.describe_http_error(e, self.req) \
                    if isinstance(e, httpx.HTTPError) else str(e)
                if failures >= CONNECTION_TRIES:
                    raise AttemptError(f"{message} (a connection failed {failures} times "
                                       "in a row)", True) from None
                retry_after = e.retry_after if isinstance(e, AttemptError) else None
                delay = self.plan.backoff(failures, retry_after)
                log.info("%s: bytes %d-%d: %s; retrying in %.1f s", self.plan.live.name,
                         part.pos, part.end - 1, downloader.scrub(message, self.req.secrets()),
                         delay)
                await trio.sleep(delay)
            finally:
                response = None

    def _check(self, answer: httpx.Response, part: Part) -> None:
        code = answer.status_code
        if code == 200:
            raise RangesRefused("the origin answered a range with the whole body (200): "
                                "one connection from now on", True)
        if code != 206:
            raise downloader._status_error(answer)
        got = answer.headers.get("Content-Range", "").strip()
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", got)
        if not m or int(m.group(1)) != part.pos or int(m.group(3)) != self.total:
            raise AttemptError(f"the origin answered bytes {part.pos}- with Content-Range "
                               f"{got!r}", True)

    async def _receive(self, answer: httpx.Response, part: Part) -> None:
        """Write what ``answer`` sends at ``part.pos`` until the part's end."""
        pending: list[bytes] = []
        size = 0
        async for chunk in answer.aiter_raw():
            pending.append(chunk)
            size += len(chunk)
            if size >= BATCH or part.pos + size >= part.end:
                await self._write(part, pending)
                pending, size = [], 0
                if part.pos >= part.end:
                    return  # the rest is another part's (or past the range)
        if pending:
            await self._write(part, pending)
        if part.pos < part.end:
            raise AttemptError(f"connection closed at byte {part.pos} of a part ending at "
                               f"{part.end}", True)

    async def _write(self, part: Part, chunks: list[bytes]) -> None:
        data = memoryview(b"".join(chunks))[: max(0, part.end - part.pos)]
        at, written = part.pos, 0
        while written < len(data):
            written += await trio.to_thread.run_sync(os.pwrite, self.fd, data[written:],
                                                     at + written)
        part.pos = at + len(data)
        self.have.add(at, part.pos)
        self.plan.live.arrived(at, part.pos)
        if self.plan.on_progress is not None:
            self.plan.on_progress(self.have.size(), self.total)
        self._notify()

    # --- the hash and the map ----------------------------------------------------------

    async def _hash(self) -> None:
        """Hash the file's bytes in order as the contiguous prefix grows."""
        while self.hashed < self.total:
            waiter = self.changed
            prefix = self.have.prefix()
            if prefix > self.hashed:
                length = min(HASH_BLOCK, prefix - self.hashed)
                block = await trio.to_thread.run_sync(os.pread, self.fd, length, self.hashed)
                if len(block) != length:
                    raise AttemptError("the partial file is shorter than what was written",
                                       True, restart=True)
                await trio.to_thread.run_sync(self.hasher.update, block)
                self.hashed += length
                if self.hashed >= self.total:
                    self._notify()
                continue
            await waiter.wait()

    def _whole(self) -> set[int]:
        count = -(-self.total // self.size)
        return {s for s in range(count) if s not in self.mapped
                and self.have.covers(s * self.size, min(self.total, (s + 1) * self.size))}

    async def _record(self) -> None:
        """Put whole segments into the map, after an fdatasync, every RECORD_EVERY."""
        while True:
            await trio.sleep(RECORD_EVERY)
            new = self._whole()
            if new:
                await trio.to_thread.run_sync(os.fdatasync, self.fd)
                self.mapped |= new
                self.plan.done |= new
                self.plan.on_map(self.plan.done)

    def _map_now(self) -> None:
        """Record every whole segment (the file was just fsynced)."""
        new = self._whole()
        if new:
            self.mapped |= new
            self.plan.done |= new
            self.plan.on_map(self.plan.done)
