"""Issue 12, never stall: the mount's collector plans the whole cache after a new
version; new versions coming one after another (a refresh burst) must not have it
planned again after each. After a collection that took T, the next waits T x
REST_AFTER; every version that came meanwhile is taken by that one collection.
Runs on trio's autojump_clock: the collector's work is replaced by a stand-in that
takes PLAN seconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import trio

from buffyfs import mount
from buffyfs.mount import REST_AFTER, Collector
from buffyfs.store import gc
from buffyfs.store.index import rfc3339

PLAN = 2.0  # seconds the stand-in collection takes


async def collector(nursery: trio.Nursery, began: list[float],
                    wake_at: list[str] | None = None) -> Collector:
    """A collector running in ``nursery``, past its start-up sweep (a worker thread,
    which the autojump clock does not wait for), whose collections append their start
    to ``began`` and report the next of ``wake_at`` (a hold's end) if any."""
    wake_at = list(wake_at or [])
    c = Collector(None, None, None, nursery)  # type: ignore[arg-type]
    swept = trio.Event()

    async def collect(need: int = 0, dry_run: bool = False) -> gc.Report:
        began.append(trio.current_time())
        await trio.sleep(PLAN)
        c.planned_in = PLAN
        return gc.Report(wake_at=wake_at.pop(0) if wake_at else None)

    async def give_back(trim: bool) -> None:
        swept.set()  # the first comes right after the start-up sweep

    c.collect = collect  # type: ignore[method-assign]
    c.give_back = give_back  # type: ignore[method-assign]
    c.sweep = lambda: []  # type: ignore[method-assign]
    c.sweep_partials = lambda: []  # type: ignore[method-assign]
    nursery.start_soon(c.run)
    await swept.wait()
    return c


async def test_a_burst_of_new_versions_shares_collections(autojump_clock: Any) -> None:
    began: list[float] = []
    async with trio.open_nursery() as nursery:
        c = await collector(nursery, began)
        await trio.sleep(1)
        start = trio.current_time()
        for _ in range(40):  # a new version every 0.5 s for 20 s
            c.kick("src")
            await trio.sleep(0.5)
        await trio.sleep(PLAN * (1 + REST_AFTER) + 1)  # the last kick's turn comes
        nursery.cancel_scope.cancel()
    during = [t - start for t in began]
    assert during[0] < 0.1  # the first new version: collected at once
    gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
    assert gaps and all(g >= PLAN * (1 + REST_AFTER) - 1e-6 for g in gaps), during
    assert len(during) <= 1 + 20 / (PLAN * (1 + REST_AFTER)) + 1, during  # not 40
    assert during[-1] >= 19.5  # the last new version (at 19.5 s) was taken too


async def test_after_a_rest_a_new_version_is_collected_at_once(autojump_clock: Any) -> None:
    began: list[float] = []
    async with trio.open_nursery() as nursery:
        c = await collector(nursery, began)
        c.kick("src")
        await trio.sleep(60)  # long after the rest
        kicked = trio.current_time()
        c.kick("src")
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert len(began) == 2 and began[1] - kicked < 0.1, began


async def test_the_rest_does_not_push_the_periodic_collection_back(
        autojump_clock: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(mount, "GC_INTERVAL", 100.0)
    began: list[float] = []
    async with trio.open_nursery() as nursery:
        c = await collector(nursery, began)
        c.kick("src")
        await trio.sleep(150)
        nursery.cancel_scope.cancel()
    # kicked at 0 (took PLAN, rested PLAN x REST_AFTER), then GC_INTERVAL after that
    # collection ended: the rest counted in
    assert len(began) == 2, began
    assert abs((began[1] - began[0]) - (PLAN + 100.0)) < 0.1, began


async def test_a_hold_that_ends_during_the_rest_ends_it(autojump_clock: Any) -> None:
    began: list[float] = []
    soon = rfc3339(datetime.now(UTC) + timedelta(seconds=1))  # the wall clock stands still
    async with trio.open_nursery() as nursery:
        c = await collector(nursery, began, [soon])
        c.kick("src")
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    # the first collection said a hold ends in about 1 s: the next comes then, not after
    # the rest of PLAN x REST_AFTER
    assert len(began) >= 2 and began[1] - began[0] < PLAN + 2, began
