"""Unit tests of buffyfs.control.parse: the grammar of the @control files."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buffyfs.control import MAX_WRITE, Command, parse
from buffyfs.errors import BadInput

# --- root scope: add / remove ------------------------------------------------------------


def test_add_minimal() -> None:
    assert parse(b"add pubtator https://example.org/p.gz\n", "root") == [
        Command("add", ["pubtator", "https://example.org/p.gz"], {})
    ]


def test_add_without_trailing_newline() -> None:
    assert parse(b"add a http://h/a", "root") == [Command("add", ["a", "http://h/a"], {})]


def test_add_with_options() -> None:
    line = b"add x http://h/p refresh=6h max_attempts=2 headers.Authorization='Bearer x y'\n"
    [cmd] = parse(line, "root")
    assert cmd.word == "add"
    assert cmd.args == ["x", "http://h/p"]
    assert cmd.options == {
        "refresh": "6h", "max_attempts": "2", "headers.Authorization": "Bearer x y",
    }


def test_add_with_quoted_json_body() -> None:
    [cmd] = parse(b"""add api http://h/q method=POST body='{"q": 1}'""", "root")
    assert cmd.options == {"method": "POST", "body": '{"q": 1}'}


def test_add_dashed_option_keys() -> None:
    [cmd] = parse(b"add x http://h/ max-attempts=2 attempt-timeout=2s", "root")
    assert cmd.options == {"max-attempts": "2", "attempt-timeout": "2s"}


@pytest.mark.parametrize(
    "url",
    ["http://h/q?a=1", "http://h/q?a=1&b=2", "https://h/x?token=abc==&y=", "http://h/?=x"],
)
def test_add_url_with_equals_in_query(url: str) -> None:
    line = f"add x {url} refresh=1h".encode()
    [cmd] = parse(line, "root")
    assert cmd.args == ["x", url]
    assert cmd.options == {"refresh": "1h"}


def test_add_quoted_url_with_ampersand_and_equals() -> None:
    [cmd] = parse(b"add x 'http://h/q?a=1&b=2'", "root")
    assert cmd.args == ["x", "http://h/q?a=1&b=2"]


def test_remove() -> None:
    assert parse(b"remove a..b", "root") == [Command("remove", ["a..b"], {})]


def test_multi_line_write() -> None:
    data = b"add a http://h/a\nadd b http://h/b refresh=never\nremove c\n"
    cmds = parse(data, "root")
    assert [(c.word, c.args, c.options) for c in cmds] == [
        ("add", ["a", "http://h/a"], {}),
        ("add", ["b", "http://h/b"], {"refresh": "never"}),
        ("remove", ["c"], {}),
    ]


def test_crlf_lines() -> None:
    cmds = parse(b"remove a\r\nremove b\r\n", "root")
    assert [c.args for c in cmds] == [["a"], ["b"]]


def test_comments_and_blank_lines() -> None:
    data = b"# a comment\n\n   \n\tadd a http://h/a   # trailing comment\n# end\n"
    assert parse(data, "root") == [Command("add", ["a", "http://h/a"], {})]


def test_hash_inside_a_word_is_not_a_comment() -> None:
    # A POSIX shell starts a comment only at the start of a word: `echo a#b` prints
    # a#b. Here shlex (comments=True) cuts the word at '#' and drops the rest of the
    # line silently, so values are truncated and later options vanish.
    [cmd] = parse(b"set body=a#b max_attempts=2", "source")
    assert cmd.options == {"body": "a#b", "max_attempts": "2"}
    [cmd] = parse(b"add x http://h/p#frag refresh=1h", "root")
    assert cmd.args == ["x", "http://h/p#frag"]
    assert cmd.options == {"refresh": "1h"}


# --- source scope: refresh / set ---------------------------------------------------------


def test_refresh() -> None:
    assert parse(b"refresh\n", "source") == [Command("refresh", [], {})]


def test_set_options() -> None:
    [cmd] = parse(b"set refresh=30m max_attempts=3 headers.Authorization='Bearer t'", "source")
    assert cmd == Command(
        "set", [], {"refresh": "30m", "max_attempts": "3", "headers.Authorization": "Bearer t"}
    )


def test_set_quoted_body() -> None:
    [cmd] = parse(b"""set body='{"q": 1}'""", "source")
    assert cmd.options == {"body": '{"q": 1}'}


def test_set_double_quoted_value_with_escapes() -> None:
    [cmd] = parse(b'set body="say \\"hi\\""', "source")
    assert cmd.options == {"body": 'say "hi"'}


def test_set_url_with_equals_in_query() -> None:
    [cmd] = parse(b"set url=https://h/x?a=b&c=d==", "source")
    assert cmd.options == {"url": "https://h/x?a=b&c=d=="}


def test_set_empty_body() -> None:
    [cmd] = parse(b"set body=", "source")
    assert cmd.options == {"body": ""}


