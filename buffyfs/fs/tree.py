"""The mount's tree: SPEC's layout as inode numbers and names, read from the index.

What a path is, without the kernel: the FUSE handlers (fs.py) ask this module which
inode a name in a directory stands for, what an inode is, what a directory lists and
which kernel entries a change of a source makes stale. Nothing here calls pyfuse3;
names that do not exist raise ``NoEntry``, lookups in a file ``NotADirectory`` (the
handlers' guard turns them into ENOENT and ENOTDIR).

Inode numbers (all stable, never reused):

    1, 2, 3, 4         the root, its @status, @control and @metrics
    index-allocated    per source a block (index.SourceInode: dir, @status,
                       @control, @versions, pending-latest, on-open latest), one per
                       version
    1<<48 and up       tag directories SOURCE/@TAG/, numbered in memory per
                       (source block, tag) on first sight; stable for the tree's life
    1<<60 and up       SOURCE/@unpacked/ and what is below it (unpackfs.py)

The name ``latest`` of a source stands for a version inode, or, while the source has no
servable version, for its "pending" inode; for an ``on-open`` source (not pinned), for
its "onopen" inode, which an open resolves to the version it checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from buffyfs.fs import links, unpackfs
from buffyfs.options import NAME_RE, RESERVED_TAGS, TAG_RE
from buffyfs.store.index import (
    Index,
    Reader,
    SourceInode,
    resolve_latest,
    tag_latest,
)
from buffyfs.store.records import Source, Version

ROOT = 1  # pyfuse3.ROOT_INODE
ROOT_STATUS = 2
ROOT_CONTROL = 3
ROOT_METRICS = 4
FIRST_TAGDIR_INO = 1 << 48

ROOT_FILES = {"@status": ROOT_STATUS, "@control": ROOT_CONTROL, "@metrics": ROOT_METRICS}
SOURCE_FILES = {"@status": SourceInode.status, "@control": SourceInode.control}
DIRECTORIES = ("root", "dir", "versions", "tagdir")  # node kinds
CONTROLS = ("root_control", "control")
GENERATED = ("root_status", "status", "root_metrics")  # built on demand (snapshots.py)
MOVING = ("latest", "newest")  # names whose target changes: short entry timeouts


class NoEntry(LookupError):
    """No such name or inode (ENOENT)."""


class NotADirectory(LookupError):
    """A name looked up in something that is not a directory (ENOTDIR)."""


@dataclass
class Node:
    """What an inode is. ``kind``: root, root_status, root_control, root_metrics, a
    SourceInode name (dir, status, control, versions, pending, onopen), version or
    tagdir."""

    kind: str
    source: str | None = None
    version: Version | None = None
    tag: str | None = None


NODES_KEPT = 4096  # inodes and `latest` answers kept between two changes of the index


class UntilChange:
    """Answers read from the index, kept until it changes (a commit by any process, or
    a state write the mount queued: ``Index.last_change``), NODES_KEPT at most: a
    second ``cat`` of many files reads nothing more. Worker threads use it too: an
    answer is kept only if nothing changed since the caller's ``get``."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.at = -1
        self.kept: dict[Any, Any] = {}

    def get(self, key: Any) -> tuple[Any, int]:
        """(the answer kept for ``key`` or None, the change to pass to ``keep``)."""
        now = self.index.last_change()
        if now != self.at:
            self.kept = {}  # a new dict: a thread may be reading the old one
            self.at = now
        return self.kept.get(key), now

    def keep(self, key: Any, answer: Any, at: int) -> Any:
        if at == self.at and len(self.kept) < NODES_KEPT:
            self.kept[key] = answer
        return answer


