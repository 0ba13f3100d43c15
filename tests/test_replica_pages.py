"""A replica reads a whole hub in pages (issue 15: a 10,000-source replica mirrors the
hub within 5 s of its start): ``/@changes?...&limit=N&after=NAME`` answers one page
of the feed, and a replica's first sync asks page after page, each applied in a
transaction of its own. Timing is bench/replica_rss.py's; these check the rules."""

from __future__ import annotations

import hashlib
import json
import os
import re

from bench.common import populate
from buffyfs.fetch.replica import FEED_PAGE
from buffyfs.store.index import Index
from tests.conftest import http_request, wait_for

NO_SCRUB = ("--scrub-interval", "never")  # the hub's blobs are not there


def hub_with(cache, sources):
    """A hub cache of ``sources`` sources of one version each (no blob files: a
    replica with prefetch none reads none; the hub is started without scrub),
    written straight into its index."""
    index = Index(cache / "index")
    try:
        return populate(index, sources, 1, size=100, options={"refresh": "never"},
                        sha256=lambda s, i: hashlib.sha256(f"{s}/{i}".encode()).hexdigest())
    finally:
        index.close()


def feed(server, query):
    status, _, body = http_request(server.url, f"/@changes?{query}")
    return status, (json.loads(body) if status == 200 else body)


def test_the_change_feed_answers_in_pages(serve_factory, cache_dir):
    names = sorted(hub_with(cache_dir, 7))
    server = serve_factory(*NO_SCRUB)
    _, whole = feed(server, "since=-1&mirror=1")  # unpaged, as before
    assert whole["sources"] == names and "more" not in whole
    pages, after = [], None
    while True:
        status, page = feed(server, "since=-1&mirror=1&limit=3"
                            + (f"&after={after}" if after else ""))
        assert status == 200
        assert sorted(page["mirror"]) == page["sources"] and page["serial"] == whole["serial"]
        pages.append(page["sources"])
        if not page["more"]:
            break
        after = page["sources"][-1]
    assert pages == [names[0:3], names[3:6], names[6:7]]
    assert feed(server, "since=-1&limit=0")[0] == 400
    assert feed(server, "since=-1&limit=lots")[0] == 400
    _, last = feed(server, f"since=-1&limit=3&after={names[-1]}")
    assert last["sources"] == [] and last["more"] is False


def test_a_replica_reads_a_big_hub_in_pages(serve_factory, cli, cache_dir, replica_factory,
                                            tmp_path):
    count = 2 * FEED_PAGE + 100  # three pages
    names = hub_with(cache_dir, count)
    server = serve_factory(*NO_SCRUB)
    replica = replica_factory(server.url, prefetch="none")

    def listed():
        return {n for n in os.listdir(replica.path) if not n.startswith("@")}

    wait_for(lambda: listed() == set(names), 30.0, interval=0.2, what="every source")
    asked = re.findall(r"> GET \S+/@changes\?since=-1&wait=0&mirror=1&limit=(\d+)"
                       r"(&after=src\d+)?\s", replica.log_text())
    assert len(asked) == 3 and {int(n) for n, _ in asked} == {FEED_PAGE}, asked
    st = json.loads((replica / names[-1] / "@status").read_text())
    assert st["versions"] and st["versions"][0].get("remote")
    # sources removed at the hub while the replica was away go at its next start,
    # whichever page they would have been on
    replica.close()
    gone = [names[0], names[FEED_PAGE + 1], names[-1]]
    for name in gone:
        cli("remove", name, check=True)
    replica = replica_factory(server.url, prefetch="none", cache=tmp_path / "replica-cache1")
    wait_for(lambda: listed() == set(names) - set(gone), 30.0, interval=0.2,
             what="the removed sources gone")
