"""A replica: the sources of a hub (``buffyfs serve``) mirrored into this cache.

One task follows the hub's change feed (``GET /@changes`` long-poll) and, for each
source named there, reads the hub's ``NAME/@status`` and writes what it says into the
index in one transaction: the source (marked ``"mirror": true``, never refreshed
here: scheduler.py skips it), its versions with their tags and holds, its pin. A
version whose bytes this cache does not hold yet carries ``"remote": true`` and no
blob reference; its bytes come from ``HUB/@blobs/sha256/HEX`` on first open or by
prefetch, are checked against the sha256 (upstream.py) and then count as any blob
(quota, collection, scrub). A first open reads them as they arrive (streaming.py
follows the blob's LiveDownload; one fetch per blob, in this task's nursery).

A first sync (or one with another hub) reads the whole hub in pages of FEED_PAGE
sources, the next asked for while one is written, each page in a transaction.

Control writes for mirrored sources go to the hub (``forward_control``); the
replica pulls the result at once rather than waiting for the feed: the hub's serial,
then the written sources' status, applied without waiting for a sync under way; a
feed answer up to that serial is not applied to them (``reread_at``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import trio

from buffyfs import control
from buffyfs.errors import BadInput, BuffyError, FetchError
from buffyfs.fetch import downloader
from buffyfs.fetch.segments import LiveDownload
from buffyfs.fetch.upstream import FEED_WAIT, Answer, HubDown, Upstream, partial_dir
from buffyfs.options import check_name, check_tag, normalize_options
from buffyfs.store import memory
from buffyfs.store.cache import Cache
from buffyfs.store.gc import CommitLock
from buffyfs.store.index import Writer, now_utc, resolve_latest, rfc3339
from buffyfs.store.records import Version, from_dict

log = logging.getLogger(__name__)

RETRY = 1.0  # seconds between tries of an unreachable hub (catch-up well within 5 s)
STATUS_READS = 8  # the hub's @status read at once during a sync
PREFETCH_MODES = ("latest", "none", "all")
BIG_SYNC = 1000  # sources: after a sync of more, freed memory goes back to the system
FEED_PAGE = 500  # sources in one page of the hub's feed (a whole hub is read in pages)
TELL_AT_ONCE = 64  # changed sources a sync tells on_changed of itself (more: see sync)


@dataclass
class ReplicaSettings:
    upstream: list[str]
    token: str | None = None
    sources: list[str] = field(default_factory=list)  # globs; none: every source
    prefetch: str = "latest"


class Replica:
    def __init__(self, cache: Cache, settings: ReplicaSettings, upstream: Upstream,
                 on_changed: Callable[[str], None] = lambda name: None,
                 make_room: Callable[[int], Awaitable[None]] | None = None,
                 downloads: int = 4) -> None:
        self.cache = cache
        self.index = cache.index
        self.settings = settings
        self.upstream = upstream
        self.on_changed = on_changed  # the scheduler and the kernel catch up
        self.make_room = make_room
        self.hub: str | None = None  # the URL whose serial we follow
        self.serial = -1
        self.down = True  # until the first answer: clears the stale marks of a restart
        self.stale_message: str | None = None  # the hub's error the sources show
        # sha256 -> (source, version id, what readers follow) of each blob arriving
        self.arriving: dict[str, tuple[str, str, LiveDownload]] = {}
        self.nursery: trio.Nursery | None = None  # where blobs arrive (run)
        self.running = trio.Event()
        self.downloads = trio.CapacityLimiter(downloads)
        self.prefetch_wanted: dict[tuple[str, str], None] = {}
        self.prefetch_wake = trio.Event()
        self.partials = partial_dir(cache.root)
        self.applying = trio.Lock()  # one feed answer applied at a time (_take_feed)
        # source -> the hub's serial its state was read after, by a forwarded write's
        # re-read (_reread): a feed answer up to that serial is older for it (sync)
        self.reread_at: dict[str, int] = {}
        self.writing = trio.Lock()  # a sync's look at reread_at and its index write
        self.refetch: set[str] = set()  # fetch_again while the task restarts (_run)
        self.plan_error: str | None = None  # the last prefetch planning failure, logged

    # --- which sources ----------------------------------------------------------------

    def wanted(self, name: str) -> bool:
        globs = self.settings.sources
        return not globs or any(fnmatch.fnmatchcase(name, g) for g in globs)

    def owns(self, name: str) -> bool:
        with self.index.read() as r:
            src = r.source(name)
        return bool(src and src.mirror)

    # --- following the hub ------------------------------------------------------------

    async def run(self) -> None:
        await trio.to_thread.run_sync(self._sweep_partials)
        try:
            await self._run()
        finally:  # (restarted after a bug: blobs wait for the next nursery)
            self.nursery, self.running = None, trio.Event()

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self.running.set()
            nursery.start_soon(self._prefetcher)
            if self.refetch:  # damage found while the task restarted
                nursery.start_soon(self._plan_prefetch, sorted(self.refetch))
                self.refetch = set()
            while True:
                try:
                    await self._follow_once()
                except HubDown as e:
                    await trio.to_thread.run_sync(self._mark_stale, str(e))
                    await trio.sleep(RETRY)
                except FetchError as e:
                    log.error("replica: %s", e)
                    await trio.to_thread.run_sync(self._mark_stale, str(e))
                    await trio.sleep(RETRY)

    def _sweep_partials(self) -> None:
        """At start: drop the arriving blobs no version waits for any more (the hub
        dropped it meanwhile); the others resume where they stopped."""
        with self.index.read() as r:
            wanted = {v.sha256 for name, src in r.sources() if src.mirror
                      for v in r.versions(name) if v.remote}
        for path in self.partials.glob("*.part"):
            if path.name.removesuffix(".part") not in wanted:
                path.unlink(missing_ok=True)

    async def _follow_once(self) -> None:
        wait = 0.0 if self.hub is None or self.down else FEED_WAIT
        answer = await self.upstream.changes(self.serial, wait, self.hub, limit=FEED_PAGE)
        await self._take_feed(answer)
        if self.down:
            self.down, self.stale_message = False, None
            await trio.to_thread.run_sync(self._mark_fresh)

    async def _take_feed(self, answer: Answer) -> None:
        """Apply an answer of the hub's change feed, and the pages after it, unless a
        newer one was applied while it travelled (a forwarded write's re-read may
        overtake a long-poll taken before the write: its older state must not come
        back). Page by page, each in a transaction of its own, the next one asked for
        while this one is applied."""
        feed = await _decoded(answer)
        async with self.applying:
            if answer.url == self.hub and feed.get("complete", True) \
                    and feed["serial"] <= self.serial:
                return  # older than what is applied (a hub that lost its index says
                # "complete": false, and is taken whole)
            # Later pages are asked after the serial this answer was asked after (not
            # self.serial: another answer may have been applied while it travelled).
            since = answer.since if answer.since is not None else -1
            paged_complete = feed.get("complete", True)  # what each page must say too
            if answer.url != self.hub:  # a first answer, or another hub: look at everything
                if self.hub is not None:
                    log.warning("replica: following %s now (was %s)", answer.url, self.hub)
                self.hub, self.serial = answer.url, -1  # a sync cut short starts over
                feed["complete"] = False
            if not feed.get("complete", True):  # serials of another hub, or another index
                self.reread_at.clear()
            complete, serial = feed.get("complete", True), feed["serial"]
            synced: set[str] = set()
            try:
                async with trio.open_nursery() as nursery:
                    while True:
                        ahead: list[Any] = []
                        arrived = trio.Event()
                        more = bool(feed.get("more") and feed["sources"])
                        if more:
                            nursery.start_soon(self._next_page, since, feed["sources"][-1],
                                               ahead, arrived)
                        names = [n for n in feed["sources"] if self.wanted(n)]
                        await self.sync(names, self.hub, feed.get("mirror") or {},
                                        serial=feed["serial"])
                        synced.update(names)
                        if not more:
                            break
                        await arrived.wait()
                        if isinstance(ahead[0], BuffyError):
                            raise ahead[0]
                        feed = ahead[0]
                        if feed.get("complete", True) != paged_complete:
                            raise FetchError(f"hub {self.hub}: its change feed changed in "
                                             "the middle of a sync")
            except BaseExceptionGroup as group:  # raised as itself (run() knows HubDown)
                raise downloader._single(group) from None
            if not complete:  # everything was listed: the mirrored sources not in it go
                gone = await trio.to_thread.run_sync(self._mirrored_besides, synced)
                if gone:
                    await self.sync(gone, self.hub, dict.fromkeys(gone))
            self.serial = serial
            self.reread_at = {n: s for n, s in self.reread_at.items() if s > serial}
        if len(synced) > BIG_SYNC:
            _give_back_memory()

    async def _reread(self, names: list[str]) -> None:
        """After a forwarded write: the hub's state of ``names`` now, read at once (not
        after a sync under way: a first one reads the whole hub). The hub's serial is
        asked first, so the state read is at least that new: a feed answer up to that
        serial (a long-poll taken before the write) is not applied to these sources."""
        hub = self.hub
        if hub is None:  # never followed one yet: ask for these sources alone
            await self.sync(names)
            return
        serial = await self.upstream.serial(hub)
        found = {}
        for name in names:
            url, found[name] = await self.upstream.source(name, hub)
            if url != hub:
                serial = None  # another hub's state: no serial of the one followed
        await self.sync(names, hub, found, reread=serial if self.hub == hub else None)

    async def _next_page(self, since: int, after: str, out: list[Any],
                         arrived: trio.Event) -> None:
        """The feed's page after the name ``after`` (its JSON, or the BuffyError that
        kept it) into ``out``; ``arrived`` set then."""
        try:
            answer = await self.upstream.changes(since, 0, self.hub, limit=FEED_PAGE,
                                                 after=after)
            if answer.url != self.hub:
                raise FetchError(f"hub {self.hub} stopped answering in the middle of a sync")
            out.append(await _decoded(answer))
        except BuffyError as e:
            out.append(e)
        arrived.set()

    def _mirrored_besides(self, names: set[str]) -> list[str]:
        with self.index.read() as r:
            return [n for n in r.mirrored_names() if n not in names]

    async def sync(self, names: list[str], hub: str | None = None,
                   known: dict[str, Any] | None = None, serial: int | None = None,
                   reread: int | None = None) -> None:
        """Bring ``names`` up to the hub's state: ``known`` has the hub's ``@status``
        of some (the feed's answer); the others are asked for (HubDown if the hub
        does not answer). ``serial``: the feed answer's (a source re-read after it is
        left as it is); ``reread``: the serial a forwarded write's re-read was asked
        after."""
        found: dict[str, dict[str, Any] | None] = {
            n: known[n] for n in names if known and n in known}
        limit = trio.CapacityLimiter(STATUS_READS)

        errors: list[BuffyError] = []

        async def read(name: str) -> None:
            async with limit:
                try:
                    _, found[name] = await self.upstream.source(name, hub)
                except BuffyError as e:  # raised below as itself, not in a group
                    errors.append(e)

        async with trio.open_nursery() as nursery:
            for name in names:
                if name not in found:
                    nursery.start_soon(read, name)
        if errors:
            raise errors[0]
        async with self.writing:  # no re-read lands between this look and the write
            if serial is not None:
                found = {n: st for n, st in found.items()
                         if self.reread_at.get(n, -1) < serial}
            if reread is not None:
                for name in found:
                    self.reread_at[name] = max(reread, self.reread_at.get(name, -1))
            changed = await trio.to_thread.run_sync(self._apply, found)
        if len(changed) <= TELL_AT_ONCE:
            for name in changed:
                self.on_changed(name)
        # else: the mount's change watcher takes them (within its poll, a chunk a loop
        # turn) from the index's change log; telling each here too would do it twice
        await self._plan_prefetch(list(found))
        if len(found) > BIG_SYNC:
            del found, known
            _give_back_memory()

    def _apply(self, found: dict[str, dict[str, Any] | None]) -> list[str]:
        changed = []
        good_options: set[str] = set()
        new: list[dict[str, Any]] = []  # sources this index has not: written at once
        with self.index.write() as w:
            for name, status in found.items():
                try:
                    status = checked_status(name, status, good_options)
                except (BadInput, ValueError, TypeError, KeyError) as e:
                    log.warning("replica: the hub's %r skipped: %s", name[:140], e)
                    continue
                if status is not None and self.wanted(name) and w.source(name) is None:
                    new.append(_new_source(name, status))
                elif _apply_source(w, name, status if self.wanted(name) else None):
                    changed.append(name)
            w.add_mirrored_sources(new)
        return changed + [s["name"] for s in new]

    def _mark_stale(self, message: str) -> None:
        if self.down and message == self.stale_message:
            return  # said already: no write of every source each retry
        self.stale_message = message
        at = rfc3339(now_utc())
        with self.index.write() as w:
            for name in w.mirrored_names():
                failures = w.state(name).consecutive_failures
                w.put_state(name, consecutive_failures=max(1, failures),
                            last_error={"at": at, "message": message})
        if not self.down:
            log.error("replica: %s", message)
        self.down = True

    def _mark_fresh(self) -> None:
        at = rfc3339(now_utc())
        with self.index.write() as w:
            for name in w.mirrored_names():
                w.put_state(name, consecutive_failures=0, last_error=None,
                            last_check=at, last_success=at)
        log.info("replica: following %s", self.hub)

    # --- bytes --------------------------------------------------------------------------

    async def hold(self, name: str, version: Version) -> None:
        """Make sure this cache holds the bytes of ``version`` (fetching them from the
        hub, checked, if not); FetchError when they cannot be had."""
        while True:
            owner, vid, live = await self.blob_arriving(name, version)
            while not live.done:
                await live.changed.waiter().wait()
            if live.error is not None:
                raise FetchError(live.error)
            if (owner, vid) == (name, version.id):
                return
            # the same bytes came for another version: now this one is marked held

    async def wait_body(self, name: str, version: Version) -> LiveDownload | None:
        """For a first read of ``version``: the blob arriving from the hub, once its
        body started (readers follow it: streaming.py), or None once the cache holds
        the bytes; FetchError when they cannot be had."""
        owner, vid, live = await self.blob_arriving(name, version)
        while True:
            waiter = live.changed.waiter()
            if live.error is not None:
                raise FetchError(live.error)
            if live.done:
                if (owner, vid) != (name, version.id):
                    await self.hold(name, version)  # the same bytes: marks it held
                return None
            if live.started:
                return live
            await waiter.wait()

    async def blob_arriving(self, name: str, version: Version
                            ) -> tuple[str, str, LiveDownload]:
        """The fetch of ``version``'s blob under way, or one started now for it: in
        the replica's nursery, so that it goes on when the reader that started it
        goes (concurrent readers and the prefetch share it)."""
        if version.remote and version.damaged:
            raise FetchError(f"version {version.id} is damaged at the hub: not fetched "
                             "until the hub has its bytes again")
        sha = version.sha256
        if sha not in self.arriving:
            await self.running.wait()
            assert self.nursery is not None
        if sha not in self.arriving:  # (no await since this look)
            live = LiveDownload(name)
            live.path, live.mirrored = self.partials / f"{sha}.part", True
            self.arriving[sha] = (name, version.id, live)
            self.nursery.start_soon(self._fetch, name, version, live)
        return self.arriving[sha]

    async def _fetch(self, name: str, version: Version, live: LiveDownload) -> None:
        """Fetch the blob of ``version`` (if not held already), commit it, mark the
        version held, and seal ``live``; or fail ``live`` with the reason."""
        sha, size = version.sha256, version.size
        try:
            held = await trio.to_thread.run_sync(self._held, sha)
            if not held:
                partial = self.partials / f"{sha}.part"
                async with self.downloads:
                    if self.make_room is not None:
                        await self.make_room(size)
                    await self.upstream.fetch_blob(sha, size, partial, live=live)
            # From blob to index commit, hold the commit lock shared (as a refresh does):
            # no collection, orphan sweep or check --repair takes the blob meanwhile.
            lock = CommitLock(self.cache.blobs)
            await trio.to_thread.run_sync(lock.acquire, False)
            try:
                if not held:  # verified bytes replace whatever sits there (damaged, orphan)
                    await trio.to_thread.run_sync(self.cache.blobs.commit_partial, partial,
                                                  sha, True)
                    for other in await trio.to_thread.run_sync(self.index.clear_damage, sha):
                        self.on_changed(other)  # a local source's versions of these bytes
                marked = await trio.to_thread.run_sync(self._mark_held, name, version.id)
            finally:
                lock.release()
            live.seal(sha, version)
            if marked:
                self.on_changed(name)
        except (BuffyError, OSError) as e:  # CacheFull too: the readers get EIO
            live.fail(str(e) if isinstance(e, BuffyError)
                      else f"cannot store the blob: {e.strerror}")
        finally:
            live.fail("the replica stopped")  # (no-op once sealed or failed)
            if self.arriving.get(sha, (None, None, None))[2] is live:
                del self.arriving[sha]

    def _held(self, sha: str) -> bool:
        with self.index.read() as r:
            ref = r.blob_ref(sha)
        return bool(ref and ref.refs > 0 and not ref.damaged
                    and self.cache.blobs.exists(sha))

    def _mark_held(self, name: str, vid: str) -> bool:
        with self.index.write() as w:
            v = w.version(name, vid)
            if v is None or not v.remote:
                return False
            w.ref_blob(v.sha256, v.size)
            w.put_version(name, dataclasses.replace(v, remote=False))
            w.changed(name)
        return True

    async def _plan_prefetch(self, names: list[str]) -> None:
        if self.settings.prefetch == "none":
            return
        arriving = sum(live.total or 0 for _, _, live in self.arriving.values())
        try:
            wanted = await trio.to_thread.run_sync(self._to_prefetch, names, arriving)
        except Exception as e:  # noqa: BLE001 (an index read error, a broken record:
            # the replica keeps following, and the next sync plans again)
            message = f"{type(e).__name__}: {e}"
            if message != self.plan_error:
                log.error("replica: planning the prefetch failed: %s", message)
            self.plan_error = message
            return
        self.plan_error = None
        self.prefetch_wanted.update(dict.fromkeys(wanted))
        if self.prefetch_wanted:
            self.prefetch_wake.set()

    def _to_prefetch(self, names: list[str], arriving: int = 0) -> list[tuple[str, str]]:
        """(source, version id) of the versions of ``names`` the prefetch mode wants
        and this cache does not hold (in a worker thread: index reads). ``latest``
        always; with ``all`` the others newest first as long as they fit in the room
        left under the quota: a prefetch never evicts one it fetched before (a quota
        smaller than the hub would have them evict each other at every sync);
        ``arriving``: bytes of blobs under way, not in the cache yet."""
        wanted = []
        with self.index.read() as r:
            quota = r.meta_json("max_cache_size")
            room = None if quota is None else quota - r.blob_bytes() - arriving
            for name in names:
                src = r.source(name)
                if not src or not src.mirror:
                    continue
                versions = r.versions(name)
                latest = resolve_latest(src, versions)
                if latest is not None and latest.remote and not latest.damaged:
                    wanted.append((name, latest.id))
                    room = None if room is None else room - latest.size
                if self.settings.prefetch != "all":
                    continue
                for v in sorted(versions, key=lambda v: v.fetched_at, reverse=True):
                    if not v.remote or v.damaged or v is latest:
                        continue
                    if room is not None:
                        if v.size > room:
                            continue
                        room -= v.size
                    wanted.append((name, v.id))
        return wanted

    def fetch_again(self, names: list[str]) -> None:
        """Versions of ``names`` lost their bytes here (found damaged: index.mark_damaged
        made them remote): prefetch what ``prefetch`` asks for again; the others come
        on their next read."""
        if self.nursery is None:  # restarting: planned once the task is back (_run)
            self.refetch.update(names)
            return
        self.nursery.start_soon(self._plan_prefetch, list(dict.fromkeys(names)))

    async def _prefetcher(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                await self.prefetch_wake.wait()
                self.prefetch_wake = trio.Event()
                wanted, self.prefetch_wanted = list(self.prefetch_wanted), {}
                for name, vid in wanted:
                    nursery.start_soon(self._prefetch, name, vid)

    async def _prefetch(self, name: str, vid: str) -> None:
        with self.index.read() as r:
            v = r.version(name, vid)
        if v is None or not v.remote:
            return
        try:
            await self.hold(name, v)
        except BuffyError as e:  # CacheFull too: the prefetcher goes on
            log.warning("%s: prefetch of %s failed: %s", name, vid, e)

    # --- control ------------------------------------------------------------------------

    async def forward_control(self, data: bytes, source: str | None) -> bool:
        """Send a control write for mirrored sources to the hub and pull the result;
        False when it names none (the caller applies it here). Raises BadInput for a
        write mixing mirrored and local sources, upstream.Forbidden without a token
        (or one the hub refuses), BadInput with the hub's reason for a 400, HubDown."""
        try:
            parsed = control.parse(data, "root" if source is None else "source")
        except BadInput:
            return False  # refused here, with the usual message
        if source is not None:
            names = [source] if self.owns(source) else []
            everything = bool(names)
        else:
            names = [c.args[0] for c in parsed if c.word == "remove" and self.owns(c.args[0])]
            everything = len(names) == len(parsed)
        if not names:
            return False
        try:
            if not everything:
                raise BadInput("a write mixing mirrored sources (their commands go to the "
                               "hub) and this replica's own cannot be applied as one: "
                               "write them separately")
            await self.upstream.control(data, source, self.hub)  # the hub we follow
        except BuffyError as e:
            log.warning("%s: control write refused: %s", source or "@control", e)
            await trio.to_thread.run_sync(self.cache.set_control_error, source, str(e))
            raise
        try:
            await self._reread(names)
        except BuffyError as e:  # applied at the hub all the same: the feed brings it
            log.warning("%s: control write applied at the hub; reading it back failed "
                        "(the change feed brings it): %s", source or "@control", e)
        await trio.to_thread.run_sync(self.cache.set_control_error, source, None)
        return True


