"""The FUSE handlers: pyfuse3's ``Operations`` over the tree (fstree.py) and the cache.

Handlers stay thin: they ask the tree what an inode or a name is, open blobs, and
answer. Each is wrapped in ``guard``, which writes the "users never see tracebacks"
rule once: only ``FUSEError`` may leave a handler (anything else would end the mount),
so the tree's and the cache's errors are mapped to errnos there (``ERRNOS``), and an
unexpected one is logged and answered with EIO.

Caching: a version inode never changes, so its attributes and entries are cached
for long and its data stays in the page cache across opens (``keep_cache``); only
its link count (links.py: how many names lead to it) moves with ``latest`` and the
tags, and its attributes are then invalidated. ``@status`` and ``@metrics`` are
snapshots whose real size ``stat`` reports (snapshots.py); reading a ``@control``
file gives a help text. The
name ``latest`` maps to a version inode with a short entry timeout, and the entry
is invalidated as soon as ``latest`` moves. While a source has no servable version,
``latest`` is the "pending" inode: opening it waits for the first download, and it
is opened with ``direct_io`` since its size is not known in advance.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from buffyfs.control import help_text
from buffyfs.errors import BadInput, BuffyError, FetchError, NotFound
from buffyfs.fetch import streaming
from buffyfs.fetch.scheduler import Scheduler
from buffyfs.fetch.upstream import Forbidden
from buffyfs.fs import unpackfs
from buffyfs.fs.snapshots import Snapshot, Snapshots
from buffyfs.fs.tree import (  # noqa: F401 (ROOT_*, FIRST_TAGDIR_INO: asked here too)
    CONTROLS,
    DIRECTORIES,
    FIRST_TAGDIR_INO,
    GENERATED,
    ROOT,
    ROOT_CONTROL,
    ROOT_FILES,
    ROOT_METRICS,
    ROOT_STATUS,
    Node,
    NoEntry,
    NotADirectory,
    SourceFacts,
    Tree,
)
from buffyfs.fs.unpackfs import UnpackedHandle, UnpackedTree
from buffyfs.options import parse_duration, redact_url
from buffyfs.store import offload, revalidate
from buffyfs.store.cache import Cache
from buffyfs.store.index import SourceInode, rfc3339_ns
from buffyfs.store.metrics import Metrics
from buffyfs.store.records import Version

log = logging.getLogger(__name__)

IMMUTABLE_TIMEOUT = 3600.0  # version inodes and their @versions entries
SHORT_TIMEOUT = 1.0  # everything that can change
# SOURCE/latest naming a version, and a source's directory: dropped from the kernel as
# soon as they change (tree.stale_entries, from source_changed; the change watcher sees
# every other process's change), so this only bounds a drop that went missing. A
# second `cat` of many `latest` files then costs an open and a release each, no lookup.
LATEST_TIMEOUT = 60.0

INVALIDATE_TIMEOUT = 2.0
RELINK_BATCH = 256  # sources whose link counts one worker-thread read looks at
CONTROL_HELP = {"root_control": help_text("root"), "control": help_text("source")}


class _BeingCollected(Exception):
    """The version to open is in a collection's commit under way: wait for ``done``."""

    def __init__(self, done: trio.Event) -> None:
        self.done = done


@dataclass
class BlobHandle:
    fd: int
    size: int
    ino: int
    sha256: str


@dataclass
class BytesHandle:
    data: bytes
    snapshot: Snapshot | None = None  # the generated file's snapshot it reads


@dataclass
class ControlHandle:
    source: str | None  # None for the root @control


@dataclass
class DirHandle:
    ino: int
    entries: list[tuple[bytes, pyfuse3.EntryAttributes]] | None = None


# What a handler answers for the errors it may meet: the tree's (a name that is not
# there) quietly; any other BuffyError is logged and answered EIO, anything else is a bug:
# logged with its traceback ("unexpected", which fails a test) and answered EIO.
ERRNOS: dict[type[Exception], int] = {NoEntry: errno.ENOENT, NotADirectory: errno.ENOTDIR}
Handler = Callable[..., Awaitable[Any]]