class Tree:
    def __init__(self, index: Index) -> None:
        self.index = index
        self.answers = UntilChange(index)  # of node() and latest_ino()
        self.tagdir_inos: dict[tuple[int, str], int] = {}  # (source base, tag) -> inode
        self.tagdirs: dict[int, tuple[str, int, str]] = {}  # inode -> (source, base, tag)
        self.shown_latest: dict[str, int] = {}  # source -> inode last given for `latest`
        # sources the kernel looked into (a lookup or a listing in their directory):
        # only these can hold entries a change makes stale (stale_entries)
        self.entered: set[str] = set()
        # of those, the ones whose @versions/ and @unpacked/ it looked into or was
        # shown (a listing): only these can hold entries inside them
        self.versions_entered: set[str] = set()
        self.unpacked_entered: set[str] = set()
        self.shown_dirs: dict[str, int] = {}  # source -> its directory's inode, as given

    # --- what an inode is -------------------------------------------------------------

    def node(self, ino: int) -> Node:
        if ino == ROOT:
            return Node("root")
        if ino == ROOT_STATUS:
            return Node("root_status")
        if ino == ROOT_CONTROL:
            return Node("root_control")
        if ino == ROOT_METRICS:
            return Node("root_metrics")
        if ino >= FIRST_TAGDIR_INO:
            if ino not in self.tagdirs:
                raise NoEntry(ino)
            source, base, tag = self.tagdirs[ino]
            with self.index.read() as r:
                src = r.source(source)
            if src is None or src.ino != base:
                raise NoEntry(ino)
            return Node("tagdir", source, tag=tag)
        node, at = self.answers.get(ino)
        if node is not None:
            return node
        with self.index.read() as r:
            ref = r.inode(ino)
            if ref is None:
                raise NoEntry(ino)
            if ref.kind == "version":
                found = r.version_by_inode(ino)  # also garbage a reader still holds
                if found is None:
                    raise NoEntry(ino)
                return self.answers.keep(ino, Node("version", found[0], found[1]), at)
        return self.answers.keep(ino, Node(ref.kind, ref.source), at)

    # --- name resolution --------------------------------------------------------------

    def child(self, parent: int, name: str) -> int:
        """The inode ``name`` in directory ``parent`` stands for (``.`` and ``..`` too)."""
        node = self.node(parent)
        if name == ".":
            return parent
        if node.kind == "root":
            if name == "..":
                return ROOT
            if name in ROOT_FILES:
                return ROOT_FILES[name]
            if not NAME_RE.fullmatch(name) or name[0] in ".@":
                raise NoEntry(name)
            return self.source_base(name)
        if node.kind == "dir":
            assert node.source
            self.entered.add(node.source)
            base = parent  # a source's directory is the first inode of its block
            if name == "..":
                return ROOT
            if name == "latest":
                return self.latest_ino(node.source)
            if name == "newest":
                return self.newest_ino(node.source)
            if name in SOURCE_FILES:
                return base + SOURCE_FILES[name]
            if name == "@versions":
                return base + SourceInode.versions
            if name == "@unpacked" and self.unpacked_shown(node.source):
                self.unpacked_entered.add(node.source)
                return unpackfs.dir_ino(base)
            tag = name[1:]
            if name.startswith("@") and TAG_RE.fullmatch(tag) and tag not in RESERVED_TAGS \
                    and tag in self.tags_in_use(node.source):
                return self.tagdir_ino(node.source, base, tag)
            raise NoEntry(name)
        if node.kind == "tagdir":
            assert node.source and node.tag
            if name == "..":
                return self.tagdirs[parent][1]
            tagged = self.tagged(node.source, node.tag)
            newest = tag_latest(tagged, node.tag)
            if name == "latest" and newest:
                return newest.ino
            for v in tagged:
                if v.id == name:
                    return v.ino
            raise NoEntry(name)
        if node.kind == "versions":
            assert node.source
            self.versions_entered.add(node.source)
            if name == "..":
                return parent - SourceInode.versions
            with self.index.read() as r:
                v = r.version(node.source, name) if "\0" not in name else None
            if v is None:
                raise NoEntry(name)
            return v.ino
        raise NotADirectory(name)

    @staticmethod
    def moves(parent: int, name: str, ino: int) -> bool:
        """Whether the entry ``name`` → ``ino`` in ``parent`` may change (short-lived in
        the kernel): ``latest``, ``newest`` and every name in a tag directory."""
        return name in MOVING or ino != parent and parent >= FIRST_TAGDIR_INO

    def source_base(self, name: str) -> int:
        """The first inode of the source's block (its directory)."""
        base, at = self.answers.get(("base", name))
        if base is None:
            with self.index.read() as r:
                src = r.source(name)
            if src is None:
                raise NoEntry(name)
            base = self.answers.keep(("base", name), src.ino, at)
        self.shown_dirs[name] = base
        return base

    def latest_ino(self, name: str) -> int:
        """What ``SOURCE/latest`` stands for now; remembered as shown (``stale_entries``
        then knows when the kernel's entry moved)."""
        ino, at = self.answers.get(("latest", name))
        if ino is None:
            with self.index.read() as r:
                ino = self.answers.keep(("latest", name),
                                        latest_target(r.source(name), r.latest(name)), at)
        self.shown_latest[name] = ino
        return ino

    def newest_ino(self, name: str) -> int:
        """``SOURCE/newest``: the newest version, tagged ``failed`` or not (NoEntry: none)."""
        with self.index.read() as r:
            v = r.newest(name)
        if v is None:
            raise NoEntry(name)
        return v.ino

    def tagdir_ino(self, name: str, base: int, tag: str) -> int:
        key = (base, tag)
        if key not in self.tagdir_inos:
            ino = FIRST_TAGDIR_INO + len(self.tagdir_inos)
            self.tagdir_inos[key] = ino
            self.tagdirs[ino] = (name, base, tag)
        return self.tagdir_inos[key]

    def tags_in_use(self, name: str) -> list[str]:
        with self.index.read() as r:
            return tags_of(r.versions(name))

    def tagged(self, name: str, tag: str) -> list[Version]:
        """Versions carrying ``tag``, newest first."""
        with self.index.read() as r:
            return [v for v in r.versions(name) if tag in v.tags]

    def unpacked_shown(self, name: str) -> bool:
        """Whether ``SOURCE/@unpacked`` can be looked up."""
        with self.index.read() as r:
            src = r.source(name)
        return src is not None and unpackfs.shown(src)

    def unpacked_listed(self, name: str) -> bool:
        """Whether ``SOURCE/@unpacked`` appears in the source's listing."""
        with self.index.read() as r:
            src = r.source(name)
            if src is None or not unpackfs.shown(src):
                return False
            kinds = [(r.unpacked(v.sha256) or {}).get("kind") for v in r.versions(name)]
        return unpackfs.listed_in(src, kinds)

    # --- listings ---------------------------------------------------------------------

    def names(self, ino: int, node: Node) -> list[tuple[str, int]]:
        """(name, inode) of what the directory ``ino`` lists, in order (not ``.``, ``..``)."""
        if node.kind == "root":
            with self.index.read() as r:
                bases = [(n, src.ino) for n, src in r.sources()]
            self.shown_dirs.update(bases)
            return [*ROOT_FILES.items(), *bases]
        if node.kind == "dir":
            assert node.source
            self.entered.add(node.source)
            base = ino
            names = [("latest", self.latest_ino(node.source))]
            try:
                names.append(("newest", self.newest_ino(node.source)))
            except NoEntry:
                pass  # no version yet
            names += [(n, base + off) for n, off in SOURCE_FILES.items()]
            names.append(("@versions", base + SourceInode.versions))
            if self.unpacked_listed(node.source):
                self.unpacked_entered.add(node.source)
                names.append(("@unpacked", unpackfs.dir_ino(base)))
            return names + [("@" + tag, self.tagdir_ino(node.source, base, tag))
                            for tag in self.tags_in_use(node.source)]
        if node.kind == "tagdir":
            assert node.source and node.tag
            tagged = self.tagged(node.source, node.tag)
            newest = tag_latest(tagged, node.tag)
            return ([("latest", newest.ino)] if newest else []) + \
                [(v.id, v.ino) for v in tagged]
        if node.kind == "versions":
            assert node.source
            self.versions_entered.add(node.source)
            with self.index.read() as r:
                return [(v.id, v.ino) for v in r.versions(node.source)]
        raise NotADirectory(ino)

    # --- link counts ------------------------------------------------------------------

    def link_count(self, source: str | None, version: Version) -> int:
        """How many names the version has (links.py); a collected one's: 1."""
        with self.index.read() as r:
            src = r.source(source) if source else None
            current = r.version(source, version.id) if src else None
            if src is None or current is None or current.ino != version.ino:
                return 1
            pin = src.pin
            pin_present = bool(pin) and r.version(source, pin) is not None
            return links.link_count(src, current, pin_present,
                                    r.versions_after(source, version.id))

    def link_counts(self, source: str) -> dict[int, int]:
        """The link count of every version of ``source``, by inode (for a listing)."""
        with self.index.read() as r:
            src = r.source(source)
            versions = r.versions(source) if src else []
        if src is None:
            return {}
        return link_counts_of(src, versions)

    # --- what a change makes stale ----------------------------------------------------

    def stale_entries(self, name: str) -> list[tuple[int, str]]:
        """(parent inode, name) of the kernel entries a change of source ``name`` may
        have made wrong: its ``latest`` if it moved since shown, ``newest``, its tag
        directories and what they hold; the source's own entry if it is gone. Nothing
        for a source the kernel never looked into (a replica's first sync adds
        thousands): it has no entries below it."""
        entered = name in self.entered
        with self.index.read() as r:
            if entered or name in self.shown_dirs:  # its record is needed
                facts = read_source(r, name, versions=entered, with_links=False)
            else:
                facts = UNSHOWN if r.has_source(name) else None
        return self.stale_entries_from(name, facts)

    def stale_entries_from(self, name: str, facts: SourceFacts | None
                           ) -> list[tuple[int, str]]:
        """``stale_entries`` from what was read of the source already (``read_source``;
        None: it is gone), reading nothing: a collection's worker process reads it
        right after its commit, and the loop only compares."""
        if facts is None:
            self.shown_latest.pop(name, None)
            self.entered.discard(name)
            self.versions_entered.discard(name)
            self.unpacked_entered.discard(name)
            self.shown_dirs.pop(name, None)
            return [(ROOT, name)]
        out = []
        if self.shown_dirs.get(name, facts.ino) != facts.ino:
            out.append((ROOT, name))  # removed, added again: a new directory inode
            del self.shown_dirs[name]
        if name not in self.entered:  # the kernel holds nothing below it
            return out
        ino = facts.ino
        shown = self.shown_latest.get(name)
        if shown is not None and shown != facts.latest:
            out.append((ino, "latest"))
            del self.shown_latest[name]
        out.append((ino, "newest"))  # a new version, a collection: it may move
        if name in self.unpacked_entered:
            out.append((unpackfs.dir_ino(ino), "latest"))  # may have moved: short-lived
        for (base, tag), tagdir in self.tagdir_inos.items():
            if base != ino:
                continue
            if tag not in facts.tags:
                out.append((base, "@" + tag))
            out += [(tagdir, "latest")] + [(tagdir, vid) for vid in facts.ids]
        return out