async def _decoded(answer: Answer) -> dict[str, Any]:
    """A ``/@changes`` answer's JSON, decoded off the loop (a whole hub's is big)."""
    if answer.status != 200:
        raise FetchError(f"hub {answer.url}: HTTP {answer.status} for /@changes")
    return await trio.to_thread.run_sync(answer.json)


SHA256_RE = re.compile(r"[0-9a-f]{64}")


def checked_status(name: str, status: dict[str, Any] | None,
                   good_options: set[str] | None = None) -> dict[str, Any] | None:
    """``status`` if every field of it a replica stores is well formed, else BadInput:
    a broken or hostile hub cannot put into this index a name, version id or sha256
    that would become a path or another source's key, nor options the rest of
    buffyfs does not expect."""
    check_name(name)
    if status is None:
        return None
    if not isinstance(status, dict) or not isinstance(status.get("url"), str) \
            or not isinstance(status.get("options"), dict):
        raise BadInput("not a source's status")
    _check_options(status["options"], good_options)
    pinned = status.get("pinned")
    if pinned is not None and not (isinstance(pinned, str)
                                   and control.VERSION_RE.fullmatch(pinned)):
        raise BadInput("bad pinned version id")
    versions = status.get("versions", [])
    if not isinstance(versions, list):
        raise BadInput("versions is not a list")
    for v in versions:
        if not isinstance(v, dict) or not isinstance(v.get("id"), str) \
                or not control.VERSION_RE.fullmatch(v["id"]):
            raise BadInput("bad version id")
        if not isinstance(v.get("sha256"), str) or not SHA256_RE.fullmatch(v["sha256"]):
            raise BadInput(f"version {v['id']}: bad sha256")
        size = v.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadInput(f"version {v['id']}: bad size")
        _check_time(v["fetched_at"])
        if v.get("held_until"):
            _check_time(v["held_until"])
        tags = v.get("tags", [])
        if not isinstance(tags, list):
            raise BadInput(f"version {v['id']}: bad tags")
        for tag in tags:
            check_tag(tag)
    return status


