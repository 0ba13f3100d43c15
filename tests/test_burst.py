"""Issue 12, a burst of 1,000 refreshes: a batch of the mount's queued index writes
(writes.IndexWrites) committed wakes only the waits it completes, not all of them (500
loop steps per batch, turns of over a second); and a whole burst, through the scheduler,
the refresher and the queued writes, never runs the steps of dozens of refreshes in one
loop turn."""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from buffyfs.store.index import Index
from buffyfs.store.writes import IndexWrites, _Call


class StepCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps: collections.Counter[str] = collections.Counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] += 1


async def test_a_committed_batch_wakes_only_the_calls_it_completes(tmp_path: Path) -> None:
    index = Index(tmp_path / "index")
    try:
        writes = IndexWrites(index)
        counter = StepCounter()
        woken: list[int] = []

        async def waiter(n: int) -> None:
            await writes.call(lambda: None)
            woken.append(n)

        async with trio.open_nursery() as nursery:
            for n in range(50):  # each waits for its own whole write, behind a post
                writes.post(lambda w: None)
                nursery.start_soon(waiter, n, name=f"waiter{n}")
                await trio.testing.wait_all_tasks_blocked()  # waiting for its call
            trio.lowlevel.add_instrument(counter)
            for n in range(50):  # one post and its call committed at a time: 50 batches
                batch, writes.queue = writes.queue[:2], writes.queue[2:]
                writes._commit(batch)
                writes._done(batch)
                await trio.testing.wait_all_tasks_blocked()
                assert woken == list(range(n + 1))
            trio.lowlevel.remove_instrument(counter)
        waiter_steps = sum(n for name, n in counter.steps.items() if name.startswith("waiter"))
        assert waiter_steps == 50, counter.steps  # one each: woken once, done
    finally:
        index.close()


class TurnCounter(trio.abc.Instrument):
    """The most task steps of refresh tasks (``refresh NAME``) that ran in one loop turn
    (from the end of one I/O wait to the start of the next), and the turns counted."""

    def __init__(self) -> None:
        self.this_turn = 0
        self.most = 0
        self.turns = 0

    def after_io_wait(self, timeout: float) -> None:
        self.this_turn = 0
        self.turns += 1

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.startswith("refresh "):
            self.this_turn += 1
            self.most = max(self.most, self.this_turn)


BURST = 200


async def burst_of_refreshes(tmp_path: Path, counter: TurnCounter,
                             max_downloads: int = 4) -> list[str]:
    """BURST sources forced at once (as BURST `refresh` control writes do) through the
    mount's scheduler, refresher and queued index writes, against an in-process origin;
    returns the results of their refreshes."""
    import httpx

    from buffyfs.fetch.refresh import Refresher
    from buffyfs.fetch.scheduler import Scheduler
    from buffyfs.options import normalize_options
    from buffyfs.store.cache import Cache

    cache = Cache(tmp_path / "cache")
    names = [f"burst{i}" for i in range(BURST)]
    for name in names:
        cache.index.add_source(name, f"http://127.0.0.1:9/{name}",
                               normalize_options({"refresh": "never"}))

    round_ = [1]  # new bytes each round: a new version each

    def answer(request: httpx.Request) -> httpx.Response:
        body = f"{request.url.path} {round_[0]}".encode() * 128

        async def streamed() -> AsyncIterator[bytes]:  # as a socket's: read once
            yield body

        return httpx.Response(200, content=streamed(),
                              headers={"Content-Length": str(len(body))})

    client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    try:
        async with client, trio.open_nursery() as nursery:
            refresher = Refresher(cache.index, cache.blobs, client, max_downloads, 2)
            refresher.writes = IndexWrites(cache.index)
            nursery.start_soon(refresher.writes.run, name="index writes")
            scheduler = Scheduler(cache.index, refresher, nursery,
                                  writes=refresher.writes)
            scheduler.start_all()
            nursery.start_soon(scheduler.run, name="scheduler")
            with trio.fail_after(120):  # the first downloads (refresh=never: once)
                while not all(_last_result(cache, n) for n in names):
                    await trio.sleep(0.05)
            round_[0] = 2
            since = time.time()
            trio.lowlevel.add_instrument(counter)
            for name in names:
                scheduler.kick(name)
            with trio.fail_after(120):
                while not all(_last_result(cache, n, since) for n in names):
                    await trio.sleep(0.05)
            trio.lowlevel.remove_instrument(counter)
            nursery.cancel_scope.cancel()
        return [_last_result(cache, n, since) for n in names]
    finally:
        cache.close()


def _last_result(cache: object, name: str, since: float = 0.0) -> str | None:
    """How the last refresh of ``name`` started after ``since`` ended (None: none yet)."""
    with cache.index.read() as r:  # type: ignore[attr-defined]
        last = r.state(name).last_refresh or {}
    return last.get("result") if last.get("started", 0) >= since else None