class SourceFacts(NamedTuple):
    """What the kernel's view of a source hangs on (``stale_entries_from``, the link
    counts): plain data, read anywhere (a worker process) and compared on the loop."""

    ino: int  # its directory's inode (the first of its block)
    latest: int  # the inode ``latest`` stands for
    tags: frozenset[str]  # the tags in use
    ids: tuple[str, ...]  # its versions' ids, newest first
    links: dict[int, int]  # its versions' link counts, by inode (if asked for)


UNSHOWN = SourceFacts(0, 0, frozenset(), (), {})  # a source that exists, nothing read


def read_source(r: Reader, name: str, versions: bool = True, with_links: bool = True
                ) -> SourceFacts | None:
    """The source's ``SourceFacts`` (None: no such source); without ``versions``, its
    inode only."""
    src = r.source(name)
    if src is None:
        return None
    if not versions:
        return UNSHOWN._replace(ino=src.ino)
    kept = r.versions(name)
    counts = link_counts_of(src, kept) if with_links else {}
    return SourceFacts(src.ino, latest_target(src, resolve_latest(src, kept)),
                       frozenset(tags_of(kept)), tuple(v.id for v in kept), counts)


def read_sources(index: Index, names: list[str]) -> dict[str, SourceFacts | None]:
    """``read_source`` of each of ``names``, in one read transaction (for
    ``offload.commit_and_read``: run in the worker process that committed)."""
    with index.read() as r:
        return {name: read_source(r, name) for name in names}


def link_counts_of(src: Source, versions: list[Version]) -> dict[int, int]:
    """The link count of every one of ``versions`` (all of ``src``'s), by inode."""
    counts = links.link_counts(src, versions)
    return {v.ino: counts[v.id] for v in versions}


def tags_of(versions: list[Version]) -> list[str]:
    """The tags in use among ``versions``; ``valid`` always."""
    tags = {"valid"}
    for v in versions:
        tags.update(v.tags)
    return sorted(tags)


def latest_target(source: Source | None, latest: Version | None) -> int:
    """The inode the name `latest` of a source stands for."""
    assert source is not None
    options = source.options
    if options.get("refresh") == "on-open" and not options.get("pinned"):
        return source.ino + SourceInode.onopen
    return latest.ino if latest else source.ino + SourceInode.pending
