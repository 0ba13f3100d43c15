"""Issue 12, start-up work off the loop: the daemon's start reads every source's name
(~0.1 s for 20,000) for the scheduler, the unpacker and its log line. Those reads run
in worker threads, not on the event loop that answers FUSE requests from the start.

The daemon runs in-process here, without a mount (as ``buffyfs serve`` without a
server would), so that the thread of each read can be seen."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import trio

from buffyfs.fetch import downloader
from buffyfs.mount import Settings, _serve
from buffyfs.options import normalize_options
from buffyfs.store.cache import Cache
from buffyfs.store.index import Reader


async def test_the_start_reads_every_source_name_in_worker_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache(tmp_path / "cache")
    try:
        for i in range(20):
            cache.index.add_source(f"s{i}", f"http://127.0.0.1:9/s{i}",
                                   normalize_options({"refresh": "never"}))
        loop_thread = threading.get_ident()
        readers: list[bool] = []  # for each read of every name: on the loop's thread?
        read_names = Reader.source_names

        def recorded(self: Reader) -> list[str]:
            readers.append(threading.get_ident() == loop_thread)
            return read_names(self)

        monkeypatch.setattr(Reader, "source_names", recorded)
        settings = Settings(mountpoint=None, cache_dir=tmp_path / "cache",
                            scrub_interval=None)
        caplog.set_level(logging.INFO, logger="buffyfs")
        client = downloader.new_client()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_serve, cache, settings, client)
                # the log line says it runs; the scheduler's and the unpacker's reads
                # of the names were made
                while not any("running without a mount" in r.getMessage()
                              for r in caplog.records) or len(readers) < 2:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        assert "20 sources" in " ".join(r.getMessage() for r in caplog.records)
        assert readers and not any(readers), readers  # none on the loop's thread
    finally:
        cache.close()


async def test_the_change_watcher_reads_the_changes_log_in_a_worker_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a collection the log holds thousands of entries: read on the loop, one
    look took 107 ms (bench.stall --full)."""
    from buffyfs.store.index import Index

    cache = Cache(tmp_path / "cache")
    try:
        loop_thread = threading.get_ident()
        readers: list[bool] = []  # for each read of the changes log: on the loop's thread?
        read_changes = Index.changes_since

        def recorded(self: Index, *args, **kwargs):
            readers.append(threading.get_ident() == loop_thread)
            return read_changes(self, *args, **kwargs)

        monkeypatch.setattr(Index, "changes_since", recorded)
        settings = Settings(mountpoint=None, cache_dir=tmp_path / "cache",
                            scrub_interval=None)
        client = downloader.new_client()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_serve, cache, settings, client)
                while len(readers) < 3:  # the first look, then the watcher's rounds
                    await trio.sleep(0.05)
                await trio.to_thread.run_sync(  # a change, as another process makes it
                    cache.index.add_source, "late", "http://127.0.0.1:9/late",
                    normalize_options({"refresh": "never"}))
                seen = len(readers)
                while len(readers) < seen + 2:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        assert not any(readers), readers  # none on the loop's thread
    finally:
        cache.close()
