"""The mount's refresh scheduler: one trio task over a heap of due times.

A source is *evaluated* (its ``refresh`` policy and state read from the index, its
next check computed by ``policy.next_check``) at start, after each of its refreshes,
and when it changes (``sync``). Its due time goes into a heap; the one scheduling task
sleeps until the earliest is due or it is woken, then starts a refresh task for each
source that is due. Only running refreshes have a task of their own, so an idle mount
with 10,000 sources holds 10,000 heap entries, not 10,000 sleeping tasks.

A ``refresh`` (control command, ``buffyfs refresh``) or an ``on-open`` check *forces*
a source: due now, whatever its policy. Openers of a source that has no version yet
wait in ``wait_first_version`` for its round to end (the evaluation, and the refresh if
one was due); they never wait on a source that has nothing planned.

Two clocks: due times are wall-clock seconds (``clock``, ``time.time`` unless a test
gives another), since policies and the index speak UTC; waiting is trio's (``sleep``,
``move_on_after``). A test that runs on trio's ``MockClock`` gives a ``clock`` that
follows ``trio.current_time()``, and the scheduler's hours pass in no time.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import trio

from buffyfs.errors import FetchError
from buffyfs.fetch.policy import next_check
from buffyfs.fetch.refresh import Refresher
from buffyfs.store.index import Index, Writer, rfc3339
from buffyfs.store.writes import IndexWrites

log = logging.getLogger(__name__)

ERROR_BACKOFF = 60.0  # after an unexpected error, before the source is looked at again
MAX_SLEEP = 3600.0  # look at the heap at least this often (clock changes)
BATCH = 256  # sources evaluated per index transaction before other tasks get a turn
# ...or fewer: an evaluation ends its loop turn after this many seconds (a batch of 256
# took ~100 ms at 20,000 sources, each a source's records decoded and its policy parsed)
EVALUATE_SLICE = 0.003
START_CHUNK = 4  # refreshes started per loop turn (each first step reads the index: ~1 ms)


class Scheduler:
    def __init__(
        self,
        index: Index,
        refresher: Refresher,
        nursery: trio.Nursery,
        on_changed: Callable[[str], None] = lambda name: None,
        clock: Callable[[], float] = time.time,
        writes: IndexWrites | None = None,
    ) -> None:
        self.index = index
        # the mount's queue of index writes (writes.py): the scheduler's go there, off
        # the loop and in order with the downloads'; None: written on the spot
        self.writes = writes
        self.clock = clock  # wall-clock seconds since the epoch
        self.refresher = refresher
        self.nursery = nursery
        self.on_changed = on_changed
        self.known: set[str] = set()  # sources the scheduler looks after
        self.pending: dict[str, None] = {}  # to evaluate, in order of arrival
        self.forced: set[str] = set()  # due now whatever the policy
        self.unstarted: set[str] = set()  # not evaluated since start: resume a partial
        self.due: dict[str, float] = {}  # name -> clock() of its next check
        self.heap: list[tuple[float, str]] = []  # (due, name); stale entries skipped
        self.running: dict[str, trio.CancelScope] = {}  # refreshes under way
        self.round_done: dict[str, trio.Event] = {}  # made when someone waits
        self.hold: dict[str, float] = {}  # no check before this time (after a bug)
        self.wake = trio.Event()

    # -- what the filesystem and the change watcher call -------------------------------

    def start_all(self, names: list[str] | None = None) -> None:
        """Plan every source of the index (``names``: the mount reads them in a worker
        thread, 0.1 s for 20,000; read here when not given); the scheduling task
        evaluates them. The states a crash left ``fetching`` were set back to idle
        before (``reset_interrupted``)."""
        if names is None:
            with self.index.read() as r:
                names = r.source_names()
        self.known.update(names)
        self.unstarted.update(names)
        self.pending.update(dict.fromkeys(names))
        self.wake.set()

    async def reset_interrupted(self) -> None:
        """Before the mount serves: the states a crash left ``fetching`` or ``waiting``
        are idle again (one write, in a worker thread), so no reader sees them."""
        def reset() -> None:
            with self.index.write() as w:
                _reset_interrupted(w)
        await trio.to_thread.run_sync(reset)

    def sync(self, name: str) -> None:
        """Match ``name`` to the index: plan it, forget it, or evaluate it again."""
        with self.index.read() as r:
            exists = r.has_source(name)
        if not exists:
            if name in self.known:
                self._forget(name)
            return
        self.known.add(name)
        if name not in self.running:  # a running refresh is followed by an evaluation
            self.pending[name] = None
            self.wake.set()

    def kick(self, name: str) -> None:
        """Check the origin of ``name`` now."""
        if name not in self.known:
            return
        self.forced.add(name)
        self.refresher.wake(name)  # a retry waiting out its backoff goes now
        if name not in self.running:
            self.pending[name] = None
            self.wake.set()

    def busy(self, name: str) -> bool:
        """Is a round of ``name`` under way (being evaluated, due or refreshing)?"""
        if name in self.pending or name in self.forced or name in self.running:
            return True
        due = self.due.get(name)
        if due is not None and due <= self.clock():
            self.wake.set()  # overdue (the wall clock jumped?): let the task look now
            return True
        return False

    async def check_on_open(self, name: str, wait: float) -> None:
        """An open of ``latest`` of an ``on-open`` source: start a check unless one runs
        (concurrent opens share it) and wait for it at most ``wait`` seconds."""
        if name not in self.known:
            self.sync(name)
        if name not in self.known:
            return
        if name not in self.running and name not in self.forced:
            self.kick(name)  # a check already under way is shared, any other plan is not
        with trio.move_on_after(wait):
            await self._round(name).wait()

    async def wait_first_version(self, name: str) -> None:
        """Wait until ``name`` has a servable version; FetchError if none is coming."""
        while True:
            with self.index.read() as r:
                versions = r.versions(name)
                state = r.state(name)
                latest = r.latest(name)
            if latest is not None:
                return
            if versions and not any(v.damaged for v in versions):
                raise FetchError("every version is tagged failed")  # (a damaged one is
                # being downloaded again: wait for that like for a first version)
            if name not in self.known:  # added by another process a moment ago
                self.sync(name)
            if name not in self.known:
                raise FetchError("no such source")
            if not self.busy(name):
                error = state.last_error or {}
                raise FetchError(error.get("message") or "no version downloaded yet")
            await self._round(name).wait()

    def now_utc(self) -> datetime:
        """The clock's time, to the second (as the index stamps it)."""
        return datetime.fromtimestamp(self.clock(), UTC).replace(microsecond=0)

    # -- the scheduling task -----------------------------------------------------------

    async def run(self) -> None:
        # Every source is looked at when the task starts, and so again if it is started
        # again after a bug (mount.start_task): none is left out of the plan.
        self.pending.update(dict.fromkeys(self.known - self.running.keys()))
        while True:
            while self.pending:
                batch = list(itertools.islice(self.pending, BATCH))
                evaluated = self._evaluate(batch)
                # Only now: if evaluating failed, the batch stays pending, and its openers
                # wait for the restarted task instead of failing meanwhile.
                for name in batch[:evaluated]:
                    self.pending.pop(name, None)
                await trio.lowlevel.checkpoint()  # let FUSE requests through a long start
            now = self.clock()
            started = 0
            while self.heap and self.heap[0][0] <= now:
                due, name = heapq.heappop(self.heap)
                if self.due.get(name) == due and name not in self.running:
                    del self.due[name]
                    self._start(name)
                    started += 1
                    if started % START_CHUNK == 0:  # the first steps of 1,000 refreshes
                        await trio.lowlevel.checkpoint()  # in one loop turn: FUSE waited
            if self.pending:
                continue
            delay = self.heap[0][0] - now if self.heap else MAX_SLEEP
            with trio.move_on_after(min(MAX_SLEEP, max(0.0, delay))):
                await self.wake.wait()
            self.wake = trio.Event()

    def _evaluate(self, names: list[str]) -> int:
        """Compute the next check of ``names`` and record it in their state; stops
        after EVALUATE_SLICE seconds. Returns how many of ``names`` it evaluated."""
        now = self.now_utc()
        updates: dict[str, str | None] = {}
        evaluated = len(names)
        stop_at = time.perf_counter() + EVALUATE_SLICE
        with self.index.read() as r:
            for i, name in enumerate(names):
                if i and time.perf_counter() > stop_at:  # the rest in the next turn
                    evaluated = i
                    break
                if name in self.running:
                    continue
                source = r.source(name)
                if source is None:
                    self._forget(name)
                    continue
                if source.mirror:  # a replica's: the hub refreshes it (replica.py)
                    self.forced.discard(name)
                    self.unstarted.discard(name)
                    self._plan(name, None)
                    continue
                state = r.state(name)

                def has_version(r=r, name=name) -> bool:  # read only when it matters
                    return r.has_versions(name)

                first = name in self.unstarted
                self.unstarted.discard(name)
                try:
                    # A download interrupted by a stop or crash is finished at once on start.
                    resume = first and bool(state.partial) and \
                        not (source.options.get("pinned") and has_version())
                    due = now if name in self.forced or resume else next_check(
                        source.options, state, has_version, now
                    )
                    planned = None if due is None else due.timestamp()
                except Exception:  # a bug, or a record it cannot read: not the others' fault
                    log.exception("%s: planning the next check failed unexpectedly", name)
                    planned = self.clock() + ERROR_BACKOFF  # looked at again then
                hold = self.hold.get(name)  # after an unexpected error
                if hold is not None and (name in self.forced or hold <= self.clock()):
                    del self.hold[name]
                elif hold is not None and planned is not None:
                    planned = max(planned, hold)
                stamp = None if planned is None else rfc3339(
                    datetime.fromtimestamp(planned, UTC))
                if state.next_check != stamp:
                    updates[name] = stamp
                self._plan(name, planned)
        if self.writes is not None:  # queued: committed together, seen at once
            for name, stamp in updates.items():
                self.writes.set_state(name, next_check=stamp)
        elif updates:
            with self.index.write() as w:  # one transaction for the whole batch
                for name, stamp in updates.items():
                    if w.source(name) is not None:
                        w.put_state(name, next_check=stamp)
        return evaluated

    def _write(self, op: Callable[[Writer], None]) -> None:
        """``op`` in an index write: queued (off the loop) in the mount."""
        if self.writes is not None:
            self.writes.post(op)
        else:
            with self.index.write() as w:
                op(w)

    def _plan(self, name: str, due: float | None) -> None:
        if due is None:
            self.due.pop(name, None)
            self._end_round(name)  # nothing planned: openers stop waiting
            return
        self.due[name] = due
        heapq.heappush(self.heap, (due, name))
        if len(self.heap) > 2 * len(self.due) + BATCH:  # drop the stale entries
            self.heap = [(d, n) for n, d in self.due.items()]
            heapq.heapify(self.heap)
        if due > self.clock():
            self._end_round(name)

    def _start(self, name: str) -> None:
        scope = self.running[name] = trio.CancelScope()
        self.forced.discard(name)
        self.nursery.start_soon(self._refresh, name, scope, name=f"refresh {name}")

    async def _refresh(self, name: str, scope: trio.CancelScope) -> None:
        backoff = False
        with scope:
            try:
                await self.refresher.refresh(name)
            except FetchError as e:
                log.error("%s: %s", name, e)
            except Exception as e:  # a bug must not stop the others, nor spin
                log.exception("%s: refresh failed unexpectedly", name)
                self.index.record_failure(name, self.now_utc(), f"internal error: {e}")
                self.index.set_state(name, state="idle", progress=None)
                backoff = True
            finally:
                if self.running.get(name) is scope:
                    del self.running[name]
                self.on_changed(name)
        if name not in self.known:
            return
        if backoff:  # looked at again, by its policy, no sooner than ERROR_BACKOFF
            self.hold[name] = self.clock() + ERROR_BACKOFF
        self.pending[name] = None
        self.wake.set()

    def _forget(self, name: str) -> None:
        """``name`` left the index: stop its refresh and let its openers go."""
        self.known.discard(name)
        self.pending.pop(name, None)
        self.forced.discard(name)
        self.unstarted.discard(name)
        self.due.pop(name, None)
        self.hold.pop(name, None)
        scope = self.running.pop(name, None)
        if scope is not None:
            scope.cancel()
        self._end_round(name)

    def _round(self, name: str) -> trio.Event:
        if name not in self.round_done:
            self.round_done[name] = trio.Event()
        return self.round_done[name]

    def _end_round(self, name: str) -> None:
        event = self.round_done.pop(name, None)
        if event is not None:
            event.set()


def _reset_interrupted(w: Writer) -> None:
    """Sources a crash (or a kill) left ``fetching`` or ``waiting``: idle now."""
    for name in w.source_names():
        if w.state(name).state != "idle":
            w.put_state(name, state="idle", progress=None)
