"""Issue 12, the refresh-burst and writer-held rows: the event loop is not made to wait
for the GIL while worker threads run Python (index commits of a burst's queued writes,
tree updates), and what a released index writer hands back to the loop is bounded."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from buffyfs.fetch import segments


async def _refresh_counting_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  size: int) -> tuple[list[int], str]:
    """One refresh of a body of ``size`` bytes from an origin that serves ranges (so the
    partial file's segment map is kept); returns the fdatasync calls made, the result."""
    import httpx

    from buffyfs.fetch import refresh
    from buffyfs.options import normalize_options
    from buffyfs.store.blobs import BlobStore
    from buffyfs.store.index import Index

    body = bytes(range(256)) * (size // 256)

    def answer(request: httpx.Request) -> httpx.Response:
        async def streamed() -> AsyncIterator[bytes]:  # as a socket's: read once
            for at in range(0, len(body), 1 << 16):
                yield body[at:at + (1 << 16)]

        return httpx.Response(200, content=streamed(), headers={
            "Content-Length": str(len(body)), "ETag": '"v1"', "Accept-Ranges": "bytes"})

    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    index = Index(tmp_path / "index")
    try:
        index.add_source("s", "http://127.0.0.1:9/s", normalize_options({}))
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            refresher = refresh.Refresher(index, BlobStore(tmp_path), client)
            outcome = await refresher.refresh("s")
        with index.read() as r:
            assert r.state("s").partial is None
        return synced, outcome.result
    finally:
        index.close()


async def test_a_small_body_is_synced_once_not_once_more_for_its_segment_map(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A body that ends in its first segment: the attempt's fsync makes it durable, the
    commit clears the map; no fdatasync (and map write) of its own for the segment it
    completed (a burst of 1,000 small refreshes made 1,000 more thread trips and syncs)."""
    synced, result = await _refresh_counting_syncs(tmp_path, monkeypatch, 4096)
    assert result == "new_version"
    assert synced == []


async def test_a_body_of_two_segments_still_maps_its_first_segment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The segment map still records whole segments before the body's end (a restart
    resumes after them): one fdatasync, for the first of two segments."""
    synced, result = await _refresh_counting_syncs(tmp_path, monkeypatch,
                                                   segments.SEGMENT_SIZE + 4096)
    assert result == "new_version"
    assert len(synced) == 1


async def test_a_small_body_is_written_hashed_and_synced_in_one_trip_to_a_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """downloader.download of a 4 KiB body: one trip to a worker thread for the body
    (the last batch is written, hashed and fsync'd together), not one for the batch and
    one for the fsync; each trip is a loop step and a wake-up more, 1,000 of them in a
    burst. The partial file is opened in the trip before (creating a file waits for
    the file system's journal: never on the loop)."""
    import httpx
    import trio

    from buffyfs.fetch import downloader

    body = b"x" * 4096

    def answer(request: httpx.Request) -> httpx.Response:
        async def streamed() -> AsyncIterator[bytes]:
            yield body

        return httpx.Response(200, content=streamed(),
                              headers={"Content-Length": str(len(body))})

    trips: list[str] = []
    real = trio.to_thread.run_sync

    async def counted(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        trips.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    partial = tmp_path / "s.part"
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        done = await downloader.download(client, downloader.Request("http://127.0.0.1:9/s"),
                                         partial)
    assert isinstance(done, downloader.Downloaded) and done.size == len(body)
    assert partial.read_bytes() == body
    assert trips == ["_open_partial", "_write_and_hash"]


async def test_a_download_slot_parses_the_host_of_its_url_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Taking a download slot (host, global and connection limits) looks the URL's host
    up once, not once per limit."""
    import httpx

    from buffyfs.fetch import refresh
    from buffyfs.store.blobs import BlobStore
    from buffyfs.store.index import Index

    asked: list[str] = []
    real = refresh.host_of
    monkeypatch.setattr(refresh, "host_of", lambda url: (asked.append(url), real(url))[1])
    index = Index(tmp_path / "index")
    try:
        async with httpx.AsyncClient() as client:
            refresher = refresh.Refresher(index, BlobStore(tmp_path), client)
            async with refresher._slot("s", "http://127.0.0.1:9/s", lambda *a: None):
                assert refresher.connections_to("http://127.0.0.1:9/s").borrowed_tokens == 1
                assert refresher.host_limits["127.0.0.1"].borrowed_tokens == 1
    finally:
        index.close()
    assert len(asked) == 2  # the slot's, then connections_to's above


async def test_a_burst_of_one_host_sets_up_few_refreshes_at_once_and_holds_up_no_other_host(
        tmp_path: Path) -> None:
    """100 refreshes of host a at once, its origin stalled: at most UNDER_WAY_PER_SLOT x
    max_downloads_per_host of them are set up (a download under way, ``live``), the
    others wait holding nothing and show ``queued``; a refresh of host b meanwhile goes
    through at once. Then all of a's end with a new version."""
    import httpx
    import trio
    import trio.testing

    from buffyfs.fetch import refresh
    from buffyfs.options import normalize_options
    from buffyfs.store.blobs import BlobStore
    from buffyfs.store.index import Index

    go = trio.Event()

    async def answer(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a.invalid":
            await go.wait()
        body = request.url.path.encode() * 64

        async def streamed() -> AsyncIterator[bytes]:
            yield body

        return httpx.Response(200, content=streamed(),
                              headers={"Content-Length": str(len(body))})

    index = Index(tmp_path / "index")
    names = [f"a{i}" for i in range(100)]
    for name in names:
        index.add_source(name, f"http://a.invalid/{name}", normalize_options({}))
    index.add_source("b", "http://b.invalid/b", normalize_options({}))
    most = [0]
    results: dict[str, str] = {}
    try:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            refresher = refresh.Refresher(index, BlobStore(tmp_path), client,
                                          max_downloads=4, max_downloads_per_host=2)

            class Watch(trio.abc.Instrument):
                def after_task_step(self, task: trio.lowlevel.Task) -> None:
                    most[0] = max(most[0], len(refresher.live))

            async def one(name: str) -> None:
                results[name] = (await refresher.refresh(name)).result

            trio.lowlevel.add_instrument(Watch())
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for name in names:
                        nursery.start_soon(one, name)
                    under_way = refresh.UNDER_WAY_PER_SLOT * 2

                    def queued() -> int:
                        with index.read() as r:
                            return sum("under way" in (r.state(n).queued or "")
                                       for n in names)

                    while queued() < len(names) - under_way:  # each took its lock
                        await trio.sleep(0.01)
                    await trio.testing.wait_all_tasks_blocked()
                    assert len(refresher.live) == under_way
                    await one("b")  # another host: not held up by a's burst
                    assert results["b"] == "new_version"
                    assert len(results) == 1
                    go.set()
    finally:
        index.close()
    assert most[0] == under_way + 1  # a's, and b's for a moment
    assert [results[n] for n in names] == ["new_version"] * len(names)
