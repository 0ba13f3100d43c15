"""Unit tests of buffyfs.config: the TOML config file, loaded and validated (no mount)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buffyfs.config import Config, DaemonConfig, load_config
from buffyfs.errors import BadInput
from buffyfs.options import DEFAULT_OPTIONS, normalize_options

SPEC_EXAMPLE = """\
[daemon]                      # all optional
cache = "/var/cache/buffyfs"
max_cache_size = "50G"        # hard quota; binary units K, M, G, T (1024-based)
max_downloads = 4             # concurrent downloads in all
max_downloads_per_host = 2
log_level = "info"

[defaults]                    # any source option, for every source
refresh = "1d"

[sources.pubtator]
url = "https://example.org/pubtator.gz"
validate = { min_size = 1000000, cmd = "gzip -t" }
"""


def write(tmp_path: Path, text: str | bytes, name: str = "config.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    return path


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def bad(tmp_path: Path, text: str | bytes) -> str:
    """The message of the BadInput that loading ``text`` raises; checks it is one line."""
    path = write(tmp_path, text)
    with pytest.raises(BadInput) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message and "\r" not in message, message
    assert info.value.exit_code == 2
    return message


# --- what loads --------------------------------------------------------------------------


def test_spec_example_loads(tmp_path: Path) -> None:
    path = write(tmp_path, SPEC_EXAMPLE)
    config = load_config(path)
    assert config.path == path
    assert config.daemon == DaemonConfig(
        cache="/var/cache/buffyfs", max_cache_size=50 * 1024**3, max_downloads=4,
        max_downloads_per_host=2, log_level="info",
    )
    assert config.defaults == normalize_options({"refresh": "1d"})
    assert list(config.sources) == ["pubtator"]
    url, opts = config.sources["pubtator"]
    assert url == "https://example.org/pubtator.gz"
    assert opts["validate"] == {"min_size": 1_000_000, "cmd": "gzip -t"}
    assert opts["refresh"] == "1d"
    assert opts == normalize_options(
        {"validate": {"min_size": 1_000_000, "cmd": "gzip -t"}}, base=config.defaults
    )


def test_empty_file_gives_all_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, "")
    assert config.daemon == DaemonConfig()
    assert config.daemon.cache is None and config.daemon.max_cache_size is None
    assert (config.daemon.max_downloads, config.daemon.max_downloads_per_host) == (4, 2)
    assert config.daemon.log_level == "info"
    assert config.defaults == DEFAULT_OPTIONS
    assert config.sources == {}


def test_empty_tables(tmp_path: Path) -> None:
    config = load_text(tmp_path, "[daemon]\n[defaults]\n[sources]\n")
    assert config.daemon == DaemonConfig()
    assert config.defaults == DEFAULT_OPTIONS
    assert config.sources == {}


def test_source_without_options_gets_builtin_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[sources.a]\nurl = "http://h/a"\n')
    assert config.sources == {"a": ("http://h/a", DEFAULT_OPTIONS)}


def test_defaults_apply_under_each_sources_own_keys(tmp_path: Path) -> None:
    config = load_text(tmp_path, """
[defaults]
refresh = "6h"
max_attempts = 2
keep_versions = 9
headers = { X-Team = "t" }

[sources.a]
url = "http://h/a"
max_attempts = 3

[sources.b]
url = "http://h/b"
refresh = "never"
headers = { Authorization = "Bearer x" }
""")
    assert config.defaults["refresh"] == "6h"
    assert config.defaults["max_attempts"] == 2
    _, a = config.sources["a"]
    assert (a["refresh"], a["max_attempts"], a["keep_versions"]) == ("6h", 3, 9)
    assert a["headers"] == {"X-Team": "t"}
    _, b = config.sources["b"]
    assert (b["refresh"], b["max_attempts"], b["keep_versions"]) == ("never", 2, 9)
    # exactly what normalize_options makes: a table option replaces the default's table
    assert b == normalize_options({"refresh": "never",
                                   "headers": {"Authorization": "Bearer x"}},
                                  base=config.defaults)
    assert b["headers"] == {"Authorization": "Bearer x"}
    # the defaults dict is not shared with (or changed by) the sources
    assert config.defaults["headers"] == {"X-Team": "t"}
    assert a["headers"] is not config.defaults["headers"]


def test_typed_toml_values(tmp_path: Path) -> None:
    config = load_text(tmp_path, """
