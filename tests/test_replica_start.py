"""A replica's start with a big hub (issue 15: 10,000 sources listed within 5 s of
the start; timing is bench/replica_rss.py's). The sources a page of the hub's feed
brings that this index has not are written in one go (Writer.add_mirrored_sources):
the same records the per-source path writes, with one ``changes`` and one ``mirror``
entry per source rather than three and two."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

from buffyfs.fetch.replica import FEED_PAGE, Replica, ReplicaSettings, _apply_source
from buffyfs.store.cache import Cache
from buffyfs.store.index import CHANGES_KEPT, Index, SourceInode
from tests.conftest import wait_for
from tests.test_replica_pages import NO_SCRUB, hub_with

PROPAGATION = 5.0  # SPEC: a change at the hub shows in the replica within 5 s


def hub_status(s: int) -> dict:
    """What the hub's feed says of a source (http/app.py's ``_mirrored``): of three
    versions, some tagged, one held, one failed validation, one damaged at the hub."""
    versions = []
    for i in range(3):
        sha = hashlib.sha256(f"{s}/{i}".encode()).hexdigest()
        vid = f"2026010{i + 1}T000000Z-{sha[:8]}"
        versions.append({"id": vid, "sha256": sha, "size": 100 + i,
                         "fetched_at": f"2026-01-0{i + 1}T00:00:00Z",
                         "tags": ["valid", "gold"] if i == 0 else ["failed"] if i == 1 else [],
                         "held_until": "2099-01-01T00:00:00Z" if i == 0 else None,
                         "validation": "too small" if i == 1 else None,
                         "damaged": {"at": "2026-01-05T00:00:00Z"} if s % 7 == 0 and i == 2
                         else None})
    versions.reverse()  # newest first, as @status lists them
    return {"url": f"http://127.0.0.1:9/src{s}", "options": {"refresh": "never"},
            "pinned": versions[1]["id"] if s % 5 == 0 else None, "versions": versions}


def replica_on(root) -> Replica:
    return Replica(Cache(root), ReplicaSettings(["http://127.0.0.1:9"], prefetch="none"),
                   upstream=None)  # type: ignore[arg-type]  # _apply asks the hub nothing


def records(cache: Cache) -> dict:
    """What the index holds of its sources, without what differs between two indexes
    written at different moments (inode numbers and when the sources were added)."""
    out = {}
    with cache.index.read() as r:
        for name, src in r.sources():
            versions = r.versions(name)
            kinds = {r.inode(src.ino + k).kind for k in SourceInode}
            refs = [r.inode(v.ino) for v in versions]
            out[name] = {
                "source": dataclasses.replace(src, ino=0, added_at=None),
                "versions": [dataclasses.replace(v, ino=0) for v in versions],
                "inodes": (sorted(kinds), refs),
            }
    return out


def test_a_page_of_new_sources_is_written_as_the_per_source_path_does(tmp_path):
    page = {f"src{s}": hub_status(s) for s in range(40)}
    page["src3"] = None  # the hub lost it meanwhile: nothing to add
    held = page["src1"]["versions"][2]["sha256"]  # bytes this cache holds already
    fast, slow = replica_on(tmp_path / "fast"), replica_on(tmp_path / "slow")
    try:
        for cache in (fast.cache, slow.cache):
            with cache.index.write() as w:
                w.ref_blob(held, 100)
        before = fast.index.last_commit()
        seq = fast.index.changes_since(0)[0]
        serial = fast.index.mirror_changes_since(0)[0]
        changed = fast._apply(page)
        assert fast.index.last_commit() == before + 1  # one transaction
        assert sorted(changed) == sorted(n for n, st in page.items() if st)
        with slow.index.write() as w:  # the per-source path, as before
            for name, status in page.items():
                _apply_source(w, name, status)
        assert records(fast.cache) == records(slow.cache)
        # one change (and one mirror entry) per source, one for the root listing
        now, names = fast.index.changes_since(seq)
        assert now == seq + len(changed) + 1 and names == set(changed) | {""}
        now, names = fast.index.mirror_changes_since(serial)
        assert now == serial + len(changed) and names == set(changed)
        with fast.index.read() as r:
            assert not r.version("src1", page["src1"]["versions"][2]["id"]).remote
            assert r.blob_ref(held).refs == 2  # the held bytes counted at once
            assert r.version("src0", page["src0"]["versions"][0]["id"]).remote
            # every inode of the page distinct
            inos = [src.ino + k for _, src in r.sources() for k in SourceInode] + \
                [v.ino for n, _ in r.sources() for v in r.versions(n)]
            assert len(inos) == len(set(inos))
        # the next page: sources it has now go the per-source way (nothing changed)
        assert fast._apply({"src0": page["src0"]}) == []
    finally:
        fast.cache.close()
        slow.cache.close()


def test_the_change_log_is_trimmed_the_same_way(tmp_path):
    """A page's entries past CHANGES_KEPT drop the oldest, as ``changed`` does."""
    cache = Cache(tmp_path / "c")
    try:
        with cache.index.write() as w:
            for i in range(CHANGES_KEPT - 5):
                w.changed(f"old{i}")
            w.changed_many([f"new{i}" for i in range(20)])
        now, names = cache.index.changes_since(CHANGES_KEPT + 15 - 30)
        assert now == CHANGES_KEPT + 15
        assert names == {f"new{i}" for i in range(20)} | {f"old{i}" for i in
                                                          range(CHANGES_KEPT - 15, CHANGES_KEPT - 5)}
        with cache.index.read() as r, r.txn.cursor(db=cache.index.dbs["changes"]) as cur:
            assert [int.from_bytes(k, "big") for k in cur.iternext(values=False)] == \
                list(range(16, CHANGES_KEPT + 16))
    finally:
        cache.close()


