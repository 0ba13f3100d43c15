"""The server's short answers (an error or a redirect, raised anywhere below the
application: app.py, proxy.py, page.py, first.py; sent by the application), and what
every answer with an origin's bytes says of them."""

from __future__ import annotations

import re

_TYPE_RE = re.compile(r"[\w.+-]+/[\w.+-]+(\s*;[\x20-\x7e]*)?")


class Answer(Exception):
    """A short answer (an error, a redirect) with a plain-text reason as the body."""

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or []


# Sent with every answer carrying an origin's bytes: on our origin they must never act
# as a page of ours (no scripts, no sniffing into HTML).
ORIGIN_BYTES_HEADERS = [("Content-Security-Policy", "sandbox"),
                        ("X-Content-Type-Options", "nosniff")]


def content_type_of(value: str | None) -> str:
    """The origin's type if it is a plain ``type/subtype[; params]``, else octet-stream."""
    if value and len(value) < 200 and _TYPE_RE.fullmatch(value):
        return value
    return "application/octet-stream"
