"""One HTTP attempt: stream a response body into a partial file, hashing as it goes.

Memory stays flat whatever the body size: the body is cut into batches of about
BATCH bytes, a bounded channel holds at most QUEUE of them, and a worker thread
writes and hashes them while the event loop receives the next ones (so receiving
and hashing use both cores). The worker also starts the disk writeback of each batch
(``sync_file_range``), so that the fsync that ends a download has little left to do.

We ask for the identity encoding (``Accept-Encoding: identity``): the cache keeps
the bytes of the resource itself, ``Content-Length`` then checks the stored bytes,
and ranges (for resuming) refer to the same bytes.

An attempt ends in a result or an ``AttemptError``, which says what becomes of the
partial file: ``resume`` (continue from there), ``restart`` (worthless: start over),
or neither (untouched: whatever resume point the caller had still holds — a
connection refused, a timeout before the body, an error status).

No attempt holds its download slot forever: besides ``attempt_timeout`` (connect, and
silence between bytes), a body slower than ``min_speed`` bytes/s over ``min_speed_time``
(like curl's --speed-limit/--speed-time) and an attempt longer than ``max_time`` fail
as retryable, keeping their resume point.
"""

from __future__ import annotations

import contextlib
import ctypes
import email.utils
import hashlib
import math
import os
import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import trio

from buffyfs import crash
from buffyfs.errors import FetchError
from buffyfs.fetch import httplog
from buffyfs.safeio import open_file

BATCH = 1 << 20
QUEUE = 4
WATCH_EVERY = 0.5  # seconds between two looks at an attempt's speed and deadline


@dataclass
class Request:
    url: str
    method: str = "GET"
    body: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    etag: str | None = None  # validators of the newest version, for a conditional GET
    last_modified: str | None = None
    attempt_timeout: float = 30.0
    min_speed: int = 0  # bytes/s a body must keep up over min_speed_time (0: no limit)
    min_speed_time: float = 60.0
    max_time: float | None = None  # seconds one attempt may take in all

    def secrets(self) -> list[str]:
        """Strings that must never be shown: header values and URL credentials."""
        out = [v for v in self.headers.values() if v]
        userinfo = httpx.URL(self.url).userinfo
        if userinfo:
            out += [p for p in userinfo.decode(errors="replace").split(":") if p]
        return out


@dataclass
class Resume:
    """Where an interrupted body stopped, and the validators that guard continuing it."""

    offset: int
    etag: str | None
    last_modified: str | None

    def if_range(self) -> str | None:
        if self.etag and not self.etag.startswith("W/"):  # If-Range needs a strong validator
            return self.etag
        return self.last_modified


@dataclass
class Downloaded:
    sha256: str
    size: int
    etag: str | None
    last_modified: str | None
    content_type: str | None
    resumed_from: int = 0


@dataclass
class PrefixHash:
    """The sha256 state of a partial file's first ``length`` bytes."""

    length: int = 0
    hasher: Any = None


class NotModified:
    """The origin answered 304: the newest version is still current."""


