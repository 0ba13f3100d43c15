"""Index writes of the mount's downloads, off the event loop.

A download records its state, progress and resume point many times; each is an LMDB
commit (an fsync, and a wait for the single writer lock that a command-line process may
hold). On the loop, every file request would wait for them. Here they are queued without
waiting and committed by one worker thread at a time, in the order they were posted,
as many to a transaction as have queued up meanwhile.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from buffyfs.errors import CacheError
from buffyfs.store.index import Index, Writer

log = logging.getLogger(__name__)

T = TypeVar("T")


class IndexWrites:
    def __init__(self, index: Index) -> None:
        self.index = index
        self.queue: list[Callable[[Writer], None]] = []
        self.posted = 0  # ops posted so far
        self.committed = 0  # ops committed (or dropped by a failed commit) so far
        self.writer = trio.CapacityLimiter(1)  # one index writer of ours at a time
        self.wake = trio.Event()
        self.progressed = trio.Event()  # set (and renewed) after each batch
        # (post number, tie, event) of the flushes waiting: each is woken when its own
        # posts are in, not at every batch (1,000 refreshes of a burst, each waiting for
        # its flush, took 500 loop steps per batch)
        self.flushing: list[tuple[int, int, trio.Event]] = []
        self.stopped = False  # the committing task ended: posts commit on the spot
        # set_state fields not committed yet, and the number of the post that queued
        # them last: the mount's reads see them at once (Reader.queued_state)
        self.queued: dict[str, dict[str, Any]] = {}
        self.queued_by: dict[str, int] = {}
        index.queued_state = self.queued

    def post(self, op: Callable[[Writer], None]) -> None:
        """Queue ``op(writer)`` for the next batch; returns at once."""
        self.queue.append(op)
        self.posted += 1
        if self.stopped:  # the mount is stopping (a refresh's clean-up, say)
            self.drain()
        else:
            self.wake.set()

    def set_state(self, name: str, **fields: Any) -> None:
        """Queue ``Index.set_state`` (a removed source is left alone); the mount's
        reads of the state see it from now on."""

        def op(w: Writer) -> None:
            if w.source(name) is not None:
                w.put_state(name, **fields)

        self.queued[name] = {**self.queued.get(name, {}), **fields}  # a new dict: a
        self.queued_by[name] = self.posted + 1  # reader thread may hold the old one
        self.index.queued_posts += 1
        self.post(op)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a whole write ``fn(*args)`` (its own transaction) in a worker thread,
        after everything posted before it. Shielded: a commit under way is not cut
        short (the blob it names is on disk already)."""
        with trio.CancelScope(shield=True):
            await self.flush()
            if self.stopped:
                return fn(*args, **kwargs)
            async with self.writer:
                return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    async def flush(self) -> None:
        """Wait until everything posted so far is committed."""
        target = self.posted
        if self.committed >= target or self.stopped:
            return
        done = trio.Event()
        heapq.heappush(self.flushing, (target, id(done), done))
        await done.wait()

    async def run(self) -> None:
        """Commit what is posted, batch by batch (the mount's task)."""
        self.stopped = False
        try:
            while True:
                await self.wake.wait()
                self.wake = trio.Event()
                while self.queue:
                    batch, self.queue = self.queue, []
                    async with self.writer:
                        await trio.to_thread.run_sync(self._commit, batch)
                    self._done(len(batch))
        finally:
            self.stopped = True
            self.drain()  # stopping: what is queued still lands, here and now
            self._wake_flushes()

    def drain(self) -> None:
        """Commit what is queued on the calling thread (at shutdown)."""
        if self.queue:
            batch, self.queue = self.queue, []
            self._commit(batch)
            self._done(len(batch))

    def _done(self, count: int) -> None:
        self.committed += count
        for name in [n for n, by in self.queued_by.items() if by <= self.committed]:
            del self.queued_by[name]  # in the index now (or dropped with its batch)
            self.queued.pop(name, None)
        self.progressed.set()
        self.progressed = trio.Event()
        self._wake_flushes()

    def _wake_flushes(self) -> None:
        while self.flushing and (self.flushing[0][0] <= self.committed or self.stopped):
            heapq.heappop(self.flushing)[2].set()

    def _commit(self, batch: list[Callable[[Writer], None]]) -> None:
        try:
            with self.index.write() as w:
                for op in batch:
                    op(w)
        except CacheError as e:  # the index is full or broken: the next write says so too
            log.error("could not record the state of downloads: %s", e)
