"""The mount daemon: cache, downloader, scheduler and filesystem in one trio nursery."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pyfuse3
import trio

from buffyfs import __version__, downloader
from buffyfs.cache import Cache
from buffyfs.errors import CacheError
from buffyfs.fs import BuffyFS
from buffyfs.refresh import Refresher
from buffyfs.scheduler import Scheduler

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5  # how often the mount looks for changes made by other processes


def run(
    mountpoint: str,
    cache_dir: Path,
    allow_other: bool = False,
    ready_fd: int | None = None,
    max_downloads: int = 4,
    max_downloads_per_host: int = 2,
) -> None:
    """Mount and serve until unmounted or signalled. Raises BuffyError on bad setup."""
    if not os.path.isdir(mountpoint):
        raise CacheError(f"mount point {mountpoint} is not a directory")
    cache = Cache(cache_dir)
    lock_fd = cache.claim_mount(os.path.abspath(mountpoint))
    try:
        trio.run(_serve, cache, mountpoint, allow_other, ready_fd,
                 max_downloads, max_downloads_per_host)
    finally:
        os.close(lock_fd)
        cache.close()


async def _serve(
    cache: Cache,
    mountpoint: str,
    allow_other: bool,
    ready_fd: int | None,
    max_downloads: int,
    max_downloads_per_host: int,
) -> None:
    async with downloader.new_client() as client, trio.open_nursery() as nursery:
        refresher = Refresher(cache.index, cache.blobs, client, max_downloads,
                              max_downloads_per_host)
        fs = BuffyFS(cache, None, progress=lambda: dict(refresher.progress))
        scheduler = Scheduler(cache.index, refresher, nursery, on_changed=fs.source_changed)
        fs.scheduler = scheduler
        options = set(pyfuse3.default_options) | {"fsname=buffyfs", "subtype=buffyfs"}
        if allow_other:
            options.add("allow_other")
        try:
            pyfuse3.init(fs, mountpoint, options)
        except RuntimeError as e:
            raise CacheError(f"cannot mount on {mountpoint}: {e}") from None
        try:
            nursery.start_soon(_watch_signals)
            nursery.start_soon(_watch_changes, cache, scheduler, fs)
            scheduler.start_all()
            with cache.index.read() as r:
                names = r.source_names()
            log.info("buffyfs %s mounted on %s, cache %s, %d sources",
                     __version__, mountpoint, cache.root, len(names))
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n")
                os.close(ready_fd)
            await pyfuse3.main()
        finally:
            nursery.cancel_scope.cancel()
            pyfuse3.close(unmount=True)
            with trio.CancelScope(shield=True):
                await refresher.aclose()
            log.info("unmounted %s", mountpoint)


async def _watch_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                continue  # reloading the config comes with the operations work
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _watch_changes(cache: Cache, scheduler: Scheduler, fs: BuffyFS) -> None:
    """Apply changes other processes made to the index (CLI add, tag, refresh...)."""
    seq, _ = cache.index.changes_since(0)
    while True:
        await trio.sleep(POLL_INTERVAL)
        seq, names = cache.index.changes_since(seq)
        if names is None:  # too far behind to tell: look at everything
            with cache.index.read() as r:
                names = set(r.source_names()) | set(scheduler.workers)
        names.discard("")
        if not names:
            continue
        for name in names:
            fs.sync(name)
        for name in cache.index.take_refresh_requests():
            scheduler.kick(name)
