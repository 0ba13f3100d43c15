"""A source's first download answered over HTTP while it runs (SPEC part 2, "Reading
while a download runs"): ``GET /NAME/latest`` and a proxied first request of a source
with no version, as the mount's ``latest`` does (streaming.py).

The answer starts once the origin's body of known length starts (without a
``Content-Length`` the caller waits for the version as before) and sends bytes as they
arrive. Its headers: ``200`` with the origin's ``Content-Length`` and ``Content-Type``,
``Cache-Control: no-cache``, ``X-Buffy-Stale: 0``, ``X-Buffy-Streaming: 1`` and
``Accept-Ranges: bytes``; no ``ETag``, ``Last-Modified`` nor ``X-Buffy-Version``: none is
known before the whole body's sha256 and the commit (the next request gets them), so
conditional headers (``If-None-Match``, ``If-Range``...) match nothing and the whole
answer is sent. A ``Range`` is answered ``206`` from the download: the bytes that
arrived at once, bytes far ahead by a ranged request of their own (ranges.py).

The seal: the answer's last chunk is sent only once the version is committed, its
validation passed. If the download gives up, the version fails validation, or the
download starts over with other bytes than were sent, the answer stops short of its
``Content-Length`` and the connection is closed: the client sees a truncated body,
never a clean end. Retries and resumes only make the client wait longer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from buffyfs.fetch import streaming
from buffyfs.fetch.segments import LiveDownload, StreamFailed
from buffyfs.http.answer import ORIGIN_BYTES_HEADERS, Answer, content_type_of
from buffyfs.http.ranges import BadRange, Span, byte_span

if TYPE_CHECKING:
    from buffyfs.http.app import App, Request, Send

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # the most bytes sent at a time


async def answer_while_downloading(app: App, req: Request, send: Send, name: str) -> bool:
    """Answer with the first download of ``name`` as it arrives; False (nothing sent)
    if there is none to stream: a version exists, or the round ended without a body of
    known length (the caller waits for the version, and says why it failed)."""
    scheduler = app.daemon.scheduler
    if scheduler is None:
        return False
    live = await streaming.wait_stream(scheduler, app.index, name)
    if live is None or live.total is None:
        return False
    total = live.total
    try:
        span = byte_span(req.headers.get("range"), total) \
            if "if-range" not in req.headers else None
    except BadRange as e:
        raise Answer(416, f"range not satisfiable: {e}",
                     [("Content-Range", f"bytes */{total}")]) from None
    headers = [("Content-Type", content_type_of(live.content_type)), ("Cache-Control", "no-cache"),
               ("Accept-Ranges", "bytes"), ("X-Buffy-Stale", "0"), ("X-Buffy-Streaming", "1"),
               *ORIGIN_BYTES_HEADERS]
    await send_arriving(app, req, send, live, name, span, headers)
    return True


async def send_arriving(app: App, req: Request, send: Send, live: LiveDownload, name: str,
                        span: Span | None, headers: list[tuple[str, str]]) -> None:
    """Answer with the bytes of ``live`` as they arrive (``span`` of them, or all):
    ``headers`` plus the length (and ``Content-Range``) at once, the last chunk only
    after the seal; the answer is cut short if the download fails or its bytes were
    not the ones sent. Also a replica's version arriving from its hub (app.py)."""
    total = live.total
    assert total is not None
    start, length = (span.start, span.length) if span else (0, total)
    headers = [*headers, ("Content-Length", str(length))]
    if span:
        headers.append(("Content-Range", span.content_range()))
    await send({"type": "http.response.start", "status": 206 if span else 200,
                "headers": [(k.lower().encode(), v.encode("latin-1", "replace"))
                            for k, v in headers]})
    if req.method == "HEAD":
        await send({"type": "http.response.body", "body": b""})
        return
    if not length:  # an empty body is a clean end too: after the seal only
        if await _sealed(streaming.open_stream(live, app.cache.blobs), name):
            await send({"type": "http.response.body", "body": b""})
        return
    handle = streaming.open_stream(live, app.cache.blobs)
    try:
        offset, end = start, start + length
        while offset < end:
            data = await streaming.read_bytes(handle, offset, min(CHUNK, end - offset),
                                              arrived=True)
            offset += len(data)
            if offset >= end and not await _sealed(handle, name):
                return  # cut short: the client sees fewer bytes than announced
            await send({"type": "http.response.body", "body": data, "more_body": offset < end})
            app.daemon.metrics.bytes_served.inc(len(data))
    except StreamFailed as e:
        log.info("%s: answer while it downloads cut short: %s", name, e)
    finally:
        handle.close()


async def _sealed(handle: streaming.StreamHandle, name: str) -> bool:
    """Wait for the seal (the read at the end of the file); False if it failed."""
    try:
        await streaming.read_bytes(handle, handle.live.total or 0, 1)
    except StreamFailed as e:
        log.info("%s: answer while it downloads cut short at its end: %s", name, e)
        return False
    finally:
        handle.close()
    return True
