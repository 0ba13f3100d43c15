"""The server's ASGI application: SPEC's URL space over the daemon's cache.

    /                             HTML listing of sources; root @status as JSON
    /@status, /@metrics           as the mount's files
    /@changes?since=N&wait=S      the change feed (changes.py); &after=NAME&limit=N pages it
    /@blobs/sha256/HEX            content by its sha256
    /NAME/                        listing (HTML, or JSON by Accept)
    /NAME/latest                  bytes of what latest resolves to now (a first
                                  download: as it arrives, first.py)
    /NAME/@status                 the source's @status
    /NAME/@versions/[ID]          listing, or a version's bytes
    /NAME/@TAG/[latest|ID]        listing, or bytes of a version carrying TAG
    POST /@control, /NAME/@control   control lines, through the daemon's run_control

A path is split on ``/`` before it is percent-decoded, and every segment must be a
valid source name, tag, version id or sha256 (or one of the fixed words): ``..``,
``%2F``, NUL and the like never name anything, and the only files ever opened are
blobs named by a sha256 the index holds. Bytes are streamed from a file descriptor
opened before the answer starts: a version collected meanwhile keeps sending (its
blob's inode lives while the descriptor is open); behind the nginx front the answer
is an ``X-Accel-Redirect`` to the blob file instead, after the same checks, and nginx
sends the bytes. Reads run in worker threads, one
CHUNK at a time, and each chunk waits for the client to take the previous one, so a
slow client holds only its own task.

``daemon`` is the daemon's filesystem object (fs.BuffyFS, mounted or not): its cache,
scheduler, metrics, live progress, ``run_control`` (the control files' path: one index
transaction, then the scheduler and kernel catch up) and ``report_damage``.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote, unquote_to_bytes

import trio

from buffyfs.config import ProxyConfig
from buffyfs.control import VERSION_RE
from buffyfs.errors import BadInput, BuffyError, FetchError, NotFound
from buffyfs.fetch.upstream import Forbidden
from buffyfs.http import access, changes, first
from buffyfs.http.answer import ORIGIN_BYTES_HEADERS, Answer, content_type_of
from buffyfs.http.changes import ChangeFeed
from buffyfs.http.page import StatusPage
from buffyfs.http.proxy import Proxy, is_proxy_request, own_path
from buffyfs.http.ranges import (
    BadRange,
    Span,
    byte_span,
    http_date,
    if_range_holds,
    not_modified,
)
from buffyfs.options import (
    NAME_RE,
    RESERVED_TAGS,
    TAG_RE,
    parse_duration,
    public_options,
    redact_url,
)
from buffyfs.store.index import resolve_latest, tag_latest
from buffyfs.store.records import Source, Version

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read and sent at a time
READERS = 4  # worker threads reading blob bytes at once
MAX_PATH = 2048
MAX_BODY = 64 << 10  # a control POST (control.MAX_WRITE)
SHA256_RE = re.compile(r"[0-9a-f]{64}")
IMMUTABLE = "public, max-age=31536000, immutable"
COOKIE_MAX_AGE = 30 * 86400
# what /@changes?mirror=1 gives of each version (the keys of its @status entry)
MIRRORED_VERSION_KEYS = ("id", "sha256", "size", "fetched_at", "tags", "held_until",
                         "validation", "damaged")
# The nginx front asks for X-Accel-Redirect answers with this request header, naming
# its internal location of the blob directory (contrib/nginx/buffyfs.conf)
ACCEL_HEADER = "x-buffy-accel"
ACCEL_PREFIX_RE = re.compile(r"/[A-Za-z0-9_/-]*/")
COOKIE_SAFE_RE = re.compile(r"[!#-+\--:<-\[\]-~]+")  # RFC 6265 cookie-octets

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class Request:
    def __init__(self, scope: dict[str, Any], receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        self.raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        self.headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text
        try:
            qs = scope.get("query_string", b"").decode("ascii")
            self.query = {k: v[-1] for k, v in parse_qs(qs, max_num_fields=20).items()}
        except (UnicodeDecodeError, ValueError):
            raise Answer(400, "malformed query string") from None

    def wants_json(self) -> bool:
        return "application/json" in self.headers.get("accept", "")

    def cookie(self, name: str) -> str | None:
        for part in self.headers.get("cookie", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
        return None

    async def body(self, limit: int) -> bytes:
        data = bytearray()
        while True:
            message = await self.receive()
            if message["type"] != "http.request":
                raise Answer(400, "the request body did not arrive")
            data += message.get("body", b"")
            if len(data) > limit:
                raise Answer(413, f"request body larger than {limit} bytes")
            if not message.get("more_body"):
                return bytes(data)


class App:
    def __init__(self, daemon: Any, tokens: access.Tokens, secure: bool = False,
                 proxy: ProxyConfig | None = None) -> None:
        self.daemon = daemon
        self.cache = daemon.cache
        self.index = daemon.cache.index
        self.tokens = tokens
        self.secure = secure
        self.feed = ChangeFeed(self.index)
        self.page = StatusPage(self)  # the HTML of / and /NAME/, and its buttons
        # its own threads: 200 clients must not take every worker thread of the daemon
        # (@status, control writes, collections), and more readers than cores only
        # fight over the GIL with the loop, which every FUSE request waits for
        self.readers = trio.CapacityLimiter(READERS)
        self.proxy = Proxy(self, proxy or ProxyConfig())  # proxy.py: [proxy]

    # --- ASGI ------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].replace("lifespan.", "")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":  # websockets: none here
            await send({"type": "websocket.close", "code": 1003})
            return
        status = [0]

        async def tracked(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.handle(scope, receive, tracked)
        except Answer as a:
            if not status[0]:
                await self._text(tracked, a.status, a.reason, a.headers)
        except NotFound as e:  # e.g. the source was removed while we answered
            if not status[0]:
                await self._text(tracked, 404, str(e))
        except BuffyError as e:  # the cache's trouble: one line, the server stays up
            log.error("%s %s: %s", scope.get("method"), _shown(scope), e)
            if not status[0]:
                await self._text(tracked, 503, str(e))
        except Exception:
            log.exception("answering %s %s failed unexpectedly", scope.get("method"),
                          _shown(scope))
            if not status[0]:
                await self._text(tracked, 500, "internal error (logged)")
        finally:
            log.debug("%s %s %s", scope.get("method"), _shown(scope), status[0] or "-")

    async def handle(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope.get("http_version") not in ("1.0", "1.1"):
            raise Answer(505, "HTTP/1.0 and HTTP/1.1 only")
        own = own_path(scope.get("raw_path") or b"", scope.get("server"))
        if own is not None:  # absolute-form naming this server: as if origin-form
            scope = {**scope, "raw_path": own}
        elif is_proxy_request(scope["method"], scope.get("raw_path") or b""):
            # the proxied URL's query is the origin's, not ours (proxy.py)
            req = Request({**scope, "query_string": b""}, receive)
            return await self.proxy.answer(req, send, scope.get("query_string", b""))
        req = Request(scope, receive)
        parts = self._parts(req.raw_path)
        if req.method == "POST":
            if parts not in (["@control"],) and not (len(parts) == 2 and parts[1] == "@control"):
                raise Answer(405, "only @control takes POST", [("Allow", "GET, HEAD")])
            if self.page.is_form(req):  # a button of the status page (cookie + CSRF)
                return await self.page.control_form(req, send, parts[0] if len(parts) == 2
                                                     else None)
            self._allow(req, "control")
            return await self._control(req, send, parts[0] if len(parts) == 2 else None)
        if req.method not in ("GET", "HEAD"):
            raise Answer(405, f"method {req.method[:20]} not allowed",
                         [("Allow", "GET, HEAD, POST")])
        if "token" in req.query:
            return await self._take_token(req, send)
        self._allow(req, "read")
        await self._route(req, send, parts)

    # --- access ----------------------------------------------------------------------

    def _allow(self, req: Request, want: access.Scope) -> None:
        refused = access.decide(self.tokens, want, access.bearer(req.headers.get(
            "authorization")), req.cookie(access.COOKIE))
        if refused is not None:
            status, reason = refused
            extra = [("WWW-Authenticate", 'Bearer realm="buffyfs"')] if status == 401 else []
            raise Answer(status, reason, extra)

    async def _take_token(self, req: Request, send: Send) -> None:
        """``?token=T``: set the cookie and send the browser on to the same URL without
        the token (it would stay in the history and in links otherwise)."""
        token = req.query["token"]
        if self.tokens.scope_of(token) is None:
            raise Answer(401, "unknown token", [("WWW-Authenticate", 'Bearer realm="buffyfs"')])
        if not COOKIE_SAFE_RE.fullmatch(token):
            raise Answer(400, "this token cannot be carried in a cookie: send it as "
                         "Authorization: Bearer TOKEN")
        rest = "&".join(f"{quote(k)}={quote(v)}" for k, v in req.query.items() if k != "token")
        # one leading slash: "//host/..." would send the browser to another site
        path = "/" + req.raw_path.decode("latin-1").lstrip("/")
        location = quote(path, safe="/%@:") + (f"?{rest}" if rest else "")
        cookie = (f"{access.COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; "
                  f"Max-Age={COOKIE_MAX_AGE}" + ("; Secure" if self.secure else ""))
        await self._text(send, 303, "token taken\n",
                         [("Location", location), ("Set-Cookie", cookie)])

    # --- routing ---------------------------------------------------------------------

    @staticmethod
    def _parts(raw_path: bytes) -> list[str]:
        """The decoded segments of a path (split before decoding: %2F is no separator)."""
        if len(raw_path) > MAX_PATH:
            raise Answer(414, f"path longer than {MAX_PATH} bytes")
        if not raw_path.startswith(b"/"):
            raise Answer(400, "the request target must be a path")
        try:
            parts = [unquote_to_bytes(p).decode("utf-8") for p in raw_path[1:].split(b"/")]
        except UnicodeDecodeError:
            raise Answer(404, "no such name (not UTF-8)") from None
        if any("\0" in p or "/" in p for p in parts):
            raise Answer(404, "no such name")
        return parts

    async def _route(self, req: Request, send: Send, parts: list[str]) -> None:
        if parts == [""]:
            return await self._root(req, send)
        head, rest = parts[0], parts[1:]
        if head == "@status" and not rest:
            data = await trio.to_thread.run_sync(self.cache.root_status)
            return await self._json(send, data)
        if head == "@metrics" and not rest:
            text = await trio.to_thread.run_sync(self.daemon.metrics.render, self.index)
            return await self._bytes(send, 200, text, "text/plain; version=0.0.4; charset=utf-8")
        if head == "@changes" and not rest:
            return await self._changes(req, send)
        if head == "@blobs" and len(rest) == 2 and rest[0] == "sha256":
            return await self._blob(req, send, rest[1])
        if head == "@control" and not rest:
            raise Answer(405, "@control takes POST", [("Allow", "POST")])
        if not _is_name(head):
            raise Answer(404, f"no such name {head[:80]!r}")
        src = self._source(head)
        if rest in ([], [""]):
            return await self._source_listing(req, send, head, src)
        word, tail = rest[0], rest[1:]
        if word == "latest" and not tail:
            return await self._latest(req, send, head, src)
        if word == "newest" and not tail:  # the newest version, tagged failed or not
            with self.index.read() as r:
                v = r.newest(head)
            if v is None:
                raise Answer(404, f"{head!r} has no version yet")
            return await self._version(req, send, head, v, mutable=True)
        if word == "@status" and not tail:
            data = await trio.to_thread.run_sync(
                self.cache.source_status, head, self.daemon.live_progress(),
                set(self.daemon.open_inos))
            return await self._json(send, data)
        if word == "@control" and not tail:
            raise Answer(405, "@control takes POST", [("Allow", "POST")])
        if word == "@versions":
            if tail in ([], [""]):
                return await self._version_listing(req, send, head, None)
            if len(tail) == 1:
                return await self._version(req, send, head, self._version_of(head, tail[0]))
        tag = word[1:]
        if word.startswith("@") and TAG_RE.fullmatch(tag) and tag not in RESERVED_TAGS:
            if tail in ([], [""]):
                return await self._version_listing(req, send, head, tag)
            if len(tail) == 1:
                with self.index.read() as r:
                    tagged = [v for v in r.versions(head) if tag in v.tags]
                if tail[0] == "latest":
                    v = tag_latest(tagged, tag)
                    if v is None:
                        raise Answer(404, f"no usable version of {head!r} is tagged {tag!r}")
                    return await self._version(req, send, head, v, mutable=True)
                for v in tagged:
                    if v.id == tail[0]:
                        return await self._version(req, send, head, v)
                raise Answer(404, f"{head!r} has no version {tail[0][:40]!r} tagged {tag!r}")
        raise Answer(404, "no such name")

    def _source(self, name: str) -> Source:
        with self.index.read() as r:
            src = r.source(name)
        if src is None:
            raise Answer(404, f"no source named {name!r}")
        return src

    def _version_of(self, name: str, vid: str) -> Version:
        v = None
        if VERSION_RE.fullmatch(vid):
            with self.index.read() as r:
                v = r.version(name, vid)
        if v is None:
            raise Answer(404, f"source {name!r} has no version {vid[:40]!r}")
        return v

    # --- bytes -----------------------------------------------------------------------

    async def _latest(self, req: Request, send: Send, name: str, src: Source) -> None:
        """What ``latest`` resolves to now: as an open of the mount's ``latest`` (an
        on-open source checks first; no version yet waits for the first download)."""
        scheduler = self.daemon.scheduler
        options = src.options
        if scheduler is not None and options.get("refresh") == "on-open" \
                and not options.get("pinned"):
            await scheduler.check_on_open(name, parse_duration(options.get("open_wait", "5s")))
        for tries_left in (1, 0):  # a blob found damaged at open: once more, what is now
            with self.index.read() as r:  # one transaction: this runs for every revalidation
                src = r.source(name) or src
                versions = r.versions(name)
                failures = r.state(name).consecutive_failures
            v = resolve_latest(src, versions)
            if v is None and not versions and \
                    await first.answer_while_downloading(self, req, send, name):
                return
            if v is None:
                v = await self._wait_latest(name)
            if await self._send_version(req, send, name, v, bool(failures), mutable=True):
                return
            if not tries_left:
                raise Answer(503, f"the latest version of {name!r} is damaged in the cache; "
                             "it is being downloaded again")
        raise AssertionError("unreachable")

    async def _wait_latest(self, name: str) -> Version:
        with self.index.read() as r:  # (it came while we waited for a stream: first.py)
            v = r.latest(name)
        if v is not None:
            return v
        status = await trio.to_thread.run_sync(self.cache.source_status, name)
        scheduler = self.daemon.scheduler
        if scheduler is not None and not status["versions"]:
            try:
                await scheduler.wait_first_version(name)
            except FetchError as e:
                raise Answer(503, f"{name}: no version: {e}") from None
            with self.index.read() as r:
                v = r.latest(name)
            if v is not None:
                return v
        reason = (status.get("last_error") or {}).get("message") or "no usable version"
        raise Answer(503, f"{name}: latest cannot be served: {reason}")

    async def _version(self, req: Request, send: Send, name: str, v: Version,
                       mutable: bool = False) -> None:
        with self.index.read() as r:
            stale = r.state(name).consecutive_failures > 0 and bool(r.latest(name))
        if not await self._send_version(req, send, name, v, stale, mutable):
            raise Answer(503, f"version {v.id} of {name!r} is damaged in the cache; it is "
                         "being downloaded again")

    def _open(self, name: str, v: Version) -> int | None:
        """An fd of the version's blob after the cheap checks the mount makes (there,
        right size); None if damaged (then marked so, and downloaded again). No await
        between the index read that found ``v`` and this open: a collection commits
        in a worker thread, but unlinks only after it, on the loop."""
        if v.damaged:
            return None
        sha = v.sha256
        try:
            fd = self.cache.blobs.open_blob(sha)
        except FileNotFoundError:
            with self.index.read() as r:
                still = r.version(name, v.id)
            if still is None:  # collected between the read and the open
                raise Answer(404, f"version {v.id} of {name!r} was just collected") from None
            self.daemon.report_damage(sha, "blob file missing", "open")
            return None
        except OSError as e:
            log.error("blob of version %s unreadable: %s", v.id, e.strerror)
            return None
        size = os.fstat(fd).st_size
        if size != v.size:
            os.close(fd)
            self.daemon.report_damage(sha, f"blob file has {size} bytes, {v.size} expected",
                                      "open")
            return None
        return fd

    async def _send_version(self, req: Request, send: Send, name: str, v: Version,
                            stale: bool, mutable: bool) -> bool:
        """Answer with the version; False (nothing sent) if its blob is damaged."""
        extra = [("X-Buffy-Version", v.id), ("X-Buffy-Stale", "1" if stale else "0")]
        if v.remote and getattr(self.daemon, "replica", None) is not None \
                and await self._send_remote(req, send, name, v, mutable, extra,
                                            f"version {v.id} of {name!r}"):
            return True  # a replica's version not held yet: as it came from the hub
        return await self._send_file(req, send, v.size, v.sha256,
                                     datetime.fromisoformat(v.fetched_at), mutable, extra,
                                     v.content_type, lambda: self._open(name, v))

    async def _send_remote(self, req: Request, send: Send, name: str, v: Version,
                           mutable: bool, extra: list[tuple[str, str]], what: str) -> bool:
        """A replica's version whose bytes are not here yet: answered as they arrive
        from the hub (first.send_arriving: the headers once the hub's answer starts,
        the last chunk only once the sha256 matched, else the answer is cut short; a
        Range waits for its bytes to arrive). False (nothing sent) once the cache holds
        the bytes: the caller sends them from there. The nginx front is sent the blob
        file, so it waits for the whole blob."""
        sha, size = v.sha256, v.size
        modified = datetime.fromisoformat(v.fetched_at)
        if not_modified(req.headers, f'"{sha}"', modified):  # 304: no bytes needed
            return await self._send_file(req, send, size, sha, modified, mutable, extra,
                                         None, lambda: None)
        headers = self._file_headers(sha, modified, mutable, extra)
        span = self._span(req, size, sha, modified, headers)
        try:
            if req.headers.get(ACCEL_HEADER) is not None:
                await self.daemon.replica.hold(name, v)
                return False
            live = await self.daemon.replica.wait_body(name, v)
        except FetchError as e:
            raise Answer(503, f"{what} is not available: {e}") from None
        if live is None:
            return False
        headers += [("Content-Type", content_type_of(v.content_type)),
                    ("X-Buffy-Streaming", "1"), *ORIGIN_BYTES_HEADERS]
        await first.send_arriving(self, req, send, live, name, span, headers)
        return True

    async def _blob(self, req: Request, send: Send, sha: str) -> None:
        if not SHA256_RE.fullmatch(sha):
            raise Answer(404, "not a sha256 (64 lowercase hex digits)")
        if getattr(self.daemon, "replica", None) is not None:
            found = await self._remote_version_of(sha)
            if found is not None and await self._send_remote(req, send, *found, False, [],
                                                             f"blob {sha}"):
                return
        with self.index.read() as r:
            ref = r.blob_ref(sha)
        if ref is None or ref.refs <= 0 or ref.damaged:
            raise Answer(404, f"no blob {sha}")
        try:
            fd = self.cache.blobs.open_blob(sha)
        except OSError:
            raise Answer(404, f"no blob {sha}") from None
        try:
            st = os.fstat(fd)
            if st.st_size != ref.size:
                raise Answer(503, f"blob {sha} is damaged in the cache")
            await self._send_file(req, send, st.st_size, sha,
                                  datetime.fromtimestamp(st.st_mtime, UTC), False, [], None,
                                  lambda: os.dup(fd))
        finally:
            os.close(fd)

    async def _remote_version_of(self, sha: str) -> tuple[str, dict[str, Any]] | None:
        """On a serving replica, a mirrored version naming a blob this cache does not
        hold yet (a replica of this replica asks for it): its bytes come from the hub,
        as a read of that version's would."""
        if self.cache.blobs.path(sha).exists():
            return None

        def find() -> tuple[str, Version] | None:
            with self.index.read() as r:
                for name in r.source_names():
                    for v in r.versions(name):
                        if v.remote and v.sha256 == sha:
                            return name, v
            return None

        return await trio.to_thread.run_sync(find)

    async def _send_file(self, req: Request, send: Send, size: int, sha: str,
                         modified: datetime, mutable: bool, extra: list[tuple[str, str]],
                         content_type: str | None, open_fd: Callable[[], int | None]) -> bool:
        """Answer with the bytes of a file (304, 416, 200 or 206, or the X-Accel-Redirect
        for the nginx front), opened with ``open_fd`` only when bytes are to be sent
        (and before the answer starts); False if it gives None (nothing sent)."""
        headers = self._file_headers(sha, modified, mutable, extra)
        if not_modified(req.headers, f'"{sha}"', modified):
            await self._start(send, 304, headers)
            await send({"type": "http.response.body", "body": b""})
            return True
        span = self._span(req, size, sha, modified, headers)
        fd = open_fd()
        if fd is None:
            return False
        try:
            await self._send_open(req, send, fd, size, sha, span, headers, content_type)
        finally:
            os.close(fd)
        return True

    @staticmethod
    def _file_headers(sha: str, modified: datetime, mutable: bool,
                      extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [("ETag", f'"{sha}"'), ("Last-Modified", http_date(modified)),
                ("Cache-Control", "no-cache" if mutable else IMMUTABLE),
                ("Accept-Ranges", "bytes"), *extra]

    @staticmethod
    def _span(req: Request, size: int, sha: str, modified: datetime,
              headers: list[tuple[str, str]]) -> Span | None:
        """The bytes a ``Range`` asks for (None: all of them); 416 if none can be."""
        if not if_range_holds(req.headers.get("if-range"), f'"{sha}"', modified):
            return None
        try:
            return byte_span(req.headers.get("range"), size)
        except BadRange as e:
            raise Answer(416, f"range not satisfiable: {e}",
                         [("Content-Range", f"bytes */{size}"), *headers]) from None

    async def _send_open(self, req: Request, send: Send, fd: int, size: int, sha: str,
                         span: Span | None, headers: list[tuple[str, str]],
                         content_type: str | None) -> None:
        accel = req.headers.get(ACCEL_HEADER)
        if accel is not None and ACCEL_PREFIX_RE.fullmatch(accel):
            # the nginx front (contrib/nginx): it sends the bytes from the blob file
            headers += [("Content-Type", content_type_of(content_type)),
                        ("X-Accel-Redirect", f"{accel}{sha[:2]}/{sha}"),
                        ("Content-Length", "0")]
            await self._start(send, 200, headers)
            return await send({"type": "http.response.body", "body": b""})
        start, length = (span.start, span.length) if span else (0, size)
        headers += [("Content-Type", content_type_of(content_type)),
                    ("Content-Length", str(length)), *ORIGIN_BYTES_HEADERS]
        if span:
            headers.append(("Content-Range", span.content_range()))
        await self._start(send, 206 if span else 200, headers)
        if req.method == "HEAD":
            return await send({"type": "http.response.body", "body": b""})
        offset, end = start, start + length
        while offset < end:
            chunk = await trio.to_thread.run_sync(os.pread, fd, min(CHUNK, end - offset), offset,
                                                  limiter=self.readers)
            if not chunk:  # the file shrank under us: cut the answer short (the client
                log.error("blob %s ends at byte %d, before %d: answer cut", sha, offset, end)
                return  # sees a body shorter than Content-Length)
            offset += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": offset < end})
            self.daemon.metrics.bytes_served.inc(len(chunk))

    # --- listings ----------------------------------------------------------------------

    async def _root(self, req: Request, send: Send) -> None:
        if not req.wants_json():
            return await self.page.root(req, send)  # the status page (page.py)
        data = await trio.to_thread.run_sync(self.cache.root_status)
        await self._json(send, data)

    async def _source_listing(self, req: Request, send: Send, name: str,
                              src: Source) -> None:
        with self.index.read() as r:
            versions = r.versions(name)
            latest = r.latest(name)
        tags = sorted({"valid", *(t for v in versions for t in v.tags)})
        entries = ["latest", "@status", "@control", "@versions/", *(f"@{t}/" for t in tags)]
        if req.wants_json():
            return await self._json(send, {"name": name, "latest": latest.id if latest
                                           else None, "tags": tags, "entries": entries})
        await self.page.source(req, send, name)  # the source's status page (page.py)

    async def _version_listing(self, req: Request, send: Send, name: str,
                               tag: str | None) -> None:
        with self.index.read() as r:
            versions = r.versions(name)
        if tag is not None:
            versions = [v for v in versions if tag in v.tags]
            if not versions and tag != "valid":
                raise Answer(404, f"no version of {name!r} is tagged {tag!r}")
        entries = [{"id": v.id, "size": v.size, "sha256": v.sha256, "fetched_at": v.fetched_at,
                    "tags": v.tags} for v in versions]
        newest = tag_latest(versions, tag) if tag is not None else None
        if req.wants_json():
            obj: dict[str, Any] = {"name": name, "versions": entries}
            if tag is not None:
                obj = {"name": name, "tag": tag, "latest": newest.id if newest else None,
                       "versions": entries}
            return await self._json(send, obj)
        base = f"/{quote(name)}/{'@' + tag if tag else '@versions'}/"
        rows = [(base + "latest", "latest", newest.id)] if newest else []
        rows += [(base + e["id"], e["id"], f"{e['size']} bytes, {','.join(e['tags'])}")
                 for e in entries]
        await self._html(send, f"{name}/{'@' + tag if tag else '@versions'}", rows)

    # --- control and changes ---------------------------------------------------------

    async def _control(self, req: Request, send: Send, source: str | None) -> None:
        if source is not None:
            if not _is_name(source):
                raise Answer(404, f"no such name {source[:80]!r}")
            self._source(source)
        data = await req.body(MAX_BODY)
        try:
            await self.daemon.run_control(data, source)
        except Forbidden as e:  # a replica whose hub refuses it (replica.py)
            raise Answer(403, str(e)) from None
        except (BadInput, NotFound) as e:
            raise Answer(400, str(e)) from None
        except BuffyError as e:
            raise Answer(503, f"control write failed: {e}") from None
        await self._text(send, 200, "ok")

    async def _changes(self, req: Request, send: Send) -> None:
        try:
            since = int(req.query.get("since", "0"))
            wait = float(req.query.get("wait", "0"))
            if not 0 <= wait < float("inf"):
                raise ValueError(wait)
        except ValueError:
            raise Answer(400, "since must be an integer and wait a number of seconds "
                         "(at most 60 are waited)") from None
        after, limit = _feed_page(req)
        feed = await self.feed.wait_since(since, wait)
        if after is not None or limit is not None:  # a page of it (a replica's first sync)
            feed = changes.page(feed, after, limit)
        if req.query.get("mirror") == "1":  # a replica's sync in one answer (replica.py)
            feed["mirror"] = await trio.to_thread.run_sync(self._mirrored, feed["sources"])
            body = await trio.to_thread.run_sync(_compact_json, feed)  # big: off the loop
            return await self._bytes(send, 200, body, "application/json")
        await self._json(send, feed)

    def _mirrored(self, names: list[str]) -> dict[str, Any]:
        """``NAME -> what a replica mirrors of it`` (null: no such source any more), in
        one read: the keys of its ``@status`` a replica reads, without the rest (the
        whole @status of 10,000 sources takes minutes to build)."""
        out: dict[str, Any] = {}
        with self.index.read() as r:
            for name in names:
                src = r.source(name)
                if src is None:
                    out[name] = None
                    continue
                out[name] = {
                    "url": redact_url(src.url),
                    "options": public_options(src.options),
                    "pinned": src.pin if src.options.get("pinned") else None,
                    "versions": [{k: getattr(v, k) for k in MIRRORED_VERSION_KEYS}
                                 for v in r.versions(name)],
                }
        return out

    # --- answers ---------------------------------------------------------------------

    @staticmethod
    async def _start(send: Send, status: int, headers: list[tuple[str, str]]) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.lower().encode(), v.encode("latin-1", "replace"))
                                for k, v in headers]})

    async def _bytes(self, send: Send, status: int, body: bytes, content_type: str,
                     headers: list[tuple[str, str]] | None = None) -> None:
        await self._start(send, status, [("Content-Type", content_type),
                                         ("Content-Length", str(len(body))),
                                         ("Cache-Control", "no-cache"),
                                         ("X-Content-Type-Options", "nosniff"),
                                         *(headers or [])])
        await send({"type": "http.response.body", "body": body})

    async def _text(self, send: Send, status: int, text: str,
                    headers: list[tuple[str, str]] | None = None) -> None:
        body = (text.rstrip("\n") + "\n").encode("utf-8", "replace")
        await self._bytes(send, status, body, "text/plain; charset=utf-8", headers)

    async def _json(self, send: Send, obj: object) -> None:
        body = (json.dumps(obj, indent=2) + "\n").encode()
        await self._bytes(send, 200, body, "application/json")

    async def _html(self, send: Send, title: str, rows: list[tuple[str, str, str]]) -> None:
        items = "\n".join(f'<li><a href="{html.escape(href)}">{html.escape(text)}</a>'
                          + (f" <small>{html.escape(note)}</small>" if note else "") + "</li>"
                          for href, text, note in rows)
        page = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title></head>\n<body><h1>{html.escape(title)}"
                f"</h1>\n<ul>\n{items}\n</ul>\n</body></html>\n")
        await self._bytes(send, 200, page.encode(), "text/html; charset=utf-8",
                          [("Content-Security-Policy", "default-src 'none'")])


def _compact_json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _feed_page(req: Request) -> tuple[str | None, int | None]:
    """``after`` and ``limit`` of a paged ``/@changes`` (changes.page); 400 if bad."""
    after = req.query.get("after")
    try:
        limit = int(req.query["limit"]) if "limit" in req.query else None
        if limit is not None and not 1 <= limit <= changes.MAX_PAGE:
            raise ValueError(limit)
    except ValueError:
        raise Answer(400, f"limit must be a number of sources, 1 to {changes.MAX_PAGE}"
                     ) from None
    return after, limit


def _is_name(text: str) -> bool:
    return bool(NAME_RE.fullmatch(text)) and text[0] not in ".@"


def _shown(scope: dict[str, Any]) -> str:
    """The request's path for the log: no query string (it may carry a token)."""
    raw = re.sub(rb"^([A-Za-z]+://)[^/]*@", rb"\1", scope.get("raw_path") or b"")  # user info
    return raw[:200].decode("latin-1").encode("unicode_escape").decode("ascii")
