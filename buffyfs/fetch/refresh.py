"""One refresh of one source: attempts, commit, and the state the user sees.

A refresh makes up to ``max_attempts`` attempts (downloader.download) with
exponential backoff and jitter between retryable failures, then commits the
result: a new version, or only a recorded check (304, or the same bytes as the
newest version). It holds the source's lock (blobs.SourceLock) throughout, so the
mount and the command line never download the same source at once.

What a failed attempt leaves: the partial file and its resume point (saved in the
source's state as ``partial``, so a later refresh or a restarted daemon continues it)
survive every failure except those that make it worthless (downloader.AttemptError
``restart``: a changed validator, a refused range, an origin that cannot resume, no
room under the quota). While the attempts run, the state shows the attempt number,
the last attempt's error, when the next attempt is due, and whether the source is
queued for a download slot.

The quota (``make_room``) bounds what downloads write, partial files included: a
body is granted room as it arrives (all of it at once when its length is known),
and one that does not fit fails with ``cache full``, not retried. Partial files count
by the blocks they take, not their (sparse) length.

The partial file is segmented (segments.py): its map of whole segments, kept with the
resume point, is what a restarted daemon resumes from. Each refresh shows itself to
readers as a ``segments.LiveDownload`` (``live``), sealed once its version is committed
or failed for good when the refresh ends without one.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import httpx
import trio

from buffyfs import crash
from buffyfs.errors import FetchError, NotFound
from buffyfs.fetch import downloader, parallel, ranges, segments
from buffyfs.options import DEFAULT_OPTIONS, human_size, parse_duration, parse_size, redact_url
from buffyfs.store import validate
from buffyfs.store.blobs import BlobStore, SourceLock
from buffyfs.store.gc import CacheFull, CommitLock
from buffyfs.store.index import Index, Writer, now_utc, rfc3339
from buffyfs.store.metrics import Metrics
from buffyfs.store.records import Source, Version
from buffyfs.store.writes import IndexWrites

log = logging.getLogger(__name__)
T = TypeVar("T")

PROGRESS_EVERY = 1.0  # seconds between progress writes to the index
LOCK_POLL = 0.2
BACKOFF_CAP = 60.0  # seconds: the longest wait of our own between attempts
RETRY_AFTER_CAP = 600.0  # seconds: the longest Retry-After we honour
GROW_STEP = 16 << 20  # bytes: the least room a body of unknown length is granted at a time
# refreshes of one host under way at once, per download slot of the host (Refresher.admit)
UNDER_WAY_PER_SLOT = 4


def backoff(attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): exponential
    with jitter, at least the origin's Retry-After (capped)."""
    delay = min(BACKOFF_CAP, 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP))
    return delay


def _retry_wording(delay: float, retry_after: float | None) -> str:
    """When the next attempt comes, as the error message ends."""
    if retry_after is None or delay > retry_after + 1:
        return f"retrying in {delay:.1f} s" if delay < 10 else f"retrying in {delay:.0f} s"
    capped = f", capped at {RETRY_AFTER_CAP:.0f} s" if retry_after > RETRY_AFTER_CAP else ""
    return f"retrying after Retry-After: {retry_after:.0f} s{capped}"


@functools.lru_cache(maxsize=4096)
def host_of(url: str) -> str:
    """The host of ``url``, parsed once (a refresh asks it for each of its limits)."""
    return httpx.URL(url).host


def _request_key(req: downloader.Request) -> str:
    """Identifies the request a partial body belongs to (secrets only as a hash)."""
    raw = json.dumps([req.url, req.method, req.body, sorted(req.headers.items())])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def request_for(source: Source, newest: Version | None = None
                ) -> downloader.Request:
    """The request a refresh of ``source`` makes (conditional on ``newest``'s validators)."""
    options = {**DEFAULT_OPTIONS, **source.options}  # stored before an option existed
    url = source.url
    if any(k.lower() == "authorization" for k in options["headers"]):
        url = str(httpx.URL(url).copy_with(username=None, password=None))  # header wins
    return downloader.Request(
        url=url, method=options["method"], body=options["body"],
        headers=options["headers"],
        etag=newest.etag if newest else None,
        last_modified=newest.last_modified if newest else None,
        attempt_timeout=float(parse_duration(options["attempt_timeout"])),
        min_speed=parse_size(options["min_speed"]),
        min_speed_time=float(parse_duration(options["min_speed_time"])),
        max_time=float(parse_duration(options["attempt_max_time"])),
    )