class AttemptError(FetchError):
    """A failed attempt; ``retryable`` says whether another attempt may succeed,
    ``retry_after`` is the origin's Retry-After in seconds, ``resume`` where a later
    attempt may continue the body, ``restart`` that the partial file is worthless
    (a changed validator, a refused range, an origin that cannot resume, no room).
    With neither, the partial file is as the attempt found it. The bytes before a
    ``resume`` offset are on disk (fsync'd)."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None,
                 resume: Resume | None = None, restart: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.resume = resume
        self.restart = restart


class TooLong(AttemptError):
    """The body ran past its Content-Length."""


def new_client(proxy: str | None = None) -> httpx.AsyncClient:
    """A long-lived client; timeouts are set per request. Without ``proxy``, the
    standard HTTP(S)_PROXY / NO_PROXY environment applies."""
    return httpx.AsyncClient(
        follow_redirects=True,
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        headers={"User-Agent": "buffyfs", "Accept-Encoding": "identity"},
        trust_env=proxy is None,
        proxy=proxy,
        event_hooks=httplog.HOOKS,  # --log-level debug: each request and response
    )


def _request_headers(req: Request, resume: Resume | None) -> dict[str, str]:
    headers = dict(req.headers)
    if resume is not None:
        headers["Range"] = f"bytes={resume.offset}-"
        guard = resume.if_range()
        if guard:
            headers["If-Range"] = guard
    else:
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
    resume: Resume | None = None,
    on_body: Callable[[int, int | None, Resume | None, str | None], Awaitable[None]]
    | None = None,
    grow: Callable[[int], Awaitable[int]] | None = None,
    on_written: Callable[[int, int], Awaitable[None]] | None = None,
    prefix_hash: PrefixHash | None = None,
    ranged: Callable[[httpx.Response, int, int, Resume], Awaitable[Downloaded | None]]
    | None = None,
) -> Downloaded | NotModified:
    """Make one attempt, continuing ``partial`` from ``resume`` when the origin agrees.

    Raises AttemptError with a message a person understands (see its docstring for
    what becomes of the partial file). ``on_body(start, total, point, content_type)``
    hears (awaited), as the body starts, where it starts in the file, the file's whole size if
    known, how it could be resumed (None: it could not) and the origin's Content-Type, so that the caller can record it before
    anything can interrupt it (and refuse it by raising AttemptError). ``grow(size)``
    is awaited before the file grows past what it granted last; it returns the size now
    granted (at least ``size``) or raises AttemptError (no room). ``on_written(fd,
    end)`` is awaited each time the file holds every byte of the body up to ``end``
    (the writing waits meanwhile: it may fdatasync ``fd``). ``prefix_hash`` carries
    the hash of the file's first bytes from one attempt to the next: resuming where
    the last attempt stopped needs no second read of them. ``ranged(response, start,
    total, point)``, for a body of known length from an origin that serves ranges, may
    take the body over (parallel.py: several connections) and return the result, or
    return None to leave it to this one stream. The bytes written are
    ``Body.size`` (the file may hold more: a batch cut short, or other segments).
    """
    if resume is not None and (resume.offset <= 0 or not resume.if_range()):
        resume = None
    timeout = httpx.Timeout(req.attempt_timeout)
    deadline = trio.current_time() + req.max_time if req.max_time else math.inf
    body = Body(partial, req, deadline)
    body.on_written = on_written
    opened = False
    try:
        async with contextlib.AsyncExitStack() as stack:
            response = None
            with trio.move_on_at(deadline):
                response = await stack.enter_async_context(client.stream(
                    req.method, req.url, headers=_request_headers(req, resume),
                    content=req.body.encode() if req.body is not None else None,
                    timeout=timeout,
                ))
            if response is None:
                raise AttemptError(
                    f"no answer within attempt_max_time ({seconds(req.max_time or 0)})", True)
            if response.status_code == 304 and resume is None:
                return NotModified()
            start, total = _accept(response, resume)
            point = _resume_point(response, max(start, 1))
            if on_body:
                await on_body(start, total, point, response.headers.get("Content-Type"))
            if ranged is not None and total is not None and point is not None:
                done = await ranged(response, start, total, point)
                if done is not None:
                    return done
            await body.open(start, prefix_hash)
            opened = True
            try:
                await body.receive(response, total, on_progress, grow)
            except (httpx.HTTPError, AttemptError) as e:
                raise _interrupted(e, req, response, body) from None
            size = body.size
            if total is not None and size != total:
                point = _resume_point(response, body.size)
                raise AttemptError(
                    f"body shorter than Content-Length: got {size} of {total} bytes", True,
                    resume=point, restart=point is None,
                )
            return Downloaded(
                sha256=body.hexdigest(), size=size,
                etag=response.headers.get("ETag"),
                last_modified=response.headers.get("Last-Modified"),
                content_type=response.headers.get("Content-Type"),
                resumed_from=start,
            )
    except AttemptError as e:  # of its kind (parallel.RangesRefused says what to do next)
        raise type(e)(scrub(str(e), req.secrets()), e.retryable, e.retry_after,
                      e.resume, e.restart) from None
    except httpx.HTTPError as e:
        raise AttemptError(scrub(describe_http_error(e, req), req.secrets()), True) from None
    except OSError as e:
        raise AttemptError(f"cannot write the download: {e.strerror}", False) from None
    finally:
        if prefix_hash is not None and opened:
            prefix_hash.length, prefix_hash.hasher = body.size, body.hasher
        body.close()


def _accept(response: httpx.Response, resume: Resume | None) -> tuple[int, int | None]:
    """Where the body starts in the file and the file's total size, or AttemptError."""
    code = response.status_code
    if code == 206 and resume is not None:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)",
                         response.headers.get("Content-Range", "").strip())
        if not m or int(m.group(1)) != resume.offset:
            raise AttemptError(
                f"origin answered the resume at byte {resume.offset} with Content-Range "
                f"{response.headers.get('Content-Range')!r}; starting over", True, restart=True)
        total = None if m.group(3) == "*" else int(m.group(3))
        piece = _content_length(response)
        if piece is not None and piece != int(m.group(2)) - int(m.group(1)) + 1:
            raise AttemptError("Content-Length does not match Content-Range; starting over",
                               True, restart=True)
        return resume.offset, total
    if code == 416 and resume is not None:
        raise AttemptError("origin refused the resume range (416); starting over", True,
                           restart=True)
    if code != 200:
        raise _status_error(response)
    return 0, _content_length(response)  # a 200 to a resume: the origin sent it all again


