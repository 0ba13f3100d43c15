"""The scheduler on its own: one task over a heap of due times, with a stand-in for the
refresher (the mount tests cover it with real downloads).

Every test runs on trio's ``autojump_clock`` and gives the scheduler a wall clock that
follows it (``TrioWallClock``): its sleeps, backoffs and clock jumps take no real time."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import trio

from buffyfs.errors import FetchError
from buffyfs.fetch.scheduler import ERROR_BACKOFF, MAX_SLEEP, Scheduler
from buffyfs.options import normalize_options
from buffyfs.store.index import Index, now_utc, rfc3339


class TrioWallClock:
    """A wall clock that follows trio's (virtual, under ``autojump_clock``) and can jump."""

    def __init__(self) -> None:
        self.start = time.time() - trio.current_time()
        self.offset = 0.0  # a jump of the wall clock, in seconds

    def __call__(self) -> float:
        return self.start + trio.current_time() + self.offset


class FakeRefresher:
    """Records refreshes; each takes ``hold`` seconds and stamps the state like a check."""

    def __init__(self, index: Index, hold: float = 0.0) -> None:
        self.index = index
        self.hold = hold
        self.calls: list[str] = []
        self.now_utc = now_utc  # the scheduler's clock, once it runs
        self.running = 0
        self.most_running = 0

    async def refresh(self, name: str) -> None:
        self.calls.append(name)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await trio.sleep(self.hold)
            self.index.set_state(name, last_check=rfc3339(self.now_utc()))
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
async def running(idx: Index, refresher: FakeRefresher,
                  clock: TrioWallClock | None = None) -> AsyncIterator[Scheduler]:
    """A scheduler on ``clock`` with every source of ``idx`` planned and its task running;
    cancelled (with any refresh under way) on leaving."""
    async with trio.open_nursery() as nursery:
        scheduler = Scheduler(idx, refresher, nursery,  # type: ignore[arg-type]
                              clock=clock or TrioWallClock())
        refresher.now_utc = scheduler.now_utc
        scheduler.start_all()
        nursery.start_soon(scheduler.run)
        yield scheduler
        nursery.cancel_scope.cancel()


async def until(predicate, limit: float = 10, every: float = 0.01) -> None:
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 (polling state that has no event)
            await trio.sleep(every)


async def settle(refresher: FakeRefresher, scheduler: Scheduler) -> None:
    """Wait (bounded) until nothing is pending or running."""
    await until(lambda: not (scheduler.pending or scheduler.running or refresher.running))
    await trio.sleep(0.05)


async def test_due_sources_refresh_once_and_idle_ones_take_no_task(idx, autojump_clock):
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
            assert r.state("idle7").next_check is not None
            assert r.state("never").next_check is None


async def test_kick_forces_a_check_and_a_kick_while_running_runs_once_more(idx, autojump_clock):
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


async def test_removed_source_is_forgotten_and_its_refresh_cancelled(idx, autojump_clock):
    add(idx, "gone", None, refresh="1d")
    refresher = FakeRefresher(idx, hold=30)
    async with running(idx, refresher) as scheduler:
        await until(lambda: refresher.running)
        idx.remove_source("gone")
        scheduler.sync("gone")
        await until(lambda: not refresher.running, 5)  # cancelled, not waited out
        assert "gone" not in scheduler.known and not scheduler.busy("gone")


async def test_heap_stays_bounded_under_many_changes(idx, autojump_clock):
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


async def test_on_open_check_not_skipped_when_a_sync_is_pending(idx, autojump_clock):
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


async def test_error_backoff_follows_policy(idx, autojump_clock):
    """After an unexpected error the source is *looked at again* after ERROR_BACKOFF,
    not refreshed regardless of its policy (here `never` with a version)."""
    add(idx, "n", timedelta(minutes=1), refresh="never")
    give_version(idx, "n")
    refresher = Boom(idx)
    async with running(idx, refresher) as s:
        await settle(refresher, s)
        s.kick("n")  # `buffyfs refresh n`
        await trio.sleep(ERROR_BACKOFF * 3)
        assert refresher.calls == ["n"], f"refreshed {len(refresher.calls)} times"


async def test_error_backoff_holds_a_due_source_back(idx, autojump_clock):
    """A source whose refresh hit a bug and whose policy says "due again at once" (10s)
    is not tried again before ERROR_BACKOFF, then is, on its policy."""
    add(idx, "b", None, refresh="2s")
    refresher = Boom(idx)
    async with running(idx, refresher):
        await until(lambda: refresher.calls)
        started = trio.current_time()
        await until(lambda: len(refresher.calls) == 2, ERROR_BACKOFF * 2, every=0.5)
        assert trio.current_time() - started >= ERROR_BACKOFF - 1