def partial_key(source: Source) -> str:
    """The key a saved partial of ``source`` must carry to be resumed (gc sweeps others)."""
    return _request_key(request_for(source))


def _same_body(saved: dict[str, Any] | None, point: downloader.Resume | None) -> bool:
    """Whether a body answered whole (200) is the one a saved map belongs to: the same
    strong validator, as If-Range would have judged it."""
    if saved is None or point is None:
        return False
    before = downloader.Resume(0, saved.get("etag"), saved.get("last_modified"))
    return before.if_range() is not None and before.if_range() == point.if_range() \
        and (before.etag, before.last_modified) == (point.etag, point.last_modified)


@dataclass
class Outcome:
    version: Version | None = None  # the new version, if one was made
    error: str | None = None  # why the refresh gave up
    checked: bool = False  # the origin answered (new version, 304 or same bytes)
    # new_version, unchanged (the same bytes), not_modified (304) or failed
    result: str = "failed"

    def record(self, started: float) -> dict[str, Any]:
        """The state's ``last_refresh``: what ``buffyfs refresh --wait`` waits for."""
        return {"started": started, "result": self.result,
                "version": self.version.id if self.version else None,
                "error": self.error}


class Refresher:
    def __init__(
        self,
        index: Index,
        blobs: BlobStore,
        client: httpx.AsyncClient,
        max_downloads: int = 4,
        max_downloads_per_host: int = 2,
        on_state: Callable[[str, str], None] | None = None,
        make_room: Callable[[int], Awaitable[None] | None] | None = None,
        on_version: Callable[[str], None] | None = None,
    ) -> None:
        self.index = index
        self.blobs = blobs
        self.client = client
        self.global_limit = trio.CapacityLimiter(max_downloads)
        self.per_host = max_downloads_per_host
        self.host_limits: dict[str, trio.CapacityLimiter] = {}
        self.on_state = on_state
        # evicts so that N more bytes fit, or raises CacheFull: the mount's is async (its
        # collection runs off the loop), the command line's blocks
        self.make_room = make_room
        # whether a quota is set now (the mount's collector): without one, a reservation
        # neither scans partial/ nor waits for the lock (a burst of 1,000 refreshes did
        # that on the loop for each)
        self.has_quota: Callable[[], bool] = lambda: True
        self.room = trio.Lock()  # one reservation at a time (it may wait for a collection)
        self.locking = trio.CapacityLimiter(1)  # source locks taken one at a time
        self.on_version = on_version  # told after each new version
        self.progress: dict[str, tuple[int, int | None]] = {}
        self.metrics: Metrics | None = None
        self.proxy_clients: dict[str, httpx.AsyncClient] = {}
        self.wakes: dict[str, trio.Event] = {}  # sources waiting out a backoff
        self.reserved: dict[str, int] = {}  # quota held by bodies being received
        self.live: dict[str, segments.LiveDownload] = {}  # refreshes under way
        self.live_changed = segments.Broadcast()  # a refresh started, ended, or its body
        self.max_connections_per_host = 8  # TCP connections to one host, all downloads
        self.host_connections: dict[str, trio.CapacityLimiter] = {}
        # the mount's queue of index writes (writes.py); None: write on the spot (CLI)
        self.writes: IndexWrites | None = None
        self.under_way: dict[str, trio.CapacityLimiter] = {}  # per host (admit)
        self.admitted: dict[str, trio.CapacityLimiter] = {}  # source -> the one it holds

    def wake(self, name: str) -> None:
        """Cut short the backoff of ``name``, if it is waiting to retry."""
        if name in self.wakes:
            self.wakes[name].set()

    def _set_state(self, name: str, state: str, **fields: Any) -> None:
        self._post_state(name, state=state, **fields)
        if self.on_state:
            self.on_state(name, state)

    def _post_state(self, name: str, **fields: Any) -> None:
        """``Index.set_state``, off the loop in the mount (queued, in order)."""
        if self.writes is None:
            self.index.set_state(name, **fields)
        else:
            self.writes.set_state(name, **fields)

    def _post(self, op: Callable[[Writer], None]) -> None:
        """Run ``op`` in an index write, off the loop in the mount (queued, in order)."""
        if self.writes is None:
            with self.index.write() as w:
                op(w)
        else:
            self.writes.post(op)

    async def _write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A whole index write, in a worker thread in the mount (after what is queued)."""
        if self.writes is None:
            return fn(*args, **kwargs)
        return await self.writes.call(fn, *args, **kwargs)

    def _host_limit(self, host: str) -> trio.CapacityLimiter:
        if host not in self.host_limits:
            self.host_limits[host] = trio.CapacityLimiter(self.per_host)
        return self.host_limits[host]

    def connections_to(self, url: str) -> trio.CapacityLimiter:
        """The connections to ``url``'s host: every download and ranged request holds one."""
        return self._connections(host_of(url))

    def _connections(self, host: str) -> trio.CapacityLimiter:
        if host not in self.host_connections:
            self.host_connections[host] = trio.CapacityLimiter(self.max_connections_per_host)
        return self.host_connections[host]

    async def refresh(
        self, name: str, on_progress: Callable[[int, int | None], None] | None = None,
        on_note: Callable[[str], None] | None = None, force: bool = False,
    ) -> Outcome:
        """Refresh ``name`` now. ``on_progress(bytes, total)`` follows the body;
        ``on_note(text)`` hears what a person watching should know (retries, resumes,
        a restart from byte 0, a wait for a download slot). ``force`` (or the state's
        ``force``, set by ``refresh --force``): an unconditional GET, from byte 0.

        The outcome is also left in the state as ``last_refresh`` (``Outcome.record``),
        stamped with the wall-clock time the refresh started."""
        # What the last refresh recorded (its resume point) may still be queued: the
        # mount's reads see it (Reader.queued_state), so nothing waits for its commit
        # here (a burst of 1,000 refreshes woke together from that wait: turns of 100 ms).
        lock = SourceLock(self.blobs.lock_path(name))
        # An open and an flock (~1 ms on a busy disk): in a worker thread, one refresh
        # at a time, so that the refreshes of a burst go on one by one, not dozens in
        # one loop turn. Taken, it is released below: nothing before the try awaits.
        while not await trio.to_thread.run_sync(  # noqa: ASYNC110
                lock.try_acquire, limiter=self.locking):
            await trio.sleep(LOCK_POLL)  # held by another process
        try:
            await self.admit(name)
        except BaseException:
            lock.release()
            raise
        started = time.time()
        live = self.live[name] = segments.LiveDownload(name)
        self.live_changed.notify()
        outcome = Outcome(error="interrupted")
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._fetch_wanted, name, live)
                    outcome = await self._refresh_locked(name, on_progress, on_note, force,
                                                         live)
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:  # trio wraps what the nursery raised
                raise downloader._single(group) from None
            return outcome
        except FetchError as e:
            outcome = Outcome(error=str(e))
            raise
        finally:
            record = outcome.record(started)
            self._post(lambda w: w.record_refresh(name, record))
            try:
                self._after_refresh(name)
            finally:  # whatever the clean-up met, the source is not left locked
                self._end_live(name, live, outcome)
                self._leave(name)
                lock.release()

    async def admit(self, name: str) -> None:
        """Wait until fewer than UNDER_WAY_PER_SLOT x max_downloads_per_host refreshes
        of the source's host are under way (past this point), then count this one.

        A burst of 1,000 refreshes of one host set all of them up at once (their
        download, its task, its callbacks) to wait for 2 download slots: the garbage
        collector walked those objects again and again, 15-35 ms each time, on the loop.
        Waiting here holds nothing but the task; the source shows ``queued``. Other hosts
        are not held up by this one's burst. Left while waiting out a backoff."""
        try:
            host = host_of(self.index.get_source(name).url)
        except NotFound:
            return  # the refresh says so
        limit = self.under_way.get(host)
        if limit is None:
            limit = self.under_way[host] = trio.CapacityLimiter(
                UNDER_WAY_PER_SLOT * self.per_host)
        try:
            limit.acquire_nowait()
        except trio.WouldBlock:
            self._post_state(name, queued=f"waiting for a download slot: "
                             f"{limit.borrowed_tokens:g} refreshes of {host} under way")
            await limit.acquire()
        self.admitted[name] = limit

    def _leave(self, name: str) -> None:
        """This refresh no longer counts as under way (see ``admit``)."""
        limit = self.admitted.pop(name, None)
        if limit is not None:
            limit.release()

    def _end_live(self, name: str, live: segments.LiveDownload,
                  outcome: Outcome | None) -> None:
        """Seal ``live`` with the version made, or fail it for good (no await)."""
        if outcome is not None and outcome.version is not None:
            live.seal(outcome.version.sha256, outcome.version)
        else:
            live.fail(outcome.error if outcome is not None and outcome.error
                      else "the download ended without a new version")
        if self.live.get(name) is live:
            del self.live[name]
        self.live_changed.notify()

    async def _fetch_wanted(self, name: str, live: segments.LiveDownload) -> None:
        """Random access ahead for the readers of ``live`` (ranges.py)."""
        try:
            source = self.index.get_source(name)
        except NotFound:
            return
        req = request_for(source)
        await ranges.fetch_wanted(live, self.client_for(source.options), req,
                                  self.blobs.partial_path(name), self.connections_to(req.url))

    async def wait_body(self, name: str) -> segments.LiveDownload:
        """Wait until a download of ``name`` is receiving a body of known length."""
        while True:
            waiter = self.live_changed.waiter()
            live = self.live.get(name)
            if live is not None and live.started and live.total is not None \
                    and not live.done:
                return live
            await waiter.wait()

    def _after_refresh(self, name: str) -> None:
        """Clear what only a running refresh shows (no await: runs even when cancelled)."""
        self.progress.pop(name, None)
        self.reserved.pop(name, None)  # committed bytes count as blobs from now on
        with self.index.read() as r:  # the mount's reads see what it queued
            exists = r.source(name) is not None
            state = r.state(name) if exists else None
        done: dict[str, Any] = {k: None for k in ("attempt", "queued")
                                if state is not None and getattr(state, k) is not None}
        if state is not None and state.state != "idle":  # interrupted (cancelled, killed
            done.update(state="idle", progress=None)  # by a signal...): not fetching
        if done:
            self._post_state(name, **done)
        if not exists:  # removed meanwhile (the mount cancelled us): drop its partial
            self.blobs.partial_path(name).unlink(missing_ok=True)

    async def _refresh_locked(
        self, name: str, on_progress: Callable[[int, int | None], None] | None,
        on_note: Callable[[str], None] | None = None, force: bool = False,
        live: segments.LiveDownload | None = None,
    ) -> Outcome:
        live = live or segments.LiveDownload(name)
        try:
            source = self.index.get_source(name)
        except NotFound:
            return Outcome(error="source removed")
        options = source.options
        with self.index.read() as r:
            versions = r.versions(name)
            force = force or bool(r.state(name).force)
        newest = versions[0] if versions else None
        if force:  # validators that lie: ask without them, and resume nothing
            self._post_state(name, force=None)
            newest = None
        if newest and newest.url != redact_url(source.url):
            newest = None  # validators of another URL say nothing about this one
        if newest and newest.damaged:
            newest = None  # its blob is damaged (scrub.py): a 304 would not repair it
        req = request_for(source, newest)
        partial = self.blobs.partial_path(name)
        key = _request_key(req)
        resume = None if force else self._saved_resume(name, key)
        saved_point: list[dict[str, Any] | None] = [None]

        def record_map(done: set[int]) -> None:
            """Whole segments, on disk, into the map (a restart keeps every one)."""
            if saved_point[0] is not None:
                saved_point[0] = {**saved_point[0], "segments": segments.segment_ranges(done)}
                self._post_state(name, partial=saved_point[0])

        # whole segments the saved map vouches for (fdatasync'd before they were mapped)
        plan = parallel.Plan(
            connections=options.get("connections", DEFAULT_OPTIONS["connections"]),
            limiter=self.connections_to(req.url), segment_size=segments.SEGMENT_SIZE,
            done=set() if force else self._saved_map(name, key), on_map=record_map,
            backoff=backoff, live=live)
        with self.index.read() as r:
            saved_point[0] = r.state(name).partial if plan.done else None
        single = [False]  # the origin answered a range with 200: one stream from now on
        in_parallel = [False]  # the attempt under way fetches over several connections
        prefix_hash = downloader.PrefixHash()  # no second read of bytes hashed already
        last_write = [0.0]
        reached = [0]  # the most bytes of the body in hand during this refresh
        asked = [resume]  # the resume point the attempt under way asked for

        def say(level: int, text: str) -> None:
            log.log(level, "%s: %s", name, text)
            if on_note:
                on_note(text)

        def progress(done: int, total: int | None) -> None:
            reached[0] = max(reached[0], done)
            done = max(done, live.written.size())  # with what was fetched ahead (ranges.py)
            if self.metrics:
                before = self.progress.get(name, (0, None))[0]
                self.metrics.bytes_downloaded.inc(max(0, done - before))
            self.progress[name] = (done, total)
            if on_progress:
                on_progress(done, total)
            if trio.current_time() - last_write[0] >= PROGRESS_EVERY:
                last_write[0] = trio.current_time()
                self._post_state(name, progress={"bytes": done, "total": total})

        plan.on_progress = progress

        async def body_starts(start: int, total: int | None,
                              point: downloader.Resume | None,
                              content_type: str | None = None) -> None:
            if start < reached[0]:  # the bar goes back: say why
                why = "the origin answered the resume with the whole body (it changed, " \
                    "or ignores ranges)" if asked[0] is not None else "the last attempt " \
                    "left nothing to resume (the origin gives no Accept-Ranges or no " \
                    "validator, or refused the range)"
                say(logging.WARNING, f"starting over from byte {start} ({reached[0]} bytes "
                    f"were in hand): {why}")
                reached[0] = start
            self.progress[name] = (start, total)  # bytes counted from here on
            # The whole file counts against the quota, the bytes kept from before too.
            if total is not None:
                await self._reserve(name, total)
            else:
                await self._grow(name, start)
            held = prefix_hash.length  # what the file held after the last attempt
            live.body_starts(start, total, (held, prefix_hash.hasher.hexdigest())
                             if held > start and prefix_hash.hasher is not None else None)
            live.guard = point.if_range() if point is not None else None
            live.content_type = content_type  # what the server's streamed answer says
            self.live_changed.notify()
            if start == 0 and not _same_body(saved_point[0], point):
                plan.done.clear()  # a whole body, maybe another: nothing of before is trusted
            in_parallel[0] = not single[0] and point is not None and total is not None \
                and parallel.wanted(plan, start, total)
            if not in_parallel[0]:  # one stream from `start`: the file ends there for now
                below = segments.segments_below(start, total)
                plan.done.intersection_update(range(below))
            # Recorded before any byte is written: a daemon killed mid-body resumes.
            saved = None if point is None else {
                "key": key, "etag": point.etag, "last_modified": point.last_modified,
                "segment_size": segments.SEGMENT_SIZE, "total": total,
                "segments": segments.segment_ranges(plan.done)}
            saved_point[0] = saved
            self._post_state(name, partial=saved)

        async def written(fd: int, end: int) -> None:
            """Bytes [0, end) are in the file: readers may have them; each segment
            they complete goes into the map once it is on disk. Not the whole body's
            last one: the attempt's fsync follows at once, then the commit clears the
            map (a burst of small bodies made a second sync and a map write each)."""
            live.arrived(0, end)
            for generation, length, digest in live.pending_checks():
                if end >= length:  # the bytes a started-over download dropped: the same?
                    same = await trio.to_thread.run_sync(downloader.prefix_digest, fd,
                                                         length) == digest
                    live.checked(generation, same)
            whole = segments.segments_below(end, live.total)
            if saved_point[0] is not None and whole > len(plan.done) and end != live.total:
                await trio.to_thread.run_sync(os.fdatasync, fd)
                plan.done.update(range(whole))
                record_map(plan.done)

        async def ranged(response: httpx.Response, start: int, total: int,
                         point: downloader.Resume) -> downloader.Downloaded | None:
            if not in_parallel[0]:
                return None
            return await parallel.receive(self.client_for(options), req, response, partial,
                                          start, total, point, plan, prefix_hash)

        max_attempts = options["max_attempts"]
        error = "no attempt made"
        for attempt in range(1, max_attempts + 1):
            label = f"attempt {attempt}/{max_attempts}"
            if attempt > 1 and self.metrics:
                self.metrics.retries.inc()
            self.progress.pop(name, None)
            self._set_state(name, "fetching", progress=None, attempt=attempt, queued=None)
            started = now_utc()
            resume = asked[0] = self._on_disk(name, resume)
            try:
                async with self._slot(name, req.url, say):
                    offset = resume.offset if resume is not None else 0
                    self._post_state(name, progress={"bytes": offset, "total": None})
                    if resume is not None:
                        say(logging.INFO, f"{label}: resuming at byte {resume.offset}")
                    result = await downloader.download(
                        self.client_for(options), req, partial, progress, resume, body_starts,
                        functools.partial(self._grow, name), written, prefix_hash, ranged,
                    )
            except downloader.AttemptError as e:
                self.reserved.pop(name, None)  # no quota held while waiting to retry
                error = f"{label}: {e}"
                if isinstance(e, parallel.RangesRefused):
                    single[0] = True
                if e.resume is not None:
                    resume = e.resume
                    if saved_point[0] is not None:  # on disk: a restart resumes there too
                        saved_point[0] = {**saved_point[0], "prefix": e.resume.offset}
                        self._post_state(name, partial=saved_point[0])
                elif e.restart:  # worthless now: the next attempt starts over
                    resume = None
                    self._post_state(name, partial=None)
                    partial.unlink(missing_ok=True)
                # else: the partial is as it was, and so is where to continue it
                if not e.retryable or attempt == max_attempts:
                    log.warning("%s: %s (%s)", name, error, redact_url(req.url))
                    break
                delay = backoff(attempt, e.retry_after)
                error += "; " + _retry_wording(delay, e.retry_after)
                say(logging.WARNING, error)
                now = now_utc()
                self._set_state(
                    name, "waiting", progress=None, attempt=attempt + 1, queued=None,
                    last_error={"at": rfc3339(now), "message": error},
                    next_check=rfc3339(now + timedelta(seconds=round(delay))),
                )
                self.wakes[name] = wake = trio.Event()
                self._leave(name)  # waiting holds no place of its host (admit)
                with trio.move_on_after(delay):
                    await wake.wait()  # or until asked to try now (`refresh`)
                del self.wakes[name]
                await self.admit(name)
                continue
            # durable before the blob is renamed: a crash then must not resume it
            await self._write(self.index.set_state, name, partial=None)
            return await self._commit(name, source, result, started)
        if resume is None:
            partial.unlink(missing_ok=True)
        else:
            say(logging.INFO, f"keeping the {resume.offset} bytes in hand: the next refresh "
                "resumes there")
        failures = await self._write(self.index.record_failure, name, now_utc(), error)
        self._set_state(name, "idle", queued=None)
        self._count("failed")
        log.error("%s: refresh gave up (%d in a row): %s", name, failures, error)
        return Outcome(error=error)

    @asynccontextmanager
    async def _slot(self, name: str, url: str,
                    say: Callable[[int, str], None]) -> AsyncIterator[None]:
        """Hold a download slot of the source's host, then one of all downloads (in that
        order: a source waiting for its host holds no slot another host could use).
        While it waits, the source shows ``fetching`` with ``queued`` saying why."""
        host = host_of(url)
        held: list[trio.CapacityLimiter] = []
        try:
            for limit, what in ((self._host_limit(host), f"max_downloads_per_host for {host}"),
                                (self.global_limit, "max_downloads"),
                                (self._connections(host),
                                 f"max_connections_per_host for {host}")):
                try:
                    limit.acquire_nowait()
                except trio.WouldBlock:
                    why = f"waiting for a download slot: {limit.borrowed_tokens} of " \
                        f"{what} ({limit.total_tokens:g}) in use"
                    self._post_state(name, queued=why)
                    say(logging.INFO, f"queued, {why}")
                    await limit.acquire()
                held.append(limit)
            self._post_state(name, queued=None)
            yield
        finally:
            for limit in reversed(held):
                limit.release()

    def _count(self, result: str) -> None:
        if self.metrics:
            self.metrics.downloads.labels(result=result).inc()

    async def _reserve(self, name: str, need: int) -> None:
        """Make room under the quota for a partial file of ``need`` bytes for ``name``
        besides what the other downloads under way hold and the other partial files
        take, and hold it; or fail the attempt (not retryable, the partial dropped)."""
        if self.make_room is None:
            return
        if not self.has_quota():
            self.reserved[name] = need
            return
        async with self.room:  # what the others hold does not change under the check
            running = sum(n for source, n in self.reserved.items() if source != name)
            kept = self._other_partials(name)
            try:
                fits = self.make_room(need + running + kept)
                if inspect.isawaitable(fits):
                    await fits
            except CacheFull as e:
                self._refuse(e, running, kept)
            self.reserved[name] = need

    @staticmethod
    def _refuse(e: CacheFull, running: int, kept: int) -> None:
        """A reservation that does not fit fails the attempt, saying what holds room."""
        held = [f"{human_size(running)} of it held by other downloads under way"] \
            if running else []
        held += [f"{human_size(kept)} by partial files kept to be resumed"] if kept else []
        raise downloader.AttemptError(
            f"{e} ({', '.join(held)})" if held else str(e), retryable=False, restart=True
        ) from None

    async def _grow(self, name: str, size: int) -> int:
        """Let the partial file of ``name`` grow to ``size`` bytes; returns the size
        granted. Room is asked for ahead (an eighth more, at least GROW_STEP), less
        when that does not fit, so that a long body asks the collector rarely."""
        if self.make_room is None:
            return sys.maxsize
        granted = self.reserved.get(name, 0)
        if size <= granted:
            return granted
        ahead = max(GROW_STEP, size // 8)
        while True:
            try:
                await self._reserve(name, size + ahead)
                return size + ahead
            except downloader.AttemptError:
                if ahead == 0:
                    raise
                ahead = ahead // 4 if ahead > downloader.BATCH else 0

    def _other_partials(self, name: str) -> int:
        """Bytes of disk that partial files no download of ours holds room for take
        (their blocks: a partial is sparse, its length says little)."""
        total = 0
        for f in self.blobs.partial_dir.glob("*.part"):
            source = f.name[: -len(".part")]
            if source != name and source not in self.reserved:
                try:
                    total += f.lstat().st_blocks * 512
                except FileNotFoundError:
                    pass
        return total

    def _on_disk(self, name: str, resume: downloader.Resume | None
                 ) -> downloader.Resume | None:
        """``resume`` at the partial file's real size (None when there is nothing)."""
        size = self.blobs.partial_size(name)  # never through a planted link
        if resume is None or size == 0:
            return None
        # the bytes the last attempt wrote (the file may be longer: sparse, or a
        # batch cut short)
        return downloader.Resume(min(size, resume.offset), resume.etag, resume.last_modified)

    def _saved_map(self, name: str, key: str) -> set[int]:
        """The whole segments a saved map of the request ``key`` holds."""
        with self.index.read() as r:
            saved = r.state(name).partial or {}
        if saved.get("key") != key or self.blobs.partial_size(name) == 0:
            return set()
        return segments.saved_segments(saved)

    def _saved_resume(self, name: str, key: str) -> downloader.Resume | None:
        """Where a download interrupted earlier (maybe by a restart) may continue."""
        with self.index.read() as r:
            saved = r.state(name).partial
        size = self.blobs.partial_size(name)
        if not saved or saved.get("key") != key or size == 0:
            return None
        vouched = segments.map_prefix(saved)  # None: saved before segments, the size counts
        offset = size if vouched is None else min(size, vouched)
        if offset == 0:
            return None
        return downloader.Resume(offset, saved.get("etag"), saved.get("last_modified"))

    def client_for(self, options: dict[str, Any]) -> httpx.AsyncClient:
        proxy = options.get("proxy")
        if not proxy:
            return self.client
        if proxy not in self.proxy_clients:
            self.proxy_clients[proxy] = downloader.new_client(proxy)
        return self.proxy_clients[proxy]

    async def aclose(self) -> None:
        for client in self.proxy_clients.values():
            await client.aclose()

    async def _commit(
        self,
        name: str,
        source: Source,
        result: downloader.Downloaded | downloader.NotModified,
        started: Any,
    ) -> Outcome:
        if isinstance(result, downloader.NotModified):
            await self._write(
                self.index.record_check, name, started, last_success=rfc3339(started),
                consecutive_failures=0, last_error=None, progress=None,
            )
            self._set_state(name, "idle")
            self._count("not_modified")
            log.info("%s: not modified", name)
            return Outcome(checked=True, result="not_modified")
        partial = self.blobs.partial_path(name)
        damaged = self.index.blob_damaged(result.sha256)  # fresh bytes must replace it
        if self.index.newest_sha256(name) == result.sha256 and not damaged:
            partial.unlink(missing_ok=True)  # same bytes as the newest version: a check only
            await self._write(self.index.commit_version, name, {"sha256": result.sha256},
                              started)
            self._set_state(name, "idle")
            self._count("unchanged")
            log.info("%s: checked, content unchanged", name)
            return Outcome(checked=True, result="unchanged")
        if not self.blobs.exists(result.sha256) and self.reserved.get(name, 0) < result.size:
            try:
                await self._reserve(name, result.size)
            except downloader.AttemptError as e:
                partial.unlink(missing_ok=True)
                await self._write(self.index.record_failure, name, now_utc(), str(e))
                self._set_state(name, "idle")
                log.error("%s: %s", name, e)
                return Outcome(error=str(e))
        # From blob to index commit, hold the commit lock shared: a collection never
        # takes this blob for an orphan.
        lock = CommitLock(self.blobs)
        await trio.to_thread.run_sync(lock.acquire, False)
        try:
            return await self._commit_blob(name, source, result, started, partial)
        finally:
            lock.release()

    async def _commit_blob(self, name: str, source: Source,
                           result: downloader.Downloaded, started: Any,
                           partial: Any) -> Outcome:
        damaged = self.index.blob_damaged(result.sha256)
        with self.index.read() as r:
            # A file no version refers to (its versions just collected, or left by a
            # crash) is unverified, and may be the damaged one: the fresh bytes win.
            unreferenced = r.blob_ref(result.sha256) is None
        try:
            blob = await trio.to_thread.run_sync(self.blobs.commit_partial, partial,
                                                 result.sha256, damaged or unreferenced)
            if damaged:  # the fresh bytes replaced the damaged file
                await self._write(self.index.clear_damage, result.sha256)
        except OSError as e:
            partial.unlink(missing_ok=True)
            message = f"cannot store the download: {e.strerror}"
            await self._write(self.index.record_failure, name, now_utc(), message)
            self._set_state(name, "idle")
            raise FetchError(message) from None
        crash.point("after-blob-rename")
        record = {
            "sha256": result.sha256, "size": result.size, "url": redact_url(source.url),
            "etag": result.etag, "last_modified": result.last_modified,
            "content_type": result.content_type, "tags": [],
        }
        rules = source.options.get("validate") or {}
        if rules:
            # Judged before the commit, so no reader ever sees an unjudged version.
            why = await validate.failure(rules, blob, result.size, result.sha256,
                                         result.content_type)
            record["tags"] = ["failed" if why else "valid"]
            if why:
                record["validation"] = why
                log.warning("%s: new version fails validation: %s", name, why)
        version = await self._write(self.index.commit_version, name, record, started)
        crash.point("after-version-commit")
        if version and self.on_version:
            self.on_version(name)
        if version and record.get("validation"):
            await self._write(self.index.set_state, name, last_error={
                "at": rfc3339(started),
                "message": f"version {version.id} failed validation: {record['validation']}",
            })
        self._set_state(name, "idle")
        self._count("new_version" if version else "unchanged")
        if version:
            tags = f", tagged {','.join(version.tags)}" if version.tags else ""
            log.info("%s: new version %s (%d bytes%s)", name, version.id, version.size,
                     tags)
        else:
            log.info("%s: checked, content unchanged", name)
        return Outcome(version=version, checked=True,
                       result="new_version" if version else "unchanged")
