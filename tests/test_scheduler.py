"""The scheduler on its own: one task over a heap of due times, with a stand-in for the
refresher (the mount tests cover it with real downloads)."""

from __future__ import annotations

import time as real_time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import trio

import buffyfs.scheduler as scheduler_module
from buffyfs.errors import FetchError
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
            # the scheduler's clock (a test may move it)
            self.index.set_state(name, last_check=rfc3339(scheduler_module.now_utc()))
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


@asynccontextmanager
async def running(idx: Index, refresher: FakeRefresher) -> AsyncIterator[Scheduler]:
    """A scheduler with every source of ``idx`` planned and its task running; cancelled
    (with any refresh under way) on leaving."""
    async with trio.open_nursery() as nursery:
        scheduler = Scheduler(idx, refresher, nursery)  # type: ignore[arg-type]
        scheduler.start_all()
        nursery.start_soon(scheduler.run)
        yield scheduler
        nursery.cancel_scope.cancel()


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
    async with running(idx, refresher) as scheduler:
        await settle(refresher, scheduler)
        assert sorted(refresher.calls) == ["new", "overdue"]
        # 303 sources, one scheduling task: no task sleeps on behalf of a source
        assert len(scheduler.nursery.child_tasks) == 1
        assert len(scheduler.known) == 303
        with idx.read() as r:  # the next check of every source is recorded
            assert r.state("idle7")["next_check"] is not None
            assert r.state("never")["next_check"] is None


async def test_kick_forces_a_check_and_a_kick_while_running_runs_once_more(idx):
    add(idx, "a", timedelta(minutes=1), refresh="1d")
    refresher = FakeRefresher(idx, hold=0.2)
    async with running(idx, refresher) as scheduler:
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


async def test_removed_source_is_forgotten_and_its_refresh_cancelled(idx):
    add(idx, "gone", None, refresh="1d")
    refresher = FakeRefresher(idx, hold=30)
    async with running(idx, refresher) as scheduler:
        await until(lambda: refresher.running)
        idx.remove_source("gone")
        scheduler.sync("gone")
        await until(lambda: not refresher.running, 5)  # cancelled, not waited out
        assert "gone" not in scheduler.known and not scheduler.busy("gone")


async def test_heap_stays_bounded_under_many_changes(idx):
    add(idx, "a", timedelta(minutes=1), refresh="1d")
    async with running(idx, FakeRefresher(idx)) as scheduler:
        for _ in range(2000):  # each change re-evaluates the source
            scheduler.sync("a")
            await trio.lowlevel.checkpoint()
        await trio.sleep(0.05)
        assert len(scheduler.heap) <= 2 * len(scheduler.due) + 256 + 1


def give_version(idx, name):
    idx.commit_version(name, {"sha256": "ab" * 32, "size": 1, "tags": []},
                       now_utc() - timedelta(minutes=1))


async def test_on_open_check_not_skipped_when_a_sync_is_pending(idx):
    """An open of an on-open source must check the origin even if an unrelated change
    (tag, set, the change watcher) left the source waiting for re-evaluation."""
    add(idx, "o", None, refresh="on-open")
    give_version(idx, "o")
    refresher = FakeRefresher(idx)
    async with running(idx, refresher) as s:
        await settle(refresher, s)
        assert refresher.calls == []
        s.sync("o")  # e.g. `tag`, `set`, or the change watcher
        await s.check_on_open("o", 1)
        await settle(refresher, s)
        assert refresher.calls == ["o"], "the open was served without a check"


class Boom(FakeRefresher):
    async def refresh(self, name):
        self.calls.append(name)
        raise RuntimeError("bug")


async def test_error_backoff_follows_policy(idx, monkeypatch):
    """After an unexpected error the source is *looked at again* after ERROR_BACKOFF,
    not refreshed regardless of its policy (here `never` with a version)."""
    monkeypatch.setattr(scheduler_module, "ERROR_BACKOFF", 0.2)
    add(idx, "n", timedelta(minutes=1), refresh="never")
    give_version(idx, "n")
    refresher = Boom(idx)
    async with running(idx, refresher) as s:
        await settle(refresher, s)
        s.kick("n")  # `buffyfs refresh n`
        await trio.sleep(1.5)
        assert refresher.calls == ["n"], f"refreshed {len(refresher.calls)} times"


class Jumped:
    """A wall clock that can jump (both of the scheduler's views of it)."""

    offset = 0.0

    def time(self):
        return real_time.time() + self.offset

    def now_utc(self):
        return now_utc() + timedelta(seconds=self.offset)


async def test_opener_not_held_after_wall_clock_jump(idx, monkeypatch):
    """A source with no version whose first download gave up (next check in 1 h): after
    the wall clock jumps 2 h forward, an open must not hang until the scheduler's
    monotonic sleep (up to MAX_SLEEP) ends."""
    clock = Jumped()
    monkeypatch.setattr(scheduler_module, "time", clock)
    monkeypatch.setattr(scheduler_module, "now_utc", clock.now_utc)
    add(idx, "f", None, refresh="1h")
    idx.record_failure("f", now_utc(), "gave up")
    refresher = FakeRefresher(idx)
    async with running(idx, refresher) as s:
        await settle(refresher, s)
        clock.offset = 7200.0
        with trio.fail_after(3):
            try:
                await s.wait_first_version("f")
            except FetchError:
                pass
