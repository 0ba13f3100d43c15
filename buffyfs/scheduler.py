"""The mount's refresh scheduler: one trio task per source.

Each worker sleeps until its source is due (policy.next_check) or is kicked
(``refresh`` control command, ``buffyfs refresh``, an option change), then runs one
refresh. Workers start and stop as sources come and go (``sync``).

Openers of a source that has no version yet wait in ``wait_first_version`` for the
worker to finish its attempt; they never wait on a worker that has nothing planned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from buffyfs.errors import FetchError
from buffyfs.index import Index, now_utc, rfc3339
from buffyfs.policy import next_check
from buffyfs.refresh import Refresher

log = logging.getLogger(__name__)

ERROR_BACKOFF = 60.0  # after an unexpected error, before the worker looks again
MAX_SLEEP = 3600.0  # re-evaluate at least this often (clock changes, lost kicks)


@dataclass
class Worker:
    name: str
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    wake: trio.Event = field(default_factory=trio.Event)
    attempt_done: trio.Event = field(default_factory=trio.Event)
    force: bool = False
    busy: bool = True  # deciding, or refreshing: an opener should wait
    first_round: bool = True

    def kick(self, force: bool) -> None:
        self.force = self.force or force
        if force:
            self.busy = True
        self.wake.set()

    def finish_round(self) -> None:
        self.busy = False
        self.attempt_done.set()
        self.attempt_done = trio.Event()


class Scheduler:
    def __init__(
        self,
        index: Index,
        refresher: Refresher,
        nursery: trio.Nursery,
        on_changed: Callable[[str], None] = lambda name: None,
    ) -> None:
        self.index = index
        self.refresher = refresher
        self.nursery = nursery
        self.on_changed = on_changed
        self.workers: dict[str, Worker] = {}

    def start_all(self) -> None:
        with self.index.write() as w:  # one transaction, however many sources
            names = w.source_names()
            for name in names:
                if w.state(name).get("state", "idle") != "idle":
                    w.put_state(name, state="idle", progress=None)  # nothing runs yet
        for name in names:
            self.sync(name)

    def sync(self, name: str) -> None:
        """Match the worker of ``name`` to the index: start, stop or re-evaluate it."""
        with self.index.read() as r:
            exists = r.source(name) is not None
        worker = self.workers.get(name)
        if exists and worker is None:
            worker = self.workers[name] = Worker(name)
            self.nursery.start_soon(self._run, worker, name=f"refresh {name}")
        elif not exists and worker is not None:
            worker.cancel_scope.cancel()
            worker.finish_round()
            del self.workers[name]
        elif worker is not None:
            worker.kick(force=False)

    def kick(self, name: str) -> None:
        """Check the origin of ``name`` now."""
        worker = self.workers.get(name)
        if worker is not None:
            worker.kick(force=True)
            self.refresher.wake(name)  # a retry waiting out its backoff goes now

    async def check_on_open(self, name: str, wait: float) -> None:
        """An open of ``latest`` of an ``on-open`` source: start a check unless one runs
        (concurrent opens share it) and wait for it at most ``wait`` seconds."""
        worker = self.workers.get(name)
        if worker is None:
            self.sync(name)
            worker = self.workers.get(name)
        if worker is None:
            return
        if not worker.busy:
            worker.kick(force=True)
        done = worker.attempt_done
        with trio.move_on_after(wait):
            await done.wait()

    async def wait_first_version(self, name: str) -> None:
        """Wait until ``name`` has a servable version; FetchError if none is coming."""
        while True:
            with self.index.read() as r:
                versions = r.versions(name)
                state = r.state(name)
                latest = r.latest(name)
            if latest is not None:
                return
            if versions:
                raise FetchError("every version is tagged failed")
            worker = self.workers.get(name)
            if worker is None:  # added by another process a moment ago: start it now
                self.sync(name)
                worker = self.workers.get(name)
            if worker is None:
                raise FetchError("no such source")
            if not worker.busy:
                error = state.get("last_error") or {}
                raise FetchError(error.get("message") or "no version downloaded yet")
            await worker.attempt_done.wait()

    async def _run(self, worker: Worker) -> None:
        with worker.cancel_scope:
            while True:
                with self.index.read() as r:
                    source = r.source(worker.name)
                    state = r.state(worker.name)
                    has_version = r.has_versions(worker.name)
                if source is None:
                    return
                now = now_utc()
                # A download interrupted by a stop or crash is finished at once on start.
                resume = worker.first_round and bool(state.get("partial")) and \
                    not (source["options"].get("pinned") and has_version)
                worker.first_round = False
                due = now if worker.force or resume else next_check(
                    source["options"], state, has_version, now
                )
                stamp = rfc3339(due) if due else None
                if state.get("next_check") != stamp:
                    self.index.set_state(worker.name, next_check=stamp)
                del source, state  # nothing decoded stays alive while the worker sleeps
                if due is None or due > now:
                    worker.finish_round()
                    delay = MAX_SLEEP if due is None else (due - now).total_seconds()
                    with trio.move_on_after(min(MAX_SLEEP, max(0.0, delay))):
                        await worker.wake.wait()
                    worker.wake = trio.Event()
                    continue
                worker.force = False
                worker.busy = True
                worker.wake = trio.Event()
                try:
                    await self.refresher.refresh(worker.name)
                except FetchError as e:
                    log.error("%s: %s", worker.name, e)
                except Exception as e:  # a bug must not stop the others, nor spin
                    log.exception("%s: refresh failed unexpectedly", worker.name)
                    self.index.record_failure(worker.name, now_utc(), f"internal error: {e}")
                    self.index.set_state(worker.name, state="idle", progress=None)
                    with trio.move_on_after(ERROR_BACKOFF):
                        await worker.wake.wait()
                finally:
                    self.on_changed(worker.name)
                worker.finish_round()