async def test_duration_policy_checks_on_time_for_hours(idx, autojump_clock):
    """A `10m` source over five (virtual) hours: one check per 10 minutes, each on time."""
    add(idx, "p", timedelta(minutes=1), refresh="10m")
    refresher = FakeRefresher(idx)
    clock = TrioWallClock()
    async with running(idx, refresher, clock) as s:
        checks = []
        refresh = refresher.refresh

        async def timed(name):
            checks.append(clock())
            await refresh(name)

        refresher.refresh = timed
        await trio.sleep(5 * 3600 + 1)
        assert len(checks) == 30, len(checks)
        gaps = [b - a for a, b in zip(checks, checks[1:], strict=False)]
        assert all(599 <= gap <= 601 for gap in gaps), gaps
        assert len(s.nursery.child_tasks) == 1  # between checks, no task of its own


async def test_opener_not_held_after_wall_clock_jump(idx, autojump_clock):
    """A source with no version whose first download gave up (next check in 1 h): after
    the wall clock jumps 2 h forward, an open must not hang until the scheduler's
    monotonic sleep (up to MAX_SLEEP) ends."""
    clock = TrioWallClock()
    add(idx, "f", None, refresh="1h")
    idx.record_failure("f", now_utc(), "gave up")
    refresher = FakeRefresher(idx)
    async with running(idx, refresher, clock) as s:
        await settle(refresher, s)
        clock.offset = 7200.0
        with trio.fail_after(MAX_SLEEP / 10):  # virtual seconds: the real wait is nil
            try:
                await s.wait_first_version("f")
            except FetchError:
                pass


async def test_a_source_that_cannot_be_planned_does_not_stop_the_others(idx, autojump_clock,
                                                                        caplog):
    """A record the policy cannot read (here a cron expression stored without checks):
    logged, looked at again after ERROR_BACKOFF; the sources of the same batch refresh."""
    idx.add_source("bad", "http://127.0.0.1:9/bad", {"refresh": "cron:not a cron"})
    idx.set_state("bad", last_check=rfc3339(now_utc()))
    for name in ("a", "b"):
        add(idx, name, None, refresh="1d")
    refresher = FakeRefresher(idx)
    async with running(idx, refresher) as s:
        await settle(refresher, s)
        assert sorted(refresher.calls) == ["a", "b"]
        assert s.due["bad"] > s.clock() + ERROR_BACKOFF - 5
        await trio.sleep(ERROR_BACKOFF * 2.5)  # tried again, twice, and not more often
    failed = [r for r in caplog.records if "bad: planning the next check failed" in r.msg % r.args]
    assert len(failed) == 3 and all(r.exc_info for r in failed)


async def test_a_burst_of_due_refreshes_starts_a_chunk_per_loop_turn(idx, autojump_clock):
    """1,000 refreshes due at once (a burst of `refresh` writes) do not all take their
    first step in one loop turn: FUSE requests are read between turns (issue 12)."""
    from buffyfs.fetch.scheduler import START_CHUNK

    for i in range(100):
        add(idx, f"s{i}", None, refresh="1d")  # never checked: all due now
    refresher = FakeRefresher(idx, hold=1.0)
    most = [0]

    async def another_task() -> None:  # as pyfuse3's: one step per loop turn
        seen = 0
        for _ in range(100_000):  # until every refresh started (the clock stands still)
            if seen == 100:
                return
            await trio.lowlevel.checkpoint()
            most[0] = max(most[0], len(refresher.calls) - seen)
            seen = len(refresher.calls)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(another_task)
        async with running(idx, refresher) as scheduler:
            await settle(refresher, scheduler)
    assert len(refresher.calls) == 100
    # between two steps of another task: one turn's starts, or parts of two (trio may
    # run a turn's tasks in either order); all 100 at once before
    assert 0 < most[0] <= 2 * START_CHUNK, most


async def test_evaluations_end_their_loop_turn_after_a_time_slice(idx, autojump_clock,
                                                                  monkeypatch):
    """The scheduler's start evaluates 20,000 sources (records decoded, policies parsed):
    a batch of 256 held the loop ~100 ms. It now stops after EVALUATE_SLICE seconds and
    goes on in the next turn; with a slice of 0, one source per turn (issue 12)."""
    from buffyfs.fetch import scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "EVALUATE_SLICE", 0.0, raising=False)
    for i in range(50):
        add(idx, f"s{i}", timedelta(hours=1), refresh="1d")  # checked: none due
    refresher = FakeRefresher(idx)
    most = [0]

    async def another_task(scheduler: Scheduler) -> None:  # one step per loop turn
        left = len(scheduler.pending)
        for _ in range(100_000):
            if not scheduler.pending:
                return
            await trio.lowlevel.checkpoint()
            most[0] = max(most[0], left - len(scheduler.pending))
            left = len(scheduler.pending)

    async with running(idx, refresher) as scheduler:
        await another_task(scheduler)
        await settle(refresher, scheduler)
        assert len(scheduler.due) == 50  # every one planned
    assert refresher.calls == []
    assert 0 < most[0] <= 2, most  # all 50 in one turn before
