"""A replica's robustness through the mount (issue 15, the last review's items): a
control write forwarded while a first sync reads a big hub is sent and shown at once,
and ``prefetch = "all"`` under a quota smaller than the hub's versions does not have
them evict each other at every sync. The hub is ``buffyfs serve`` on 127.0.0.1, seen
through test_replica_harden's HubFront (which counts requests and holds pages)."""

from __future__ import annotations

import time

from buffyfs.fetch.replica import FEED_PAGE
from tests.conftest import wait_for
from tests.test_replica import (
    PROPAGATION,
    blob_file,
    hub_add,
    hub_config,
    hub_control,
    hub_status,
    status,
)
from tests.test_replica_harden import TOKEN, front_factory, versions  # noqa: F401 (fixture)
from tests.test_replica_pages import NO_SCRUB, hub_with

PAGE_DELAY = 8.0  # seconds the front holds the answer of a feed's later page


def test_a_forwarded_write_is_not_held_behind_a_first_sync(
        serve_factory, cache_dir, replica_factory, front_factory, tmp_path):  # noqa: F811
    names = sorted(hub_with(cache_dir, FEED_PAGE + 10))  # two pages
    hub = serve_factory("--config", str(hub_config(tmp_path)), *NO_SCRUB)
    front = front_factory(hub.url)
    front.page_delay = PAGE_DELAY
    replica = replica_factory(front.url, token=TOKEN, prefetch="none")
    first = names[0]  # on the first page: shown while the second is held
    vid = wait_for(lambda: (s := status(replica, first)) and s["latest"], 15,
                   what="the first page's sources")
    began = time.monotonic()
    (replica / first / "@control").write_text(f"tag {vid} gold\n")
    took = time.monotonic() - began
    assert took < PAGE_DELAY / 2, took  # not after the rest of the first sync
    assert "gold" in hub_status(hub, first)["versions"][0]["tags"]
    assert "gold" in versions(replica, first)[vid]["tags"]
    assert status(replica, names[-1]) is None  # the second page was not there yet
    wait_for(lambda: status(replica, names[-1]), PAGE_DELAY + 15, what="the second page")
    assert "gold" in versions(replica, first)[vid]["tags"]


def test_prefetch_all_under_a_small_quota_fetches_each_blob_once(
        serve_factory, cli, origin, replica_factory, front_factory, tmp_path):  # noqa: F811
    hub = serve_factory("--config", str(hub_config(tmp_path)))
    bodies = [bytes([65 + i]) * 40_000 for i in range(4)]
    ids = [hub_add(hub, cli, origin, "a", bodies[0])]
    for body in bodies[1:]:
        origin.set("/a", body)
        cli("refresh", "a", check=True)
        ids.append(wait_for(lambda: (s := hub_status(hub, "a")) and s["latest"] not in ids
                            and s["latest"], what="the hub's next version"))
    front = front_factory(hub.url)
    replica = replica_factory(front.url, "--max-cache-size", "100K", prefetch="all")
    wait_for(lambda: blob_file(replica.cache, bodies[3]).exists(), PROPAGATION,
             what="the latest's prefetch")
    for i in range(4):  # each a change of `a` at the hub: a sync plans its prefetch again
        hub_control(hub, "a", f"tag {ids[0]} t{i}")
        wait_for(lambda i=i: f"t{i}" in versions(replica, "a")[ids[0]]["tags"],
                 PROPAGATION, what=f"tag t{i}")
    time.sleep(1.0)  # what the last sync planned has started
    blobs = [path for method, path, _ in front.seen if path.startswith("/@blobs/")]
    assert len(blobs) == len(set(blobs)) <= 2, blobs  # the newest that fit, once each
    held = [v["id"] for v in versions(replica, "a").values() if not v.get("remote")]
    assert sorted(held) == sorted(ids[2:]), held
    # a read of an older one still fetches it (and may evict); no sync fetches it back
    assert (replica / "a" / "@versions" / ids[0]).read_bytes() == bodies[0]
    hub_control(hub, "a", f"tag {ids[0]} again")
    wait_for(lambda: "again" in versions(replica, "a")[ids[0]]["tags"], PROPAGATION,
             what="tag again")
    time.sleep(1.0)
    blobs = [path for method, path, _ in front.seen if path.startswith("/@blobs/")]
    assert len(blobs) <= 4, blobs