def test_a_replica_shows_a_big_hub_with_its_tags_and_pins(serve_factory, cli, cache_dir,
                                                          replica_factory):
    """2,000 sources (four pages): every one listed with the hub's versions, tags
    and pins, in one change entry each in the replica's index; a change at the hub
    afterwards still shows within 5 s."""
    count = 4 * FEED_PAGE
    names = sorted(hub_with(cache_dir, count))
    tagged, pinned = names[::97], names[5::211]
    hub = Index(cache_dir / "index")
    try:
        with hub.write() as w:
            for name in tagged:
                w.change_tag(name, w.versions(name)[0].id, add="gold")
            for name in pinned:
                w.set_pin(name, True, w.versions(name)[0].id)
    finally:
        hub.close()
    server = serve_factory(*NO_SCRUB)
    replica = replica_factory(server.url, prefetch="none")

    def listed():
        return {n for n in os.listdir(replica.path) if not n.startswith("@")}

    wait_for(lambda: listed() == set(names), 60.0, interval=0.2, what="every source")
    for name in names[::400] + tagged[:3] + pinned[:3]:
        st = json.loads((replica / name / "@status").read_text())
        hub_st = json.loads(cli("status", name, "--json", check=True).stdout)
        assert [(v["id"], v["tags"]) for v in st["versions"]] == \
            [(v["id"], v["tags"]) for v in hub_st["versions"]], name
        assert st["pinned"] == hub_st["pinned"] and st["latest"] == hub_st["latest"]
        assert (replica / name / "@gold").is_dir() == (name in tagged)
    # each source took one entry of the replica's change log (three before: the
    # mount's change watcher read every source three times)
    replica_index = Index(replica.cache / "index")
    try:
        seq = replica_index.changes_since(0)[0]
    finally:
        replica_index.close()
    assert seq < count + 50, seq
    # a change at the hub still shows within 5 s
    target = names[count // 2]
    vid = json.loads((replica / target / "@status").read_text())["versions"][0]["id"]
    cli("tag", target, vid, "late", check=True)
    t0 = time.monotonic()
    wait_for(lambda: (replica / target / "@late" / vid).exists(), PROPAGATION,
             interval=0.1, what="the tag on the replica")
    assert time.monotonic() - t0 < PROPAGATION


def test_sources_the_kernel_never_looked_into_have_no_stale_entries(tmp_path):
    """The change watcher reads nothing more of the thousands of sources a replica's
    sync adds than whether they exist: the kernel holds no entry below them."""
    from buffyfs.fs.tree import ROOT, Tree
    from tests.test_fs_api import three_versions

    cache = Cache(tmp_path / "c")
    try:
        three_versions(cache)  # source "s"
        cache.add_source("t", "http://127.0.0.1:9/t", {})
        tree = Tree(cache.index)
        base = tree.child(ROOT, "s")  # the root's entry: nothing below it yet
        assert tree.stale_entries("s") == [] and tree.stale_entries("t") == []
        tree.child(base, "latest")  # looked into: its entries may go stale now
        assert (base, "newest") in tree.stale_entries("s")
        tree.names(tree.child(ROOT, "t"), tree.node(tree.child(ROOT, "t")))  # a listing
        assert tree.stale_entries("t")
        for name in ("s", "t"):
            cache.remove_source(name)
            assert tree.stale_entries(name) == [(ROOT, name)]
        assert not tree.entered
    finally:
        cache.close()