RFC3339_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def _check_time(text: Any) -> None:
    """ValueError unless ``text`` is a time as the index writes them (what
    ``parse_rfc3339`` reads), checked without strptime: 40 us each, and a whole hub
    has tens of thousands."""
    if not isinstance(text, str) or not RFC3339_RE.fullmatch(text):
        raise ValueError(f"bad time {str(text)[:40]!r}")
    datetime.fromisoformat(text[:-1])  # the ranges: no month 13


def _check_options(options: dict[str, Any], good: set[str] | None) -> None:
    """BadInput unless ``options`` are valid source options; ``good`` remembers the
    ones found valid (most sources of a hub share theirs: checked once a page). The
    key is their repr: it tells 1 from true and 1.0 as JSON does, at a fraction of
    json.dumps's cost (another order of the same keys is only checked again)."""
    key = repr(options)
    if good is not None and key in good:
        return
    normalize_options(options)
    if good is not None:
        good.add(key)


def _apply_source(w: Writer, name: str, status: dict[str, Any] | None) -> bool:
    """Write the hub's ``@status`` of ``name`` (None: the hub has none, or we do not
    mirror it) into the index; True if anything changed."""
    local = w.source(name)
    if local is not None and not local.mirror:
        return False  # a source of this replica's own: the hub's of that name is not shown
    if status is None:
        if local is None:
            return False
        w.remove_source(name)
        return True
    options = dict(status["options"])
    if local is None:
        w.add_source(name, status["url"], options)
        local = w.source(name)
        assert local is not None
    changed = False
    wanted = dataclasses.replace(local, url=status["url"], options=options, mirror=True,
                                 pin=status.get("pinned"))
    if wanted != local:
        w.put_source(name, wanted)
        changed = True
    hub_versions = {v["id"]: v for v in status.get("versions", [])}
    mine = {v.id: v for v in w.versions(name)}
    for vid, v in mine.items():
        if vid not in hub_versions:
            w.retire_version(name, v)
            changed = True
    for vid, hv in hub_versions.items():
        fields = _version_fields(hv)
        v = mine.get(vid)
        if hv.get("damaged") and (v is None or v.remote):
            fields["damaged"] = hub_damage(hv["damaged"])  # not servable until mended
        if v is None:
            w.add_mirrored_version(name, from_dict(Version, _version_record(status["url"], hv,
                                                                             fields)))
            changed = True
            continue
        now = dataclasses.replace(v, **fields)
        for key in ("held_until", "validation"):  # dropped at the hub: dropped here
            if not hv.get(key):
                now = dataclasses.replace(now, **{key: None})
        if v.remote and "damaged" not in fields:
            now = dataclasses.replace(now, damaged=None)  # the hub has sound bytes again
        if now != v:
            w.put_version(name, now)
            changed = True
    if changed:
        w.changed(name)
        w.mirrored(name)
    return changed


