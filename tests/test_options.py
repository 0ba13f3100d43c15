"""Unit tests of buffyfs.options: names, tags, URLs, durations, sizes, source options."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from buffyfs.errors import BadInput
from buffyfs.fetch import policy
from buffyfs.options import (
    DEFAULT_OPTIONS,
    RESERVED_TAGS,
    check_name,
    check_tag,
    check_url,
    normalize_options,
    parse_duration,
    parse_size,
    public_options,
    redact_url,
)
from buffyfs.store.records import SourceState

# --- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a", "a..b", "A-z_0.9", "x" * 128, "pubtator", "0", "a.", "a-", "_x", "-x"]
)
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "../x", "a/b", "/a", "@x", ".x", ".", "..", "x" * 129, "x" * 200, "", "a\0b", "a b",
        " a", "a\n", "a\tb", "é", "a:b", "a*", "a\\b", None, 5, b"abc",
    ],
)
def test_check_name_rejects(name: object) -> None:
    with pytest.raises(BadInput):
        check_name(name)  # type: ignore[arg-type]


def test_check_name_error_is_one_clear_line() -> None:
    with pytest.raises(BadInput) as e:
        check_name("../etc")
    message = str(e.value)
    assert "\n" not in message
    assert "'../etc'" in message


# --- tags --------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["valid", "failed", "keep", "a", "a" + "b" * 31, "x1_y-z"])
def test_check_tag_accepts(tag: str) -> None:
    assert check_tag(tag) == tag


@pytest.mark.parametrize(
    "tag",
    ["", "A", "Valid", "1a", "_a", "-a", "a" * 33, "a b", "a.b", "a/b", "é", "@valid",
     *sorted(RESERVED_TAGS)],
)
def test_check_tag_rejects(tag: str) -> None:
    with pytest.raises(BadInput):
        check_tag(tag)


def test_reserved_tags_are_the_spec_words() -> None:
    # the SPEC's words (part 2: unpacked, blobs, changes, proxy), and ours: newest
    # (SOURCE/newest, a version word like latest)
    assert RESERVED_TAGS == {"versions", "status", "control", "tags", "latest", "metrics",
                             "newest", "unpacked", "blobs", "changes", "proxy"}


# --- URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://example.org/",
        "https://example.org/pubtator.gz",
        "http://127.0.0.1:8080/x?a=b&c=d",
        "https://user:pass@example.org/",
        "http://[::1]:9/x",
        "HTTPS://EXAMPLE.ORG/",
    ],
)
def test_check_url_accepts_http_and_https(url: str) -> None:
    assert check_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.org/x",
        "gopher://example.org/",
        "data:text/plain,hello",
        "example.org/x",
        "garbage",
        "",
        "http://",
        "http:///path",
        "https://",
        "http://exa mple.org/",
        "http://example.org/a b",
        " http://example.org/",
        "http://example.org/\n",
        "http://example.org/\0",
        "http://[::1/",
        None,
        42,
    ],
)
def test_check_url_rejects(url: object) -> None:
    with pytest.raises(BadInput):
        check_url(url)  # type: ignore[arg-type]


def test_check_url_error_hides_credentials() -> None:
    with pytest.raises(BadInput) as e:
        check_url("ftp://alice:s3cr3t-pw@example.org/x")
    assert "s3cr3t-pw" not in str(e.value)
    assert "ftp" in str(e.value)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://user:pass@example.org/x", "https://example.org/x"),
        ("https://user@example.org/", "https://example.org/"),
        ("http://:pw@h:8080/p?q=1", "http://h:8080/p?q=1"),
        ("http://example.org/a@b", "http://example.org/a@b"),  # no userinfo: unchanged
        ("http://example.org/?next=a@b", "http://example.org/?next=a@b"),
        ("https://example.org/", "https://example.org/"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_url_password_containing_at_sign() -> None:
    # httpx (like browsers and curl) splits userinfo from the host at the LAST '@' of
    # the authority, so this URL authenticates as user "user" with password "p@ss" to
    # host "host". The redacted form must not keep any part of the password.
    url = "https://user:p@ss@host/x"
    shown = redact_url(url)
    assert "ss@" not in shown
    assert shown == "https://host/x"


# --- durations and sizes -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [("2s", 2), ("30m", 1800), ("6h", 21600), ("1d", 86400), ("90s", 90), ("007s", 7)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "s", "2", "2 s", " 2s", "2s ", "2w", "2S", "1.5h", "-1s", "0s", "0d", "2sec",
             2, None, True, "1d2h"],
)
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(BadInput) as e:
        parse_duration(text, "refresh")
    assert "refresh" in str(e.value)


def test_parse_duration_huge_number_is_bad_input_not_crash() -> None:
    # 5000 digits: int() refuses strings over 4300 digits with ValueError
    with pytest.raises(BadInput):
        parse_duration("9" * 5000 + "s")


@pytest.mark.parametrize(
    "value, size",
    [("0", 0), ("100", 100), ("1K", 1024), ("2M", 2 << 20), ("50G", 50 << 30),
     ("1T", 1 << 40), (12345, 12345), (0, 0)],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    "value", ["", "G", "1.5G", "1KB", "1 K", "-1", "1X", -1, True, None, 1.5, "1k2"]
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(BadInput):
        parse_size(value, "max_cache_size")


def test_parse_size_huge_number_is_bad_input_not_crash() -> None:
    with pytest.raises(BadInput):
        parse_size("9" * 5000 + "G")


# --- normalize_options -------------------------------------------------------------------


def test_normalize_defaults() -> None:
    out = normalize_options({})
    assert out == DEFAULT_OPTIONS
    assert out is not DEFAULT_OPTIONS
    assert out["headers"] is not DEFAULT_OPTIONS["headers"]


def test_normalize_typed_values() -> None:
    given = {
        "refresh": "6h", "attempt_timeout": "2s", "max_attempts": 2, "keep_versions": 0,
        "method": "post", "body": '{"q": 1}', "headers": {"Authorization": "Bearer x"},
    }
    out = normalize_options(given)
    assert out == {**DEFAULT_OPTIONS, **given, "method": "POST"}


def test_normalize_pinned() -> None:
    assert normalize_options({"pinned": True})["pinned"] is True
    assert normalize_options({"pinned": "true"})["pinned"] is True
    assert normalize_options({"pinned": "false"})["pinned"] is False
    for bad in ("maybe", "", 2, None):
        with pytest.raises(BadInput):
            normalize_options({"pinned": bad})


def test_normalize_validate_typed_and_dotted() -> None:
    typed = normalize_options({"validate": {"min_size": 1000, "cmd": "gzip -t"}})
    assert typed["validate"] == {"min_size": 1000, "cmd": "gzip -t"}
    dotted = normalize_options({"validate.min_size": "1K", "validate.cmd": "gzip -t"})
    assert dotted["validate"] == {"min_size": 1024, "cmd": "gzip -t"}
    for bad in ({"validate.colour": "red"}, {"validate.min_size": "big"},
                {"validate.sha256": "abc"}, {"validate": {"cmd": ""}}, {"validate": "gzip -t"}):
        with pytest.raises(BadInput):
            normalize_options(bad)


def test_normalize_string_values_from_control_lines() -> None:
    out = normalize_options(
        {"max_attempts": "3", "keep_versions": "0", "refresh": "never", "method": "GET"}
    )
    assert out["max_attempts"] == 3
    assert out["keep_versions"] == 0
    assert out["refresh"] == "never"
    assert out["method"] == "GET"


def test_normalize_dashed_keys() -> None:
    out = normalize_options({"max-attempts": "2", "attempt-timeout": "5s"})
    assert out["max_attempts"] == 2
    assert out["attempt_timeout"] == "5s"


def test_normalize_dotted_headers() -> None:
    out = normalize_options({"headers.Authorization": "Bearer x", "headers.Accept": "a/b"})
    assert out["headers"] == {"Authorization": "Bearer x", "Accept": "a/b"}


def test_normalize_dotted_header_name_with_dashes_is_kept() -> None:
    # Only the option key is spelled with dashes or underscores; an HTTP header name
    # like X-Api-Key must reach the origin as X-Api-Key, not X_Api_Key.
    out = normalize_options({"headers.X-Api-Key": "k"})
    assert out["headers"] == {"X-Api-Key": "k"}


def test_normalize_over_base_merges_headers_without_mutating_base() -> None:
    base = normalize_options({"headers": {"A": "1"}, "max_attempts": 4})
    out = normalize_options({"headers.B": "2", "refresh": "1h"}, base=base)
    assert out["headers"] == {"A": "1", "B": "2"}
    assert out["max_attempts"] == 4
    assert out["refresh"] == "1h"
    assert base["headers"] == {"A": "1"}
    assert base["refresh"] == "1d"


def test_normalize_headers_table_replaces() -> None:
    base = normalize_options({"headers": {"A": "1"}})
    out = normalize_options({"headers": {"B": "2"}}, base=base)
    assert out["headers"] == {"B": "2"}


@pytest.mark.parametrize(
    "raw",
    [
        {"colour": "red"},
        {"url2": "x"},
        {"url": "http://example.org/"},  # the URL is not an option of normalize_options
        {"foo.bar": "1"},
        {"": "1"},
        {".x": "1"},
        {"refresh": "sometimes"},
        {"refresh": "0s"},
        {"refresh": 5},
        {"attempt_timeout": "30"},
        {"attempt_timeout": 30},
        {"max_attempts": "0"},
        {"max_attempts": 0},
        {"max_attempts": "-1"},
        {"max_attempts": "two"},
        {"max_attempts": True},
        {"max_attempts": 1.5},
        {"max_attempts": " 2"},
        {"keep_versions": "-1"},
        {"method": "DELETE"},
        {"method": 1},
        {"body": 5},
        {"headers": "Authorization: x"},
        {"headers": {"Bad Name": "x"}},
        {"headers": {"A": 1}},
        {"headers": {"A": "x\r\nInjected: 1"}},
        {"headers.": "x"},
        {"headers.A:B": "x"},
        {"headers.A": "x\ny"},
        {"max_attempts.x": "1"},
        {"refresh.x": "1"},
    ],
)
def test_normalize_rejects(raw: dict) -> None:
    with pytest.raises(BadInput):
        normalize_options(raw)


@pytest.mark.parametrize("raw,key,value", [
    ({"open_wait": "5s"}, "open_wait", "5s"),
    ({"open-wait": "2s"}, "open_wait", "2s"),
    ({"refresh": "on-open"}, "refresh", "on-open"),
    ({"refresh": "cron:30 2 * * *"}, "refresh", "cron:30 2 * * *"),
    ({"proxy": "http://squid:3128"}, "proxy", "http://squid:3128"),
])
def test_normalize_policy_and_proxy_options(raw: dict, key: str, value: str) -> None:
    assert normalize_options(raw)[key] == value


@pytest.mark.parametrize("raw", [
    {"refresh": "cron:* * *"}, {"refresh": "cron:99 * * * *"}, {"refresh": "on-close"},
    {"open_wait": "0s"}, {"proxy": "ftp://h/"},
])
def test_normalize_rejects_bad_policies(raw: dict) -> None:
    with pytest.raises(BadInput):
        normalize_options(raw)


@pytest.mark.parametrize("value", ["²", "١٢", "9" * 5000])
def test_normalize_odd_digit_strings_are_bad_input_not_crash(value: str) -> None:
    # "²".isdigit() is True but int("²") raises ValueError; 5000 digits exceed int()'s
    # limit. Anything a control line can carry must end in BadInput (or be accepted).
    try:
        out = normalize_options({"max_attempts": value})
    except BadInput:
        return
    assert isinstance(out["max_attempts"], int) and out["max_attempts"] >= 1


def test_normalize_header_value_error_does_not_echo_value() -> None:
    with pytest.raises(BadInput) as e:
        normalize_options({"headers.Authorization": "Bearer sekrit\r\nX: y"})
    assert "sekrit" not in str(e.value)


def test_normalize_non_ascii_header_value_is_refused() -> None:
    # httpx encodes header values as ASCII: a value it cannot send must be refused when
    # the option is given (BadInput, value not echoed), not crash every later refresh
    # with UnicodeEncodeError.
    with pytest.raises(BadInput) as e:
        normalize_options({"headers.Authorization": "Bearer sekrit-tök"})
    assert "sekrit" not in str(e.value)


@pytest.mark.parametrize("duration", ["99999999999d", "999999999d", "3000000d", "365d"])
def test_accepted_refresh_duration_is_usable_by_the_policy(duration: str) -> None:
    # A duration the options accept must not crash the scheduler later
    # (datetime + timedelta overflows past year 9999).
    try:
        opts = normalize_options({"refresh": duration})
    except BadInput:
        return
    now = datetime(2024, 1, 1, tzinfo=UTC)
    state = SourceState(last_check="2024-01-01T00:00:00Z")
    due = policy.next_check(opts, state, True, now)
    assert due is None or due >= now


def test_public_options_hides_header_values() -> None:
    opts = normalize_options({"headers": {"Authorization": "Bearer sekrit"}})
    shown = public_options(opts)
    assert "sekrit" not in repr(shown)
    assert shown["headers"] == {"Authorization": "<hidden>"}
    assert opts["headers"] == {"Authorization": "Bearer sekrit"}


def test_an_empty_value_removes_a_header_a_check_or_the_body() -> None:
    base = normalize_options({"headers": {"Authorization": "Bearer x", "Accept": "a/b"},
                              "validate": {"min_size": 10, "cmd": "gzip -t"},
                              "method": "POST", "body": "q=1"})
    out = normalize_options({"headers.Authorization": "", "validate.cmd": "", "body": ""},
                            base=base)
    assert out["headers"] == {"Accept": "a/b"}
    assert out["validate"] == {"min_size": 10}
    assert out["body"] is None
    # removing what is not there is fine; a misspelt name is still an error
    assert normalize_options({"headers.X-Absent": ""}, base=base)["headers"] == base["headers"]
    for bad in ({"validate.colour": ""}, {"headers.bad name": ""}):
        with pytest.raises(BadInput):
            normalize_options(bad, base=base)
