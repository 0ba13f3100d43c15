"""The server as an HTTP proxy (SPEC part 2, "The proxy interface").

Two forms of request are proxy requests:

    GET http://host/path?query HTTP/1.1            absolute-form: curl -x, http_proxy=,
                                                   requests' proxies=, urllib, wget
    GET /@proxy/https/host/path?query HTTP/1.1     the rewrite form, for https origins
                                                   (``/@proxy/http/...`` works too)

``CONNECT`` is refused with ``405`` naming the rewrite form: inside a tunnel a caching
proxy sees nothing to cache. hypercorn (0.18, on h11) hands an absolute-form target to
the application as it came: ``raw_path`` is ``b"http://host/path"`` and the query is
apart in ``query_string``; a ``CONNECT`` target (``host:443``) likewise, so the
application decides all three.

A proxied URL is served when it matches one of the ``[proxy] allow`` globs (fnmatch,
case-sensitive, on the URL as normalized here: scheme and host lower case, no default
port); anything else is ``403``, and with no glob the server proxies nothing. A target
that is not a plain URL is refused with ``400`` before anything is registered: user
info (``user@host``), a ``.`` or ``..`` segment (also percent-encoded), an encoded
slash or backslash, an encoded control character (``%0D%0A``, ``%00``), a malformed
percent escape; ``414`` past MAX_URL bytes.

The first request for a URL registers a source (``commands.apply``'s ``add``, in one
index transaction): method, URL and body are the source, with the options of ``[proxy]
defaults``; a source already registered with the same URL string, method and body is
used instead, whatever its name. The answer is that source's ``latest`` through the
server's byte answers (app.py: ETag, Range, 304, X-Buffy-Version, X-Buffy-Stale); a
first download with a known length is streamed as it arrives (first.py), one without is
waited for, and if it fails before its body starts the answer carries the origin's
status (``404`` stays ``404``) or ``502``/``504`` for a network failure or a timeout.

No header of the client's request reaches the origin. The origin sees the downloader's
request (its own User-Agent, validators, resumes) with the ``headers`` of ``[proxy]
defaults``; the client's ``Range``, ``If-None-Match``, ``If-Modified-Since``,
``If-Range`` are answered from the cache, and its ``Authorization``,
``Proxy-Authorization``, cookies and hop-by-hop headers go nowhere. So a source, the
cache's key, is method, URL and body, and nothing the client sends besides.

Access: the server's read tokens, given as ``Proxy-Authorization: Bearer T`` (what a
client configured with a proxy sends) or ``Authorization: Bearer T``; without one a
token-protected server answers ``407`` (absolute-form) or ``401`` (rewrite form).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import trio

from buffyfs.config import ProxyConfig
from buffyfs.control import Command
from buffyfs.errors import BadInput, FetchError
from buffyfs.http import access, first
from buffyfs.http.answer import Answer
from buffyfs.options import (
    DEFAULT_OPTIONS,
    check_url,
    normalize_options,
)
from buffyfs.store import commands
from buffyfs.store.index import Index
from buffyfs.store.records import Source

if TYPE_CHECKING:
    from buffyfs.http.app import App, Request, Send

log = logging.getLogger(__name__)

PREFIX = b"/@proxy/"
MAX_URL = 2048  # bytes of a proxied URL, query included
MAX_POST_BODY = 64 << 10  # a POST body becomes a source option, kept in the index
HASH_HEX = 8
MAX_NAME = 128  # a source name's length (SPEC)
MEMO_SIZE = 100_000  # entries of each memo (names, parsed targets) before it starts over

# labels of letters, digits, '-' and '_' between dots (check_url looks closer), or an IP
# literal; no pattern here backtracks more than linearly on a hostile 2 KiB target
_HOST_RE = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?|\[[0-9a-f:.]+\]")
_PATH_RE = re.compile(r"(/[A-Za-z0-9\-._~!$&'()*+,;=:@%]*)*")
_QUERY_RE = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*")
_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# encoded control characters (CR LF injection, NUL): never part of a proxied URL;
# an encoded '/' or '\\' in the path would name one thing to us and another to the origin
_CONTROL_ESCAPE_RE = re.compile(r"%([01][0-9A-Fa-f]|7[Ff])")
_SLASH_ESCAPE_RE = re.compile(r"%(2[Ff]|5[Cc])")
_DOT_SEGMENT_RE = re.compile(r"/(\.|%2[Ee]){1,2}(?=/|$)")
_NAME_CHARS_RE = re.compile(r"[^A-Za-z0-9._-]+")


def is_proxy_request(method: str, raw_path: bytes) -> bool:
    """Whether a request is the proxy's: CONNECT, an absolute-form target, or the
    rewrite form."""
    head = raw_path[:8].lower()
    return method == "CONNECT" or raw_path.startswith(PREFIX) or raw_path == PREFIX[:-1] \
        or head.startswith(b"http://") or head.startswith(b"https://")


def own_path(raw_path: bytes, server: tuple[str, int] | None) -> bytes | None:
    """The path of an absolute-form target that names this server itself (a client whose
    HTTP_PROXY is this server, asking for ``/NAME/latest`` here): an ordinary request
    then (RFC 9112, 3.2.2). None for any other target."""
    m = re.fullmatch(rb"https?://([^/?#]+)(/.*)?", raw_path, re.IGNORECASE | re.DOTALL)
    if m is None or server is None or server[1] is None:
        return None
    host, port = server
    ours = {f"{host}:{port}".lower().encode()}
    if port in (80, 443):
        ours.add(host.lower().encode())
    return (m.group(2) or b"/") if m.group(1).lower() in ours else None


def target_url(raw_path: bytes, query: bytes) -> str:
    """The normalized URL a proxy request names; BadInput (``400``) or
    TargetTooLong (``414``) if it names none that may be fetched."""
    if len(raw_path) + len(query) > MAX_URL:
        raise TargetTooLong(f"proxied URL longer than {MAX_URL} bytes")
    try:
        target, qs = raw_path.decode("ascii"), query.decode("ascii")
    except UnicodeDecodeError:
        raise BadInput("the proxied URL is not ASCII (percent-encode it)") from None
    if target.startswith(PREFIX.decode()):
        scheme, _, rest = target[len(PREFIX):].partition("/")
        if scheme not in ("http", "https"):
            raise BadInput("the rewrite form is /@proxy/https/HOST/PATH (or /@proxy/http/...)")
    else:
        scheme, sep, rest = target.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in ("http", "https"):
            raise BadInput("the proxy serves http:// and https:// URLs only")
    authority, slash, path = rest.partition("/")
    path = slash + path or "/"
    if target.startswith(PREFIX.decode()):
        # here the authority is a path segment, which clients may percent-encode
        # (pip sends 127.0.0.1%3A8080): decoded, then checked like any other
        try:
            authority = unquote(authority, errors="strict")
        except UnicodeDecodeError:
            raise BadInput("the proxied URL has no valid host") from None
    if "@" in authority:
        raise BadInput("a proxied URL may not carry user info (user@host)")
    host, port = _split_authority(authority.lower())
    if not _PATH_RE.fullmatch(path) or not _QUERY_RE.fullmatch(qs):
        raise BadInput("the proxied URL holds characters a URL may not hold unencoded")
    for part in (path, qs):
        if _ESCAPE_RE.search(part):
            raise BadInput("the proxied URL holds a malformed percent escape")
        if _CONTROL_ESCAPE_RE.search(part):
            raise BadInput("the proxied URL holds an encoded control character")
    if _SLASH_ESCAPE_RE.search(path):
        raise BadInput("the proxied URL's path holds an encoded slash or backslash")
    if _DOT_SEGMENT_RE.search(path):
        raise BadInput("the proxied URL holds a '.' or '..' segment")
    default = {"http": 80, "https": 443}[scheme]
    netloc = host if port in (None, default) else f"{host}:{port}"
    url = f"{scheme}://{netloc}{path}" + (f"?{qs}" if qs else "")
    return check_url(url)


class TargetTooLong(BadInput):
    """A proxied URL past MAX_URL: ``414``."""


def _split_authority(authority: str) -> tuple[str, int | None]:
    host, port = authority, None
    m = re.fullmatch(r"(.*):(\d{1,5})", authority)
    if m:
        host, port = m.group(1), int(m.group(2))
        if not 0 < port < 65536:
            raise BadInput("the proxied URL's port is out of range")
    if not host or not _HOST_RE.fullmatch(host):
        raise BadInput("the proxied URL has no valid host")
    return host, port


def request_key(url: str, method: str, body: str | None) -> str:
    """What the name's hash covers: the URL, or for a POST ``POST URL``, a line break
    and the body (a URL holds no line break: no two requests share a key)."""
    return url if method == "GET" else f"{method} {url}\n{body or ''}"


def source_name(url: str, method: str = "GET", body: str | None = None) -> str:
    """The name of an auto-registered source: host (and port) and path, with every run
    of characters a name may not hold as one ``_``, cut so that ``-`` and 8 hex of the
    request's sha256 end it within MAX_NAME characters."""
    digest = hashlib.sha256(request_key(url, method, body).encode()).hexdigest()[:HASH_HEX]
    rest = url.partition("://")[2]
    stem = _NAME_CHARS_RE.sub("_", rest.partition("?")[0]).strip("._-")
    stem = stem[:MAX_NAME - HASH_HEX - 1].rstrip("._-") or "proxied"
    return f"{stem}-{digest}"