VID = "20240506T070809Z-0123abcd"


@pytest.mark.parametrize(
    "line, expected",
    [
        (f"tag {VID} keep", Command("tag", [VID, "keep"], {})),
        ("tag latest failed", Command("tag", ["latest", "failed"], {})),
        (f"untag {VID} valid", Command("untag", [VID, "valid"], {})),
        ("pin", Command("pin", [], {})),
        ("pin latest", Command("pin", ["latest"], {})),
        (f"pin {VID}", Command("pin", [VID], {})),
        ("unpin", Command("unpin", [], {})),
    ],
)
def test_tag_and_pin_commands(line: str, expected: Command) -> None:
    assert parse(line.encode(), "source") == [expected]


def test_source_multi_line() -> None:
    cmds = parse(b"set refresh=1h\nrefresh\n", "source")
    assert [c.word for c in cmds] == ["set", "refresh"]


# --- bad input ---------------------------------------------------------------------------

BAD_ROOT = [
    b"frobnicate",
    b"refresh",  # a source word in the root
    b"set refresh=1h",
    b"ADD a http://h/",
    b"add",
    b"add a",
    b"add a http://h/ extra",  # a third positional word
    b"remove",
    b"remove a b",
    b"add ../x http://h/",
    b"add a/b http://h/",
    b"add .x http://h/",
    b"add @x http://h/",
    b"add . http://h/",
    b"add .. http://h/",
    b"add '' http://h/",
    b"add " + b"x" * 200 + b" http://h/",
    b"remove ../x",
    b"remove 'a b'",
    b"add a ftp://h/x",
    b"add a file:///etc/passwd",
    b"add a http://",
    b"add a garbage",
    b"add a 'http://h/a b'",
    b"add a http://h/ url=http://h/other",
    b"add a http://h/ colour=red",
    b"add a http://h/ max_attempts=0",
    b"add a http://h/ refresh=sometimes",
    b"add a http://h/ pinned=maybe",
    b"add a http://h/ validate.colour=red",
    b"add a http://h/ open_wait=0s",
    b"add a http://h/ refresh=cron:61 * * * *",
    b"add a http://h/ proxy=socks5://h:1080",
    b"tag latest valid",
    b"pin",
    b"add a 'http://h/",
    b"add a http://h/ body='abc",
    b'add a http://h/ body="abc',
    b"add a http://h/ body=abc\\",
]

BAD_SOURCE = [
    b"frobnicate",
    b"add a http://h/",  # a root word in a source
    b"remove a",
    b"refresh now",
    b"refresh x=1",
    b"set",
    b"set refresh",
    b"set 1h",
    b"set =1h",
    b"set colour=red",
    b"set url=ftp://h/x",
    b"set url=",
    b"set max_attempts=0",
    b"set max_attempts=x",
    b"set method=DELETE",
    b"set open_wait=soon",
    b"set headers.=x",
    b"set body='unbalanced",
    b"tagx latest valid",
    b"tag",
    b"tag latest",
    b"tag latest valid extra",
    b"tag 20240101T000000Z-abcdef01 Valid",
    b"tag 20240101T000000Z-abcdef01 latest",
    b"tag 20240101T000000Z-abcdef01 @valid",
    b"tag nonsense valid",
    b"tag ../20240101T000000Z-abcdef01 valid",
    b"untag latest",
    b"untag bogus keep",
    b"pin a b",
    b"pin nonsense",
    b"unpin latest",
]


@pytest.mark.parametrize("data", [b"", b"\n", b"\n\n", b"# only a comment\n"])
def test_empty_writes_do_nothing(data: bytes) -> None:
    assert parse(data, "root") == [] and parse(data, "source") == []


@pytest.mark.parametrize("data", BAD_ROOT)
def test_bad_root_lines(data: bytes) -> None:
    with pytest.raises(BadInput) as e:
        parse(data, "root")
    assert str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("data", BAD_SOURCE)
def test_bad_source_lines(data: bytes) -> None:
    with pytest.raises(BadInput) as e:
        parse(data, "source")
    assert str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("scope", ["root", "source"])
def test_non_utf8(scope: str) -> None:
    with pytest.raises(BadInput, match="UTF-8"):
        parse(b"remove \xff\xfe\n", scope)  # type: ignore[arg-type]


@pytest.mark.parametrize("scope", ["root", "source"])
def test_nul_byte(scope: str) -> None:
    with pytest.raises(BadInput, match="NUL"):
        parse(b"refresh\0\n", scope)  # type: ignore[arg-type]


@pytest.mark.parametrize("scope", ["root", "source"])
def test_over_long_write(scope: str) -> None:
    with pytest.raises(BadInput, match="too long"):
        parse(b"#" * (MAX_WRITE + 1), scope)  # type: ignore[arg-type]


