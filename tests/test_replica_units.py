"""Rules of a replica (fetch/replica.py, fetch/upstream.py) shown on the pieces, with a
hub double in place of ``buffyfs serve``: damage found while the replica task restarts
is fetched again once it is back; a prefetch plan that fails is contained; a feed
answer's later pages are asked after the serial that answer was asked after; a
source's status fails over on refusals and non-statuses as the feed does."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from buffyfs.errors import FetchError
from buffyfs.fetch.replica import Replica, ReplicaSettings
from buffyfs.fetch.upstream import Answer, HubDown, Upstream
from buffyfs.store.cache import Cache

HUB = "http://127.0.0.1:1"
OTHER = "http://127.0.0.1:2"
VID = "20260101T000000Z-0123abcd"


def a_status(name: str) -> dict[str, Any]:
    """What the hub says of ``name``: one version."""
    return {"url": f"http://127.0.0.1:9/{name}", "options": {"refresh": "never"},
            "pinned": None,
            "versions": [{"id": VID, "sha256": hashlib.sha256(name.encode()).hexdigest(),
                          "size": 3, "fetched_at": "2026-01-01T00:00:00Z", "tags": []}]}


class HubDouble:
    """Stands in for Upstream: the feed is down unless ``pages`` holds its later
    pages (by the name they come after); ``asked`` is (since, after) of each page."""

    def __init__(self) -> None:
        self.pages: dict[str, dict[str, Any]] = {}
        self.asked: list[tuple[int, str | None]] = []

    async def changes(self, since: int, wait: float, hub: str | None,
                      limit: int | None = None, after: str | None = None) -> Answer:
        if after is None or after not in self.pages:
            raise HubDown("hub unreachable: the double has no feed")
        self.asked.append((since, after))
        return Answer(HUB, 200, json.dumps(self.pages[after]).encode(), since=since)


def make_replica(tmp_path: Path, prefetch: str = "none") -> tuple[Cache, Replica, HubDouble]:
    cache = Cache(tmp_path / "replica")
    hub = HubDouble()
    settings = ReplicaSettings([HUB], prefetch=prefetch)
    replica = Replica(cache, settings, hub)  # type: ignore[arg-type]
    return cache, replica, hub


def test_damage_found_while_the_replica_restarts_is_fetched_again_once_back(tmp_path):
    cache, replica, _ = make_replica(tmp_path, prefetch="latest")
    planned: list[list[str]] = []

    async def plan(names: list[str]) -> None:
        planned.append(names)

    replica._plan_prefetch = plan  # type: ignore[method-assign]
    assert replica.nursery is None  # the task is not running (restarting after a bug)
    replica.fetch_again(["a", "b"])

    async def main() -> None:
        with trio.move_on_after(0.5):
            await replica.run()

    try:
        trio.run(main)
    finally:
        cache.close()
    assert planned == [["a", "b"]]


def test_a_prefetch_plan_that_fails_is_contained_and_planned_again(tmp_path, caplog):
    cache, replica, _ = make_replica(tmp_path, prefetch="latest")
    failures = [2]
    planning = replica._to_prefetch

    def to_prefetch(names: list[str], arriving: int = 0) -> list[tuple[str, str]]:
        if failures[0]:
            failures[0] -= 1
            raise OSError(5, "Input/output error")  # e.g. the index unreadable a moment
        return planning(names, arriving)

    replica._to_prefetch = to_prefetch  # type: ignore[method-assign]

    async def main() -> None:
        for _ in range(3):  # a failed plan raises nothing: the replica keeps following
            await replica.sync(["a"], HUB, {"a": a_status("a")})

    caplog.set_level(logging.ERROR, "buffyfs.fetch.replica")
    try:
        trio.run(main)
        with cache.index.read() as r:
            assert r.source("a").mirror
    finally:
        cache.close()
    said = [r for r in caplog.records if "planning the prefetch failed" in r.getMessage()]
    assert len(said) == 1 and "Input/output error" in said[0].getMessage()
    assert list(replica.prefetch_wanted) == [("a", VID)]  # the next sync planned it


def page(serial: int, names: list[str], more: bool, complete: bool = True) -> dict[str, Any]:
    return {"serial": serial, "sources": names, "more": more, "complete": complete,
            "mirror": {n: a_status(n) for n in names}}


def test_later_pages_are_asked_after_the_serial_the_answer_was_asked_after(tmp_path):
    cache, replica, hub = make_replica(tmp_path)
    replica.hub, replica.serial = HUB, 8  # another answer moved the serial meanwhile
    hub.pages = {"a": page(10, ["b"], more=False)}
    answer = Answer(HUB, 200, json.dumps(page(9, ["a"], more=True)).encode(), since=5)
    try:
        trio.run(replica._take_feed, answer)
        assert hub.asked == [(5, "a")]  # not 8: changes 6..8 on later pages would be lost
        assert replica.serial == 9
        with cache.index.read() as r:
            assert r.source("a") and r.source("b")
        # a later page whose completeness differs from the first fails the sync
        hub.pages = {"c": page(12, ["d"], more=False, complete=False)}
        answer = Answer(HUB, 200, json.dumps(page(11, ["c"], more=True)).encode(), since=9)
        with pytest.raises(FetchError, match="changed in the middle of a sync"):
            trio.run(replica._take_feed, answer)
        assert replica.serial == 9
    finally:
        cache.close()


def upstream_of(answers: dict[str, Any]) -> Upstream:
    """An Upstream over [HUB, OTHER] whose answers come from ``answers`` (URL ->
    (status, body), or None: no connection); nothing goes on the network."""

    def handler(request: httpx.Request) -> httpx.Response:
        got = answers[f"{request.url.scheme}://{request.url.netloc.decode()}"]
        if got is None:
            raise httpx.ConnectError("connection refused", request=request)
        status, body = got
        return httpx.Response(status, content=body)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return Upstream([HUB, OTHER], None, client)


@pytest.mark.parametrize("refusal", [(401, b"no"), (403, b"no"), (404, b"not found"),
                                     (200, b"<html>Welcome to nginx!</html>"),
                                     (200, b"[1, 2]")])
def test_a_sources_status_fails_over_like_the_feed(refusal):
    status = a_status("a")
    upstream = upstream_of({HUB: refusal, OTHER: (200, json.dumps(status).encode())})
    assert trio.run(upstream.source, "a", None) == (OTHER, status)


def test_a_source_is_gone_only_when_no_hub_that_answers_has_it():
    both = upstream_of({HUB: (404, b"no source named 'a'"), OTHER: (404, b"no")})
    assert trio.run(both.source, "a", None) == (HUB, None)
    one_down = upstream_of({HUB: None, OTHER: (404, b"no source named 'a'")})
    assert trio.run(one_down.source, "a", None) == (OTHER, None)
    refused = upstream_of({HUB: (403, b"no"), OTHER: None})
    with pytest.raises(HubDown, match="HTTP 403"):
        trio.run(refused.source, "a", None)
