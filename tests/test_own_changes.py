"""Issue 12, never stall: the mount's change watcher applies what other processes
wrote to the index, and leaves out what the mount's own collector committed (that
one brings the kernel's view up to date itself, from what its worker read). A batch's
commit lands in the index before the worker's answer, with the changes it wrote,
comes back: a watcher round in between took every collected source for another
process's change, and synced them all again (thousands after a big collection; and the
unpacker looked at each, mapping the index pages the collection had just given back)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from buffyfs import mount
from buffyfs.mount import Collector, Unmounted
from buffyfs.store import offload
from buffyfs.store.cache import Cache
from tests.test_stall import build

SOURCES = 30


class Watched(Unmounted):
    """The filesystem object of a mount without a kernel: records what is synced."""

    def __init__(self, cache: Cache) -> None:
        super().__init__(cache, None)
        self.synced: list[str] = []

    def sync(self, name: str) -> None:
        self.synced.append(name)


class NoScheduler:
    known: set[str] = set()

    def kick(self, name: str) -> None:
        pass


@pytest.fixture
def cache(tmp_path: Path) -> Any:
    build(tmp_path, SOURCES, 5)  # latest, newest valid, keep_versions 1: two go
    c = Cache(tmp_path)
    yield c
    c.close()


async def test_the_watcher_leaves_out_a_commit_whose_answer_is_on_its_way(
        cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = Watched(cache)
    landed = trio.Event()
    real_commit = offload.commit_and_read

    async def slow_answer(*args: Any, **kwargs: Any) -> offload.Committed:
        committed = await real_commit(*args, **kwargs)
        landed.set()
        await trio.sleep(1.0)  # in the index already; the answer still on its way back
        return committed

    monkeypatch.setattr(offload, "commit_and_read", slow_answer)
    rounds = 0
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            collector = Collector(cache, fs, None, nursery)
            seq, _ = await trio.to_thread.run_sync(cache.index.changes_since, 0)

            async def watch() -> None:
                nonlocal seq, rounds
                await landed.wait()  # a round while the answer is on its way
                while True:
                    seq = await mount._apply_changes(cache, NoScheduler(), fs,  # type: ignore[arg-type]
                                                     collector, seq)
                    rounds += 1
                    await trio.sleep(0.05)

            nursery.start_soon(watch)
            report = await collector.collect()
            after = rounds
            with trio.fail_after(10):  # rounds after the answer came
                while rounds < after + 2:  # noqa: ASYNC110 (a count, not an event)
                    await trio.sleep(0.05)
            assert len(report.collected()) == 2 * SOURCES
            assert fs.synced == []  # none of the collection's sources taken for another's
            # another process's change is still applied
            await trio.to_thread.run_sync(cache.tag, "src3", "latest", "mine")
            with trio.fail_after(10):
                while "src3" not in fs.synced:  # noqa: ASYNC110 (a list, not an event)
                    await trio.sleep(0.05)
            assert fs.synced == ["src3"]
            nursery.cancel_scope.cancel()


async def test_a_stuck_commit_skips_the_watchers_rounds_without_stopping_them(
        cache: Cache, autojump_clock: Any) -> None:
    """A commit whose worker hangs holds the change watcher's look at the log: each
    round gives up after REGISTER_WAIT, and the next looks again."""
    fs = Watched(cache)
    async with trio.open_nursery() as nursery:
        collector = Collector(cache, fs, None, nursery)
        seq, _ = await trio.to_thread.run_sync(cache.index.changes_since, 0)
        await trio.to_thread.run_sync(cache.tag, "src3", "latest", "mine")
        ended = trio.Event()

        async def stuck_commit(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            async with collector.registering:
                task_status.started()
                await ended.wait()

        await nursery.start(stuck_commit)
        began = trio.current_time()
        with trio.fail_after(mount.REGISTER_WAIT * 2):
            assert await mount._apply_changes(cache, NoScheduler(), fs,  # type: ignore[arg-type]
                                              collector, seq) == seq
        assert trio.current_time() - began == pytest.approx(mount.REGISTER_WAIT)
        assert fs.synced == []
        ended.set()
        assert await mount._apply_changes(cache, NoScheduler(), fs,  # type: ignore[arg-type]
                                          collector, seq) > seq
        assert fs.synced == ["src3"]
        nursery.cancel_scope.cancel()
