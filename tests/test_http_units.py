"""The server's pure pieces without a server: byte ranges, conditionals, tokens."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from buffyfs.errors import BadInput
from buffyfs.http.access import Tokens, bearer, decide, is_loopback
from buffyfs.http.ranges import BadRange, Span, byte_span, if_range_holds, not_modified
from buffyfs.http.server import parse_listen, prepare

WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
DATE = "Fri, 02 Jan 2026 03:04:05 GMT"


def test_byte_spans():
    assert byte_span(None, 10) is None
    assert byte_span("items=0-1", 10) is None
    assert byte_span("bytes=0-0", 10) == Span(0, 0, 10)
    assert byte_span("bytes=-3", 10) == Span(7, 9, 10)
    assert byte_span("bytes=8-", 10) == Span(8, 9, 10)
    assert byte_span("bytes=2-3, 6-7", 10) == Span(2, 7, 10)
    assert byte_span("bytes=20-30, 1-1", 10) == Span(1, 1, 10)
    for bad in ("bytes=10-", "bytes=-0", "bytes=5-1", "bytes=x", "bytes=", "bytes=1-2-3"):
        with pytest.raises(BadRange):
            byte_span(bad, 10)
    with pytest.raises(BadRange):
        byte_span("bytes=0-0", 0)


@given(st.text(max_size=80), st.integers(0, 10**12))
def test_byte_span_never_fails_otherwise(header, size):
    try:
        span = byte_span(header, size)
    except BadRange:
        return
    assert span is None or 0 <= span.start <= span.end < size


def test_conditionals():
    etag = '"abc"'
    assert not_modified({"if-none-match": '"abc"'}, etag, WHEN)
    assert not_modified({"if-none-match": 'W/"abc", "x"'}, etag, WHEN)
    assert not not_modified({"if-none-match": '"x"', "if-modified-since": DATE}, etag, WHEN)
    assert not_modified({"if-modified-since": DATE}, etag, WHEN)
    assert not not_modified({"if-modified-since": "Thu, 01 Jan 2026 00:00:00 GMT"}, etag, WHEN)
    assert not not_modified({"if-modified-since": "junk"}, etag, WHEN)
    assert if_range_holds(None, etag, WHEN) and if_range_holds(etag, etag, WHEN)
    assert if_range_holds(DATE, etag, WHEN)
    assert not if_range_holds('W/"abc"', etag, WHEN)
    assert not if_range_holds("Thu, 01 Jan 2026 00:00:00 GMT", etag, WHEN)


def test_token_decisions():
    none = Tokens()
    both = Tokens(read=[b"r"], control=[b"c"])
    assert decide(none, "read", None, None) is None
    assert decide(none, "control", None, None)[0] == 401
    assert decide(both, "read", None, None)[0] == 401
    assert decide(both, "read", "r", None) is None and decide(both, "read", None, "c") is None
    assert decide(both, "read", "x", None)[0] == 401
    assert decide(both, "control", "r", None)[0] == 403
    assert decide(both, "control", None, "c")[0] == 401  # the cookie opens reads only
    assert decide(both, "control", "c", None) is None
    assert bearer("Bearer  tok ") == "tok" and bearer("Basic x") is None and bearer("") is None


def test_listen_addresses():
    assert parse_listen("127.0.0.1:8631") == ("127.0.0.1", 8631)
    assert parse_listen("[::1]:80") == ("::1", 80)
    for bad in ("8631", "host:", ":80", "a b:80", "h:99999", "h:x"):
        with pytest.raises(BadInput):
            parse_listen(bad)
    assert is_loopback("127.5.5.5") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::")
    with pytest.raises(BadInput, match="--public"):
        prepare("0.0.0.0:1", False, Tokens(), None, None)
    prepare("0.0.0.0:1", True, Tokens(), None, None)
    prepare("0.0.0.0:1", False, Tokens(read=[b"r"]), None, None)