async def test_a_burst_of_refreshes_runs_few_refresh_steps_per_loop_turn(tmp_path: Path
                                                                         ) -> None:
    """200 refreshes forced at once, 4 downloads at a time: the ones waiting for a
    download slot wait without work, and no loop turn carries the first steps (or the
    index writes' wake-ups) of dozens of them (FUSE requests wait for the whole turn)."""
    counter = TurnCounter()
    results = await burst_of_refreshes(tmp_path, counter)
    assert results == ["new_version"] * BURST, results[:3]
    assert counter.most <= 12, counter.most  # all 200 at once before


async def test_writes_pile_up_while_another_writer_holds_the_index(tmp_path: Path) -> None:
    """While another writer holds LMDB's lock (a `buffyfs` command's long write), the
    mount's queued state and whole writes wait in memory, in order, the loop runs on,
    and its reads see the queued state; all of it lands, in order, once the lock is
    free (issue 12's writer-held row)."""
    import threading

    index = Index(tmp_path / "index")
    try:
        index.add_source("a", "http://127.0.0.1:9/a", {})
        writes = IndexWrites(index)
        held, release = threading.Event(), threading.Event()

        def hold() -> None:  # as another process: the writer lock is the file's
            with index.write():
                held.set()
                release.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(10)
        order: list[str] = []
        turns = [0]

        async def whole_write(tag: str) -> None:
            def fn() -> str:
                order.append(tag)
                index.set_state("a", last_error={"at": "now", "message": tag})
                return tag
            assert await writes.call(fn) == tag

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writes.run)
                writes.set_state("a", progress={"bytes": 1, "total": 2})
                for n in range(10):
                    nursery.start_soon(whole_write, f"w{n}")
                    await trio.testing.wait_all_tasks_blocked()
                writes.set_state("a", queued="behind the others")
                for _ in range(20):  # the loop turns while the writes wait
                    await trio.sleep(0.01)
                    turns[0] += 1
                assert order == []  # nothing could commit
                with index.read() as r:  # the queued state is seen at once
                    state = r.state("a")
                assert state.progress == {"bytes": 1, "total": 2}
                assert state.queued == "behind the others"
                release.set()
                with trio.fail_after(30):
                    while writes.committed < writes.posted:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        finally:
            release.set()
            holder.join(10)
        assert turns[0] == 20
        assert order == [f"w{n}" for n in range(10)]  # each in its turn, in order
        with index.read() as r:
            state = r.state("a")
        assert state.last_error == {"at": "now", "message": "w9"}
        assert state.queued == "behind the others" and writes.queued == {}
    finally:
        index.close()


async def test_a_bug_in_a_queued_op_does_not_leave_a_whole_write_waiting(tmp_path: Path
                                                                          ) -> None:
    """An op that raises (a bug) ends the committing task (the mount logs it and starts
    it again), but the whole write queued with it still runs and its caller is answered:
    the caller waits shielded, it would wait forever."""
    index = Index(tmp_path / "index")
    try:
        writes = IndexWrites(index)
        failed: list[str] = []

        def bug(w: object) -> None:
            raise RuntimeError("a bug")

        async def committing() -> None:
            try:
                await writes.run()
            except RuntimeError as e:
                failed.append(str(e))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(committing)
            writes.post(bug)
            with trio.fail_after(10):
                assert await writes.call(lambda: "answered") == "answered"
        assert failed == ["a bug"]
    finally:
        index.close()


async def test_whole_writes_still_run_when_the_committing_task_is_cancelled(
        tmp_path: Path) -> None:
    """Unmounting cancels the committing task while whole writes wait in the queue:
    every one of them still runs and answers (a cancel taken between trips dropped
    them, and their callers got None)."""
    index = Index(tmp_path / "index")
    try:
        writes = IndexWrites(index)
        ran: list[int] = []
        answers: dict[int, object] = {}

        def write(i: int) -> str:
            time.sleep(0.02)
            ran.append(i)
            return f"r{i}"

        async def caller(i: int) -> None:
            answers[i] = await writes.call(write, i)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writes.run)
                for i in range(10):
                    nursery.start_soon(caller, i)
                await trio.sleep(0.01)  # the first trip under way
                nursery.cancel_scope.cancel()
        assert sorted(ran) == list(range(10))
        assert answers == {i: f"r{i}" for i in range(10)}
    finally:
        index.close()


def test_a_bug_in_an_op_at_shutdown_still_answers_the_whole_writes(tmp_path: Path) -> None:
    """The same at shutdown (``drain`` on the calling thread): the whole write runs,
    its waiter is woken, the posts are counted."""
    index = Index(tmp_path / "index")
    try:
        writes = IndexWrites(index)
        writes.stopped = True

        def bug(w: object) -> None:
            raise RuntimeError("a bug")

        call = _Call(lambda: "answer")
        writes.queue += [bug, call]
        writes.posted += 2
        with pytest.raises(RuntimeError):
            writes.drain()
        assert call.done.is_set() and call.result == "answer"
        assert writes.committed == writes.posted == 2
    finally:
        index.close()
