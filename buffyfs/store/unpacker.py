"""The mount's background unpacking: which versions to unpack, in what order, and the
index records of the outcome (``blobs[SHA].unpacked``, index.py).

After a version is committed (``kick``), its blob is looked at (magic bytes,
unpack.detect) and, if compressed or an archive, queued; ``WORKERS`` child processes
(``python -m buffyfs.store.unpack``, niced) unpack one blob each into
``unpacked/partial/SHA``, which is renamed into place when complete and only then
recorded ``done``. The version itself never waits for any of it.

Bounds: a child stops past ``unpack_max_size`` bytes of output; its data file counts
against ``max_cache_size`` while it grows (``make_room``, the collector's, may evict
old versions as for a download; when nothing may go, the unpack fails "cache full");
a child that neither finishes nor writes for ``STALL_TIMEOUT`` is killed. Every
failure is ``state: error`` with a one-line ``error`` (``unpack_error`` in
``@status``): opening the view then gives ``EIO``. What the bytes are to blame for
(corrupt, truncated, past ``unpack_max_size``) stays failed; what the machine is to
blame for (the quota, a stall, the child killed) is marked ``retry`` and tried again
at the next mount start.

Opening a view before its unpack is done waits (``wait_done``), at most
``OPEN_WAIT``; the blob waited for is moved to the front of the queue.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from buffyfs.errors import BuffyError
from buffyfs.store.cache import Cache
from buffyfs.store.index import now_utc, rfc3339
from buffyfs.store.unpack import DerivedStore, detect

log = logging.getLogger(__name__)

WORKERS = 2  # unpacks at once (each a niced child process)
POLL = 0.25  # seconds between looks at a running unpack (progress, quota)
PROGRESS_EVERY = 1.0  # seconds between progress records in the index
STALL_TIMEOUT = 900.0  # a child that writes nothing for this long is killed
OPEN_WAIT = 600.0  # the longest an open waits for an unpack
SCAN_CHUNK = 16  # sources looked at per worker-thread run (and per detection commit)
SCAN_PAUSE = 0.02  # seconds between chunks: the scan of a big cache leaves the GIL alone
CHILD_MEMORY = 2 << 30  # address space of a child (a decoder asking more fails it)


class Unpacker:
    def __init__(self, cache: Cache, max_size: int,
                 make_room: Callable[[int], Awaitable[None]] | None = None) -> None:
        self.cache = cache
        self.index = cache.index
        self.derived = DerivedStore(cache.root)
        self.max_size = max_size
        self.make_room = make_room  # raises CacheFull when the bytes cannot fit
        self.queue: dict[str, str] = {}  # sha256 -> kind, first in first out
        self.finished: dict[str, trio.Event] = {}  # sha256 -> set when done or failed
        self.to_scan: set[str] = set()  # sources to look at
        self.wake = trio.Event()
        self.work = trio.Event()
        self.running: set[str] = set()
        self.starting = False  # the first round after the start

    # --- what to unpack ---------------------------------------------------------------

    def kick(self, name: str) -> None:
        """``name`` changed (a new version, its options): look at it again."""
        self.to_scan.add(name)
        self.wake.set()

    def _pending_of(self, names: set[str]) -> list[tuple[str, str | None]]:
        """(sha256, recorded kind or None: not looked at) of the versions of ``names``
        with ``unpack`` on and no finished unpack."""
        out: dict[str, str | None] = {}
        with self.index.read() as r:
            for name in sorted(names):
                src = r.source(name)
                if src is None or src.options.get("unpack", "auto") == "off":
                    continue
                for v in r.versions(name):
                    if v.damaged or v.remote:  # remote: no bytes here yet
                        continue
                    record = r.unpacked(v.sha256)
                    if record is None:
                        out[v.sha256] = None
                    elif record["state"] in ("pending", "running") or \
                            self.starting and record.get("retry"):
                        out[v.sha256] = record["kind"]
        return list(out.items())

    def detect_now(self, sha256: str) -> str | None:
        """Look at a blob's bytes and record what they are (blocking: a worker thread).
        Returns the kind, or None for nothing to unpack."""
        return self._detect([sha256]).get(sha256)

    def _detect(self, shas: list[str]) -> dict[str, str | None]:
        """``detect_now`` of several blobs, recorded in one index transaction."""
        kinds: dict[str, str | None] = {}
        fresh: dict[str, str | None] = {}
        with self.index.read() as r:
            for sha in shas:
                record = r.unpacked(sha)
                if record is not None:
                    kinds[sha] = record["kind"]
        for sha in shas:
            if sha in kinds:
                continue
            try:
                fresh[sha] = kinds[sha] = detect(self.cache.blobs.path(sha))
            except OSError as e:
                log.warning("cannot look at blob %s for unpacking: %s", sha, e)
                kinds[sha] = None
        if fresh:
            with self.index.write() as w:
                for sha, kind in fresh.items():
                    if w.unpacked(sha) is None:
                        w.put_unpacked(sha, {"state": "pending" if kind else "none",
                                             "kind": kind})
        return kinds

    def _scan(self, names: set[str]) -> list[tuple[str, str]]:
        """Detect what is not yet looked at; the (sha256, kind) to unpack. Blocking."""
        pending = self._pending_of(names)
        kinds = self._detect([sha for sha, kind in pending if kind is None])
        return [(sha, kind or kinds.get(sha)) for sha, kind in pending
                if kind or kinds.get(sha)]

    def _enqueue(self, todo: list[tuple[str, str]]) -> None:
        for sha, kind in todo:
            if sha not in self.queue and sha not in self.running:
                self.queue[sha] = kind
                self.finished.setdefault(sha, trio.Event())
        if self.queue:
            self.work.set()

    # --- waiting for a view -----------------------------------------------------------

    async def wait_done(self, sha256: str) -> dict[str, Any] | None:
        """The blob's finished record (``done`` or ``error``) once its unpack has
        ended, at most OPEN_WAIT from now; None if it is nothing to unpack, or still
        not done then."""
        kind = await trio.to_thread.run_sync(self.detect_now, sha256)
        if kind is None:
            return None
        with trio.move_on_after(OPEN_WAIT):
            while True:
                with self.index.read() as r:
                    record = r.unpacked(sha256)
                if record is None or record["state"] in ("done", "error", "none"):
                    return record
                if sha256 not in self.queue and sha256 not in self.running:
                    self._enqueue([(sha256, kind)])
                if sha256 in self.queue:  # the one a reader waits for goes first
                    self.queue = {sha256: self.queue.pop(sha256), **self.queue}
                event = self.finished.setdefault(sha256, trio.Event())
                with trio.move_on_after(5):  # and look at the index again
                    await event.wait()
        log.warning("an open waited %gs for the unpack of blob %s: giving up", OPEN_WAIT,
                    sha256)
        return None

    # --- the work ---------------------------------------------------------------------

    async def run(self) -> None:
        """The scanner: at start every source, later those kicked; and the workers."""
        await trio.to_thread.run_sync(self._start)
        async with trio.open_nursery() as nursery:
            for _ in range(WORKERS):
                nursery.start_soon(self._worker)
            names = set(await trio.to_thread.run_sync(self.index.source_names))
            self.starting = True  # the first round also retries what failed for want of room
            while True:
                ordered = sorted(names)
                for start in range(0, len(ordered), SCAN_CHUNK):  # a chunk per thread run
                    chunk = set(ordered[start:start + SCAN_CHUNK])
                    try:
                        self._enqueue(await trio.to_thread.run_sync(self._scan, chunk))
                    except BuffyError as e:
                        log.error("looking for versions to unpack failed: %s", e)
                    if len(ordered) > SCAN_CHUNK:
                        await trio.sleep(SCAN_PAUSE)
                self.starting = False
                await self.wake.wait()
                self.wake = trio.Event()
                names, self.to_scan = self.to_scan, set()

    def _start(self) -> None:
        """Unpacks a crash or an unmount interrupted start again from scratch."""
        self.derived.ensure()
        self.derived.drop_partials()

    async def _worker(self) -> None:
        while True:
            while not self.queue:
                self.work = trio.Event()
                await self.work.wait()
            sha, kind = next(iter(self.queue.items()))
            del self.queue[sha]
            self.running.add(sha)
            try:
                await self._unpack(sha, kind)
            finally:
                self.running.discard(sha)
                self.finished.pop(sha, trio.Event()).set()

    async def _unpack(self, sha: str, kind: str) -> None:
        with self.index.read() as r:
            record = r.unpacked(sha)
        if record is None or record["state"] not in ("pending", "running") and \
                not record.get("retry"):
            return  # collected meanwhile, or done by an earlier round
        blob = self.cache.blobs.path(sha)
        partial = self.derived.partial(sha)
        await trio.to_thread.run_sync(self.derived.remove_partial, sha)
        await trio.to_thread.run_sync(self._record, sha,
                                      {"state": "running", "kind": kind, "bytes": 0})
        log.info("unpacking blob %s (%s)", sha, kind)
        started = trio.current_time()
        summary = await self._run_child(sha, [
            sys.executable, "-m", "buffyfs.store.unpack", str(blob), kind, str(partial),
            str(self.max_size), str(os.getpid()), str(CHILD_MEMORY)])
        if "error" in summary:
            await trio.to_thread.run_sync(self.derived.remove_partial, sha)
            if not await trio.to_thread.run_sync(self._still_used, sha):
                log.info("blob %s was collected while it unpacked", sha)
                return
            log.warning("unpacking blob %s (%s) failed: %s", sha, kind, summary["error"])
            await trio.to_thread.run_sync(self._record, sha, {
                "state": "error", "kind": kind, "error": summary["error"],
                "retry": summary.get("retry", False), "at": rfc3339(now_utc())})
            return
        await trio.to_thread.run_sync(self._commit, sha, summary)
        log.info("unpacked blob %s (%s) in %.1fs", sha, kind, trio.current_time() - started)

    def _commit(self, sha: str, summary: dict[str, Any]) -> None:
        """Move the unpack into place, then record it (a crash between the two leaves a
        derived entry the next start unpacks again over)."""
        if not self.derived.commit(sha):  # a collection removed the partial meanwhile
            if self._still_used(sha):  # not a collection: unpack it again at next start
                self._record(sha, {"state": "error", "kind": summary.get("kind"),
                                   "error": "the unpacked data went missing",
                                   "retry": True, "at": rfc3339(now_utc())})
                log.warning("the unpack of blob %s went missing before its commit", sha)
            else:
                log.info("blob %s was collected while it unpacked", sha)
            return
        record = {**summary, "state": "done", "size": self.derived.disk_size(sha),
                  "at": rfc3339(now_utc())}
        with self.index.write() as w:
            kept = w.put_unpacked(sha, record)
            for name in _sources_of(w, sha):
                w.changed(name)
        if not kept:  # its last version was collected meanwhile
            self.derived.remove(sha)

    def _still_used(self, sha: str) -> bool:
        with self.index.read() as r:
            return r.blob_ref(sha) is not None

    def _record(self, sha: str, record: dict[str, Any]) -> None:
        try:
            with self.index.write() as w:
                w.put_unpacked(sha, record)
        except BuffyError as e:
            log.error("cannot record the unpack of blob %s: %s", sha, e)

    async def _run_child(self, sha: str, cmd: list[str]) -> dict[str, Any]:
        """Run the unpacking child; its summary (``{"error"}`` on failure). Watches its
        output grow meanwhile: progress in the index, room under the quota, a stall."""
        data = self.derived.partial(sha) / "data"
        result: dict[str, Any] = {}

        def fail(message: str) -> None:  # not the bytes' fault: tried again at next start
            if "error" not in result:
                result.update(error=message, retry=True)
            nursery.cancel_scope.cancel()  # a running child is killed

        async def child() -> None:
            done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True,
                                          check=False)
            try:
                result.update(json.loads(done.stdout.decode().splitlines()[-1]))
            except (ValueError, IndexError):
                fail(f"the unpacker ended with status {done.returncode}"
                     + (" (out of memory?)" if done.returncode < 0 else "")
                     + " without an answer")
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
            size, last_growth, last_record = 0, trio.current_time(), 0.0
            while True:
                await trio.sleep(POLL)
                try:
                    now_size = os.stat(data).st_size
                except OSError:
                    now_size = 0
                now = trio.current_time()
                if now_size != size:
                    size, last_growth = now_size, now
                elif now - last_growth > STALL_TIMEOUT:
                    fail(f"the unpacker wrote nothing for {STALL_TIMEOUT:g}s")
                if not await self._fits(now_size, fail):
                    break
                if now - last_record >= PROGRESS_EVERY:
                    last_record = now
                    await trio.to_thread.run_sync(  # an index commit: not on the loop
                        self._record, sha, {"state": "running", "kind": cmd[4], "bytes": size})
        if "error" not in result:  # the whole of it, members list included
            await self._fits(self.derived.partial_size(sha), fail)
        return result

    async def _fits(self, size: int, fail: Callable[[str], None]) -> bool:
        """Whether ``size`` bytes of a partial unpack fit under the quota (not yet in
        ``blob_bytes``), evicting what may go; else ``fail``. An index read when they
        fit: asked at every poll."""
        if size == 0 or self.make_room is None:
            return True
        try:
            await self.make_room(size)
        except BuffyError as e:
            fail(f"the unpacked data does not fit: {e}")
            return False
        return True


def _sources_of(w: Any, sha: str) -> list[str]:
    return sorted({s for s, _v, live in w.users_of_blob(sha) if live})
