"""The hub client of a replica: the hub's JSON answers, its blobs by sha256, its
control endpoint, over the ``--upstream`` URLs tried in order.

Every request goes to the first URL that answers; a URL that fails (no connection,
a 5xx; for the change feed and a source's status also a 401, 403 or 404 and an
answer that is no feed or status: a misconfigured cache in between) hands the request
to the next one. The token (``upstream_token``) goes in an
``Authorization: Bearer`` header and never into a message.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio

from buffyfs.errors import BadInput, FetchError, NotFound
from buffyfs.fetch import downloader
from buffyfs.fetch.refresh import backoff
from buffyfs.fetch.segments import LiveDownload
from buffyfs.store.blobs import hash_file

log = logging.getLogger(__name__)

FEED_WAIT = 10.0  # seconds a /@changes long-poll waits at the hub
FEED_SLACK = 10.0  # seconds past that wait before a silent feed counts as a cut link
TIMEOUT = 30.0  # seconds of silence before a request to the hub fails
CONNECT = 3.0  # seconds to connect: a hub cut off hands over to the next URL soon
BLOB_ATTEMPTS = 5  # attempts at one blob on each URL, as a refresh's max_attempts


class Forbidden(FetchError):
    """The hub refused a control write (no token, or one it does not take)."""


class HubDown(FetchError):
    """No URL of ``--upstream`` answered."""


class Oversize(downloader.AttemptError):
    """A blob answer ran past the size the hub announced for it."""


@dataclass
class Answer:
    url: str  # the hub URL that answered
    status: int
    body: bytes
    since: int | None = None  # a change feed's: the serial it was asked after
    decoded: Any = field(default=None, repr=False)  # json(), once taken

    def json(self) -> Any:
        """The body's JSON, decoded once (feed_problem looks at a feed page, the
        replica then takes it: one decode of a big page, not two)."""
        if self.decoded is None:
            self.decoded = json.loads(self.body)
        return self.decoded


class Upstream:
    def __init__(self, urls: list[str], token: str | None,
                 client: httpx.AsyncClient) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.token = token
        self.client = client

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", **(extra or {})}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _scrub(self, text: str) -> str:
        return downloader.scrub(text, [self.token] if self.token else [])

    async def request(self, method: str, path: str | Callable[[str], str],
                      content: bytes | None = None, timeout: float = TIMEOUT,
                      first: str | None = None, only: str | None = None,
                      refuse: Callable[[Answer], str | None] | None = None) -> Answer:
        """``method path`` at the first URL that answers (``first``, when given, is
        asked before the others; ``only``: that URL alone; ``path`` may depend on the
        URL); an answer below 500 counts (404 and 400 too) unless ``refuse`` gives a
        reason not to take it. HubDown with every URL's error when none answers."""
        order = self.urls if first is None else [first] + [u for u in self.urls if u != first]
        if only is not None:
            order = [only]
        errors = []
        for base in order:
            where = path(base) if callable(path) else path
            try:
                r = await self.client.request(method, base + where, content=content,
                                              headers=self._headers(),
                                              timeout=httpx.Timeout(timeout, connect=CONNECT))
            except httpx.HTTPError as e:
                errors.append(f"{base}: {downloader.describe_http_error(e, downloader.Request(base))}")
                continue
            if r.status_code >= 500:
                errors.append(f"{base}: HTTP {r.status_code}")
                continue
            answer = Answer(base, r.status_code, r.content)
            if refuse is not None and (why := refuse(answer)) is not None:
                log.info("hub %s: %s", base, why)
                errors.append(f"{base}: {why}")
                continue
            return answer
        raise HubDown(self._scrub("hub unreachable: " + "; ".join(errors)))

    async def changes(self, since: int, wait: float, hub: str | None,
                      limit: int | None = None, after: str | None = None) -> Answer:
        """The change feed after ``since`` of ``hub``, the URL whose serial it is; any
        other URL is asked for everything (its serials are its own). ``limit``: in
        pages of that many sources, this one the page after the name ``after``
        (http/changes.py; a hub without pages answers everything at once)."""
        paging = "" if limit is None else f"&limit={limit}" + (
            "" if after is None else f"&after={quote(after)}")

        def path(base: str) -> str:
            if base == hub:
                return f"/@changes?since={since}&wait={wait:g}&mirror=1{paging}"
            return f"/@changes?since=-1&wait=0&mirror=1{paging}"

        # A long-poll answers after ``wait`` at the latest, and its answer is small: a
        # link cut without a reset shows after wait + FEED_SLACK (20 s), not a minute.
        answer = await self.request("GET", path, timeout=wait + FEED_SLACK if wait else TIMEOUT,
                                    refuse=feed_problem)
        answer.since = since if answer.url == hub else -1  # its later pages: the same
        return answer

    async def serial(self, hub: str) -> int:
        """The serial of ``hub``'s change feed now (HubDown if it does not answer)."""
        a = await self.request("GET", "/@changes?since=-1&wait=0&limit=1", only=hub,
                               refuse=feed_problem)
        if a.status != 200:
            raise FetchError(f"hub {a.url}: HTTP {a.status} for /@changes")
        return int(a.json()["serial"])

    async def source(self, name: str, first: str | None) -> tuple[str, dict[str, Any] | None]:
        """The hub's ``@status`` of ``name`` (None: the hub has no such source). As for
        the feed, a refusal (401, 403) or an answer that is no source's status hands
        over to the next URL; so does a 404, and the source counts as gone only when
        no URL that answered has it."""
        gone: list[str] = []  # the URLs that answered 404

        def refuse(answer: Answer) -> str | None:
            if answer.status == 404:
                gone.append(answer.url)
                return f"HTTP 404 for {name}/@status"
            return status_problem(answer)

        try:
            a = await self.request("GET", f"/{quote(name)}/@status", first=first,
                                   refuse=refuse)
        except HubDown:
            if gone:
                return gone[0], None
            raise
        if a.status != 200:
            raise FetchError(f"hub {a.url}: HTTP {a.status} for {name}/@status")
        return a.url, a.json()

    async def control(self, data: bytes, source: str | None, hub: str | None = None) -> None:
        """Forward a control write to ``hub`` (the one followed: None, the first that
        answers); returns once the hub applied it. Forbidden when the hub refuses the
        token, BadInput with the hub's reason for a 400."""
        if not self.token:
            raise Forbidden("this replica has no upstream_token: control commands for "
                            "mirrored sources go to the hub, which needs one")
        path = "/@control" if source is None else f"/{quote(source)}/@control"
        a = await self.request("POST", path, content=data, only=hub)
        reason = a.body.decode(errors="replace").strip()
        if a.status in (401, 403):
            raise Forbidden(f"the hub refused the control write: {reason}")
        if a.status == 404:
            raise NotFound(f"the hub: {reason}")
        if a.status >= 400:
            raise BadInput(f"the hub: {reason}")

    async def fetch_blob(self, sha256: str, size: int, partial: Path,
                         grow: Callable[[int], Awaitable[int]] | None = None,
                         live: LiveDownload | None = None) -> None:
        """Download blob ``sha256`` into ``partial``, continuing what it holds (a
        blob never changes: any prefix of it is good), until its sha256 matches.
        A mismatch drops the bytes and asks once more with ``Cache-Control:
        no-cache`` (a cache between us and the hub refreshes its copy), then the
        next URL. FetchError when every URL failed. ``live``: what readers of the
        file as it arrives follow (streaming.py); told of every byte written and
        of every byte dropped."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):  # it becomes a file name
            raise FetchError(f"not a sha256: {sha256[:80]!r}")
        live = live or LiveDownload(sha256)

        async def body_starts(start: int, total: int | None,
                              point: downloader.Resume | None,
                              content_type: str | None) -> None:
            _check_total(total, size)  # another size than the hub's: refused
            live.body_starts(start, size)

        async def written(fd: int, end: int) -> None:
            live.arrived(0, end)

        errors = []
        for base in self.urls:
            extra: dict[str, str] = {}
            attempt = 0
            while attempt < BLOB_ATTEMPTS:
                attempt += 1
                req = downloader.Request(f"{base}/@blobs/sha256/{sha256}",
                                         headers=self._headers(extra),
                                         attempt_timeout=TIMEOUT)
                have = partial.stat().st_size if partial.exists() else 0
                resume = downloader.Resume(have, f'"{sha256}"', None) if 0 < have < size else None
                if have >= size:  # a whole file left by an earlier run: check it
                    got = await trio.to_thread.run_sync(hash_file, partial)
                    if got == sha256:
                        return
                    live.drop()
                    partial.unlink(missing_ok=True)
                    resume = None
                try:
                    done = await downloader.download(self.client, req, partial, resume=resume,
                                                     on_body=body_starts,
                                                     grow=lambda n: _capped(n, size, grow),
                                                     on_written=written)
                except Oversize as e:  # a cache (or hub) sending other bytes: as a mismatch
                    live.drop()  # readers given some of these bytes fail (EIO)
                    partial.unlink(missing_ok=True)
                    log.warning("blob %s from %s: %s: dropped", sha256, base, e)
                    errors.append(f"{base}: {e}")
                    if extra:
                        break
                    extra = {"Cache-Control": "no-cache"}
                    attempt = 0
                    continue
                except downloader.AttemptError as e:
                    errors.append(f"{base}: {e}")
                    if e.restart:
                        live.drop()
                        partial.unlink(missing_ok=True)
                    if not e.retryable:
                        break
                    await trio.sleep(backoff(attempt, e.retry_after))
                    continue
                assert isinstance(done, downloader.Downloaded)
                if done.sha256 == sha256 and done.size == size:
                    return
                live.drop()  # readers given some of these bytes fail (EIO)
                partial.unlink(missing_ok=True)
                log.warning("blob %s from %s had the wrong sha256 (%s, %d bytes): dropped",
                            sha256, base, done.sha256, done.size)
                errors.append(f"{base}: wrong sha256")
                if extra:  # asked past the caches already: the next URL
                    break
                extra = {"Cache-Control": "no-cache"}
                attempt = 0
        raise FetchError(self._scrub(f"blob {sha256[:12]}… not fetched: "
                                     + "; ".join(errors[-3:])))


def _check_total(total: int | None, size: int) -> None:
    """A blob answer announcing another size than the hub's is refused at its start."""
    if total is not None and total != size:
        raise Oversize(f"the answer is {total} bytes, the blob {size}", True, restart=True)


