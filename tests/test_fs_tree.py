"""The tree (fstree.py) on its own: what a name in the mount stands for, from the index
alone, without pyfuse3, handlers or a mount. test_fs_api.py covers the handlers above
it; the mount tests the same through the kernel."""

from __future__ import annotations

import pytest

from buffyfs.fs import unpackfs
from buffyfs.fs.tree import (
    FIRST_TAGDIR_INO,
    ROOT,
    ROOT_CONTROL,
    ROOT_METRICS,
    ROOT_STATUS,
    NoEntry,
    NotADirectory,
    Tree,
    latest_target,
    tags_of,
)
from buffyfs.store.cache import Cache
from buffyfs.store.index import SourceInode
from tests.test_fs_api import cache, put_version, three_versions  # noqa: F401 (fixture)


@pytest.fixture
def tree(cache: Cache) -> Tree:
    return Tree(cache.index)


def resolve(tree: Tree, path: str) -> int:
    """The inode of ``path`` (``/``-separated, from the root), one name at a time."""
    ino = ROOT
    for name in path.split("/"):
        ino = tree.child(ino, name)
    return ino


def kind(tree: Tree, path: str) -> str:
    return tree.node(resolve(tree, path)).kind


def test_the_root_and_its_files(tree: Tree, cache: Cache) -> None:
    cache.add_source("s", "http://127.0.0.1:9/s", {})
    assert [resolve(tree, n) for n in ("@status", "@control", "@metrics")] == \
        [ROOT_STATUS, ROOT_CONTROL, ROOT_METRICS]
    assert [tree.node(i).kind for i in (ROOT, ROOT_STATUS, ROOT_CONTROL, ROOT_METRICS)] == \
        ["root", "root_status", "root_control", "root_metrics"]
    base = resolve(tree, "s")
    assert tree.node(base).kind == "dir" and tree.node(base).source == "s"
    assert tree.child(ROOT, ".") == ROOT and tree.child(ROOT, "..") == ROOT
    assert tree.child(base, "..") == ROOT and tree.child(base, ".") == base
    assert tree.names(ROOT, tree.node(ROOT)) == [
        ("@status", ROOT_STATUS), ("@control", ROOT_CONTROL), ("@metrics", ROOT_METRICS),
        ("s", base)]


@pytest.mark.parametrize("name", ["nope", ".s", "@s", "@versions", "latest", "a" * 129,
                                  "s\0", "s/latest", ""])
def test_unknown_or_invalid_names_at_the_root(tree: Tree, cache: Cache, name: str) -> None:
    cache.add_source("s", "http://127.0.0.1:9/s", {})
    with pytest.raises(NoEntry):
        tree.child(ROOT, name)


def test_latest_newest_and_version_ids(tree: Tree, cache: Cache) -> None:
    v1, v2, v3 = three_versions(cache)
    assert resolve(tree, "s/latest") == v3["ino"] == resolve(tree, "s/newest")
    for v in (v1, v2, v3):
        assert resolve(tree, f"s/@versions/{v['id']}") == v["ino"]
        node = tree.node(v["ino"])
        assert (node.kind, node.source, node.version["id"]) == ("version", "s", v["id"])
    cache.tag("s", v3["id"], "failed")  # latest falls back; newest does not
    assert resolve(tree, "s/latest") == v2["ino"] and resolve(tree, "s/newest") == v3["ino"]
    for v in (v1, v2):
        cache.tag("s", v["id"], "failed")
    base = resolve(tree, "s")
    assert resolve(tree, "s/latest") == base + SourceInode.pending
    assert kind(tree, "s/latest") == "pending"
    versions = resolve(tree, "s/@versions")
    assert tree.child(versions, "..") == base
    for name in ("latest", "20990101T000000Z-00000000", v1["id"] + "x", v1["id"] + "\0", ""):
        with pytest.raises(NoEntry):
            tree.child(versions, name)


def test_pending_and_on_open_latest(tree: Tree, cache: Cache) -> None:
    cache.add_source("s", "http://127.0.0.1:9/s", {})
    base = resolve(tree, "s")
    assert resolve(tree, "s/latest") == base + SourceInode.pending
    with pytest.raises(NoEntry):
        resolve(tree, "s/newest")  # no version yet
    cache.add_source("o", "http://127.0.0.1:9/o", {"refresh": "on-open"})
    v = put_version(cache, "o", b"x")
    assert kind(tree, "o/latest") == "onopen"
    cache.pin("o")  # pinned: latest is the version, the origin is not asked
    assert resolve(tree, "o/latest") == v["ino"]