def guard(handler: Handler | None = None, *,
          errnos: dict[type[Exception], int] | None = None) -> Any:
    """Wrap a FUSE handler (``@guard``, or ``@guard(errnos={...})`` for the errors that
    handler answers quietly besides ``ERRNOS``): only FUSEError may leave it, anything
    else would end the mount."""
    table = {**(errnos or {}), **ERRNOS}  # the handler's own first

    def wrap(handler: Handler) -> Handler:
        op = handler.__name__

        @functools.wraps(handler)
        async def guarded(self: BuffyFS, *args: Any, **kwargs: Any) -> Any:
            self.metrics.fuse_request(op).inc()
            try:
                return await handler(self, *args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except Exception as e:
                code = next((n for kind, n in table.items() if isinstance(e, kind)), None)
                if code is not None:
                    raise pyfuse3.FUSEError(code) from None
                if isinstance(e, BuffyError):
                    log.error("%s: %s", handler.__name__, e)
                else:
                    log.exception("%s failed unexpectedly", handler.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None

        return guarded

    return wrap(handler) if handler is not None else wrap


class BuffyFS(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(
        self,
        cache: Cache,
        scheduler: Scheduler | None,
        progress: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        super().__init__()
        self.cache = cache
        self.index = cache.index
        self.scheduler = scheduler
        self.live_progress = progress
        self.on_retention: Callable[[], None] | None = None  # the collector's kick
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.handles: dict[int, Any] = {}
        self.next_fh = 1
        self.tree = Tree(self.index)  # inodes and names (fstree.py)
        self.metrics = Metrics()
        self.open_inos: collections.Counter[int] = collections.Counter()
        # versions found damaged by this mount: their first open once repaired drops
        # whatever the kernel cached of them
        self.repaired_inos: set[int] = set()
        self.nowait_reads = True
        self.started_ns = time.time_ns()
        # version inodes a collection is committing right now (mount.Collector): their
        # opens wait for the commit, then resolve again
        self.collecting: set[int] = set()
        self.collected = trio.Event()
        self.snapshots = Snapshots()  # of @status and @metrics
        # version inode -> the link count the kernel was last given: invalidated when
        # it changes (the attributes are cached for long)
        self.shown_links: dict[int, int] = {}
        self.relink_pending: set[str] = set()  # sources whose link counts may have moved
        self.relinking = False  # the task that looks at them runs
        self.relink_idle = trio.Event()  # set when that task ends (relinked)
        self.unpacked = UnpackedTree(self)  # SOURCE/@unpacked/ (unpackfs.py)
        self.on_source_changed: Callable[[str], None] | None = None  # the unpacker's kick
        self.replica: Any = None  # replica.Replica of a mount with --upstream

    # --- attributes -------------------------------------------------------------------

    def _attr(self, ino: int, node: Node | None = None, nlink: int | None = None,
              snap: Snapshot | None = None) -> pyfuse3.EntryAttributes:
        """``nlink``: a version's link count when the caller has it (listings);
        ``snap``: a generated file's snapshot the caller just got (getattr)."""
        if unpackfs.owns(ino):
            return self.unpacked.attr(ino)
        node = node or self.tree.node(ino)
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_blksize = 1 << 17
        a.entry_timeout = SHORT_TIMEOUT
        a.attr_timeout = SHORT_TIMEOUT
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = self.started_ns
        kind = node.kind
        if kind in DIRECTORIES:
            a.st_mode = stat.S_IFDIR | 0o555
            a.st_nlink = 2
            if kind in ("dir", "versions"):  # a source's, its @versions: same until removed
                a.entry_timeout = a.attr_timeout = LATEST_TIMEOUT
        elif kind == "version":
            assert node.version is not None
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = self.tree.link_count(node.source, node.version) if nlink is None \
                else nlink
            self.shown_links[ino] = a.st_nlink
            a.st_size = node.version.size
            a.st_blocks = (a.st_size + 511) // 512
            stamp = rfc3339_ns(node.version.fetched_at)
            a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = stamp
            a.entry_timeout = a.attr_timeout = IMMUTABLE_TIMEOUT
        elif kind in CONTROLS:  # writes take commands, reads a help text
            a.st_mode = stat.S_IFREG | 0o644
            a.st_nlink = 1
            a.st_size = len(CONTROL_HELP[kind])
        elif kind in GENERATED:  # the size of the snapshot a read would get now
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            a.attr_timeout = 0  # every stat asks getattr, which builds it if need be
            snap = snap or self.snapshots.usable(ino, self.index.last_change())
            if snap is not None:
                a.st_size = len(snap.data)
                a.st_blocks = (a.st_size + 511) // 512
                a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = snap.mtime_ns
        elif kind == "onopen":  # shows the cached latest; served direct_io, never cached
            assert node.source
            with self.index.read() as r:
                v = r.latest(node.source)
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            a.attr_timeout = 0
            if v:
                a.st_size = v.size
                stamp = rfc3339_ns(v.fetched_at)
                a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = stamp
        else:  # pending latest: contents not known ahead, served direct_io
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            if kind == "pending":
                a.st_size = self._arriving_size(node.source)
                a.attr_timeout = 0
        return a

    def _arriving_size(self, name: str | None) -> int:
        """The length of the first version of ``name`` while it downloads (0: unknown)."""
        live = self.scheduler.refresher.live.get(name or "") if self.scheduler else None
        return live.total or 0 if live is not None and not live.done else 0

    @guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if unpackfs.owns(inode):
            return self.unpacked.attr(inode)
        node = self.tree.node(inode)
        if node.kind in GENERATED:  # its size: of the snapshot built now, even if the
            # index changed since (a download's state written meanwhile)
            return self._attr(inode, node, snap=await self._snapshot(inode, node))
        return self._attr(inode, node)

    async def _snapshot(self, ino: int, node: Node, opening: bool = False) -> Snapshot:
        """The content of a generated file as a stat or open sees it (snapshots.py)."""
        commit = self.index.last_change()  # before building: a later change builds again
        if node.kind == "root_metrics":
            build = self._build_metrics
        elif node.kind == "root_status":
            build = self._build_root_status
        else:
            build = functools.partial(trio.to_thread.run_sync, functools.partial(
                self._render_status, node.source, self.live_progress(), set(self.open_inos)))
        return await self.snapshots.get(ino, commit, build, opening)

    async def _build_root_status(self) -> bytes:
        """The root ``@status``: of a big cache, in a worker process (offload.py)."""
        if offload.is_small(self.index):
            return await trio.to_thread.run_sync(self._render_status, None, {}, set())
        data = await offload.root_status(self.index, self.cache.root)
        self.metrics.worker_runs.labels(task="status").inc()
        return data

    async def _build_metrics(self) -> bytes:
        """``@metrics``: what it reads from a big cache's index, in a worker process."""
        if offload.is_small(self.index):
            return await trio.to_thread.run_sync(self.metrics.render, self.index)
        figures = await offload.metrics_figures(self.index)
        self.metrics.worker_runs.labels(task="metrics").inc()
        return self.metrics.render_with(figures)

    # --- lookup and listing -----------------------------------------------------------

    @guard
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise NoEntry(name) from None
        if unpackfs.owns(parent_inode):
            attr = self._attr(await self.unpacked.lookup(parent_inode, text))
            if text == "latest":
                attr.entry_timeout = SHORT_TIMEOUT  # moves with the source's latest
            return attr
        ino = self.tree.child(parent_inode, text)
        if unpackfs.owns(ino):  # SOURCE/@unpacked
            return self._attr(ino)
        node = self.tree.node(ino)
        attr = self._attr(ino, node)
        if self.tree.moves(parent_inode, text, ino):
            # a source's latest naming a version is dropped when it moves; the pending
            # and on-open inodes, a tag directory's names: short-lived
            attr.entry_timeout = LATEST_TIMEOUT if text == "latest" and \
                node.kind == "version" and parent_inode < FIRST_TAGDIR_INO else SHORT_TIMEOUT
        return attr

    async def _check_on_open(self, name: str) -> None:
        """An open of `latest` of an on-open source: check the origin, wait open_wait."""
        with self.index.read() as r:
            src = r.source(name)
        if src is None or self.scheduler is None:
            return
        wait = parse_duration(src.options.get("open_wait", "5s"))
        await self.scheduler.check_on_open(name, wait)

    @guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if unpackfs.owns(inode):
            if not self.unpacked.is_dir(inode):
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return self._new_handle(DirHandle(inode))
        node = self.tree.node(inode)
        if node.kind not in DIRECTORIES:
            raise NotADirectory(inode)
        return self._new_handle(DirHandle(inode))

    async def _list_entries(self, ino: int) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        """A directory's entries. The root, ``@versions`` and tag directories may hold
        thousands: listed in a worker thread (``_list`` only reads the index for them).
        A source's directory is small, and its listing numbers tag directories and
        remembers the ``latest`` shown: on the loop."""
        if unpackfs.owns(ino):
            return await self.unpacked.listing(ino)
        if ino == ROOT or ino >= FIRST_TAGDIR_INO:
            return await trio.to_thread.run_sync(self._list, ino)
        with self.index.read() as r:
            ref = r.inode(ino)
        if ref is not None and ref.kind == SourceInode.versions.name:
            return await trio.to_thread.run_sync(self._list, ino)
        return self._list(ino)

    def _list(self, ino: int) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        node = self.tree.node(ino)
        names = self.tree.names(ino, node)
        # all link counts in one pass (these two run in a worker thread)
        nlinks = self.tree.link_counts(node.source) \
            if node.kind in ("versions", "tagdir") and node.source else {}
        out = []
        for name, child in names:
            # source directories all look alike: no index read per entry of the root
            shown = Node("dir", name) if node.kind == "root" and name not in ROOT_FILES \
                else None
            try:
                attr = self._attr(child, shown, nlink=nlinks.get(child))
            except (NoEntry, pyfuse3.FUSEError):
                continue  # removed meanwhile
            if self.tree.moves(ino, name, child):
                attr.entry_timeout = SHORT_TIMEOUT
            out.append((name.encode(), attr))
        return out

    @guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.handles.get(fh)
        if not isinstance(handle, DirHandle):
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.entries is None or start_id == 0:
            handle.entries = await self._list_entries(handle.ino)
        for i in range(start_id, len(handle.entries)):
            name, attr = handle.entries[i]
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                break

    @guard
    async def releasedir(self, fh: int) -> None:
        self.handles.pop(fh, None)

    async def forget(self, inode_list: Any) -> None:
        pass  # nothing is kept per inode: numbers are stable and come from the index

    # --- opening and reading ----------------------------------------------------------

    def _new_handle(self, handle: Any) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = handle
        return fh

    def start_collecting(self, inos: set[int]) -> trio.Event:
        """A collection is about to commit the drop of ``inos``: opens of them wait."""
        self.collecting = inos
        self.collected = trio.Event()
        return self.collected

    def end_collecting(self, done: trio.Event) -> None:
        self.collecting = set()
        done.set()

    def _open_version(self, version: Version, **info: Any) -> pyfuse3.FileInfo:
        """Open a version's blob, after a cheap check (exists, right size): a damaged
        version fails with EIO, never serves wrong bytes (the scrub checks the hash).
        A version being collected right now raises _BeingCollected (``open`` waits)."""
        if version.ino in self.collecting:
            raise _BeingCollected(self.collected)
        if version.damaged:
            log.warning("version %s is damaged (%s): not served", version.id,
                        version.damaged["reason"])
            raise pyfuse3.FUSEError(errno.EIO)
        sha = version.sha256
        try:
            fd, size = self.cache.blobs.open_blob_sized(sha)
        except FileNotFoundError:
            self.report_damage(sha, "blob file missing", "open")
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as e:
            log.error("blob of version %s unreadable: %s", version.id, e.strerror)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if size != version.size:
            os.close(fd)
            self.report_damage(sha, f"blob file has {size} bytes, {version.size} expected",
                               "open")
            raise pyfuse3.FUSEError(errno.EIO)
        if version.ino in self.repaired_inos:  # the kernel may hold pages of the bad file
            self.repaired_inos.discard(version.ino)
            info["keep_cache"] = False  # an open without keep_cache drops them
        self.metrics.opens.inc()
        self.open_inos[version.ino] += 1  # collection waits for the last close
        fh = self._new_handle(BlobHandle(fd, version.size, version.ino, sha))
        return pyfuse3.FileInfo(fh=fh, **info)

    @guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        while True:
            try:
                return await self._open(inode, flags)
            except _BeingCollected as e:  # the commit decides: gone (ENOENT) or kept
                await e.done.wait()

    async def _open(self, inode: int, flags: int) -> pyfuse3.FileInfo:
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if unpackfs.owns(inode):
            if writing:
                raise pyfuse3.FUSEError(errno.EROFS)
            return await self._open_unpacked(inode)
        node = self.tree.node(inode)
        if node.kind in ("root_control", "control"):
            if not writing:  # a help text, so that copies of the mount can read it
                return pyfuse3.FileInfo(fh=self._new_handle(BytesHandle(CONTROL_HELP[node.kind])),
                                        direct_io=True, keep_cache=False)
            return pyfuse3.FileInfo(fh=self._new_handle(ControlHandle(node.source)),
                                    direct_io=True, keep_cache=False)
        if writing:
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.kind == "version":
            assert node.version is not None
            return await self._open_held(node.source, node.version)
        if node.kind == "pending":
            assert node.source
            return await self._open_latest(node.source)
        if node.kind == "onopen":
            assert node.source
            await self._check_on_open(node.source)
            return await self._open_latest(node.source)
        if node.kind in GENERATED:
            # built in a worker thread (its own read transaction): a big cache's takes
            # seconds of reading and JSON; the snapshot a stat just built is reused
            snap = await self._snapshot(inode, node, opening=True)
            snap.readers += 1
            return pyfuse3.FileInfo(fh=self._new_handle(BytesHandle(snap.data, snap)),
                                    direct_io=True, keep_cache=False)
        raise pyfuse3.FUSEError(errno.EISDIR)

    async def _open_unpacked(self, inode: int) -> pyfuse3.FileInfo:
        """An unpacked view (unpackfs.py). Opened before its unpack was done, its size
        was not known to the kernel: served uncached (direct_io) that once."""
        handle, waited = await self.unpacked.open(inode)
        self.metrics.opens.inc()
        self.open_inos[handle.version_ino] += 1  # collection waits for the last close
        return pyfuse3.FileInfo(fh=self._new_handle(handle), keep_cache=not waited,
                                direct_io=waited)

    async def _open_latest(self, name: str) -> pyfuse3.FileInfo:
        """Open what `latest` resolves to now; if its blob turns out damaged at open,
        once more what it resolves to then (an older version, or the download again).
        A source's first version is served while it downloads (streaming.py)."""
        if self.scheduler is not None:
            live = await streaming.wait_stream(self.scheduler, self.index, name)
            if live is not None:
                handle = streaming.open_stream(live, self.cache.blobs)
                return pyfuse3.FileInfo(fh=self._new_handle(handle), direct_io=True,
                                        keep_cache=False)
        for tries_left in (1, 0):
            version = await self._wait_latest(name)
            arriving = await self._open_arriving(name, version)
            if arriving is not None:
                return arriving
            try:
                return self._open_version(version, direct_io=True, keep_cache=False)
            except pyfuse3.FUSEError:
                with self.index.read() as r:
                    now = r.version(name, version.id)
                if not tries_left or not (now and (now.damaged or now.remote)):
                    raise
        raise AssertionError("unreachable")

    async def _open_held(self, name: str | None, version: Version) -> pyfuse3.FileInfo:
        """Open a version. On a replica, one not held yet streams as it arrives, and one
        whose bytes turn out damaged at open is remote again (index.mark_damaged): it
        comes from the hub as if never held."""
        arriving = await self._open_arriving(name, version)
        if arriving is not None:
            return arriving
        try:
            return self._open_version(version, keep_cache=True)
        except pyfuse3.FUSEError:
            if self.replica is None or name is None:
                raise
            with self.index.read() as r:
                now = r.version(name, version.id)
            if not (now and now.remote):
                raise
        arriving = await self._open_arriving(name, now)
        if arriving is not None:
            return arriving
        return self._open_version(now, keep_cache=True)

    async def _open_arriving(self, name: str | None,
                             version: Version) -> pyfuse3.FileInfo | None:
        """A replica's version whose bytes are not here yet: served as they arrive
        from the hub (replica.py fetches, streaming.py reads, uncached: direct_io);
        None when they are here (after all); EIO if they cannot be had."""
        if self.replica is None or not version.remote or name is None:
            return None
        try:
            live = await self.replica.wait_body(name, version)
        except FetchError as e:
            log.warning("%s: version %s not available: %s", name, version.id, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if live is None:
            return None
        handle = streaming.open_stream(live, self.cache.blobs)
        return pyfuse3.FileInfo(fh=self._new_handle(handle), direct_io=True, keep_cache=False)

    def report_damage(self, sha256: str, reason: str, check: str) -> None:
        """A blob failed a check (``check``: open, read or scrub): mark it and its versions
        damaged, stop serving them (``latest`` falls back), and download their sources
        again. Blobs are shared: every version with that sha256, of any source, is hit."""
        marked = self.index.mark_damaged(sha256, reason)
        if marked is not None:  # else marked already, or no version uses the blob any more
            self._damaged(sha256, reason, check, marked)

    async def report_damage_many(self, reasons: dict[str, str], check: str) -> None:
        """``report_damage`` of many blobs (sha256 -> reason; a scrub's batch): one
        index transaction in a worker thread, then the kernel and scheduler catch up a
        blob per loop step."""
        marked = await trio.to_thread.run_sync(self.index.mark_damaged_many, reasons)
        for sha256, pairs in marked.items():
            self._damaged(sha256, reasons[sha256], check, pairs)
            await trio.lowlevel.checkpoint()

    def _damaged(self, sha256: str, reason: str, check: str,
                 marked: list[tuple[str, Version]]) -> None:
        """After a blob was marked damaged: count, log, and download its sources again."""
        self.metrics.damage_found.labels(check=check).inc()
        log.error("blob %s is damaged (%s, found at %s): versions %s not served; "
                  "downloading again", sha256, reason, check,
                  ", ".join(f"{s}/{v.id}" for s, v in marked) or "(removed sources only)")
        for _source, v in marked:
            self.repaired_inos.add(v.ino)
        for source in dict.fromkeys(s for s, _ in marked):
            if self.scheduler is not None:
                self.scheduler.kick(source)
            self.source_changed(source)
        if self.replica is not None:  # its mirrored versions are remote again: refetched
            self.replica.fetch_again([s for s, _ in marked])

    async def _wait_latest(self, name: str) -> Version:
        if self.scheduler is not None:
            try:
                await self.scheduler.wait_first_version(name)
            except FetchError as e:
                log.info("%s: open of latest fails: %s", name, e)
                raise pyfuse3.FUSEError(errno.EIO) from None
        with self.index.read() as r:
            v = r.latest(name)
        if v is None:
            raise pyfuse3.FUSEError(errno.EIO)
        return v

    def _render_status(self, source: str | None, progress: dict[str, Any],
                       open_inos: set[int]) -> bytes:
        """The JSON of an ``@status`` file (in a worker thread: reads the index only)."""
        if source is None:
            obj = self.cache.root_status()
        else:
            try:
                obj = self.cache.source_status(source, progress, open_inos)
            except BuffyError:
                raise pyfuse3.FUSEError(errno.ENOENT) from None
        return offload.encode_status(obj)

    @guard
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        handle = self.handles.get(fh)
        if isinstance(handle, BytesHandle):
            return handle.data[off : off + size]
        if isinstance(handle, streaming.StreamHandle):
            data = await streaming.read(handle, off, size)
            if not data and not handle.live.mirrored:  # the seal: `latest` is the new
                await self._latest_moved_now(handle.live.name)  # version for every lookup
            self.metrics.bytes_served.inc(len(data))
            return data
        if isinstance(handle, UnpackedHandle):
            data = await self.unpacked.read(handle, off, size)
            self.metrics.bytes_served.inc(len(data))
            return data
        if not isinstance(handle, BlobHandle):
            raise pyfuse3.FUSEError(errno.EBADF)
        size = max(0, min(size, handle.size - off))
        if size == 0:
            return b""
        data = self._read_cached(handle.fd, off, size)
        if data is None:  # not in the page cache: read from disk off the event loop
            data = await trio.to_thread.run_sync(os.pread, handle.fd, size, off)
            if len(data) < size:  # the blob shrank under an open handle: no short file
                if self.cache.blobs.is_current(handle.sha256, handle.fd):  # not repaired since
                    self.report_damage(handle.sha256, f"blob file ends before byte "
                                       f"{off + size} of {handle.size}", "read")
                raise pyfuse3.FUSEError(errno.EIO)
        self.metrics.bytes_served.inc(len(data))
        return data

    def _read_cached(self, fd: int, off: int, size: int) -> memoryview | None:
        """Read without blocking if the bytes are in the page cache (RWF_NOWAIT)."""
        if not self.nowait_reads:
            return None
        buf = bytearray(size)
        try:
            n = os.preadv(fd, [buf], off, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.nowait_reads = False
                return None
            raise pyfuse3.FUSEError(errno.EIO) from None
        return memoryview(buf)[:n] if n == size else None

    @guard
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if isinstance(handle, BytesHandle) and handle.snapshot is not None:
            handle.snapshot.readers -= 1
        if isinstance(handle, streaming.StreamHandle):
            handle.close()
        if isinstance(handle, BlobHandle | UnpackedHandle):
            os.close(handle.fd)
            ino = handle.ino if isinstance(handle, BlobHandle) else handle.version_ino
            self.open_inos[ino] -= 1
            if self.open_inos[ino] <= 0:
                del self.open_inos[ino]

    # --- control files ----------------------------------------------------------------

    @guard(errnos={
        Forbidden: errno.EACCES,  # a replica without a token the hub takes (replica.py)
        BadInput: errno.EINVAL, NotFound: errno.EINVAL,  # logged, last_control_error
        BuffyError: errno.EIO,  # logged where it happened
    })
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles.get(fh)
        if not isinstance(handle, ControlHandle):
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            await self.run_control(buf, handle.source)
        finally:
            self.snapshots.clear()  # applied or refused: @status shows it now
        return len(buf)

    async def run_control(self, data: bytes, source: str | None) -> None:
        """One control write (``source`` None: the root's), all or nothing: parsed,
        checked and applied in one index transaction, in a worker thread (an LMDB write
        transaction stays in the thread that began it: the whole of it runs in the one
        call). Once it has committed, the scheduler and the kernel catch up, so every
        command has taken effect for every later open when this returns.

        Raises BadInput or NotFound when the write is refused (nothing applied). On a
        replica, a write for mirrored sources goes to the hub instead (replica.py)."""
        if self.replica is not None and await self.replica.forward_control(data, source):
            return
        def judge(parsed: list[Any], source: str | None) -> None:  # revalidate's checks
            trio.from_thread.run(revalidate.judge, self.index, self.cache.blobs, parsed,
                                 source)

        outcome = await trio.to_thread.run_sync(self.cache.run_control, data, source, judge)
        if outcome.retention and self.on_retention is not None:
            self.on_retention()  # e.g. `release`: the version goes now, not in 10 minutes
        for name in outcome.refresh:
            if self.scheduler is not None:
                self.scheduler.kick(name)
        for name in outcome.changed:
            if self.scheduler is not None:
                self.scheduler.sync(name)  # a removed source's download is cancelled
            await self.source_changed_now(name)

    @guard
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
        fh: int | None, ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if unpackfs.owns(inode):
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self.tree.node(inode)
        only_size = fields.update_size and not any((
            fields.update_mode, fields.update_uid, fields.update_gid,
            fields.update_atime, fields.update_mtime,
        ))
        if node.kind in ("root_control", "control") and only_size:
            return self._attr(inode, node)  # O_TRUNC of a control file: nothing to do
        raise pyfuse3.FUSEError(errno.EROFS)

    # --- extended attributes ----------------------------------------------------------

    def _xattrs(self, inode: int) -> dict[bytes, bytes]:
        if unpackfs.owns(inode):
            return self.unpacked.xattrs(inode)
        node = self.tree.node(inode)
        if node.kind == "onopen":  # the version an open would serve now
            assert node.source
            with self.index.read() as r:
                current = r.latest(node.source)
            if current is None:
                return {}
            node = Node("version", node.source, current)
        if node.kind != "version":
            return {}
        v = node.version
        assert v is not None and node.source is not None
        out = {
            "source": node.source, "version": v.id, "url": redact_url(v.url or ""),
            "sha256": v.sha256, "fetched_at": v.fetched_at,
            "tags": ",".join(v.tags),
            "etag": v.etag, "last_modified": v.last_modified,
            "content_type": v.content_type,
            "stale": "1" if self._is_stale(node.source, v.id) else "0",
        }
        return {f"user.buffy.{k}".encode(): val.encode() for k, val in out.items()
                if val is not None}

    def _is_stale(self, source: str, vid: str) -> bool:
        """Served as latest while the origin is failing."""
        with self.index.read() as r:
            latest = r.latest(source)
            failures = r.state(source).consecutive_failures
        return bool(failures) and latest is not None and latest.id == vid

    @guard
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not name.startswith(b"user."):
            # No ACLs, no security labels: "not supported" (not "no such attribute")
            # lets ls -l remember it for the whole mount instead of asking three times
            # per file (coreutils caches ENOTSUP per device).
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        value = self._xattrs(inode).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @guard
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(self._xattrs(inode))

    @guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if unpackfs.owns(inode):
            return self.unpacked.readlink(inode)
        raise pyfuse3.FUSEError(errno.EINVAL)

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    # --- everything that would change the tree ----------------------------------------

    async def mknod(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    @guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.cache.root)
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.f_bsize
        out.f_frsize = st.f_frsize
        out.f_blocks = st.f_blocks
        out.f_bfree = st.f_bfree
        out.f_bavail = st.f_bavail
        out.f_namemax = 255
        return out

    # --- keeping the kernel's view current --------------------------------------------

    def sync(self, name: str) -> None:
        """Bring the scheduler and the kernel up to date after ``name`` changed."""
        if self.scheduler is not None:
            self.scheduler.sync(name)
        self.source_changed(name)

    def source_changed(self, name: str, kick: bool = True) -> None:
        """Drop kernel entries that changed for ``name`` (the kernel catches up soon);
        ``kick``: tell ``on_source_changed`` too (not for collected versions: nothing
        to unpack, and its look at 20,000 sources after a collection mapped them)."""
        self.snapshots.clear()
        if kick and self.on_source_changed is not None:
            self.on_source_changed(name)
        for parent, entry in self.tree.stale_entries(name):
            _invalidate(parent, entry)
        # the kernel holds link counts of versions, and those of this source only if
        # it looked into it (a version's inode is found by a lookup below the source)
        if self.shown_links and name in self.tree.entered:
            self.relink_pending.add(name)
            if not self.relinking:
                try:
                    trio.lowlevel.spawn_system_task(self._relink)
                    self.relinking = True
                    self.relink_idle = trio.Event()
                except RuntimeError:  # not in trio (unit tests)
                    pass

    async def relinked(self) -> None:
        """Return once the link counts that changes named have been looked at (the
        collector gives the index pages back after that, not before: the look maps
        them again)."""
        if self.relinking:
            await self.relink_idle.wait()

    async def _relink(self) -> None:
        """Have the kernel ask again for the link counts that changed, for the sources
        ``source_changed`` named: read in a worker thread, a batch of sources per read
        (a collection or a refresh burst names thousands)."""
        try:
            while self.relink_pending:
                names = [self.relink_pending.pop()
                         for _ in range(min(RELINK_BATCH, len(self.relink_pending)))]
                counts = await trio.to_thread.run_sync(self._link_counts_of, names)
                await self._invalidate_now([], self._changed_links(counts))
        finally:
            self.relinking = False
            self.relink_idle.set()

    async def source_changed_now(self, name: str) -> None:
        """Like ``source_changed``, but returns once the kernel has dropped the entries,
        so that a control write has taken effect for every later open when it returns.

        The notification may block until the kernel has finished requests on the same
        directory, so it runs in a worker thread while the loop keeps serving them.
        """
        self.snapshots.clear()
        entries = self.tree.stale_entries(name)
        inos: list[int] = []
        if self.shown_links:
            counts = await trio.to_thread.run_sync(self._link_counts_of, [name])
            inos = self._changed_links(counts)
        await self._invalidate_now(entries, inos)

    def _link_counts_of(self, names: list[str]) -> dict[int, int]:
        """The tree's link counts of several sources (in a worker thread)."""
        out: dict[int, int] = {}
        for name in names:
            out.update(self.tree.link_counts(name))
        return out

    def _changed_links(self, counts: dict[int, int]) -> list[int]:
        """Of the version inodes in ``counts`` (their link counts now), those whose link
        count changed since the kernel got it (``latest`` or a ``@TAG/latest`` moved, a
        tag came or went); forgotten, so the kernel's next look records them again."""
        changed = [ino for ino, n in counts.items() if self.shown_links.get(ino, n) != n]
        for ino in changed:
            del self.shown_links[ino]
        return changed

    async def _latest_moved_now(self, name: str) -> None:
        """Drop the kernel's entry of ``name``/latest and wait for it (whether or not
        ``source_changed`` already asked: that one does not wait)."""
        with self.index.read() as r:
            src = r.source(name)
        if src is None:
            return
        self.tree.shown_latest.pop(name, None)
        await self._invalidate_now([(src.ino, "latest")], [])

    def versions_collected(self, source: str, vids: list[str], facts: SourceFacts | None,
                           entries: list[tuple[int, str]], inos: list[int]) -> None:
        """Which kernel entries and attributes the collection of ``vids`` of
        ``source`` made stale (their entries were long-lived), from what the
        committing worker read of the source right after its commit (``facts``:
        tree.read_sources; None: gone), reading nothing and sending nothing: the
        entries to drop are added to ``entries``, the version inodes whose link count
        moved to ``inos``, for ``send_invalidations``. Entries in ``@versions/`` only
        if the kernel looked in there (most collected versions were never looked up)."""
        if facts is None:
            return
        self.snapshots.clear()
        entered = source in self.tree.entered
        if source in self.tree.versions_entered:
            entries += [(facts.ino + SourceInode.versions, vid) for vid in vids]
        entries += self.tree.stale_entries_from(source, facts)
        if entered and self.shown_links:
            inos += self._changed_links(facts.links)

    async def send_invalidations(self, entries: list[tuple[int, str]], inos: list[int]
                                 ) -> None:
        """Have the kernel drop ``entries`` ((parent inode, name)) and the attributes
        of ``inos`` (only those: their cached pages stay), all from one worker thread:
        a notification may wait for the kernel's requests on the same directory, which
        the loop answers meanwhile."""
        await _send_in_thread(_Invalidations(entries, inos))

    async def _invalidate_now(self, entries: list[tuple[int, str]], inos: list[int]
                              ) -> None:
        """``send_invalidations``, waited for INVALIDATE_TIMEOUT at most (a control
        write or a read returns by then whatever the kernel does). An entry the kernel
        holds up (its directory's lock) does not hold up the rest past that: what the
        thread has not reached goes to pyfuse3's notification thread."""
        batch = _Invalidations(entries, inos)
        with trio.move_on_after(INVALIDATE_TIMEOUT):
            await _send_in_thread(batch)
            return
        batch.handed_off = True  # the thread sends no further entry (its inodes still)
        for parent, name in entries[batch.next_entry:]:
            _invalidate(parent, name)


@dataclass
class _Invalidations:
    """Kernel entries ((parent inode, name)) and inodes (their attributes) to drop, in
    order, by one worker thread; ``next_entry`` is how far it got (an entry may be
    sent twice after a hand-off, never left out)."""

    entries: list[tuple[int, str]]
    inos: list[int]
    next_entry: int = 0
    handed_off: bool = False  # the caller stopped waiting: entries left go elsewhere


async def _send_in_thread(batch: _Invalidations) -> None:
    if batch.entries or batch.inos:
        await trio.to_thread.run_sync(_send_invalidations, batch, abandon_on_cancel=True)


def _send_invalidations(batch: _Invalidations) -> None:
    while batch.next_entry < len(batch.entries) and not batch.handed_off:
        parent, name = batch.entries[batch.next_entry]
        batch.next_entry += 1
        try:
            pyfuse3.invalidate_entry(parent, name.encode())
        except OSError as e:  # ENOENT: the kernel did not have it
            if e.errno != errno.ENOENT:
                log.debug("invalidate %s/%s: %s", parent, name, e)
    for ino in batch.inos:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.debug("invalidate inode %s: %s", ino, e)


def _invalidate(parent: int, name: str) -> None:
    try:
        pyfuse3.invalidate_entry_async(parent, name.encode(), ignore_enoent=True)
    except Exception as e:  # not mounted (unit tests) or shutting down
        log.debug("invalidate %s/%s: %s", parent, name, e)