def _same_request(src: Source, url: str, method: str, body: str | None) -> bool:
    opts = src.options
    return src.url == url and opts.get("method", "GET") == method \
        and (opts.get("body") or None) == (body or None)


Memo = dict[tuple[str, str, str | None], str]


def find(index: Index, url: str, method: str, body: str | None,
         memo: Memo) -> tuple[str, bool] | None:
    """The source already registered for this request, by its remembered or its own
    name: (name, has a version), or None. One short read transaction: the loop runs it."""
    name = memo.get((method, url, body)) or source_name(url, method, body)
    with index.read() as r:
        src = r.source(name)
        if src is not None and _same_request(src, url, method, body):
            return name, r.has_versions(name)
    return None


def find_or_add(index: Index, url: str, method: str, body: str | None,
                defaults: dict[str, Any], memo: Memo) -> tuple[str, bool]:
    """The source for this request, registered if there is none: (name, added).
    Blocking (a write transaction, a scan of every source): run in a worker thread."""
    key = (method, url, body)
    with index.write() as w:  # one writer at a time: two first requests add it once
        for other, src in w.sources():
            if _same_request(src, url, method, body):
                _remember(memo, key, other)
                return other, False
        name = source_name(url, method, body)
        if w.source(name) is not None:
            raise BadInput(f"a source named {name!r} exists already for another URL")
        options = {**defaults, "method": method, "body": body}
        commands.apply(w, [Command("add", [name, url], options)])
    _remember(memo, key, name)
    log.info("proxy: registered source %s for %s %s", name, method, url.partition("?")[0])
    return name, True


