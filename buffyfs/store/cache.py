"""The cache directory as a whole: index + blobs, and the operations that the
command line and the mount's control files share (add, remove, set, tag, pin...:
their rules are commands.py's, applied here in one index transaction; status).

Layout of a cache directory::

    index/            the LMDB index (index.py documents its keys)
    blobs/, partial/  the blob store (blobs.py)
    upstream/         a replica's blobs arriving from its hub, SHA256.part (upstream.py)
    mount.lock        flock held by the running mount of this cache
    mount.json        {"pid", "mountpoint"} of that mount
    buffyfs.log       the log of a detached mount
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import platformdirs

from buffyfs import control
from buffyfs.control import Command
from buffyfs.errors import BadInput, BuffyError, CacheError, NotFound
from buffyfs.safeio import entry_kind, make_dir, open_file, opener, read_text
from buffyfs.store import commands, status
from buffyfs.store.blobs import BlobStore, SourceLock
from buffyfs.store.index import Index, Writer
from buffyfs.store.records import Version

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    if os.getuid() == 0:
        return Path("/var/cache/buffyfs")
    return Path(platformdirs.user_cache_dir("buffyfs"))


def resolve_cache_dir(cli_value: str | None, config_value: str | None = None) -> Path:
    """SPEC order: --cache, the config's [daemon] cache, $BUFFYFS_CACHE, the default."""
    for value in (cli_value, config_value, os.environ.get("BUFFYFS_CACHE")):
        if value:
            return Path(value).expanduser().absolute()
    return default_cache_dir()


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create cache directory {root}: {e.strerror}") from None
        # Header values live in the index: the cache is private to its owner. Nothing
        # in it is followed through a symlink, and no one else may write to its
        # directories (safeio.py): else one clear error, here.
        make_dir(root)
        if not os.access(root, os.W_OK | os.X_OK):
            raise CacheError(f"cache directory {root} is not writable")
        self.blobs = BlobStore(root)
        make_dir(root / "index", root)
        for name in ("data.mdb", "lock.mdb"):  # LMDB opens them without O_NOFOLLOW
            what = entry_kind(root / "index" / name)
            if what not in (None, "regular file"):
                raise CacheError(f"index file {root / 'index' / name} is a {what}, "
                                 "not a regular file: refusing to use it")
        self.index = Index(root / "index")

    def close(self) -> None:
        self.index.close()

    # --- sources: the rules are commands.py's, shared with the control files ----------

    def add_source(self, name: str, url: str, raw_options: dict[str, Any]) -> None:
        commands.run(self.index, [Command("add", [name, url], raw_options)])

    def sync_sources(self, declared: dict[str, tuple[str, dict[str, Any]]],
                     prune: bool = False) -> tuple[list[str], list[str], list[str]]:
        """Write a config's sources into the index, in one transaction: (added, changed,
        removed).

        Declared options replace the stored ones; a pin made with ``pin`` survives a
        config that does not mention ``pinned``. With ``prune``, sources the config does
        not declare are removed (a replica's mirrored sources are the hub's: never).
        """
        added, changed, removed = [], [], []
        with self.index.write() as w:
            existing = {n: src for n, src in w.sources()}
            for name, (url, options) in declared.items():
                old = existing.get(name)
                if old is not None and old.options.get("pinned") and not options["pinned"]:
                    options = {**options, "pinned": True}  # pinned at run time: keep the pin
                newly_pinned = options["pinned"] and not (old is not None
                                                          and old.options.get("pinned"))
                if w.add_source(name, url, options, replace=True):
                    (changed if old is not None else added).append(name)
                if newly_pinned and old is not None:
                    current = w.latest(name)
                    w.set_pin(name, True, current.id if current else None)
            if prune:
                for name in existing:
                    if name not in declared and not existing[name].mirror:
                        w.remove_source(name)
                        removed.append(name)
        return added, changed, removed

    def remove_source(self, name: str) -> None:
        """Unregister ``name`` and drop its partial download."""
        commands.run(self.index, [Command("remove", [name])])
        self.drop_partial(name)

    def drop_partial(self, name: str) -> None:
        """Delete the partial download of a removed source; one under way (its lock
        held) is cancelled by the mount, which drops the partial as it stops."""
        lock = SourceLock(self.blobs.lock_path(name))
        if lock.try_acquire():
            try:
                self.blobs.partial_path(name).unlink(missing_ok=True)
                self.blobs.lock_path(name).unlink(missing_ok=True)  # a new one comes if needed
            finally:
                lock.release()

    def set_options(self, name: str, raw_options: dict[str, Any]) -> None:
        """Change options (``url`` included) of an existing source."""
        commands.run(self.index, [Command("set", [], raw_options)], name)

    def tag(self, name: str, ref: str, tag: str) -> Version:
        """Tag a version (an id or ``latest``); returns it as tagged."""
        return commands.run(self.index, [Command("tag", [ref, tag])], name).results[0]

    def untag(self, name: str, ref: str, tag: str) -> Version:
        return commands.run(self.index, [Command("untag", [ref, tag])], name).results[0]

    def pin(self, name: str, ref: str | None = None) -> str | None:
        """Pin ``latest`` at a version (default: the current latest, or the first to come)."""
        args = [ref] if ref is not None else []
        return commands.run(self.index, [Command("pin", args)], name).results[0]

    def unpin(self, name: str) -> None:
        commands.run(self.index, [Command("unpin", [])], name)

    def hold(self, name: str, ref: str, duration: str) -> Version:
        """Hold a version (an id or ``latest``, resolved now) for ``duration``; returns
        it as held."""
        return commands.run(self.index, [Command("hold", [ref, duration])], name).results[0]

    def release(self, name: str, ref: str) -> Version:
        return commands.run(self.index, [Command("release", [ref])], name).results[0]

    def request_refresh(self, name: str, by: commands.RefreshBy) -> None:
        """Check that ``name`` may be refreshed (it is not pinned) and, ``by`` the
        running mount (``"request"``), ask it to; ``"check"`` only checks."""
        commands.run(self.index, [Command("refresh", [])], name, refresh=by)

    def run_control(self, data: bytes, source: str | None,
                    judge: Callable[[list[Command], str | None], None] | None = None
                    ) -> commands.Outcome:
        """One write to a control file (``source`` None: the root's), all or nothing.

        Parses the write, then checks and applies every command in one index write
        transaction, which also clears ``last_control_error``; a failure applies nothing
        and is logged and recorded as ``last_control_error``. Partial downloads of
        removed sources go after the commit; the rest of the outcome (scheduler, kernel
        caches) is the mount's. Blocking: the mount runs it in a worker thread.

        ``revalidate`` commands get their verdicts before the transaction, from
        ``judge(parsed, source)`` (default: revalidate.judge in a trio run of its own;
        the mount runs it on its loop).
        """
        where = source or "@control"
        try:
            parsed = control.parse(data, "root" if source is None else "source")
            if any(cmd.word == "revalidate" for cmd in parsed):
                (judge or self.judge)(parsed, source)
            with self.index.write() as w:
                outcome = commands.apply(w, parsed, source, refresh="mount")
                _put_control_error(w, source, None)
        except (BadInput, NotFound) as e:
            log.warning("%s: control write refused: %s", where, e)
            self.set_control_error(source, str(e))
            raise
        except BuffyError as e:
            log.error("%s: control write failed: %s", where, e)
            self.set_control_error(source, str(e))
            raise
        for name in outcome.removed:
            self.drop_partial(name)
        return outcome

    def judge(self, parsed: list[Command], source: str | None) -> None:
        """Run the checks of the ``revalidate`` commands of ``parsed`` (revalidate.py)."""
        import trio

        from buffyfs.store import revalidate

        trio.run(revalidate.judge, self.index, self.blobs, parsed, source)

    # --- status -----------------------------------------------------------------------

    def cache_size(self) -> int:
        """Bytes of the distinct blobs that versions refer to."""
        with self.index.read() as r:
            return r.blob_bytes()

    def max_cache_size(self) -> int | None:
        """The quota the last mount of this cache ran with (None: unlimited)."""
        with self.index.read() as r:
            return r.meta_json("max_cache_size")

    def set_max_cache_size(self, value: int | None) -> None:
        with self.index.write() as w:
            w.put_meta_json("max_cache_size", value)

    def request_gc(self, dry_run: bool) -> int:
        """Ask the running mount to collect; returns the request id to wait for."""
        with self.index.write() as w:
            last = w.meta_json("gc_request") or {"id": 0}
            rid = last["id"] + 1
            w.put_meta_json("gc_request", {"id": rid, "dry_run": dry_run})
            w.changed("")
        return rid

    def gc_result(self, rid: int) -> dict[str, Any] | None:
        """The mount's answer to request ``rid``, if any."""
        with self.index.read() as r:
            return r.gc_result(rid)

    def gc_answered(self) -> dict[str, Any] | None:
        """``{"id", "dry_run"}`` of the newest request the mount answered."""
        with self.index.read() as r:
            return r.meta_json("gc_answered")

    def source_status(
        self, name: str, live_progress: dict[str, Any] | None = None,
        open_inos: Collection[int] = (),
    ) -> dict[str, Any]:
        with self.index.read() as r:
            try:
                return status.source_status(r, name, live_progress, open_inos)
            except KeyError:
                raise NotFound(f"no source named {name!r}") from None

    def root_status(self) -> dict[str, Any]:
        return status.root_status(self.index, self.root, self.cache_size(),
                                  self.max_cache_size())

    def set_control_error(self, source: str | None, message: str | None) -> None:
        try:
            with self.index.write() as w:
                _put_control_error(w, source, message)
        except BuffyError as e:
            log.error("cannot record control error: %s", e)

    # --- the running mount ------------------------------------------------------------

    def running_mount(self) -> dict[str, Any] | None:
        """``{"pid", "mountpoint"}`` of the mount using this cache, or None."""
        try:
            fd = open_file(self.root / "mount.lock", os.O_RDONLY)
        except OSError:  # none, or not a file any mount could hold
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(read_text(self.root / "mount.json"))
            except (OSError, ValueError):
                return {"pid": None, "mountpoint": None}
        finally:
            os.close(fd)
        return None

    def claim_mount(self, mountpoint: str | None, serving: str | None = None) -> int:
        """Take the mount lock; returns its fd (held for the mount's life). A daemon
        without a mount (``buffyfs serve``) has no mount point; ``serving`` is the URL
        of its HTTP server."""
        fd = open_file(self.root / "mount.lock", os.O_RDWR | os.O_CREAT, 0o600, replace=True)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = self.running_mount() or {}
            where = other.get("mountpoint") or f"serving {other.get('serving')}"
            raise CacheError(
                f"cache {self.root} is in use by another mount"
                + (f" at {where} (pid {other['pid']})" if other.get("pid") else "")
            ) from None
        info = {"pid": os.getpid(), "mountpoint": mountpoint, "serving": serving}
        with open(self.root / "mount.json", "w", opener=opener) as f:
            f.write(json.dumps(info))
        return fd


def _put_control_error(w: Writer, source: str | None, message: str | None) -> None:
    """``last_control_error`` of the root (``source`` None) or of a source."""
    if source is None:
        w.put_meta_json("last_control_error", message)
    elif w.source(source) is not None:
        w.put_state(source, last_control_error=message)