def test_write_of_exactly_max_size_is_parsed() -> None:
    data = b"remove a\n" + b"#" * (MAX_WRITE - len(b"remove a\n"))
    assert len(data) == MAX_WRITE
    assert parse(data, "root") == [Command("remove", ["a"], {})]


def test_one_bad_line_rejects_the_whole_write_and_names_it() -> None:
    with pytest.raises(BadInput) as e:
        parse(b"add a http://h/a\nremove ../b\nremove c\n", "root")
    assert "line 2" in str(e.value)


def test_unknown_word_error_lists_the_scope_commands() -> None:
    with pytest.raises(BadInput) as e:
        parse(b"frobnicate", "source")
    assert "refresh" in str(e.value) and "set" in str(e.value)
    assert "add" not in str(e.value)


def test_errors_do_not_echo_header_values() -> None:
    # SPEC: header values never appear in status, logs or errors; the control error
    # is shown as last_control_error in @status. An unbalanced quote must not make the
    # parser echo the line with the secret.
    secret = "sekrit-token-123"
    for data in (
        f"set headers.Authorization='Bearer {secret} max_attempts=2".encode(),
        f"set headers.Authorization='Bearer {secret}' max_attempts=0".encode(),
        f"set headers.Authorization='Bearer {secret}' colour=red".encode(),
    ):
        with pytest.raises(BadInput) as e:
            parse(data, "source")
        assert secret not in str(e.value), str(e.value)


def test_errors_do_not_echo_url_credentials() -> None:
    for data in (
        b"add x ftp://alice:pw-sekrit@h/x",
        b"add x http://alice:pw-sekrit@h/x 'unbalanced",
    ):
        with pytest.raises(BadInput) as e:
            parse(data, "root")
        assert "pw-sekrit" not in str(e.value), str(e.value)


# --- fuzzing -----------------------------------------------------------------------------

OPTION_KEYS = [
    "refresh", "max_attempts", "max-attempts", "keep_versions", "attempt_timeout", "method",
    "body", "headers", "headers.Authorization", "headers.X-Y", "url", "pinned", "validate",
    "validate.min_size", "open_wait", "", "x", "headers.",
]
words = st.sampled_from(["add", "remove", "refresh", "set", "tag", "#", "''", '"'])
values = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["1d", "0s", "2", "0", "²", "9" * 5000, "http://h/", "ftp://h/", "never",
                     "POST", "'", '"', "\\", "a#b", "on-open", "cron:* * * * *"]),
)
pairs = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(OPTION_KEYS), values)
tokens = st.one_of(
    pairs, st.text(max_size=15), st.sampled_from(["a", "..", "http://h/?a=b", "'x y'", "#"])
)
lines = st.builds(lambda w, ts: " ".join([w, *ts]), words, st.lists(tokens, max_size=5))
structured = st.builds(lambda ls: "\n".join(ls).encode(), st.lists(lines, min_size=1, max_size=4))
text_writes = st.builds(
    lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass"),
    st.lists(st.text(max_size=60), max_size=5),
)

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def _parse_or_bad_input(data: bytes, scope: str) -> None:
    try:
        result = parse(data, scope)  # type: ignore[arg-type]
    except BadInput as e:
        assert str(e)
        return
    assert isinstance(result, list)  # empty for a blank or comment-only write
    assert all(isinstance(c, Command) for c in result)
    for c in result:
        assert all(isinstance(a, str) for a in c.args)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in c.options.items())


@pytest.mark.parametrize("scope", ["root", "source"])
@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes(scope: str, data: bytes) -> None:
    _parse_or_bad_input(data, scope)


@pytest.mark.parametrize("scope", ["root", "source"])
@FUZZ
@given(data=text_writes)
def test_fuzz_random_text_lines(scope: str, data: bytes) -> None:
    _parse_or_bad_input(data, scope)


@pytest.mark.parametrize("scope", ["root", "source"])
@FUZZ
@given(data=structured)
def test_fuzz_command_shaped_lines(scope: str, data: bytes) -> None:
    _parse_or_bad_input(data, scope)


REAL_KEYS = ["refresh", "max_attempts", "max-attempts", "keep_versions", "attempt_timeout",
             "method", "body", "pinned", "headers.X-Token", "validate.min_size"]
option_values = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["²", "³s", "9" * 5000, "9" * 5000 + "s", "9" * 5000 + "K", "1e3",
                     "0x10", "-1", "1_000", "٣", " 1", "1d "]),
)
option_lines = st.builds(
    lambda kvs: " ".join(f"{k}={v}" for k, v in kvs),
    st.lists(st.tuples(st.sampled_from(REAL_KEYS), option_values), min_size=1, max_size=4),
)


@FUZZ
@given(opts=option_lines)
def test_fuzz_option_values(opts: str) -> None:
    # Every value a control line can carry ends in BadInput or an accepted command.
    _parse_or_bad_input(f"set {opts}".encode(), "source")
    _parse_or_bad_input(f"add x http://h/ {opts}".encode(), "root")