[sources.api]
url = "https://api.example.org/q"
method = "post"
body = '{"q": 1}'
pinned = true
max_attempts = 7
keep_versions = 0
attempt_timeout = "2s"
open_wait = "10s"
refresh = "on-open"
headers = { Authorization = "Bearer x", X-Y = "z" }
validate = { min_size = "1K", sha256 = "ABCDEF0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789", content_type = "application/json", cmd = "jq .", timeout = "5s" }
proxy = "http://proxy:3128"

[sources.cron]
url = "http://h/c"
refresh = "cron:30 2 * * *"
pinned = false
""")  # noqa: E501
    _, api = config.sources["api"]
    assert api["method"] == "POST"
    assert api["body"] == '{"q": 1}'
    assert api["pinned"] is True
    assert (api["max_attempts"], api["keep_versions"]) == (7, 0)
    assert api["headers"] == {"Authorization": "Bearer x", "X-Y": "z"}
    assert api["validate"]["min_size"] == 1024
    assert api["validate"]["sha256"] == "abcdef0123456789" * 4
    assert api["proxy"] == "http://proxy:3128"
    _, cron = config.sources["cron"]
    assert cron["refresh"] == "cron:30 2 * * *" and cron["pinned"] is False


def test_dotted_toml_keys_are_tables(tmp_path: Path) -> None:
    config = load_text(tmp_path, """
[sources.a]
url = "http://h/a"
validate.min_size = 10
headers.Authorization = "Bearer x"
""")
    _, a = config.sources["a"]
    assert a["validate"] == {"min_size": 10}
    assert a["headers"] == {"Authorization": "Bearer x"}


def test_dashed_keys_as_on_the_command_line(tmp_path: Path) -> None:
    config = load_text(tmp_path, """
[daemon]
max-downloads = 8
max-downloads-per-host = 3
log-level = "debug"

[defaults]
max-attempts = 2

[sources.a]
url = "http://h/a"
attempt-timeout = "3s"
keep-versions = 1
""")
    assert config.daemon.max_downloads == 8
    assert config.daemon.max_downloads_per_host == 3
    assert config.daemon.log_level == "debug"
    _, a = config.sources["a"]
    assert (a["max_attempts"], a["attempt_timeout"], a["keep_versions"]) == (2, "3s", 1)


def test_source_names(tmp_path: Path) -> None:
    config = load_text(tmp_path, """
