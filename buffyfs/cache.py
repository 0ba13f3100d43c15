"""The cache directory as a whole: index + blobs, and the operations that the
command line and the mount's control files share (add, remove, set, status).

Layout of a cache directory::

    index/            the LMDB index (index.py documents its keys)
    blobs/, partial/  the blob store (blobs.py)
    mount.lock        flock held by the running mount of this cache
    mount.json        {"pid", "mountpoint"} of that mount
    buffyfs.log       the log of a detached mount
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import platformdirs

from buffyfs import status
from buffyfs.blobs import BlobStore, SourceLock
from buffyfs.errors import CacheError, NotFound
from buffyfs.index import Index
from buffyfs.options import check_name, check_tag, check_url, normalize_options
from buffyfs.safeio import entry_kind, make_dir, open_file, opener, read_text


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

    # --- sources ----------------------------------------------------------------------

    def add_source(
        self, name: str, url: str, raw_options: dict[str, Any], replace: bool = False
    ) -> bool:
        check_name(name)
        check_url(url)
        return self.index.add_source(name, url, normalize_options(raw_options), replace=replace)

    def sync_sources(self, declared: dict[str, tuple[str, dict[str, Any]]],
                     prune: bool = False) -> tuple[list[str], list[str], list[str]]:
        """Write a config's sources into the index: (added, changed, removed).

        Declared options replace the stored ones; a pin made with ``pin`` survives a
        config that does not mention ``pinned``. With ``prune``, sources the config does
        not declare are removed.
        """
        added, changed, removed = [], [], []
        with self.index.read() as r:
            existing = {n: src for n, src in r.sources()}
        for name, (url, options) in declared.items():
            old = existing.get(name)
            if old is not None and old["options"].get("pinned") and not options["pinned"]:
                options = {**options, "pinned": True}  # pinned at run time: keep the pin
            newly_pinned = options["pinned"] and not (old or {}).get("options", {}).get("pinned")
            if self.index.add_source(name, url, options, replace=True):
                (changed if old is not None else added).append(name)
            if newly_pinned and old is not None:
                with self.index.read() as r:
                    current = r.latest(name)
                self.index.set_pin(name, True, current["id"] if current else None)
        if prune:
            for name in existing:
                if name not in declared:
                    self.index.remove_source(name)
                    removed.append(name)
        return added, changed, removed

    def remove_source(self, name: str) -> None:
        """Unregister ``name`` and drop its partial download; one under way (its lock
        held) is cancelled by the mount, which drops the partial as it stops."""
        check_name(name)
        self.index.remove_source(name)
        lock = SourceLock(self.blobs.lock_path(name))
        if lock.try_acquire():
            try:
                self.blobs.partial_path(name).unlink(missing_ok=True)
                self.blobs.lock_path(name).unlink(missing_ok=True)  # a new one comes if needed
            finally:
                lock.release()

    def set_options(self, name: str, raw_options: dict[str, Any]) -> None:
        """Change options (``url`` included) of an existing source."""
        src = self.index.get_source(name)
        raw = dict(raw_options)
        url = check_url(raw.pop("url")) if "url" in raw else src["url"]
        options = normalize_options(raw, base=src["options"])
        pinned = options["pinned"]
        options["pinned"] = src["options"].get("pinned", False)  # pin() moves it with the pin
        self.index.add_source(name, url, options, replace=True)
        if pinned != options["pinned"]:
            self.pin(name) if pinned else self.unpin(name)

    def tag(self, name: str, ref: str, tag: str) -> dict[str, Any]:
        check_tag(tag)
        return self.index.change_tag(name, self.version(name, ref)["id"], add=tag)

    def untag(self, name: str, ref: str, tag: str) -> dict[str, Any]:
        check_tag(tag)
        return self.index.change_tag(name, self.version(name, ref)["id"], remove=tag)

    def pin(self, name: str, ref: str | None = None) -> str | None:
        """Pin ``latest`` at a version (default: the current latest, or the first to come)."""
        self.index.get_source(name)
        with self.index.read() as r:
            has_versions = bool(r.versions(name))
        vid = self.version(name, ref or "latest")["id"] if (ref or has_versions) else None
        self.index.set_pin(name, True, vid)
        return vid

    def unpin(self, name: str) -> None:
        self.index.set_pin(name, False, None)

    def version(self, name: str, ref: str) -> dict[str, Any]:
        """A version of ``name`` by id, or ``latest``."""
        with self.index.read() as r:
            if r.source(name) is None:
                raise NotFound(f"no source named {name!r}")
            if ref == "latest":
                v = r.latest(name)
                if v is None:
                    raise NotFound(f"source {name!r} has no usable version")
                return v
            v = r.version(name, ref)
        if v is None:
            raise NotFound(f"source {name!r} has no version {ref!r}")
        return v

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
        with self.index.read() as r:
            result = r.meta_json("gc_result")
        return result if result and result.get("id") == rid else None

    def source_status(
        self, name: str, live_progress: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        with self.index.read() as r:
            try:
                return status.source_status(r, name, live_progress)
            except KeyError:
                raise NotFound(f"no source named {name!r}") from None

    def root_status(self) -> dict[str, Any]:
        return status.root_status(self.index, self.root, self.cache_size(),
                                  self.max_cache_size())

    def set_control_error(self, source: str | None, message: str | None) -> None:
        if source is None:
            with self.index.write() as w:
                w.put_meta_json("last_control_error", message)
        else:
            self.index.set_state(source, last_control_error=message)

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

    def claim_mount(self, mountpoint: str) -> int:
        """Take the mount lock; returns its fd (held for the mount's life)."""
        fd = open_file(self.root / "mount.lock", os.O_RDWR | os.O_CREAT, 0o600, replace=True)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = self.running_mount() or {}
            raise CacheError(
                f"cache {self.root} is in use by another mount"
                + (f" at {other['mountpoint']} (pid {other['pid']})" if other.get("pid") else "")
            ) from None
        info = {"pid": os.getpid(), "mountpoint": mountpoint}
        with open(self.root / "mount.json", "w", opener=opener) as f:
            f.write(json.dumps(info))
        return fd

