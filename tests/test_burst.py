"""Issue 12, a burst of 1,000 refreshes: each waits for the mount's queued index writes
(writes.IndexWrites.flush) before it starts; a batch committed wakes only the waits it
completes, not all of them (500 loop steps per batch, turns of over a second)."""

from __future__ import annotations

import collections
from pathlib import Path

import trio
import trio.testing

from buffyfs.store.index import Index
from buffyfs.store.writes import IndexWrites


class StepCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps: collections.Counter[str] = collections.Counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] += 1


async def test_a_committed_batch_wakes_only_the_flushes_it_completes(tmp_path: Path) -> None:
    index = Index(tmp_path / "index")
    try:
        writes = IndexWrites(index)
        counter = StepCounter()
        woken: list[int] = []

        async def waiter(n: int) -> None:
            await writes.flush()
            woken.append(n)

        async with trio.open_nursery() as nursery:
            for n in range(50):  # each waits for its own post
                writes.post(lambda w: None)
                nursery.start_soon(waiter, n, name=f"waiter{n}")
                await trio.testing.wait_all_tasks_blocked()  # waiting for post n + 1
            trio.lowlevel.add_instrument(counter)
            for n in range(50):  # one post committed at a time: 50 batches
                batch, writes.queue = writes.queue[:1], writes.queue[1:]
                writes._commit(batch)
                writes._done(1)
                await trio.testing.wait_all_tasks_blocked()
                assert woken == list(range(n + 1))
            trio.lowlevel.remove_instrument(counter)
        waiter_steps = sum(n for name, n in counter.steps.items() if name.startswith("waiter"))
        assert waiter_steps == 50, counter.steps  # one each: woken once, done
    finally:
        index.close()
