"""Index writes of the mount's downloads, off the event loop.

A download records its state, progress and resume point many times; each is an LMDB
commit (an fsync, and a wait for the single writer lock that a command-line process may
hold). On the loop, every file request would wait for them. Here they are queued without
waiting and committed by one worker thread at a time, in the order they were posted,
as many to a transaction as have queued up meanwhile.

A whole write that answers (``call``: a version's commit, a recorded failure) joins the
same queue and runs in the same worker thread, in its own transaction, when its turn
comes; only its caller is woken when it is done. (It used to wait for everything posted
before it, then for the writer: a burst of 1,000 refreshes woke hundreds of such waits
in one loop turn, and each took its own trip to a thread.) A trip to the thread takes at
most CALLS_PER_TRIP of them, so that a trip wakes few callers at once: each goes on with
its refresh in the loop turn that follows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from buffyfs.errors import CacheError
from buffyfs.store.index import Index, Writer

log = logging.getLogger(__name__)

T = TypeVar("T")

CALLS_PER_TRIP = 4  # whole writes (``call``) run per trip to the worker thread


class _Call:
    """A whole write waiting in the queue, and then its answer."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.ran = False

    def run(self) -> None:
        self.ran = True
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 (raised again in the caller)
            self.error = e


class IndexWrites:
    def __init__(self, index: Index) -> None:
        self.index = index
        # ops (``post``) and whole writes (``call``), in the order they came
        self.queue: list[Callable[[Writer], None] | _Call] = []
        self.posted = 0  # ops posted so far
        self.committed = 0  # ops committed (or dropped by a failed commit) so far
        self.writer = trio.CapacityLimiter(1)  # one index writer of ours at a time
        self.wake = trio.Event()
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
        """Run a whole write ``fn(*args)`` (its own transaction) in the committing
        worker thread, after everything posted before it; returns its answer or raises
        its error. Shielded: a commit under way is not cut short (the blob it names is
        on disk already)."""
        if self.stopped:
            self.drain()
            return fn(*args, **kwargs)
        call = _Call(lambda: fn(*args, **kwargs))
        self.queue.append(call)
        self.posted += 1
        self.wake.set()
        with trio.CancelScope(shield=True):
            await call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[no-any-return]

    async def run(self) -> None:
        """Commit what is posted, batch by batch (the mount's task)."""
        self.stopped = False
        try:
            while True:
                await self.wake.wait()
                self.wake = trio.Event()
                while self.queue:
                    batch = self._take()
                    try:
                        # shielded: a trip is short, and its whole writes' callers wait
                        # for their answers (a cancel taken here dropped them unrun)
                        with trio.CancelScope(shield=True):
                            async with self.writer:
                                await trio.to_thread.run_sync(self._commit, batch)
                    finally:  # even after a bug in an op: its callers are not left waiting
                        self._done(batch)
        finally:
            self.stopped = True
            self.drain()  # stopping: what is queued still lands, here and now

    def drain(self) -> None:
        """Commit what is queued on the calling thread (at shutdown)."""
        if self.queue:
            batch, self.queue = self.queue, []
            try:
                self._commit(batch)
            finally:
                self._done(batch)

    def _take(self) -> list[Callable[[Writer], None] | _Call]:
        """The next trip's share of the queue: up to CALLS_PER_TRIP whole writes and
        the ops among and before them."""
        calls = 0
        for i, item in enumerate(self.queue):
            if isinstance(item, _Call):
                calls += 1
                if calls > CALLS_PER_TRIP:
                    batch, self.queue = self.queue[:i], self.queue[i:]
                    return batch
        batch, self.queue = self.queue, []
        return batch

    def _done(self, batch: list[Callable[[Writer], None] | _Call]) -> None:
        for item in batch:
            if isinstance(item, _Call):
                if not item.ran:  # never a silent None: the caller hears it did not land
                    item.error = CacheError("an index write was not run (the mount's "
                                            "writer stopped)")
                item.done.set()
        self.committed += len(batch)
        for name in [n for n, by in self.queued_by.items() if by <= self.committed]:
            del self.queued_by[name]  # in the index now (or dropped with its batch)
            self.queued.pop(name, None)

    def _commit(self, batch: list[Callable[[Writer], None] | _Call]) -> None:
        """The ops of ``batch`` in one transaction, then its whole writes in order, each
        in its own: a whole write comes after everything posted before it (and maybe
        after ops of its batch posted since). One transaction per stretch of ops between
        whole writes made a burst's commits (fsyncs) twice as many."""
        ops = [item for item in batch if not isinstance(item, _Call)]
        try:
            if ops:
                self._commit_ops(ops)
        finally:  # a bug in an op (raised on) does not keep the whole writes from running
            for item in batch:
                if isinstance(item, _Call):
                    item.run()

    def _commit_ops(self, ops: list[Callable[[Writer], None]]) -> None:
        try:
            with self.index.write() as w:
                for op in ops:
                    op(w)
        except CacheError as e:  # the index is full or broken: the next write says so too
            log.error("could not record the state of downloads: %s", e)