[sources."a.b"]
url = "http://h/1"
[sources."a..b"]
url = "http://h/2"
[sources.A-z_0]
url = "http://h/3"
[sources."-x"]
url = "http://h/4"
""")
    assert list(config.sources) == ["a.b", "a..b", "A-z_0", "-x"]
    long = "x" * 128
    assert list(load_text(tmp_path, f'[sources.{long}]\nurl = "http://h/"\n').sources) == [long]


def test_url_with_credentials_is_kept_as_given(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[sources.a]\nurl = "https://user:pw@h/x?q=1#f"\n')
    assert config.sources["a"][0] == "https://user:pw@h/x?q=1#f"


@pytest.mark.parametrize("value, size", [
    ("1024", 1024), (1024, 1024), ('"1024"', 1024), ('"1K"', 1024), ('"2M"', 2 << 20),
    ('"50G"', 50 << 30), ('"3T"', 3 << 40), (1, 1),
])
def test_max_cache_size(tmp_path: Path, value: Any, size: int) -> None:
    config = load_text(tmp_path, f"[daemon]\nmax_cache_size = {value}\n")
    assert config.daemon.max_cache_size == size


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error", "INFO", "Warning"])
def test_log_levels(tmp_path: Path, level: str) -> None:
    assert load_text(tmp_path, f'[daemon]\nlog_level = "{level}"\n').daemon.log_level \
        == level.lower()


def test_cache_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_text(tmp_path, '[daemon]\ncache = "/srv/c"\n').daemon.cache == "/srv/c"
    assert load_text(tmp_path, '[daemon]\ncache = "/srv/c/../d/"\n').daemon.cache == "/srv/d"
    monkeypatch.setenv("HOME", "/home/someone")
    assert load_text(tmp_path, '[daemon]\ncache = "~/.cache/b"\n').daemon.cache \
        == "/home/someone/.cache/b"
    # relative: to the config file's directory, not the working directory
    monkeypatch.chdir("/")
    assert load_text(tmp_path, '[daemon]\ncache = "c"\n').daemon.cache == str(tmp_path / "c")


def test_relative_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, '[daemon]\ncache = "c"\n[sources.a]\nurl = 3\n', "rel.toml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput, match=r"^rel\.toml: \[sources\.a\] url: "):
        load_config(Path("rel.toml"))
    write(tmp_path, '[daemon]\ncache = "c"\n', "rel.toml")
    config = load_config(Path("rel.toml"))
    assert config.path == Path("rel.toml")
    assert config.daemon.cache == str(tmp_path / "c")


def test_accepts_a_str_path(tmp_path: Path) -> None:
    path = write(tmp_path, SPEC_EXAMPLE)
    assert load_config(str(path)).sources == load_config(path).sources  # type: ignore[arg-type]


# --- what is refused: one line naming the file, the table and the key ---------------------

SRC = '[sources.s]\nurl = "http://h/"\n'

ERRORS: list[tuple[str, str, list[str]]] = [
    # (config text, what the message starts with after "FILE: ", further fragments)
    # top level
    ("x = 1\n", "unknown key 'x' outside any table", ["[daemon]"]),
    ("[deamon]\n", "unknown table [deamon]", ["did you mean 'daemon'"]),
    ("[source.a]\nurl = 'http://h/'\n", "unknown table [source]",
     ["did you mean 'sources'"]),
    ('["a b"]\n', 'unknown table ["a b"]', []),
    ("daemon = 3\n", "daemon must be a table", []),
    ("defaults = []\n", "defaults must be a table", []),
    ("sources = 'x'\n", "sources must be a table", ["[sources.NAME]"]),
    ("[[sources]]\nurl = 'http://h/'\n", "sources must be a table", []),
    # [daemon]
    ("[daemon]\nmax_download = 3\n", "[daemon] unknown key 'max_download'",
     ["did you mean 'max_downloads'", "max_downloads_per_host"]),
    ("[daemon]\nrefresh = '1d'\n", "[daemon] unknown key 'refresh'", []),
    ('[daemon]\nmax_downloads = "four"\n', "[daemon] max_downloads: invalid max_downloads 'four'",
     [">= 1"]),
    ('[daemon]\nmax_downloads = "4"\n', "[daemon] max_downloads: ", ["'4'"]),
    ("[daemon]\nmax_downloads = 0\n", "[daemon] max_downloads: invalid max_downloads 0", []),
    ("[daemon]\nmax_downloads = -2\n", "[daemon] max_downloads: ", []),
    ("[daemon]\nmax_downloads = 2.0\n", "[daemon] max_downloads: ", []),
    ("[daemon]\nmax_downloads = true\n", "[daemon] max_downloads: ", ["True"]),
    ("[daemon]\nmax_downloads_per_host = 0\n", "[daemon] max_downloads_per_host: ", []),
    ("[daemon]\nmax_downloads_per_host = []\n", "[daemon] max_downloads_per_host: ", []),
    ('[daemon]\nlog_level = "loud"\n', "[daemon] log_level: invalid log_level 'loud'",
     ["debug, info, warning, error"]),
    ("[daemon]\nlog_level = 10\n", "[daemon] log_level: ", []),
    ('[daemon]\nlog_level = "warn ing"\n', "[daemon] log_level: ", []),
    ('[daemon]\nmax_cache_size = "50GB"\n', "[daemon] max_cache_size: invalid max_cache_size",
     ["'50GB'"]),
    ('[daemon]\nmax_cache_size = "50g"\n', "[daemon] max_cache_size: ", []),
    ("[daemon]\nmax_cache_size = -1\n", "[daemon] max_cache_size: ", []),
    ("[daemon]\nmax_cache_size = 0\n", "[daemon] max_cache_size: ", ["leave it out"]),
    ("[daemon]\nmax_cache_size = 1.5\n", "[daemon] max_cache_size: ", []),
    ("[daemon]\nmax_cache_size = false\n", "[daemon] max_cache_size: ", []),
    ("[daemon]\ncache = 3\n", "[daemon] cache: invalid cache 3", []),
    ('[daemon]\ncache = ""\n', "[daemon] cache: ", []),
    ('[daemon]\ncache = "a\\u0000b"\n', "[daemon] cache: ", []),
    ("[daemon]\ncache = ['/a']\n", "[daemon] cache: ", []),
    ("[daemon]\nmax_downloads = 2\nmax-downloads = 3\n", "[daemon] max-downloads: given twice",
     ["max_downloads"]),
    # [defaults]
    ('[defaults]\nurl = "http://h/"\n', "[defaults] url: not allowed in [defaults]", []),
    ('[defaults]\nrefresh = "often"\n', "[defaults] refresh: invalid refresh 'often'", []),
    ('[defaults]\nrefrsh = "1d"\n', "[defaults] unknown key 'refrsh'",
     ["did you mean 'refresh'"]),
    ("[defaults]\nmax_attempts = 0\n", "[defaults] max_attempts: ", []),
    ('[defaults]\nname = "x"\n', "[defaults] unknown key 'name'", []),
    ("[defaults]\nvalidate = { size = 3 }\n", "[defaults] validate.size: ",
     ["unknown check validate.size"]),
    # [sources.NAME]: names
    ('[sources."a/b"]\nurl = "http://h/"\n', '[sources."a/b"] invalid source name \'a/b\'', []),
    ('[sources.".x"]\nurl = "http://h/"\n', '[sources.".x"] invalid source name', []),
    ('[sources."@x"]\nurl = "http://h/"\n', '[sources."@x"] invalid source name', []),
    ('[sources."."]\nurl = "http://h/"\n', '[sources."."] invalid source name', []),
    ('[sources.".."]\nurl = "http://h/"\n', '[sources.".."] invalid source name', []),
    ('[sources.""]\nurl = "http://h/"\n', '[sources.""] invalid source name', []),
    ('[sources."a b"]\nurl = "http://h/"\n', '[sources."a b"] invalid source name', []),
    ('[sources."a\\nb"]\nurl = "http://h/"\n', '[sources."a\\nb"] invalid source name', []),
    (f'[sources.{"x" * 129}]\nurl = "http://h/"\n', f"[sources.{'x' * 129}] invalid source",
     []),
    ("[sources.a.b]\nurl = 'http://h/'\n", "[sources.a] b: a table here is not an option",
     ['[sources."a.b"]']),
    ("[sources]\na = 3\n", "[sources] a: must be a table", []),
    # [sources.NAME]: url
    ('[sources.a]\nrefresh = "1d"\n', "[sources.a] url: missing", []),
    ("[sources.a]\n", "[sources.a] url: missing", []),
    ('[sources.a]\nurl = "ftp://h/x"\n', "[sources.a] url: unsupported URL scheme 'ftp'", []),
    ('[sources.a]\nurl = "h/x"\n', "[sources.a] url: ", []),
    ('[sources.a]\nurl = "http://"\n', "[sources.a] url: ", []),
    ('[sources.a]\nurl = ""\n', "[sources.a] url: ", []),
    ('[sources.a]\nurl = "http://h/a b"\n', "[sources.a] url: ", []),
    ("[sources.a]\nurl = 3\n", "[sources.a] url: invalid URL '3'", []),
    ("[sources.a]\nurl = ['http://h/']\n", "[sources.a] url: ", []),
    # [sources.NAME]: options
    (SRC + 'refresh = "often"\n', "[sources.s] refresh: invalid refresh 'often'", []),
    (SRC + "refresh = 30\n", "[sources.s] refresh: ", []),
    (SRC + 'refresh = "cron:* *"\n', "[sources.s] refresh: ", ["five fields"]),
    (SRC + 'refresh = "0s"\n', "[sources.s] refresh: ", []),
    (SRC + 'attempt_timeout = "30"\n', "[sources.s] attempt_timeout: ", []),
    (SRC + 'open_wait = "1w"\n', "[sources.s] open_wait: ", []),
    (SRC + "max_attempts = 0\n", "[sources.s] max_attempts: invalid max_attempts 0", []),
    (SRC + 'max_attempts = "x"\n', "[sources.s] max_attempts: ", []),
    (SRC + "max_attempts = 1.5\n", "[sources.s] max_attempts: ", []),
    (SRC + "keep_versions = -1\n", "[sources.s] keep_versions: ", []),
    (SRC + "keep-versions = true\n", "[sources.s] keep-versions: ", []),
    (SRC + 'method = "PUT"\n', "[sources.s] method: invalid method 'PUT'", []),
    (SRC + "body = 3\n", "[sources.s] body: ", []),
    (SRC + 'pinned = "maybe"\n', "[sources.s] pinned: ", []),
    (SRC + "pinned = 1\n", "[sources.s] pinned: ", []),
    (SRC + 'headers = "Authorization: x"\n', "[sources.s] headers: ", []),
    (SRC + "headers = { Authorization = 3 }\n", "[sources.s] headers.Authorization: ", []),
    (SRC + 'headers = { "a b" = "x" }\n', '[sources.s] headers."a b": ', []),
    (SRC + 'headers."a:b" = "x"\n', '[sources.s] headers."a:b": ', []),
    (SRC + 'validate = "gzip -t"\n', "[sources.s] validate: ", []),
    (SRC + 'validate = { min_size = "big" }\n', "[sources.s] validate.min_size: ", ["'big'"]),
    (SRC + 'validate = { sha256 = "abc" }\n', "[sources.s] validate.sha256: ", []),
    (SRC + 'validate = { cmd = "" }\n', "[sources.s] validate.cmd: ", []),
    (SRC + 'validate = { cmd = "\'unclosed" }\n', "[sources.s] validate.cmd: ", []),
    (SRC + 'validate = { timeout = "soon" }\n', "[sources.s] validate.timeout: ", []),
    (SRC + "validate = { mn_size = 3 }\n", "[sources.s] validate.mn_size: ", []),
    (SRC + 'validate.cmd = 3\n', "[sources.s] validate.cmd: ", []),
    (SRC + 'proxy = "socks://p"\n', "[sources.s] proxy: ", []),
    (SRC + 'refrsh = "1d"\n', "[sources.s] unknown key 'refrsh'", ["did you mean 'refresh'"]),
    (SRC + 'Authorization = "Bearer x"\n', "[sources.s] unknown key 'Authorization'", []),
    (SRC + "max_attempts = 2\nmax-attempts = 3\n", "[sources.s] max-attempts: given twice",
     []),
    (SRC + 'name = "t"\n', "[sources.s] unknown key 'name'", []),
    (SRC + '"refresh.x" = 1\n', '[sources.s] "refresh.x": ', ["not a table"]),
    (SRC + "[sources.s.extra]\nrefresh = '1d'\n", "[sources.s] unknown key 'extra'", []),
    (SRC + '"url.x" = 1\n', '[sources.s] "url.x": url is not a table', []),
    (SRC + "body = { url = 'http://h/' }\n", "[sources.s] body: invalid body", []),
    ('[defaults]\n"url.x" = 1\n', '[defaults] "url.x": not allowed in [defaults]', []),
]


@pytest.mark.parametrize("text, start, fragments", ERRORS,
                         ids=[f"{i}-{e[1][:40]}" for i, e in enumerate(ERRORS)])
def test_errors_name_file_table_and_key(tmp_path: Path, text: str, start: str,
                                        fragments: list[str]) -> None:
    message = bad(tmp_path, text)
    path = str(tmp_path / "config.toml")
    assert message.startswith(f"{path}: {start}"), message
    for fragment in fragments:
        assert fragment in message, message


def test_brief_examples_word_for_word(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    assert bad(tmp_path, '[sources.pubtator]\nurl = "https://h/"\nrefresh = "often"\n') \
        .startswith(f"{path}: [sources.pubtator] refresh: invalid refresh 'often': ")
    assert bad(tmp_path, "[daemon]\nmax_download = 1\n") \
        .startswith(f"{path}: [daemon] unknown key 'max_download'")


def test_the_first_problem_is_reported(tmp_path: Path) -> None:
    # daemon before defaults before sources; sources in file order
    message = bad(tmp_path, """
