"""HTTP validators, conditional requests and byte ranges (RFC 9110), pure: no I/O.

What a version answer decides from the request headers, in RFC 9110's order
(section 13.2.2): ``If-None-Match`` (else ``If-Modified-Since``) may make it a
``304``; then ``Range``, unless ``If-Range`` names another representation, makes it a
``206`` or a ``416``.

Multi-range requests (``bytes=0-9,100-199``) are answered as one range: the smallest
one that covers every satisfiable range asked, in one ``206`` (RFC 9110 lets a server
coalesce ranges; it never has to send ``multipart/byteranges``). A request with more
than MAX_RANGES ranges, or with a malformed byte range, is refused with ``416``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

MAX_RANGES = 64
_RANGE_RE = re.compile(r"\s*(\d{0,19})\s*-\s*(\d{0,19})\s*")


class BadRange(ValueError):
    """A ``Range`` header that cannot be satisfied or parsed: answered ``416``."""


@dataclass(frozen=True)
class Span:
    """Bytes ``start`` to ``end`` inclusive, of a representation ``size`` long."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


def http_date(t: datetime) -> str:
    """IMF-fixdate, as ``Last-Modified`` is written."""
    return format_datetime(t.astimezone(UTC).replace(microsecond=0), usegmt=True)


def parse_http_date(value: str) -> datetime | None:
    try:
        t = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


def _etags(value: str) -> list[str]:
    """The entity tags of an ``If-None-Match``/``If-Match`` list, ``W/`` dropped."""
    return [t.strip().removeprefix("W/") for t in value.split(",") if t.strip()]


def not_modified(headers: dict[str, str], etag: str, modified: datetime) -> bool:
    """Whether a GET or HEAD gets ``304``: ``If-None-Match`` matches the ETag (weak
    comparison), or, without ``If-None-Match``, nothing changed since
    ``If-Modified-Since``."""
    inm = headers.get("if-none-match")
    if inm is not None:
        tags = _etags(inm)
        return "*" in tags or etag in tags
    ims = headers.get("if-modified-since")
    if ims is not None:
        since = parse_http_date(ims)
        return since is not None and modified.replace(microsecond=0) <= since
    return False


def if_range_holds(value: str | None, etag: str, modified: datetime) -> bool:
    """Whether ``If-Range`` (absent: yes) still names this representation: a strong
    ETag equal to ours, or exactly our ``Last-Modified`` date."""
    if value is None:
        return True
    value = value.strip()
    if value.startswith('"') or value.startswith("W/"):
        return value == etag  # a weak tag never matches (strong comparison)
    when = parse_http_date(value)
    return when is not None and when == modified.replace(microsecond=0)


def byte_span(value: str | None, size: int) -> Span | None:
    """The span a ``Range`` header asks of ``size`` bytes: None for the whole
    representation (no header, or a unit other than bytes, which RFC 9110 says to
    ignore); BadRange when nothing asked is inside the file or the header is
    malformed."""
    if value is None:
        return None
    unit, sep, specs = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = specs.split(",")
    if len(parts) > MAX_RANGES:
        raise BadRange(f"more than {MAX_RANGES} ranges")
    spans = []
    for part in parts:
        m = _RANGE_RE.fullmatch(part)
        if m is None or not (m.group(1) or m.group(2)):
            raise BadRange(f"malformed byte range {part.strip()[:40]!r}")
        first, last = m.group(1), m.group(2)
        if not first:  # suffix: the last N bytes
            n = int(last)
            if n > 0 and size > 0:
                spans.append((max(0, size - n), size - 1))
            continue
        start = int(first)
        end = int(last) if last else size - 1
        if last and end < start:
            raise BadRange(f"byte range {part.strip()!r} ends before it starts")
        if start < size:
            spans.append((start, min(end, size - 1)))
    if not spans:
        raise BadRange("no requested range is inside the file")
    return Span(min(s for s, _ in spans), max(e for _, e in spans), size)
