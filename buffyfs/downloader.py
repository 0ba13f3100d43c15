"""One HTTP attempt: stream a response body into a partial file, hashing as it goes.

Memory stays flat whatever the body size: the body is cut into batches of at most
BATCH bytes, a bounded channel holds at most QUEUE of them, and a worker thread
writes and hashes them while the event loop receives the next ones (so receiving
and hashing use both cores).

We ask for the identity encoding (``Accept-Encoding: identity``): the cache keeps
the bytes of the resource itself, ``Content-Length`` then checks the stored bytes,
and ranges (for resuming) refer to the same bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from buffyfs.errors import FetchError

BATCH = 1 << 20
QUEUE = 4


@dataclass
class Request:
    url: str
    method: str = "GET"
    body: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    etag: str | None = None  # validators of the newest version, for a conditional GET
    last_modified: str | None = None
    attempt_timeout: float = 30.0

    def secrets(self) -> list[str]:
        """Strings that must never be shown: header values and URL credentials."""
        out = [v for v in self.headers.values() if v]
        userinfo = httpx.URL(self.url).userinfo
        if userinfo:
            out += [p for p in userinfo.decode(errors="replace").split(":") if p]
        return out


@dataclass
class Downloaded:
    sha256: str
    size: int
    etag: str | None
    last_modified: str | None
    content_type: str | None


class NotModified:
    """The origin answered 304: the newest version is still current."""


class AttemptError(FetchError):
    """A failed attempt; ``retryable`` says whether another attempt may succeed."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def new_client() -> httpx.AsyncClient:
    """The long-lived client; timeouts are set per request."""
    return httpx.AsyncClient(
        follow_redirects=True,
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        headers={"User-Agent": "buffyfs", "Accept-Encoding": "identity"},
        trust_env=True,
    )


def _request_headers(req: Request) -> dict[str, str]:
    headers = dict(req.headers)
    if req.etag:
        headers["If-None-Match"] = req.etag
    if req.last_modified:
        headers["If-Modified-Since"] = req.last_modified
    return headers


async def download(
    client: httpx.AsyncClient,
    req: Request,
    partial: Path,
    on_progress: Callable[[int, int | None], None] | None = None,
) -> Downloaded | NotModified:
    """Make one attempt. Raises AttemptError with a message a person understands."""
    timeout = httpx.Timeout(req.attempt_timeout)
    try:
        async with client.stream(
            req.method, req.url, headers=_request_headers(req),
            content=req.body.encode() if req.body is not None else None, timeout=timeout,
        ) as response:
            if response.status_code == 304:
                return NotModified()
            if response.status_code != 200:
                raise _status_error(response)
            total = _content_length(response)
            sha, size = await _stream_to_file(response, partial, total, on_progress)
            if total is not None and size != total:
                raise AttemptError(
                    f"body shorter than Content-Length: got {size} of {total} bytes", True
                )
            return Downloaded(
                sha256=sha, size=size,
                etag=response.headers.get("ETag"),
                last_modified=response.headers.get("Last-Modified"),
                content_type=response.headers.get("Content-Type"),
            )
    except AttemptError as e:
        raise AttemptError(scrub(str(e), req.secrets()), e.retryable) from None
    except httpx.HTTPError as e:
        raise AttemptError(scrub(describe_http_error(e, req), req.secrets()), True) from None
    except OSError as e:
        raise AttemptError(f"cannot write the download: {e.strerror}", False) from None


def _content_length(response: httpx.Response) -> int | None:
    raw = response.headers.get("Content-Length")
    if raw is None or not raw.strip().isdigit():
        return None
    return int(raw)


def _status_error(response: httpx.Response) -> AttemptError:
    code = response.status_code
    reason = response.reason_phrase or ""
    retryable = code >= 500 or code in (408, 429)
    return AttemptError(f"HTTP {code} {reason}".strip(), retryable)


def describe_http_error(e: httpx.HTTPError, req: Request) -> str:
    timeout = f"{req.attempt_timeout:g}s"
    if isinstance(e, httpx.ConnectTimeout):
        return f"timed out connecting (after {timeout})"
    if isinstance(e, httpx.ReadTimeout):
        return f"stalled: no data for {timeout}"
    if isinstance(e, httpx.TimeoutException):
        return f"timed out (after {timeout})"
    if isinstance(e, httpx.ConnectError):
        text = str(e)
        if "Name or service not known" in text or "getaddrinfo" in text or "resolve" in text:
            return f"cannot resolve host {httpx.URL(req.url).host!r}"
        return f"cannot connect: {text or type(e).__name__}"
    if isinstance(e, httpx.RemoteProtocolError):
        return f"connection broken: {e}"
    if isinstance(e, httpx.ReadError):
        return f"connection reset while reading: {e or type(e).__name__}"
    if isinstance(e, httpx.TooManyRedirects):
        return "too many redirects"
    return f"{type(e).__name__}: {e}"


def scrub(message: str, secrets: list[str]) -> str:
    for s in secrets:
        if len(s) >= 3:
            message = message.replace(s, "<hidden>")
    return message


async def _stream_to_file(
    response: httpx.Response,
    partial: Path,
    total: int | None,
    on_progress: Callable[[int, int | None], None] | None,
) -> tuple[str, int]:
    hasher = hashlib.sha256()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    size = 0
    try:
        send, receive = trio.open_memory_channel[bytes](QUEUE)

        async def write_batches() -> None:
            async with receive:
                async for batch in receive:
                    await trio.to_thread.run_sync(_write_and_hash, fd, hasher, batch)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_batches)
            async with send:
                pending: list[bytes] = []
                pending_len = 0
                async for chunk in response.aiter_raw():
                    pending.append(chunk)
                    pending_len += len(chunk)
                    size += len(chunk)
                    if pending_len >= BATCH:
                        await send.send(b"".join(pending))
                        pending, pending_len = [], 0
                        if on_progress:
                            on_progress(size, total)
                    if total is not None and size > total:
                        raise AttemptError(
                            f"body longer than Content-Length ({total} bytes)", True
                        )
                if pending:
                    await send.send(b"".join(pending))
        await trio.to_thread.run_sync(os.fsync, fd)
    finally:
        os.close(fd)
    if on_progress:
        on_progress(size, total)
    return hasher.hexdigest(), size


def _write_and_hash(fd: int, hasher: hashlib._Hash, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    hasher.update(data)