def _resume_point(response: httpx.Response, size: int) -> Resume | None:
    """Where to continue, if the origin says it serves ranges and gave a validator."""
    ranges = response.status_code == 206 or \
        response.headers.get("Accept-Ranges", "").lower() == "bytes"
    etag, modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
    if not ranges or size <= 0:
        return None
    point = Resume(size, etag, modified)
    return point if point.if_range() else None


def _interrupted(e: Exception, req: Request, response: httpx.Response, body: Body) -> AttemptError:
    if isinstance(e, AttemptError) and e.restart:
        return e  # no room, or an inconsistent origin: start over, never resume
    if isinstance(e, AttemptError):
        message, retryable = str(e), e.retryable
    else:
        message, retryable = describe_http_error(e, req), True
    point = _resume_point(response, body.size)
    return AttemptError(message, retryable, resume=point, restart=point is None)


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds, from either of its forms (seconds or an HTTP date)."""
    raw = response.headers.get("Retry-After")
    if raw is None:
        return None
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _content_length(response: httpx.Response) -> int | None:
    raw = response.headers.get("Content-Length")
    if raw is None or not raw.strip().isdigit():
        return None
    return int(raw)


def _status_error(response: httpx.Response) -> AttemptError:
    code = response.status_code
    reason = response.reason_phrase or ""
    retryable = code >= 500 or code in (408, 429)
    return AttemptError(f"HTTP {code} {reason}".strip(), retryable, _retry_after(response))


def seconds(value: float) -> str:
    """A number of seconds as an option would spell it: 90 -> 90s, 7200 -> 2h."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size and value % size == 0:
            return f"{value / size:g}{unit}"
    return f"{value:g}s"


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
            for form in (s, repr(s.encode("utf-8", "replace"))[2:-1], repr(s)[1:-1]):
                message = message.replace(form, "<hidden>")
    return message


