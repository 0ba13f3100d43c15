"""``--log-level debug``: one log line per HTTP request and one per response.

What a line shows: the method, the URL without credentials (options.redact_url), the
status and the length, and, for a request, the *names* of the protocol headers that
make it conditional or partial (Range, If-Range, If-None-Match, If-Modified-Since).
Never a header's value (a source's own headers are secrets) and never a body (a POST
body may carry a key). httpx's own request log stays off (log.py): it shows the URL
as given, credentials included.
"""

from __future__ import annotations

import logging

import httpx

from buffyfs.options import redact_url

log = logging.getLogger("buffyfs.http")

SHOWN_HEADER_NAMES = ("Range", "If-Range", "If-None-Match", "If-Modified-Since")


async def log_request(request: httpx.Request) -> None:
    if log.isEnabledFor(logging.DEBUG):
        sent = [name for name in SHOWN_HEADER_NAMES if name in request.headers]
        log.debug("> %s %s%s", request.method, redact_url(str(request.url)),
                  f" (with {', '.join(sent)})" if sent else "")


async def log_response(response: httpx.Response) -> None:
    if log.isEnabledFor(logging.DEBUG):
        length = response.headers.get("Content-Length")
        log.debug("< %s %s: %d %s, %s", response.request.method,
                  redact_url(str(response.request.url)), response.status_code,
                  response.reason_phrase,
                  f"{length} bytes" if length is not None else "length not given")


HOOKS = {"request": [log_request], "response": [log_response]}
