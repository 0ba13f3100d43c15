"""The mount daemon: cache, downloader, scheduler, collector, scrubber and filesystem
in one trio nursery; with ``Settings.serve``, the HTTP server too. Without a mount
point (``buffyfs serve``) it is the same daemon minus FUSE: the filesystem object
still keeps the daemon's state (open versions, metrics, control writes), and nothing
is told to a kernel."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pyfuse3
import trio

from buffyfs import __version__, mounttable, watchdog
from buffyfs.errors import BuffyError, CacheError
from buffyfs.fetch import downloader
from buffyfs.fetch.refresh import Refresher, partial_key
from buffyfs.fetch.replica import Replica, ReplicaSettings
from buffyfs.fetch.scheduler import Scheduler
from buffyfs.fetch.upstream import Upstream
from buffyfs.fs import libfuse
from buffyfs.fs.handlers import BuffyFS
from buffyfs.fs.tree import SourceFacts, read_sources
from buffyfs.http import ServeSettings
from buffyfs.store import gc, memory, offload
from buffyfs.store.cache import Cache
from buffyfs.store.index import now_utc, rfc3339
from buffyfs.store.scrub import Scrubber
from buffyfs.store.unpacker import Unpacker
from buffyfs.store.writes import IndexWrites

if TYPE_CHECKING:
    from buffyfs.config import Config

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5  # how often the mount looks for changes made by other processes
REGISTER_WAIT = 10.0  # seconds a change watcher's round waits for a commit of ours
GC_INTERVAL = 600.0  # periodic collection, besides the one after each new version
REST_AFTER = 4.0  # after a collection whose plan took T, the next one a new version or a
# control write asks for waits T x this (REST_CAP at most; not one `buffyfs gc` asks for)
REST_CAP = 30.0
SWEEP_RETRY = 2.0  # seconds between tries of the start-up orphan sweep
SWITCH_INTERVAL = 0.0005  # seconds: sys.setswitchinterval of the daemon (see run)
SYNC_CHUNK = 16  # sources brought up to date per loop turn (change watcher, collector)
FORGET_SLICE = 0.002  # seconds of the loop per slice of a collected batch's kernel work
GIVE_BACK_WAIT = 30.0  # seconds the give-back waits for link counts and unlinks at most
TRIM_AFTER = 1000  # versions: a collection of more gives glibc's free heap back


@dataclass
class Settings:
    mountpoint: str | None  # None: no FUSE mount (buffyfs serve)
    cache_dir: Path
    allow_other: bool = False
    ready_fd: int | None = None
    max_downloads: int = 4
    max_downloads_per_host: int = 2
    max_connections_per_host: int = 8
    max_cache_size: int | None = None
    config_path: Path | None = None  # reloaded on SIGHUP
    prune: bool = False  # remove sources the config does not declare
    scrub_interval: float | None = 7 * 86400.0  # seconds between scrubs; None: no scrub
    scrub_rate: int = 20 << 20  # bytes per second the scrub reads at most
    serve: ServeSettings | None = None  # the HTTP server, if any
    unpack_max_size: int = 10 << 30  # bytes one version may expand to (unpacker.py)
    replica: ReplicaSettings | None = None  # a replica of a hub (--upstream)


def sync_config(cache: Cache, settings: Settings) -> None:
    """Read the config file and write its sources into the index (BadInput if bad)."""
    if settings.config_path is None:
        return
    from buffyfs.config import load_config

    config = load_config(settings.config_path)
    added, changed, removed = cache.sync_sources(config.sources, settings.prune)
    log.info("config %s: %d sources (%d added, %d changed, %d removed)",
             settings.config_path, len(config.sources), len(added), len(changed), len(removed))


def run(settings: Settings) -> None:
    """Mount and serve until unmounted or signalled. Raises BuffyError on bad setup."""
    if settings.mountpoint is not None and not os.path.isdir(settings.mountpoint):
        raise CacheError(f"mount point {settings.mountpoint} is not a directory")
    cache = Cache(settings.cache_dir)
    try:
        if settings.serve is not None:
            from buffyfs import http

            http.bind(settings.serve)  # an address in use: one error, before "ready"
            http.preload()
        lock_fd = cache.claim_mount(
            os.path.abspath(settings.mountpoint) if settings.mountpoint is not None else None,
            serving=settings.serve.url if settings.serve is not None else None)
    except BaseException:
        if settings.serve is not None:
            http.close(settings.serve)
        cache.close()
        raise
    try:
        sync_config(cache, settings)
        _put_reload_error(cache, None)  # read now: a refused reload of before is moot
        cache.set_max_cache_size(settings.max_cache_size)
        # built before the loop runs: loading the CA certificates takes ~0.1 s
        client = downloader.new_client()
        # Worker threads (collections, @status) run Python too: the loop thread waits up
        # to the switch interval for the GIL each time it wakes. 5 ms by default, several
        # times per request; 0.5 ms keeps a request's wait to a few ms.
        sys.setswitchinterval(SWITCH_INTERVAL)
        offload.configure_workers()
        with watchdog.LoopMonitor() as monitor:
            trio.run(_serve, cache, settings, client, instruments=[monitor])
        if _stuck_exit is not None:
            _stuck_exit.cancel()
    finally:
        if settings.serve is not None:
            from buffyfs import http

            http.close(settings.serve)
        os.close(lock_fd)
        cache.close()


class Unmounted(BuffyFS):
    """The filesystem object of a daemon without a mount (``buffyfs serve``): there is
    no kernel cache to drop entries from."""

    def source_changed(self, name: str, kick: bool = True) -> None:
        pass

    async def source_changed_now(self, name: str) -> None:
        pass

    def versions_collected(self, *args: Any) -> None:
        pass


class Collector:
    """Garbage collection inside the mount: after each new version (resting REST_AFTER
    times as long as the last plan took first), periodically, and when ``buffyfs gc``
    asks.

    Off the event loop: the plan reads a snapshot in a worker process, and each batch
    of it commits in that kind of process too (``gc.commit``, which re-checks
    protection, reading every version of the batch's sources: neither the loop's GIL
    nor the daemon's memory pays for it; a small plan uses threads). What is open may
    change meanwhile, so just before each batch's commit, on the loop, the versions
    opened since the plan are left out of it, and the batch's inodes are marked
    ``fs.collecting``: an open of one of them waits for the commit and then resolves
    again (the version is gone, or was kept).
    """

    def __init__(self, cache: Cache, fs: BuffyFS, max_size: int | None,
                 nursery: trio.Nursery) -> None:
        self.cache = cache
        self.fs = fs
        self.max_size = max_size
        self.nursery = nursery
        self.wake = trio.Event()
        self.lock = trio.Lock()  # one collection at a time
        self.unlinking = trio.CapacityLimiter(1)  # one batch of blob unlinks at a time
        self.unlinks_queued = 0  # batches of blob unlinks started and not yet ended
        self.unlinked = trio.Event()  # set whenever that is 0
        self.unlinked.set()
        self.notifying = trio.Lock()  # one batch of kernel invalidations at a time
        # entries (after, upto] of the index's changes log our commits wrote: their
        # sources are brought up to date here (versions_collected), not again by the
        # change watcher (a collection touches thousands; it reads them under
        # ``registering``, so no commit adds to them meanwhile)
        self.own_changes: list[tuple[int, int]] = []
        # held from before a commit until its range is in own_changes (a commit lands
        # before its worker's answer comes back); the watcher reads the log only outside
        # it, or it took a landed commit's thousands of sources for another process's
        self.registering = trio.Lock()
        self.asked = False  # a `buffyfs gc` request may be waiting
        self.answering = False
        self.request: int | None = None  # the `buffyfs gc` request being answered
        self.rounds = 0  # collections so far (in gc_progress: each one's batches differ)
        self.lost_blobs = False  # a commit's list of freed blobs was lost: sweep for them
        self.sweeping = False
        self.planned_in = 0.0  # seconds the last plan took (Collector.run rests after it)

    def kick(self, name: str = "") -> None:
        self.wake.set()

    async def make_room(self, need: int) -> None:
        """Evict so that ``need`` more bytes fit under the quota (CacheFull if not), for
        downloads, unpacks and a replica's blobs. When they do not fit, the eviction is
        a collection like any other (plan in a worker thread, batches committed in
        worker threads): the loop never plans."""
        if self.max_size is None:
            return
        with self.cache.index.read() as r:  # one read: the common case, no await
            if r.blob_bytes() + need <= self.max_size:
                return
        await self.collect(need)

    async def collect(self, need: int = 0, dry_run: bool = False) -> gc.Report:
        async with self.lock:
            # planned in a worker process (offload.py): not even the GIL is taken from
            # the loop; its batches are committed there too, one at a time
            began = trio.current_time()
            planned = await offload.plan_collection(
                self.cache.index, set(self.fs.open_inos), need, self.max_size, dry_run)
            self.planned_in = trio.current_time() - began
            if planned.pid != os.getpid():
                self.fs.metrics.worker_runs.labels(task="gc_plan").inc()
            if planned.report is not None:  # a dry run: its answer, encoded by the planner
                return gc.Report(wake_at=planned.wake_at, answer=planned.report)
            report = gc.Report(wake_at=planned.wake_at)
            self.rounds += 1
            for i, (batch, inos) in enumerate(zip(planned.batches, planned.inos,
                                                  strict=True)):
                progress = {"request": self.request, "round": self.rounds, "done": i + 1,
                            "of": len(planned.batches)}
                gc.merge(report, await self._commit(planned, batch, inos, progress))
            return report

    async def _commit(self, planned: offload.Plan, batch: bytes, inos: list[int],
                      progress: dict[str, Any]) -> gc.Report:
        """Commit one batch of the plan where it was made (``offload.commit_batch``):
        the loop only marks its inodes and, after, drops the kernel's entries."""
        async with self.registering:  # until the range its commit wrote is known
            # No await between the re-check and marking the batch: an open either
            # counted already (kept) or waits for the commit (fs.open).
            open_now = set(self.fs.open_inos)
            done = self.fs.start_collecting({ino for ino in inos if ino not in open_now})
            try:
                # what the kernel's view of the batch's sources hangs on is read there
                committed = await offload.commit_and_read(
                    self.cache.index, planned, batch, open_now, progress, read_sources,
                    lost=self.sweep_lost_blobs)
                self.own_changes += committed.report.changes
            except Exception:  # it may have landed: its freed blobs are not known
                self.sweep_lost_blobs()
                raise
            finally:
                self.fs.end_collecting(done)
        if planned.pid != os.getpid():
            self.fs.metrics.worker_runs.labels(task="gc_commit").inc()
        part = committed.report
        # landed: the kernel's view and the unlinks follow even if our caller (a
        # download's make_room) is cancelled meanwhile; the watcher skips these sources
        with trio.CancelScope(shield=True):
            await self._collected_async(part, committed.read)
        return part

    def seen_changes(self, upto: int) -> None:
        """The change watcher looked at the log up to ``upto``."""
        self.own_changes = [r for r in self.own_changes if r[1] > upto]

    async def _collected_async(self, report: gc.Report,
                               facts: dict[str, SourceFacts | None]) -> None:
        """After a commit: unlink the blob files (a worker thread) and drop the kernel's
        entries of the collected versions, worked out from ``facts`` in slices of
        FORGET_SLICE seconds of the loop and sent from a worker thread."""
        for _ in self._forget(report, facts):
            await trio.lowlevel.checkpoint()

    def _forget(self, report: gc.Report, facts: dict[str, SourceFacts | None]
                ) -> Iterator[None]:
        if report.unlink:
            if not self.unlinks_queued:
                self.unlinked = trio.Event()
            self.unlinks_queued += 1
            # restart=False: _unlink's finally counts it down once; what is left is
            # swept as orphans at the next start
            start_task(self.nursery, "blob unlinking", self._unlink, report.unlink,
                       restart=False)
        removed: dict[str, list[str]] = {}
        for source, vid, _ in report.collected():
            removed.setdefault(source, []).append(vid)
        entries: list[tuple[int, str]] = []
        inos: list[int] = []
        until = time.perf_counter() + FORGET_SLICE
        for source, vids in removed.items():
            if time.perf_counter() > until:
                yield
                until = time.perf_counter() + FORGET_SLICE
            self.fs.versions_collected(source, vids, facts.get(source), entries, inos)
        if entries or inos:
            start_task(self.nursery, "kernel invalidations", self._send, entries, inos,
                       restart=False)

    async def _send(self, entries: list[tuple[int, str]], inos: list[int]) -> None:
        """One batch's invalidations at a time (a big collection queues hundreds)."""
        async with self.notifying:
            await self.fs.send_invalidations(entries, inos)

    async def _unlink(self, shas: list[str]) -> None:
        """Unlink a batch's blob files in a worker thread, one batch at a time: a
        collection of 100,000 versions queues hundreds of batches, which must not take
        every worker thread (control writes, @status and index writes need them)."""
        try:
            await trio.to_thread.run_sync(gc.unlink_blobs, self.cache.index,
                                          self.cache.blobs, shas, limiter=self.unlinking)
        finally:
            self.unlinks_queued -= 1
            if not self.unlinks_queued:
                self.unlinked.set()

    async def run(self) -> None:
        # Orphans a crash left are swept at start, retried while a commit is under way.
        while await trio.to_thread.run_sync(self.sweep) is None:  # noqa: ASYNC110 (a flock)
            await trio.sleep(SWEEP_RETRY)
        await self.give_back(trim=True)  # the sweep read every blob's entry
        wait = GC_INTERVAL
        while True:
            with trio.move_on_after(wait) as periodic:
                await self.wake.wait()
            periodic_round = periodic.cancelled_caught and not self.wake.is_set()
            self.wake = trio.Event()
            wait = GC_INTERVAL
            report = None
            try:
                report = await self.collect()
                wait = gc.seconds_until(report.wake_at, GC_INTERVAL)  # a hold or grace ends
                # partial files are swept on the periodic round (and by `buffyfs gc`),
                # not after each new version: that sweep would race the report of a
                # `buffyfs gc` asked meanwhile
                if periodic_round:
                    await trio.to_thread.run_sync(self.sweep_partials)
            except BuffyError as e:
                log.error("collection failed: %s", e)
            big = report is not None and len(report.collected()) >= TRIM_AFTER
            await self.give_back(trim=big)
            # New versions coming one after another (a burst of refreshes) would have
            # the whole cache planned again after each: rest a while, and the next
            # collection takes every version that came meanwhile at once. A hold or
            # grace that ends sooner (wait) ends the rest.
            rest = min(self.planned_in * REST_AFTER, REST_CAP, wait)
            await trio.sleep(rest)
            wait -= rest

    async def give_back(self, trim: bool) -> None:
        """After a collection (or the start-up sweep): the index pages it and what
        came before it (lookups, a refresh burst) mapped go back to the system
        (store/memory.py), in a worker thread; with ``trim``, glibc's free heap too
        (malloc_trim holds the heap's lock for up to tens of ms, during which the
        loop's bigger allocations wait: only after a big collection)."""
        with trio.move_on_after(GIVE_BACK_WAIT):  # their reads would map the pages again
            await self.fs.relinked()
            await self.unlinked.wait()  # (it reads the entry of every blob it unlinks)
        await trio.to_thread.run_sync(memory.unmap_index, self.cache.index)
        if trim:
            await trio.to_thread.run_sync(memory.trim_heap)

    def sweep_lost_blobs(self) -> None:
        """A commit landed, maybe, and the list of the blobs it freed was lost (its
        worker process died, or it raised): the orphan sweep finds them, in a task, as
        soon as no download is between blob and commit (not at the next start)."""
        self.lost_blobs = True
        if not self.sweeping:
            self.sweeping = True
            start_task(self.nursery, "orphan sweep", self._sweep_lost_blobs,
                       restart=False)

    async def _sweep_lost_blobs(self) -> None:
        try:
            while self.lost_blobs:
                self.lost_blobs = False
                while await trio.to_thread.run_sync(self.sweep) is None:  # noqa: ASYNC110
                    await trio.sleep(SWEEP_RETRY)
        except OSError as e:  # what is left is swept at the next start
            log.error("sweeping the blobs a failed commit freed failed: %s", e)
        finally:
            self.sweeping = False

    def sweep(self) -> list[str] | None:
        return gc.sweep_orphans(self.cache.index, self.cache.blobs, partial_key)

    def sweep_partials(self) -> list[str]:
        try:
            return gc.sweep_partials(self.cache.index, self.cache.blobs, partial_key)
        except OSError as e:
            log.error("sweeping partial files failed: %s", e)
            return []

    def request_seen(self) -> None:
        """The root changed: a ``buffyfs gc`` may have asked; answer in a task."""
        self.asked = True
        if not self.answering:
            self.answering = True
            self.nursery.start_soon(self._answer_requests)

    async def _answer_requests(self) -> None:
        try:
            while self.asked:
                self.asked = False
                await self.answer_request()
        except Exception:  # keep serving: the CLI times out and says so
            log.exception("answering a gc request failed")
        finally:
            self.answering = False

    async def answer_request(self) -> None:
        """Run a collection ``buffyfs gc`` asked for, and leave the report for it."""
        with self.cache.index.read() as r:
            request = r.meta_json("gc_request")
            if not request or r.gc_result(request["id"]) is not None:
                return
        report, error = None, None
        self.request = request["id"]
        try:
            # the CLI waits while gc_progress moves: now (the plan), then each batch's
            await trio.to_thread.run_sync(self._put_progress, {"request": request["id"],
                                                               "done": 0, "of": None})
            report = await self.collect(dry_run=request["dry_run"])
            if not request["dry_run"]:
                report.orphans += await trio.to_thread.run_sync(self.sweep_partials)
        except BuffyError as e:
            error = str(e)
        finally:
            self.request = None
        await trio.to_thread.run_sync(self._put_result, request, report, error)
        del report
        await self.give_back(trim=True)

    def _put_progress(self, progress: dict[str, Any]) -> None:
        with self.cache.index.write() as w:
            w.put_meta_json("gc_progress", progress)

    def _put_result(self, request: dict[str, Any], report: gc.Report | None,
                    error: str | None) -> None:
        result = {"id": request["id"], "dry_run": request["dry_run"], "error": error}
        with self.cache.index.write() as w:
            if report is not None and report.answer is not None:  # JSON already
                w.put_gc_result(result, report=report.answer)
                return
            w.put_gc_result({**result, "report": gc.report_json(report)
                             if report else None})


async def _serve(cache: Cache, settings: Settings, client: httpx.AsyncClient) -> None:
    async with client, trio.open_nursery() as nursery:
        refresher = Refresher(cache.index, cache.blobs, client, settings.max_downloads,
                              settings.max_downloads_per_host)
        refresher.max_connections_per_host = settings.max_connections_per_host
        refresher.writes = IndexWrites(cache.index)  # downloads' index writes, off the loop
        mounted = settings.mountpoint is not None
        fs = (BuffyFS if mounted else Unmounted)(cache, None,
                                                 progress=lambda: dict(refresher.progress))
        refresher.metrics = fs.metrics
        collector = Collector(cache, fs, settings.max_cache_size, nursery)
        refresher.make_room = collector.make_room  # async: its collections off the loop
        refresher.has_quota = lambda: collector.max_size is not None
        refresher.on_version = collector.kick
        fs.on_retention = collector.kick
        scheduler = Scheduler(cache.index, refresher, nursery, on_changed=fs.source_changed,
                              writes=refresher.writes)
        fs.scheduler = scheduler
        # fsname names the cache (a bare "buffyfs" would be read as a path by mount(8))
        options = set(pyfuse3.default_options) | {f"fsname=buffyfs:{cache.root}",
                                                  "subtype=buffyfs"}
        if settings.allow_other:
            options.add("allow_other")
        if mounted:
            try:
                pyfuse3.init(fs, settings.mountpoint, options)
            except RuntimeError as e:
                raise CacheError(f"cannot mount on {settings.mountpoint}: {e}") from None
        stopped = trio.Event()  # a signal asks the daemon without a mount to stop
        try:
            if mounted:
                start_task(nursery, "read-ahead", raise_readahead, settings.mountpoint,
                           restart=False)  # one try: what failed once fails again
            start_task(nursery, "signal watcher", _watch_signals, cache, settings, collector,
                       fs, stopped, refresher.writes, nursery)
            start_task(nursery, "index writes", refresher.writes.run)
            start_task(nursery, "change watcher", _watch_changes, cache, scheduler, fs,
                       collector)
            start_task(nursery, "collector", collector.run)
            start_task(nursery, "scrub", Scrubber(cache.index, cache.blobs,
                                                  settings.scrub_interval, settings.scrub_rate,
                                                  fs.report_damage_many, fs.metrics).run)
            start_task(nursery, "unpacker", _start_unpacker(cache, fs, collector,
                                                             settings.unpack_max_size).run)
            await scheduler.reset_interrupted()  # before pyfuse3.main serves a request
            names = await trio.to_thread.run_sync(cache.index.source_names)  # 0.1 s
            scheduler.start_all(names)
            start_task(nursery, "scheduler", scheduler.run)
            heartbeat = watchdog.watchdog_interval()
            if heartbeat is not None:
                start_task(nursery, "watchdog feeder", watchdog.feed_watchdog, heartbeat)
            if watchdog.hooks_enabled():
                start_task(nursery, "test hook", watchdog.block_loop_on_signal)
            if settings.replica is not None:
                fs.replica = _start_replica(nursery, cache, settings, fs, scheduler, client,
                                            collector)
            if settings.serve is not None:
                from buffyfs import http

                start_task(nursery, "HTTP server", http.serve, settings.serve, fs)
            with cache.index.read() as r:  # a count LMDB keeps: no scan
                versions = r.version_count()
            log.info("buffyfs %s %s, cache %s, %d sources, %d versions", __version__,
                     f"mounted on {settings.mountpoint}" if mounted else "running without a mount",
                     cache.root, len(names), versions)
            if mounted:
                log.info("%s", libfuse.describe())
            if settings.serve is not None:
                log.info("serving HTTP on %s", settings.serve.url)
            if settings.ready_fd is not None:
                os.write(settings.ready_fd, b"ready\n")
                os.close(settings.ready_fd)
            watchdog.tune_collector()
            watchdog.notify_systemd(b"READY=1")
            if mounted:
                await pyfuse3.main()
            else:
                await stopped.wait()
        finally:
            watchdog.notify_systemd(b"STOPPING=1")
            nursery.cancel_scope.cancel()
            if settings.serve is not None:
                _exit_if_stuck(SHUTDOWN_GRACE)
            if mounted:
                pyfuse3.close(unmount=True)
            with trio.CancelScope(shield=True):
                await refresher.aclose()
            log.info("unmounted %s" if mounted else "stopped (%s)", settings.mountpoint or
                     "no mount")


# Seconds the daemon's tasks get to end once it stops, when it serves HTTP: hypercorn
# finishes each send to a client, and one that reads nothing would hold its task (and
# so the daemon) forever. Past this the process exits at once: the index is
# transactional and the lock goes with the process.
SHUTDOWN_GRACE = 5.0
_stuck_exit: threading.Timer | None = None


def _exit_if_stuck(grace: float) -> None:
    global _stuck_exit

    def exit_now() -> None:
        log.warning("the daemon's tasks did not end within %gs of the stop (an HTTP "
                    "client that reads nothing?): exiting now", grace)
        logging.shutdown()
        os._exit(0)

    _stuck_exit = threading.Timer(grace, exit_now)
    _stuck_exit.daemon = True
    _stuck_exit.start()


def _start_replica(nursery: trio.Nursery, cache: Cache, settings: Settings, fs: BuffyFS,
                   scheduler: Scheduler, client: httpx.AsyncClient,
                   collector: Collector) -> Replica:
    """Follow the hub (replica.py); its changes reach the scheduler and the kernel."""
    assert settings.replica is not None

    def changed(name: str) -> None:
        scheduler.sync(name)
        fs.source_changed(name)

    replica = Replica(cache, settings.replica,
                      Upstream(settings.replica.upstream, settings.replica.token, client),
                      on_changed=changed, make_room=collector.make_room,
                      downloads=settings.max_downloads)
    start_task(nursery, "replica", replica.run)
    return replica


def _start_unpacker(cache: Cache, fs: BuffyFS, collector: Collector, max_size: int
                    ) -> Unpacker:
    """The background unpacker, told of every changed source (a new version, its
    options), and waited for by opens of SOURCE/@unpacked/."""
    unpacker = Unpacker(cache, max_size, collector.make_room)
    fs.unpacked.unpacker = unpacker
    fs.on_source_changed = unpacker.kick
    return unpacker


RESTART_PAUSE = 10.0  # seconds before a background task that failed starts again


def start_task(nursery: trio.Nursery, what: str, task: Callable[..., Awaitable[object]],
               *args: object, restart: bool = True) -> None:
    """Start a long-running task of the mount. Every one fails the same way: an
    unexpected error is logged with its traceback (a repeat of the same error in one
    line), the mount stays up, and the task starts again after RESTART_PAUSE; with
    ``restart=False`` it stays ended. A task that returns is done."""

    async def keep_running() -> None:
        last = None
        while True:
            try:
                await task(*args)
                return
            except Exception as e:  # a bug in one task must not end the mount
                again = last == (type(e), str(e))
                last = (type(e), str(e))
                then = f"restarting in {RESTART_PAUSE:g}s" if restart else "not restarted"
                if again:
                    log.error("%s failed unexpectedly again (%s: %s); %s", what,
                              type(e).__name__, e, then)
                else:
                    log.exception("%s failed unexpectedly; %s", what, then)
            if not restart:
                return
            await trio.sleep(RESTART_PAUSE)

    nursery.start_soon(keep_running, name=what)


READAHEAD_KB = 4096
READAHEAD_DELAY = 0.5


async def raise_readahead(mountpoint: str) -> None:
    """Let the kernel send 1 MiB reads instead of 128 KiB ones (NOTES.md: a first read
    ~40 % faster). Needs root; without it the default stays. The kernel sets the
    device's read-ahead when it has our answer to its INIT request: so, a bit later."""
    await trio.sleep(READAHEAD_DELAY)
    await trio.to_thread.run_sync(_set_readahead, mountpoint)


def _set_readahead(mountpoint: str) -> None:
    # The device comes from the mount table: a stat() of our own mount point would
    # wait for this very thread to answer it.
    mounted = mounttable.topmost(mountpoint)
    if mounted is None:
        return
    path = f"/sys/class/bdi/{mounted.device}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READAHEAD_KB))
    except OSError as e:
        log.debug("read-ahead left as it is (%s): %s", path, e.strerror)


async def _watch_signals(cache: Cache, settings: Settings, collector: Collector,
                         fs: BuffyFS, stopped: trio.Event, writes: IndexWrites,
                         nursery: trio.Nursery) -> None:
    reloading = trio.Lock()  # one reload at a time, in the order the signals came
    waiting = [False]  # a reload is queued that has not read the file yet

    async def reload() -> None:
        if waiting[0]:  # that one reads the file after this signal too: it answers both
            return
        waiting[0] = True
        async with reloading:
            waiting[0] = False  # from here on a signal needs a reload of its own
            await reload_config(cache, settings, collector, fs, writes)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:  # a task: its index write must not hold a SIGTERM
                start_task(nursery, "config reload", reload, restart=False)
                continue
            if settings.mountpoint is None:
                log.info("%s: stopping", signal.Signals(signum).name)
                stopped.set()
                return
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def reload_config(cache: Cache, settings: Settings, collector: Collector, fs: BuffyFS,
                        writes: IndexWrites) -> None:
    """SIGHUP: apply the config file again; a bad one leaves the running config as it is.
    The file is read in a worker thread, and the index written in the mount's index
    writes' thread, in turn with the writes queued before (``IndexWrites.call``): never
    on the loop, which another process holding LMDB's writer lock would stop."""
    if settings.config_path is None:
        log.info("SIGHUP: no config file to reload")
        return
    from buffyfs.config import load_config

    try:
        config = await trio.to_thread.run_sync(load_config, settings.config_path)
    except BuffyError as e:
        log.error("SIGHUP: config not reloaded, keeping the running one: %s", e)
        await writes.call(_put_reload_error, cache,
                          {"at": rfc3339(now_utc()), "message": str(e)})
        return
    try:
        added, changed, removed = await writes.call(_apply_config, cache, config,
                                                    settings.prune)
    except BuffyError as e:
        log.error("SIGHUP: config not applied: %s", e)
        await writes.call(_put_reload_error, cache,
                          {"at": rfc3339(now_utc()), "message": str(e)})
        return
    for name in added + changed + removed:
        fs.sync(name)
    collector.max_size = config.daemon.max_cache_size
    logging.getLogger().setLevel(config.daemon.log_level.upper())
    log.info("SIGHUP: config %s reloaded (%d added, %d changed, %d removed)",
             settings.config_path, len(added), len(changed), len(removed))


def _apply_config(cache: Cache, config: Config,
                  prune: bool) -> tuple[list[str], list[str], list[str]]:
    """A reload's index writes (blocking): the refusal cleared, the sources synced, the
    quota recorded; (added, changed, removed) sources."""
    synced = cache.sync_sources(config.sources, prune)
    cache.set_max_cache_size(config.daemon.max_cache_size)
    _put_reload_error(cache, None)
    return synced


def _put_reload_error(cache: Cache, error: dict[str, str] | None) -> None:
    """Root ``@status``'s ``last_reload_error``: why the last reload was refused."""
    with cache.index.write() as w:
        w.put_meta_json("last_reload_error", error)


async def _watch_changes(cache: Cache, scheduler: Scheduler, fs: BuffyFS,
                         collector: Collector) -> None:
    """Apply changes other processes made to the index (CLI add, tag, refresh, gc...).
    The changes log is read in a worker thread: after a collection it holds thousands
    of entries (100 ms on the loop at 10,000)."""
    seq, _ = await trio.to_thread.run_sync(cache.index.changes_since, 0)
    while True:
        await trio.sleep(POLL_INTERVAL)
        try:
            seq = await _apply_changes(cache, scheduler, fs, collector, seq)
        except Exception:  # keep serving: the next round looks again
            log.exception("applying index changes failed")


async def _apply_changes(cache: Cache, scheduler: Scheduler, fs: BuffyFS,
                         collector: Collector, seq: int) -> int:
    """One round of the change watcher; returns the new change counter. Many changed
    sources (a collection touches thousands) are synced a chunk per loop turn."""
    # not while a commit of ours may have landed and not be known yet; a commit stuck
    # (its worker hung) skips rounds, it does not stop the watcher's task
    with trio.move_on_after(REGISTER_WAIT) as waited:
        async with collector.registering:
            seq, names = await trio.to_thread.run_sync(cache.index.changes_since, seq,
                                                       collector.own_changes)
            collector.seen_changes(seq)
    if waited.cancelled_caught:
        return seq
    if names is None:  # too far behind to tell: look at everything
        names = set(await trio.to_thread.run_sync(cache.index.source_names)) | \
            scheduler.known | {""}
    if "" in names:
        names.discard("")
        collector.request_seen()
    for i, name in enumerate(sorted(names)):
        if i and i % SYNC_CHUNK == 0:
            await trio.lowlevel.checkpoint()
        fs.sync(name)
    if names:  # a write transaction (fsync, LMDB's writer lock): not on the loop
        for name in await trio.to_thread.run_sync(cache.index.take_refresh_requests):
            scheduler.kick(name)
    return seq