class Body:
    """The partial file being written, and the running hash of all its bytes."""

    def __init__(self, path: Path, req: Request | None = None, deadline: float = math.inf) -> None:
        self.path = path
        self.fd: int | None = None
        self.hasher = hashlib.sha256()
        self.size = 0
        self.arrived = 0  # bytes of the file received so far (written or queued)
        self.min_speed = req.min_speed if req else 0
        self.min_speed_time = req.min_speed_time if req else 60.0
        self.max_time = req.max_time if req else None
        self.deadline = deadline
        self.on_written: Callable[[int, int], Awaitable[None]] | None = None

    async def open(self, start: int, prefix_hash: PrefixHash | None = None) -> None:
        """Keep the first ``start`` bytes of the file (hashing them again unless
        ``prefix_hash`` is their hash), drop the rest."""
        rehash = None
        if start and prefix_hash is not None and prefix_hash.length == start:
            self.hasher = prefix_hash.hasher.copy()
        elif start:
            rehash = self.hasher
        # in a worker thread, not cancellable (the fd is ours once it returns): creating
        # a file waits for the file system's journal, up to ~1 ms each while other
        # downloads sync (a burst of 1,000 refreshes spent 1 s of the loop in open)
        self.fd = await trio.to_thread.run_sync(_open_partial, self.path, start, rehash)
        self.size = start

    async def receive(self, response: httpx.Response, total: int | None,
                      on_progress: Callable[[int, int | None], None] | None,
                      grow: Callable[[int], Awaitable[int]] | None = None) -> None:
        """Append the body; a worker thread writes and hashes while the loop receives.

        A watchdog ends the receiving (as a retryable AttemptError, keeping what
        arrived) when the body is too slow or the attempt's deadline has come.
        """
        fd = self.fd
        assert fd is not None
        # (batch, whether it is the last: its trip to the thread also syncs the file)
        send, receive = trio.open_memory_channel[tuple[list[bytes], bool]](QUEUE)
        synced = [False]

        async def write_batches() -> None:
            async with receive:
                async for batch, last in receive:
                    await trio.to_thread.run_sync(_write_and_hash, fd, self.hasher, batch,
                                                  self.size, last)
                    synced[0] = last
                    self.size += sum(map(len, batch))
                    crash.point("download-mid-body")  # a batch is in the file
                    if self.on_written is not None:
                        await self.on_written(fd, self.size)

        interrupted: Exception | None = None
        stopped: list[str] = []  # why the watchdog ended the receiving
        receiving, watching = trio.CancelScope(), trio.CancelScope()
        self.arrived = self.size
        granted = self.size if grow else math.inf
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_batches)
                nursery.start_soon(self._watch, receiving, watching, stopped)
                async with send:
                    pending: list[bytes] = []
                    pending_len = 0
                    with receiving:
                        try:
                            async for chunk in response.aiter_raw():
                                after = self.arrived + len(chunk)
                                if total is not None and after > total:
                                    raise TooLong(
                                        f"body longer than Content-Length ({total} bytes)",
                                        True, restart=True)
                                if after > granted:
                                    assert grow is not None
                                    granted = await grow(after)  # or AttemptError: no room
                                pending.append(chunk)
                                pending_len += len(chunk)
                                self.arrived = after
                                if pending_len >= BATCH:
                                    await send.send((pending, False))
                                    pending, pending_len = [], 0
                                    if on_progress:
                                        on_progress(self.arrived, total)
                        except (httpx.HTTPError, AttemptError) as e:
                            interrupted = e  # keep what arrived: a later attempt may resume
                    watching.cancel()
                    if stopped:
                        interrupted = AttemptError(stopped[0], True)
                    if pending:  # written and synced in one trip (a small body: its only)
                        await send.send((pending, True))
        except BaseExceptionGroup as group:  # trio wraps what the nursery raised
            raise _single(group) from None
        if not synced[0]:
            await trio.to_thread.run_sync(os.fsync, fd)
        if interrupted is not None:
            raise interrupted
        if on_progress:
            on_progress(self.size, total)

    async def _watch(self, receiving: trio.CancelScope, watching: trio.CancelScope,
                     stopped: list[str]) -> None:
        """End ``receiving`` when the attempt's deadline has come, or when fewer than
        ``min_speed`` bytes a second arrived over the last ``min_speed_time`` seconds."""
        samples: deque[tuple[float, int]] = deque([(trio.current_time(), self.arrived)])
        with watching:
            while True:
                await trio.sleep(WATCH_EVERY)
                now = trio.current_time()
                if now >= self.deadline:
                    stopped.append(f"attempt took longer than attempt_max_time "
                                   f"({seconds(self.max_time or 0)})")
                    receiving.cancel()
                    return
                if not self.min_speed:
                    continue
                samples.append((now, self.arrived))
                while len(samples) > 1 and samples[1][0] <= now - self.min_speed_time:
                    samples.popleft()  # samples[0]: the newest at least min_speed_time ago
                since, then = samples[0]
                if now - since >= self.min_speed_time:
                    rate = (self.arrived - then) / (now - since)
                    if rate < self.min_speed:
                        stopped.append(
                            f"too slow: {rate:.0f} bytes/s over the last "
                            f"{seconds(self.min_speed_time)}, below min_speed "
                            f"({self.min_speed} bytes/s)")
                        receiving.cancel()
                        return

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _single(group: BaseExceptionGroup) -> BaseException:
    """The one meaningful exception of a nursery's group (the others are cancellations)."""
    real = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
    if len(real) == 1:
        inner = real[0]
        return _single(inner) if isinstance(inner, BaseExceptionGroup) else inner
    return group