def _remember(memo: dict[Any, Any], key: Any, value: Any) -> None:
    if len(memo) >= MEMO_SIZE:
        memo.clear()
    memo[key] = value


def origin_status(message: str) -> int:
    """The status that tells a proxy client why a first download failed: the origin's
    own 4xx/5xx, else 504 for a timeout or a stall and 502 for any other failure."""
    m = re.search(r"\bHTTP (\d{3})\b", message)
    if m and 400 <= int(m.group(1)) <= 599:
        return int(m.group(1))
    if re.search(r"timed out|stalled|too slow|took longer", message):
        return 504
    return 502


class Proxy:
    """The proxy half of the server's application (``App.proxy``)."""

    def __init__(self, app: App, config: ProxyConfig) -> None:
        self.app = app
        self.config = config
        self.defaults = normalize_options({}, base=config.defaults or DEFAULT_OPTIONS)
        self.memo: Memo = {}  # (method, URL, body) -> the source's name, if not its own
        self.targets: dict[tuple[bytes, bytes], str] = {}  # request target -> its URL

    def allows(self, url: str) -> bool:
        return any(fnmatch.fnmatchcase(url, glob) for glob in self.config.allow)

    async def answer(self, req: Request, send: Send, query: bytes) -> None:
        rewrite = req.raw_path.startswith(PREFIX)
        if req.method == "CONNECT":
            raise Answer(405, "CONNECT is not served: a caching proxy cannot see inside a "
                         "tunnel. Ask for https URLs in the rewrite form: "
                         "GET /@proxy/https/HOST/PATH?QUERY on this server",
                         [("Allow", "GET, HEAD" + (", POST" if self.config.allow_post else ""))])
        self._allow(req, rewrite)
        url = self.targets.get((req.raw_path, query))
        if url is None:
            try:
                url = target_url(req.raw_path, query)
            except TargetTooLong as e:
                raise Answer(414, str(e)) from None
            except BadInput as e:
                raise Answer(400, str(e)) from None
            _remember(self.targets, (req.raw_path, query), url)
        if not self.config.allow:
            raise Answer(403, "this server proxies no URL ([proxy] allow is empty)")
        if not self.allows(url):
            raise Answer(403, "this URL is not among those the proxy serves ([proxy] allow)")
        body = None
        if req.method == "POST":
            if not self.config.allow_post:
                raise Answer(405, "POST is not proxied here ([proxy] allow_post = false)",
                             [("Allow", "GET, HEAD")])
            try:
                body = (await req.body(MAX_POST_BODY)).decode("utf-8") or None
            except UnicodeDecodeError:
                raise Answer(400, "a proxied POST body must be UTF-8 text") from None
        elif req.method not in ("GET", "HEAD"):
            raise Answer(405, f"method {req.method[:20]} is not proxied",
                         [("Allow", "GET, HEAD" + (", POST" if self.config.allow_post else ""))])
        method = "POST" if req.method == "POST" else "GET"
        found = find(self.app.index, url, method, body, self.memo)
        if found is None:
            try:
                name, added = await trio.to_thread.run_sync(
                    find_or_add, self.app.index, url, method, body, self.defaults, self.memo)
            except BadInput as e:
                raise Answer(409, str(e)) from None
            daemon = self.app.daemon
            if added:
                if daemon.scheduler is not None:
                    daemon.scheduler.sync(name)  # plan it: the first download starts now
                await daemon.source_changed_now(name)
            found = (name, False)
        name, has_version = found
        if not has_version:
            if await first.answer_while_downloading(self.app, req, send, name):
                return
            await self._wait_first(name)
        await self.app._latest(req, send, name, self.app._source(name))

    def _allow(self, req: Request, rewrite: bool) -> None:
        token = access.bearer(req.headers.get("proxy-authorization")) \
            or access.bearer(req.headers.get("authorization"))
        refused = access.decide(self.app.tokens, "read", token, req.cookie(access.COOKIE))
        if refused is None:
            return
        challenge = 'Bearer realm="buffyfs"'
        if rewrite:
            raise Answer(401, refused[1], [("WWW-Authenticate", challenge)])
        raise Answer(407, "a read token is needed (Proxy-Authorization: Bearer TOKEN)",
                     [("Proxy-Authenticate", challenge)])

    async def _wait_first(self, name: str) -> None:
        """Wait for the first version of a source that has none; a failed first
        download is answered with the origin's status (origin_status)."""
        with self.app.index.read() as r:
            if r.latest(name) is not None or r.has_versions(name):
                return
        scheduler = self.app.daemon.scheduler
        if scheduler is None:
            return
        try:
            await scheduler.wait_first_version(name)
        except FetchError as e:
            message = str(e)
            with self.app.index.read() as r:
                message = (r.state(name).last_error or {}).get("message") or message
            raise Answer(origin_status(message), f"{name}: no version: {message}") from None