async def _capped(n: int, size: int, grow: Callable[[int], Awaitable[int]] | None) -> int:
    """``download``'s ``grow``: never past the blob's size (a body without a length
    that runs on is cut off there, not left to fill the disk)."""
    if n > size:
        raise Oversize(f"more bytes than the blob's {size}", True, restart=True)
    return min(await grow(n), size) if grow is not None else size


def answer_problem(answer: Answer, what: str, refusals: tuple[int, ...],
                   is_valid: Callable[[Any], bool], invalid: str) -> str | None:
    """Why ``answer`` (to ``what``) is not what was asked, so the next URL is asked: a
    refusal (``refusals``: a hub that does not know us, or a cache in between answering
    for it), a body that is not JSON, or JSON that ``is_valid`` rejects (``invalid``
    says what it is not). None for an acceptable answer, or another status (the caller
    says what it is)."""
    if answer.status in refusals:
        return f"HTTP {answer.status} for {what}"
    if answer.status != 200:
        return None
    try:
        body = answer.json()
    except ValueError:
        return f"the answer to {what} is not JSON"
    return None if is_valid(body) else f"the answer to {what} is no {invalid}"


def is_feed(feed: Any) -> bool:
    """A ``/@changes`` page: a serial, the source names, the mirror part."""
    return isinstance(feed, dict) and isinstance(feed.get("serial"), int) \
        and not isinstance(feed["serial"], bool) and isinstance(feed.get("sources"), list) \
        and all(isinstance(n, str) for n in feed["sources"]) \
        and isinstance(feed.get("mirror") or {}, dict)


def feed_problem(answer: Answer) -> str | None:
    """Why an answer of ``/@changes`` is no change feed (then the next URL is asked)."""
    return answer_problem(answer, "/@changes", (401, 403, 404), is_feed, "change feed")


def status_problem(answer: Answer) -> str | None:
    """Why an answer of ``NAME/@status`` is no source's status (a 404 is the
    caller's: Upstream.source)."""
    return answer_problem(answer, "@status", (401, 403), lambda body: isinstance(body, dict),
                          "source's status")


def partial_dir(cache_root: Path) -> Path:
    """Where blobs from the hub arrive (not ``partial/``: its sweep knows sources)."""
    path = cache_root / "upstream"
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path