def prefix_digest(fd: int, length: int) -> str:
    """sha256 of the file's first ``length`` bytes (blocking: a worker thread's)."""
    hasher = hashlib.sha256()
    _hash_prefix(fd, length, hasher)
    return hasher.hexdigest()


def _open_partial(path: Path, start: int, rehash: hashlib._Hash | None) -> int:
    """The partial file's fd, keeping its first ``start`` bytes (hashed into ``rehash``
    first when given: a file shorter than that must not be padded and trusted) and
    dropping the rest, positioned at ``start``."""
    # never through a symlink planted in partial/: such an entry is replaced
    fd = open_file(path, os.O_RDWR | os.O_CREAT, 0o600, replace=True)
    try:
        if rehash is not None:
            _hash_prefix(fd, start, rehash)
        os.ftruncate(fd, start)  # what is past the start is not trusted: dropped
        os.lseek(fd, start, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _hash_prefix(fd: int, length: int, hasher: hashlib._Hash) -> None:
    if hash_range(fd, hasher, 0, length) < length:
        raise AttemptError("the partial download is shorter than recorded; starting over",
                           True, restart=True)


def hash_range(fd: int, hasher: Any, start: int, end: int) -> int:
    """Hash the file's bytes [start, end) into ``hasher`` (blocking: a worker thread's);
    returns where it stopped: ``end``, or earlier if the file is shorter."""
    at = start
    while at < end:
        block = os.pread(fd, min(BATCH, end - at), at)
        if not block:
            break
        hasher.update(block)
        at += len(block)
    return at


def _write_and_hash(fd: int, hasher: hashlib._Hash, chunks: list[bytes], offset: int,
                    sync: bool = False) -> None:
    """Append ``chunks`` (the file is at ``offset``), hash them, start their writeback
    (``sync``: the body's last batch, fsync the file instead)."""
    views = [memoryview(c) for c in chunks if c]
    length = sum(map(len, views))
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]
    for chunk in chunks:
        hasher.update(chunk)
    if sync:
        os.fsync(fd)
    else:
        _start_writeback(fd, offset, length)


_SYNC_FILE_RANGE_WRITE = 2
try:
    _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
except (OSError, AttributeError):  # not Linux/glibc: the final fsync does it all
    _sync_file_range = None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk, without waiting for it (an
    optimisation only: the blob's fsync is what makes it durable)."""
    if _sync_file_range is not None and length:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