def _version_fields(hv: dict[str, Any]) -> dict[str, Any]:
    """What a version's record takes over from the hub's (tags, hold, validation)."""
    fields = {"tags": list(hv.get("tags", []))}
    if hv.get("held_until"):
        fields["held_until"] = hv["held_until"]
    if hv.get("validation"):
        fields["validation"] = hv["validation"]
    return fields


def _version_record(url: str, hv: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """The record of a version the hub has and this index not yet (no ``ino``)."""
    return {"id": hv["id"], "sha256": hv["sha256"], "size": hv["size"],
            "fetched_at": hv["fetched_at"], "url": url, "etag": None,
            "last_modified": None, "content_type": None, **fields}


def _new_source(name: str, status: dict[str, Any]) -> dict[str, Any]:
    """A source of the hub this index has not, as ``Writer.add_mirrored_sources``
    takes it (what ``_apply_source`` would write for it, in one go)."""
    versions = {}  # by id: one record each, as _apply_source keeps them
    for hv in status.get("versions", []):
        fields = _version_fields(hv)
        if hv.get("damaged"):
            fields["damaged"] = hub_damage(hv["damaged"])  # not servable until mended
        versions[hv["id"]] = _version_record(status["url"], hv, fields)
    return {"name": name, "url": status["url"], "options": dict(status["options"]),
            "pin": status.get("pinned"), "versions": list(versions.values())}


def hub_damage(mark: Any) -> dict[str, str]:
    """A version the hub found damaged and this replica does not hold: shown as
    damaged (not served, ``latest`` falls back as at the hub) until the hub has its
    bytes again. A held one stays served: its bytes were verified here."""
    at = mark.get("at") if isinstance(mark, dict) else None
    return {"at": at if isinstance(at, str) else rfc3339(now_utc()),
            "reason": "damaged at the hub; not fetched until the hub has it again"}


def _give_back_memory() -> None:
    """A whole hub read at once (10,000 sources: tens of MiB of JSON and dicts) leaves
    glibc's heap grown; malloc_trim returns the freed part (the replica's RSS)."""
    memory.trim_heap()
