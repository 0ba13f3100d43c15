"""How many names a version has in the mount: its link count.

One version is one inode, reachable as ``@versions/ID``, as ``@TAG/ID`` for each of
its tags, as ``@TAG/latest`` for each tag of which it is the newest undamaged
carrier, as ``SOURCE/newest`` while it is the newest undamaged version, and as
``SOURCE/latest`` while ``latest`` resolves to it (except for an
unpinned on-open source, whose ``latest`` is a file of its own). Reporting that
count as ``st_nlink`` lets ``du`` count the version once, ``tar`` store the other
names as hard links and ``rsync -H`` make one copy.

Both functions follow ``index.resolve_latest`` and fs.py's ``@TAG/latest``.
"""

from __future__ import annotations

from collections.abc import Iterable

from buffyfs.store.index import servable
from buffyfs.store.records import Source, Version


def names_latest(source: Source) -> bool:
    """Is ``SOURCE/latest`` a name of a version inode (fs.py's ``_latest_target``)?"""
    options = source.options
    return not (options.get("refresh") == "on-open" and not options.get("pinned"))


def _latest_bound(source: Source, pin_present: bool) -> str | None:
    """The newest id ``latest`` may resolve to: the pin, when it names a version."""
    return source.pin if pin_present else None


def link_counts(source: Source, versions: list[Version]) -> dict[str, int]:
    """Link count of every version of ``source`` (``versions``: all, newest first)."""
    bound = _latest_bound(source, any(v.id == source.pin for v in versions))
    latest_taken = not names_latest(source)
    tags_taken: set[str] = set()  # tags whose @TAG/latest is a newer version
    newest_taken = False  # SOURCE/newest names a newer version
    counts = {}
    for v in versions:
        tags = v.tags
        n = 1 + len(tags)
        if not v.damaged:
            n += len(set(tags) - tags_taken)
            tags_taken.update(tags)
            n += int(not newest_taken)
            newest_taken = True
        if not latest_taken and servable(v) and (bound is None or v.id <= bound):
            n += 1
            latest_taken = True
        counts[v.id] = n
    return counts


def link_count(source: Source, version: Version, pin_present: bool,
               newer: Iterable[Version]) -> int:
    """Link count of one version. ``newer``: the source's versions newer than it,
    oldest first, read lazily (the scan stops once nothing newer can matter)."""
    bound = _latest_bound(source, pin_present)
    tags = version.tags
    open_tags = set() if version.damaged else set(tags)  # still its @TAG/latest
    is_latest = names_latest(source) and servable(version) and \
        (bound is None or version.id <= bound)
    is_newest = not version.damaged
    for w in newer:
        if not (open_tags or is_latest or is_newest):
            break
        if is_latest and servable(w) and (bound is None or w.id <= bound):
            is_latest = False
        if not w.damaged:
            open_tags -= set(w.tags)
            is_newest = False
    return 1 + len(tags) + len(open_tags) + int(is_latest) + int(is_newest)