def test_tag_directories_and_their_latest(tree: Tree, cache: Cache) -> None:
    v1, v2, v3 = three_versions(cache)
    cache.tag("s", v2["id"], "prod")
    cache.tag("s", v1["id"], "prod")
    prod = resolve(tree, "s/@prod")
    assert prod >= FIRST_TAGDIR_INO and kind(tree, "s/@prod") == "tagdir"
    assert resolve(tree, "s/@prod/latest") == v2["ino"]  # the newest carrying the tag
    assert resolve(tree, f"s/@prod/{v1['id']}") == v1["ino"]
    assert resolve(tree, "s/@keep/latest") == v1["ino"]
    assert resolve(tree, "s/@prod") == prod  # numbered once
    assert tree.child(prod, "..") == resolve(tree, "s")
    for name in (v3["id"], "newest", "nope"):
        with pytest.raises(NoEntry):
            tree.child(prod, name)
    names = dict(tree.names(prod, tree.node(prod)))
    assert names == {"latest": v2["ino"], v2["id"]: v2["ino"], v1["id"]: v1["ino"]}
    assert tree.moves(prod, v1["id"], v1["ino"]) and tree.moves(prod, "latest", v2["ino"])
    # @valid is always there, even empty; no tag directory for an unused tag, a reserved
    # word or an invalid tag
    valid = resolve(tree, "s/@valid")
    assert tree.names(valid, tree.node(valid)) == []
    for name in ("@nope", "@latest", "@metrics", "@tags", "@Prod", "prod", "@"):
        with pytest.raises(NoEntry):
            resolve(tree, f"s/{name}")


def test_a_tag_directory_whose_source_is_gone(tree: Tree, cache: Cache) -> None:
    three_versions(cache)
    keep = resolve(tree, "s/@keep")
    cache.remove_source("s")
    with pytest.raises(NoEntry):
        tree.node(keep)
    with pytest.raises(NoEntry):
        tree.node(10**9)  # never given


def test_control_and_status_files_are_not_directories(tree: Tree, cache: Cache) -> None:
    v1, _, _ = three_versions(cache)
    assert kind(tree, "s/@control") == "control" and kind(tree, "s/@status") == "status"
    assert tree.node(resolve(tree, "s/@control")).source == "s"
    for path in ("s/@control", "s/@status", "s/latest", "@control", "@status"):
        ino = resolve(tree, path)
        with pytest.raises(NotADirectory):
            tree.child(ino, "x")
        with pytest.raises(NotADirectory):
            tree.names(ino, tree.node(ino))


def test_a_source_directory_lists_in_order(tree: Tree, cache: Cache) -> None:
    v1, v2, v3 = three_versions(cache)
    base = resolve(tree, "s")
    names = [n for n, _ in tree.names(base, tree.node(base))]
    assert names == ["latest", "newest", "@status", "@control", "@versions", "@keep",
                     "@valid"]
    assert tree.moves(base, "latest", v3["ino"]) and not tree.moves(base, "@status", base + 1)


def test_unpacked_is_looked_up_unless_off(tree: Tree, cache: Cache) -> None:
    three_versions(cache)
    base = resolve(tree, "s")
    assert resolve(tree, "s/@unpacked") == unpackfs.dir_ino(base)
    cache.add_source("p", "http://127.0.0.1:9/p", {"unpack": "off"})
    with pytest.raises(NoEntry):
        resolve(tree, "p/@unpacked")


def test_stale_entries_after_latest_moved_and_after_removal(tree: Tree, cache: Cache) -> None:
    v1, v2, v3 = three_versions(cache)
    base = resolve(tree, "s")
    keep = resolve(tree, "s/@keep")
    assert resolve(tree, "s/latest") == v3["ino"]  # shown to the kernel
    stale = tree.stale_entries("s")
    assert (base, "latest") not in stale  # it did not move
    assert (keep, "latest") in stale and (keep, v1["id"]) in stale
    cache.tag("s", v3["id"], "failed")
    stale = tree.stale_entries("s")
    assert (base, "latest") in stale
    assert (base, "latest") not in tree.stale_entries("s")  # said once
    cache.untag("s", v1["id"], "keep")
    assert (base, "@keep") in tree.stale_entries("s")  # the tag went
    cache.remove_source("s")
    assert tree.stale_entries("s") == [(ROOT, "s")]


def test_link_counts_match_the_names(tree: Tree, cache: Cache) -> None:
    v1, v2, v3 = three_versions(cache)
    counts = tree.link_counts("s")
    assert counts == {v["ino"]: tree.link_count("s", v) for v in (v1, v2, v3)}
    assert counts[v3["ino"]] > counts[v2["ino"]]  # latest (and newest) lead to v3
    assert tree.link_count("nope", v1) == 1


def test_helpers() -> None:
    assert tags_of([]) == ["valid"]
    assert tags_of([{"tags": ["b", "a"]}, {"tags": ["valid"]}, {}]) == ["a", "b", "valid"]
    source = {"ino": 100, "options": {}}
    assert latest_target(source, None) == 100 + SourceInode.pending
    assert latest_target(source, {"ino": 7}) == 7
    assert latest_target({"ino": 100, "options": {"refresh": "on-open"}}, {"ino": 7}) == \
        100 + SourceInode.onopen
