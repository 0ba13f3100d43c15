"""Ranged requests into a segmented partial file (segments.py).

Random access ahead: while a download runs, a reader waiting for bytes more than
``AHEAD`` past the bytes that arrived has them fetched at once, from just before them
to the end of their segment, with a ranged request of its own (``Range: bytes=A-B``
guarded by ``If-Range``), instead of waiting for everything before them: ``unzip -l``
of a file still downloading answers at once. These bytes count as arrived for readers
and for progress;
the download itself still writes every byte (the same bytes: the If-Range guard makes
sure of that) and hashes them in order.

Every such request holds a connection of the host (``[daemon]
max_connections_per_host``), as every download does.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import httpx
import trio

from buffyfs.fetch import downloader
from buffyfs.fetch.segments import SEGMENT_SIZE, LiveDownload
from buffyfs.safeio import open_file

log = logging.getLogger(__name__)

AHEAD = 1 << 20  # a read this far past the arrived bytes fetches its segment at once
ALIGN = 64 << 10  # such a request starts at the read's offset rounded down to this
BATCH = 1 << 20  # bytes written (and shown to readers) at a time


class RangeRefused(Exception):
    """The origin did not answer a range with exactly the bytes asked for."""


async def fetch_wanted(live: LiveDownload, client: httpx.AsyncClient,
                       req: downloader.Request, partial: Path,
                       connections: trio.CapacityLimiter) -> None:
    """Fetch each segment readers of ``live`` want ahead, once per generation of the
    download, until cancelled (the download's end)."""
    asked: set[tuple[int, int]] = set()  # (generation, first byte) fetched or under way
    async with trio.open_nursery() as nursery:
        while True:
            waiter = live.wants.waiter()
            for offset in live.take_wanted():
                total, guard = live.total, live.guard
                if total is None or guard is None or live.done:
                    continue
                # from just before the offset to the end of its segment
                first = offset - offset % ALIGN
                end = min(total, (offset // SEGMENT_SIZE + 1) * SEGMENT_SIZE)
                key = (live.generation, first)
                if key in asked or live.written.covers(first, end):
                    continue
                asked.add(key)
                nursery.start_soon(_fetch_segment, live, client, req, partial, connections,
                                   first, end, guard, asked, key)
            await waiter.wait()


async def _fetch_segment(live: LiveDownload, client: httpx.AsyncClient,
                         req: downloader.Request, partial: Path,
                         connections: trio.CapacityLimiter, first: int, end: int,
                         guard: str, asked: set[tuple[int, int]], key: tuple[int, int]) -> None:
    try:
        async with connections:
            await fetch_range(live, client, req, partial, first, end, guard)
    except (httpx.HTTPError, RangeRefused, OSError) as e:
        asked.discard(key)  # a later read asks again
        what = downloader.describe_http_error(e, req) if isinstance(e, httpx.HTTPError) \
            else str(e)
        log.info("%s: fetching bytes %d-%d ahead failed: %s", live.name, first, end - 1,
                 downloader.scrub(what, req.secrets()))


async def fetch_range(live: LiveDownload, client: httpx.AsyncClient, req: downloader.Request,
                      partial: Path, first: int, end: int, guard: str) -> None:
    """Write bytes [first, end) of the body into ``partial`` from a ranged request,
    telling ``live`` as they arrive. Stops quietly if the download started over or ended
    meanwhile; RangeRefused if the origin answers anything but those bytes."""
    generation, total = live.generation, live.total
    headers = {**req.headers, "Range": f"bytes={first}-{end - 1}", "If-Range": guard}
    log.debug("%s: fetching bytes %d-%d ahead for a reader", live.name, first, end - 1)
    async with client.stream(req.method, req.url, headers=headers,
                             content=req.body.encode() if req.body is not None else None,
                             timeout=httpx.Timeout(req.attempt_timeout)) as response:
        if response.status_code != 206:
            raise RangeRefused(f"the origin answered a range with HTTP {response.status_code}")
        got = response.headers.get("Content-Range", "").strip()
        if not re.fullmatch(rf"bytes {first}-{end - 1}/{total}", got):
            raise RangeRefused(f"the origin answered bytes {first}-{end - 1} with "
                               f"Content-Range {got!r}")
        try:
            fd = open_file(partial, os.O_WRONLY)
        except FileNotFoundError:
            return  # the download is over, or starting over
        try:
            at = first
            pending: list[bytes] = []
            size = 0
            async for chunk in response.aiter_raw():
                if at + size + len(chunk) > end:
                    raise RangeRefused("the origin sent more than the range")
                pending.append(chunk)
                size += len(chunk)
                if size >= BATCH:
                    if not await _write(live, fd, pending, at, generation):
                        return
                    at, pending, size = at + size, [], 0
            if pending and not await _write(live, fd, pending, at, generation):
                return
            if at + size != end:
                raise RangeRefused("the origin sent less than the range")
        finally:
            os.close(fd)


async def _write(live: LiveDownload, fd: int, chunks: list[bytes], at: int,
                 generation: int) -> bool:
    """Write ``chunks`` at ``at``; False if the download moved on (nothing counted)."""
    if live.generation != generation or live.done:
        return False
    data = memoryview(b"".join(chunks))
    written = 0
    while written < len(data):
        written += await trio.to_thread.run_sync(os.pwrite, fd, data[written:], at + written)
    if live.generation != generation:
        return False
    live.arrived(at, at + len(data))
    return True