[sources.b]
url = "ftp://x"
[sources.a]
url = "ftp://y"
[defaults]
refresh = "often"
[daemon]
max_downloads = 0
""")
    assert "[daemon] max_downloads" in message
    message = bad(tmp_path, '[sources.b]\nurl = "ftp://x"\n[sources.a]\nurl = "ftp://y"\n')
    assert "[sources.b]" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(BadInput) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(BadInput) as info:
        load_config(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot read: Is a directory"


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, SPEC_EXAMPLE)
    if os.getuid() == 0:  # root reads any file: make the read fail as it would for a user
        def refuse(self: Path) -> bytes:
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "read_bytes", refuse)
    else:
        path.chmod(0)
    with pytest.raises(BadInput) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: Permission denied"


@pytest.mark.parametrize("text, where", [
    ("[daemon]\nmax_downloads = \n", "line 2, column 17"),
    ("[daemon\n", "line 1"),
    ("[daemon]\nlog_level = 'a'\nlog_level = 'b'\n", "line 3"),
    ("[sources.a]\nurl = 'http://h/'\n[sources.a]\n", "line 3"),
    ('a = "unterminated\n', "line 1"),
    ("= 3\n", "line 1"),
])
def test_not_toml(tmp_path: Path, text: str, where: str) -> None:
    message = bad(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'config.toml'}: not valid TOML: "), message
    assert where in message


def test_not_utf8(tmp_path: Path) -> None:
    message = bad(tmp_path, b'[daemon]\ncache = "\xff"\n')
    assert "not valid TOML: not UTF-8" in message


def test_deep_nesting_and_huge_numbers(tmp_path: Path) -> None:
    assert "not valid TOML" in bad(tmp_path, "a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert "not valid TOML" in bad(tmp_path, "[daemon]\nmax_downloads = " + "9" * 5000 + "\n")


def test_secrets_never_in_messages(tmp_path: Path) -> None:
    message = bad(tmp_path, '[sources.a]\nurl = "ftp://user:s3cret@h/x"\n')
    assert "s3cret" not in message and "user" not in message
    message = bad(tmp_path, '[sources.a]\nurl = "https://user:s3cret@/x"\n')
    assert "s3cret" not in message
    message = bad(tmp_path, '[sources.a]\nurl = "https://h/"\n'
                  'headers = { Authorization = "Bearer s3cret\\n" }\n')
    assert "headers.Authorization" in message and "s3cret" not in message
    message = bad(tmp_path, '[defaults]\nheaders = { X-Key = "s3cret\\u0000" }\n')
    assert "s3cret" not in message


def test_message_is_one_line_whatever_the_key(tmp_path: Path) -> None:
    message = bad(tmp_path, '[daemon]\n"max\\ndownloads" = 1\n')
    assert "max\\ndownloads" in message
    message = bad(tmp_path, '["x\\ny"]\n')
    assert "\n" not in message


# --- fuzzing: nothing but BadInput, and what loads is normalized ---------------------------

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.booleans(),
    st.floats(allow_nan=True), st.text(max_size=12),
    st.sampled_from(["1d", "30m", "never", "on-open", "cron:0 * * * *", "50G", "info",
                     "http://h/x", "https://u:p@h/", "GET", "post", "gzip -t", "true", "0"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["min_size", "cmd", "sha256", "X-A", "a b", "url"]),
                        inner, max_size=3),
    ),
    max_leaves=6,
)
# plausible values per key, so that many documents load and the rest fail deep inside
PLAUSIBLE: dict[str, Any] = {
    "cache": st.sampled_from(["/var/cache/b", "c", "~/x", ""]),
    "max_cache_size": st.sampled_from(["50G", "1K", 0, 1 << 20, "x"]),
    "max_downloads": st.integers(-1, 9), "max_downloads_per_host": st.integers(-1, 9),
    "log_level": st.sampled_from(["debug", "INFO", "warning", "error", "loud"]),
    "url": st.sampled_from(["http://h/x", "https://u:p@h/y?z", "ftp://h/", "h", "http://"]),
    "refresh": st.sampled_from(["1d", "30m", "never", "on-open", "cron:0 * * * *", "cron:x",
                                "often", "0s"]),
    "attempt_timeout": st.sampled_from(["2s", "30s", "1", "1w"]),
    "open_wait": st.sampled_from(["5s", "1m", "", "5"]),
    "max_attempts": st.integers(-1, 9), "keep_versions": st.integers(-1, 9),
    "method": st.sampled_from(["GET", "post", "PUT"]),
    "body": st.sampled_from(['{"q": 1}', "", None, 3]),
    "pinned": st.sampled_from([True, False, "true", "no", 1]),
    "headers": st.dictionaries(st.sampled_from(["Authorization", "X-A", "a b"]),
                               st.sampled_from(["Bearer x", "v", "é", 3]), max_size=2),
    "validate": st.dictionaries(
        st.sampled_from(["min_size", "cmd", "sha256", "content_type", "timeout", "size"]),
        st.sampled_from([1000, "1K", "gzip -t", "a" * 64, "text/csv", "5s", "", -1]),
        max_size=3),
    "proxy": st.sampled_from(["http://p:3128", "socks://p", ""]),
    "max-attempts": st.integers(0, 3), "validate.min_size": st.integers(-1, 9),
    "headers.X-A": st.sampled_from(["v", 3]), "x": values,
}
DAEMON_KEYS = ["cache", "max_cache_size", "max_downloads", "max_downloads_per_host",
               "log_level", "x", "refresh"]
OPTION_KEYS = [*DEFAULT_OPTIONS, "max-attempts", "validate.min_size", "headers.X-A", "x"]


def table_of(keys: list[str], wild: bool = True) -> st.SearchStrategy[dict[str, Any]]:
    def value_of(k: str) -> st.SearchStrategy[Any]:
        if k not in PLAUSIBLE or k == "x":
            return values
        return st.one_of(PLAUSIBLE[k], PLAUSIBLE[k], values) if wild else PLAUSIBLE[k]

    entry = st.sampled_from(keys).flatmap(lambda k: st.tuples(st.just(k), value_of(k)))
    return st.lists(entry, max_size=4, unique_by=lambda kv: kv[0]).map(dict)


def source_tables(wild: bool) -> st.SearchStrategy[dict[str, Any]]:
    keys = OPTION_KEYS if wild else [k for k in OPTION_KEYS if k != "x"]
    return st.builds(lambda url, rest: {"url": url, **rest},
                     PLAUSIBLE["url"], table_of(keys, wild))


# anything goes: unknown tables, bad names, sources without url, values of any type
documents = st.fixed_dictionaries({}, optional={
    "daemon": table_of(DAEMON_KEYS),
    "defaults": table_of([*OPTION_KEYS, "url"]),
    "sources.a": source_tables(True),
    'sources."b.c"': source_tables(True),
    'sources."@x"': source_tables(True),
    "sources.d": table_of(OPTION_KEYS),
    "other": table_of(["x"]),
})
# near misses: the right tables and keys, values sometimes wrong; many of these load
plausible_documents = st.fixed_dictionaries({}, optional={
    "defaults": table_of([k for k in OPTION_KEYS if k != "x"], wild=False),
    "sources.a": source_tables(False),
    'sources."b.c"': source_tables(False),
    "sources.A-z_0": source_tables(False),
})


def toml_str(text: str) -> str:
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)  # surrogates stay raw: the file is then not UTF-8
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_str(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def render(doc: dict[str, dict[str, Any]]) -> str:
    return "".join(
        f"[{table}]\n" + "".join(f"{toml_str(k)} = {toml_value(v)}\n" for k, v in body.items())
        for table, body in doc.items()
    )


def check_loads_or_bad_input(path: Path) -> None:
    try:
        config = load_config(path)
    except BadInput as e:
        message = str(e)
        assert message.startswith(f"{path}: ") and "\n" not in message
        return
    assert isinstance(config.daemon, DaemonConfig)
    for url, opts in config.sources.values():
        assert url.startswith(("http://", "https://"))
        assert normalize_options(opts) == opts  # already normalized: a fixed point
        assert set(opts) == set(DEFAULT_OPTIONS)


@FUZZ
@given(text=st.text(max_size=300))
def test_fuzz_random_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    check_loads_or_bad_input(path)


@FUZZ
@given(data=st.binary(max_size=200))
def test_fuzz_random_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(data)
    check_loads_or_bad_input(path)


@FUZZ
@given(doc=documents)
def test_fuzz_config_shaped_documents(tmp_path: Path, doc: dict[str, dict[str, Any]]) -> None:
    path = tmp_path / "config.toml"
    path.write_text(render(doc), encoding="utf-8", errors="surrogatepass")
    check_loads_or_bad_input(path)


@FUZZ
@given(doc=plausible_documents)
def test_fuzz_sources_match_normalize_options(tmp_path: Path,
                                               doc: dict[str, dict[str, Any]]) -> None:
    # Whatever loads, loads exactly as normalize_options(raw, base=defaults) would make it.
    path = tmp_path / "config.toml"
    path.write_text(render(doc), encoding="utf-8", errors="surrogatepass")
    try:
        config = load_config(path)
    except BadInput:
        return
    import tomllib

    data = tomllib.loads(path.read_text())
    assert config.defaults == normalize_options(data.get("defaults", {}))
    for name, (url, opts) in config.sources.items():
        raw = dict(data["sources"][name])
        assert raw.pop("url") == url
        assert opts == normalize_options(raw, base=config.defaults)
