"""``GET /@changes``: the long-poll change feed over the index's mirror serial.

Every process that writes the index (this daemon, the command line) advances the
serial (index.py, ``mirror``); one task here looks at it every POLL seconds (one read
of one key) and wakes every waiting request when it moved.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import trio

from buffyfs.store.index import Index

POLL = 0.1  # seconds between looks at the serial: a change wakes waiters within this
MAX_WAIT = 60.0
MAX_PAGE = 10_000  # sources in one page of a paged feed (``limit``)


class ChangeFeed:
    def __init__(self, index: Index) -> None:
        self.index = index
        self.moved = trio.Event()

    async def run(self) -> None:
        with self.index.read() as r:
            last = r.mirror_serial()
        while True:
            await trio.sleep(POLL)
            with self.index.read() as r:
                now = r.mirror_serial()
            if now != last:
                last = now
                self.moved.set()
                self.moved = trio.Event()

    async def wait_since(self, since: int, wait: float) -> dict[str, object]:
        """``{"serial": M, "sources": [...]}`` of the changes after ``since``, waiting up
        to ``wait`` seconds (at most MAX_WAIT) for one when there is none. When
        ``since`` is too old to tell (or from another index), every current source is
        listed and ``"complete": false`` says a replica must look at everything."""
        wait = min(max(0.0, wait), MAX_WAIT) if math.isfinite(wait) else 0.0  # app checks
        with trio.move_on_after(wait):
            while True:
                moved = self.moved  # taken before the look: a change after it wakes us
                serial, names = self.index.mirror_changes_since(since)
                if names is None or names:
                    break
                await moved.wait()
        serial, names = self.index.mirror_changes_since(since)
        if names is None:
            with self.index.read() as r:
                return {"serial": serial, "sources": sorted(r.source_names()),
                        "complete": False}
        return {"serial": serial, "sources": sorted(names), "complete": True}


def page(feed: dict[str, Any], after: str | None, limit: int | None) -> dict[str, Any]:
    """The page of ``feed`` a paged request (``&after=NAME&limit=N``) asks for: its
    sources after the name ``after`` in sorted order, at most ``limit`` of them, and
    ``"more": true`` when names are left. The next page is asked with the same
    ``since`` and ``after`` = this page's last name; the first page's ``serial`` is
    the one to follow the feed from (changes made while paging come again)."""
    names: list[str] = feed["sources"]  # sorted (wait_since)
    start = bisect.bisect_right(names, after) if after is not None else 0
    end = len(names) if limit is None else start + limit
    return {**feed, "sources": names[start:end], "more": end < len(names)}
