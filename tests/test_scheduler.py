"""The scheduler on its own: one task over a heap of due times, with a stand-in for the
refresher (the mount tests cover it with real downloads)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import trio

from buffyfs.index import Index, now_utc, rfc3339
from buffyfs.options import normalize_options
from buffyfs.scheduler import Scheduler


class FakeRefresher:
    """Records refreshes; each takes ``hold`` seconds and stamps the state like a check."""

    def __init__(self, index: Index, hold: float = 0.0) -> None:
        self.index = index
        self.hold = hold
        self.calls: list[str] = []
        self.running = 0
        self.most_running = 0

    async def refresh(self, name: str) -> None:
        self.calls.append(name)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await trio.sleep(self.hold)
            self.index.set_state(name, last_check=rfc3339(now_utc()))
        finally:
            self.running -= 1

    def wake(self, name: str) -> None:
        pass


@pytest.fixture
def idx(tmp_path: Path) -> Iterator[Index]:
    index = Index(tmp_path / "index")
    yield index
    index.close()


def add(idx: Index, name: str, checked_ago: timedelta | None, **options: object) -> None:
    idx.add_source(name, f"http://127.0.0.1:9/{name}", normalize_options(options))
    if checked_ago is not None:
        idx.set_state(name, last_check=rfc3339(now_utc() - checked_ago))


async def until(predicate, limit: float = 10) -> None:
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 (polling state that has no event)
            await trio.sleep(0.01)


async def settle(refresher: FakeRefresher, scheduler: Scheduler) -> None:
    """Wait (bounded) until nothing is pending or running."""
    await until(lambda: not (scheduler.pending or scheduler.running or refresher.running))
    await trio.sleep(0.05)


async def test_due_sources_refresh_once_and_idle_ones_take_no_task(idx):
    for i in range(300):  # checked a minute ago, refresh daily: nothing to do
        add(idx, f"idle{i}", timedelta(minutes=1), refresh="1d")
    add(idx, "new", None, refresh="1d")  # never checked: due now
    add(idx, "overdue", timedelta(days=2), refresh="1d")
    add(idx, "never", timedelta(days=2), refresh="never")
    refresher = FakeRefresher(idx)
    async with trio.open_nursery() as nursery:
        scheduler = Scheduler(idx, refresher, nursery)  # type: ignore[arg-type]
        scheduler.start_all()
        nursery.start_soon(scheduler.run)
        await settle(refresher, scheduler)
        assert sorted(refresher.calls) == ["new", "overdue"]
        # 303 sources, one scheduling task: no task sleeps on behalf of a source
        assert len(nursery.child_tasks) == 1
        assert len(scheduler.known) == 303
        with idx.read() as r:  # the next check of every source is recorded
            assert r.state("idle7")["next_check"] is not None
            assert r.state("never")["next_check"] is None
        nursery.cancel_scope.cancel()


async def test_kick_forces_a_check_and_a_kick_while_running_runs_once_more(idx):
    add(idx, "a", timedelta(minutes=1), refresh="1d")
    refresher = FakeRefresher(idx, hold=0.2)
    async with trio.open_nursery() as nursery:
        scheduler = Scheduler(idx, refresher, nursery)  # type: ignore[arg-type]
        scheduler.start_all()
        nursery.start_soon(scheduler.run)
        await settle(refresher, scheduler)
        assert refresher.calls == []
        scheduler.kick("a")
        assert scheduler.busy("a")
        await until(lambda: refresher.running)
        scheduler.kick("a")  # during the refresh: one more after it
        scheduler.kick("a")
        await settle(refresher, scheduler)
        assert refresher.calls == ["a", "a"]
        assert refresher.most_running == 1  # never two refreshes of one source at once
        assert not scheduler.busy("a")
        nursery.cancel_scope.cancel()


async def test_removed_source_is_forgotten_and_its_refresh_cancelled(idx):
    add(idx, "gone", None, refresh="1d")
    refresher = FakeRefresher(idx, hold=30)
    async with trio.open_nursery() as nursery:
        scheduler = Scheduler(idx, refresher, nursery)  # type: ignore[arg-type]
        scheduler.start_all()
        nursery.start_soon(scheduler.run)
        await until(lambda: refresher.running)
        idx.remove_source("gone")
        scheduler.sync("gone")
        await until(lambda: not refresher.running, 5)  # cancelled, not waited out
        assert "gone" not in scheduler.known and not scheduler.busy("gone")
        nursery.cancel_scope.cancel()


async def test_heap_stays_bounded_under_many_changes(idx):
    add(idx, "a", timedelta(minutes=1), refresh="1d")
    async with trio.open_nursery() as nursery:
        scheduler = Scheduler(idx, FakeRefresher(idx), nursery)  # type: ignore[arg-type]
        scheduler.start_all()
        nursery.start_soon(scheduler.run)
        for _ in range(2000):  # each change re-evaluates the source
            scheduler.sync("a")
            await trio.lowlevel.checkpoint()
        await trio.sleep(0.05)
        assert len(scheduler.heap) <= 2 * len(scheduler.due) + 256 + 1
        nursery.cancel_scope.cancel()
