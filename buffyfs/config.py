"""The TOML config file: load and validate (pure: no index, no mount).

    [daemon]                      # all optional
    cache = "/var/cache/buffyfs"
    max_cache_size = "50G"
    max_downloads = 4
    max_downloads_per_host = 2
    log_level = "info"
    scrub_interval = "7d"         # ours: re-hash every blob this often ("never": off)
    scrub_rate = "20M"            # ours: bytes per second the scrub reads at most
    upstream = ["http://hub:8631"]  # a replica of these hubs, tried in order
    upstream_token = "..."        # a control token of the hub: forwarded control writes
    upstream_sources = ["team-*"] # globs: the hub's sources to mirror (none: all)
    prefetch = "latest"           # replica bytes fetched before a read: latest, none, all

    [defaults]                    # any source option (not url), for every source
    refresh = "1d"

    [serve]                       # the HTTP server (buffyfs serve, mount --serve)
    listen = "127.0.0.1:8631"
    public = false                # open reads beyond loopback need it
    read_tokens = ["..."]         # or read_token_files = ["/etc/buffyfs/read.tokens"]
    control_tokens = ["..."]      # or control_token_files = [...]
    tls_cert = "/etc/buffyfs/cert.pem"
    tls_key = "/etc/buffyfs/key.pem"

    [proxy]                       # the server as an HTTP proxy (http/proxy.py)
    allow = ["https://example.org/data/*"]   # globs of URLs served; none: no proxy
    allow_post = false
    defaults = { refresh = "6h" } # source options of the sources it registers

    [sources.NAME]                # a name with dots is quoted: [sources."a.b"]
    url = "https://example.org/file.gz"
    validate = { min_size = 1000000, cmd = "gzip -t" }

Every problem is one ``BadInput`` line naming the file, the table and the key:

    FILE: cannot read: No such file or directory
    FILE: not valid TOML: Invalid value (at line 3, column 7)
    FILE: unknown table [deamon]: use [daemon], [defaults] and [sources.NAME]
    FILE: [daemon] unknown key 'max_download' (did you mean 'max_downloads'?)
    FILE: [daemon] max_downloads: invalid max_downloads 'four': must be an integer >= 1
    FILE: [sources.pubtator] refresh: invalid refresh 'often': never, on-open, ...
    FILE: [sources.pubtator] url: missing: every source needs url = "https://..."

Source options come out exactly as ``options.normalize_options(raw, base=defaults)``
makes them, ``defaults`` being the ``[defaults]`` table normalized over
``options.DEFAULT_OPTIONS``. Header values are never echoed; URLs are shown without
credentials.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from buffyfs import options
from buffyfs.errors import BadInput

LOG_LEVELS = ("debug", "info", "warning", "error")
TOP_LEVEL_TABLES = ("daemon", "defaults", "sources", "serve", "proxy")
SERVE_KEYS = ("listen", "public", "read_tokens", "control_tokens", "read_token_files",
              "control_token_files", "tls_cert", "tls_key")
DAEMON_KEYS = ("cache", "max_cache_size", "max_downloads", "max_downloads_per_host", "log_level",
               "scrub_interval", "scrub_rate", "max_connections_per_host",
               "unpack_max_size", "upstream", "upstream_token", "upstream_sources", "prefetch")
DEFAULT_SCRUB_INTERVAL = "7d"
DEFAULT_SCRUB_RATE = 20 << 20  # bytes/s: 1 TiB in about 15 hours
PROXY_KEYS = ("allow", "allow_post", "defaults")
TABLE_OPTIONS = ("headers", "validate")

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class DaemonConfig:
    cache: str | None = None
    max_cache_size: int | None = None  # bytes; from "50G" etc via options.parse_size (1024-based)
    max_downloads: int = 4
    max_downloads_per_host: int = 2
    log_level: str = "info"  # debug, info, warning, error
    scrub_interval: str = DEFAULT_SCRUB_INTERVAL  # a duration, or "never" (scrub.py)
    scrub_rate: int = DEFAULT_SCRUB_RATE  # bytes per second
    max_connections_per_host: int = 8  # TCP connections to one host, all downloads
    unpack_max_size: int = 10 << 30  # bytes one version may expand to (unpacker.py)
    # a replica of these hubs, tried in order (replica.py); none: not a replica
    upstream: list[str] = field(default_factory=list)
    upstream_token: str | None = None  # a control token of the hub (forwarded writes)
    upstream_sources: list[str] = field(default_factory=list)  # globs; none: all
    prefetch: str = "latest"  # latest, none, all


@dataclass
class ServeConfig:
    """``[serve]``; tokens stay as given (http.access checks and loads them)."""

    listen: str | None = None  # None: not given (mount: no server; serve: the default)
    public: bool = False
    read_tokens: list[str] = field(default_factory=list)
    control_tokens: list[str] = field(default_factory=list)
    read_token_files: list[str] = field(default_factory=list)  # absolute paths
    control_token_files: list[str] = field(default_factory=list)
    tls_cert: str | None = None
    tls_key: str | None = None


@dataclass
class ProxyConfig:
    """``[proxy]``: which URLs the server answers as a proxy, and how it registers them."""

    allow: list[str] = field(default_factory=list)  # URL globs (fnmatch); none: no proxy
    allow_post: bool = False
    # source options of registered sources: [proxy] defaults over [defaults], normalized
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    path: Path
    daemon: DaemonConfig
    # the [defaults] table, validated (normalize_options over options.DEFAULT_OPTIONS)
    defaults: dict[str, Any] = field(default_factory=dict)
    # name -> (url, normalized options with defaults applied)
    sources: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    serve: ServeConfig = field(default_factory=ServeConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)


def load_config(path: Path) -> Config:
    """Read, parse and validate the config file at ``path``; BadInput on any problem."""
    path = Path(path)
    data = _parse(path)
    where = _Where(path)
    for key, value in data.items():
        if key not in TOP_LEVEL_TABLES:
            what = f"table [{_key(key)}]" if isinstance(value, dict) else \
                f"key {key!r} outside any table"
            where.fail(None, None, f"unknown {what}" + _hint(key, TOP_LEVEL_TABLES)
                       + ": use [daemon], [defaults], [sources.NAME], [serve] and [proxy]")
        if not isinstance(value, dict):
            where.fail(None, None, f"{_key(key)} must be a table: [{key}]"
                       + (" with [sources.NAME] tables" if key == "sources" else ""))
    daemon = _load_daemon(where, data.get("daemon", {}))
    defaults = _load_defaults(where, data.get("defaults", {}))
    sources: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, table in data.get("sources", {}).items():
        sources[name] = _load_source(where, name, table, defaults)
    serve = _load_serve(where, data.get("serve", {}))
    proxy = _load_proxy(where, data.get("proxy", {}), defaults)
    return Config(path=path, daemon=daemon, defaults=defaults, sources=sources, serve=serve,
                  proxy=proxy)


# --- reading ----------------------------------------------------------------------------


def _parse(path: Path) -> dict[str, Any]:
    where = _Where(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        where.fail(None, None, f"cannot read: {e.strerror or e}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where.fail(None, None, f"not valid TOML: not UTF-8 text (byte {e.start})")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        where.fail(None, None, f"not valid TOML: {e}")
    except RecursionError:
        where.fail(None, None, "not valid TOML: nested too deeply")
    except ValueError as e:  # e.g. an integer with too many digits
        where.fail(None, None, f"not valid TOML: {e}")


class _Where:
    """Builds the one-line messages: ``FILE: [TABLE] KEY: message``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, table: str | None, key: str | None, message: str) -> NoReturn:
        text = f"{self.path}: "
        if table is not None:
            text += f"[{table}] "
        if key is not None:
            text += f"{key}: "
        text += message
        # one line, whatever the file, key or value held
        raise BadInput(text.replace("\r", "\\r").replace("\n", "\\n"))


def _key(key: str) -> str:
    """A key as TOML would spell it: bare when it can be, else quoted."""
    return key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key)


def _hint(key: str, known: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _normal_keys(where: _Where, table: str, raw: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """{normal key: (key as written, value)}: ``max-attempts`` is ``max_attempts``; not both."""
    out: dict[str, tuple[str, Any]] = {}
    for key, value in raw.items():
        head, dot, rest = key.partition(".")
        normal = head.replace("-", "_") + dot + rest
        if normal in out:
            where.fail(table, _key(key), f"given twice (also as {_key(out[normal][0])})")
        out[normal] = (key, value)
    return out


def _checked_keys(where: _Where, table: str, raw: dict[str, Any],
                  allowed: tuple[str, ...] | list[str]) -> Iterator[tuple[str, str, Any]]:
    """(normal key, key as shown, value) of each key of ``table``; an unknown key fails
    with a hint and the list of the keys ``allowed``."""
    for normal, (key, value) in _normal_keys(where, table, raw).items():
        if normal not in allowed:
            where.fail(table, None, f"unknown key {key!r}" + _hint(normal, allowed)
                       + ": use " + ", ".join(allowed))
        yield normal, _key(key), value


# --- [daemon] ---------------------------------------------------------------------------


def check_upstream(value: Any) -> list[str]:
    """``--upstream URL[,URL...]`` or ``upstream = [...]``: hub URLs, http or https."""
    urls = value.split(",") if isinstance(value, str) else value
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise BadInput("upstream must be a list of hub URLs, e.g. "
                       '["http://hub.example:8631"]')
    out = []
    for url in urls:
        url = url.strip()
        if re.match(r"https?://[^/?#]*@", url):
            raise BadInput(f"invalid upstream URL {options.redact_url(url)!r}: no user or "
                           "password in it; give the hub's token as upstream_token")
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
            raise BadInput(f"invalid upstream URL {options.redact_url(url)!r}: use "
                           "http://HOST:PORT or https://HOST[:PORT][/PATH]")
        out.append(url.rstrip("/"))
    return out


def _load_daemon(where: _Where, raw: dict[str, Any]) -> DaemonConfig:
    daemon = DaemonConfig()
    for normal, shown, value in _checked_keys(where, "daemon", raw, DAEMON_KEYS):
        if normal == "cache":
            daemon.cache = _cache_dir(where, shown, value)
            continue
        try:
            setattr(daemon, normal, _DAEMON_CHECKS[normal](value))
        except BadInput as e:
            where.fail("daemon", shown, str(e))
    return daemon


def _check_max_cache_size(value: Any) -> int:
    size = options.parse_size(value, "max_cache_size")
    if size == 0:
        raise BadInput(f"invalid max_cache_size {value!r}: must be more than 0 "
                       "(leave it out for no limit)")
    return size


def _check_count(key: str) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadInput(f"invalid {key} {value!r}: must be an integer >= 1")
        return value
    return check


def _check_upstream_token(value: Any) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise BadInput("upstream_token must be a non-empty string without spaces")
    return value


def _check_upstream_sources(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(g, str) and g for g in value):
        raise BadInput('upstream_sources must be a list of globs, e.g. ["team-*"]')
    return list(value)


def _check_prefetch(value: Any) -> str:
    if value not in ("latest", "none", "all"):
        raise BadInput(f"invalid prefetch {value!r}: use latest, none or all")
    return value


def _check_log_level(value: Any) -> str:
    level = value.lower() if isinstance(value, str) else None
    if level not in LOG_LEVELS:
        raise BadInput(f"invalid log_level {value!r}: use " + ", ".join(LOG_LEVELS))
    return level


def check_scrub_interval(value: Any) -> str:
    """A duration such as ``7d``, or ``never`` (no background scrub)."""
    if value != "never":
        options.parse_duration(value, "scrub_interval")
    return value


def check_scrub_rate(value: Any) -> int:
    """Bytes per second (``20M``: 1024-based units), more than 0."""
    rate = options.parse_size(value, "scrub_rate")
    if rate == 0:
        raise BadInput(f"invalid scrub_rate {value!r}: must be more than 0 bytes per second")
    return rate


# How each [daemon] key (but ``cache``, relative to the file) is checked and converted.
_DAEMON_CHECKS: dict[str, Callable[[Any], Any]] = {
    "max_cache_size": _check_max_cache_size,
    **{key: _check_count(key) for key in ("max_downloads", "max_downloads_per_host",
                                          "max_connections_per_host")},
    "scrub_interval": check_scrub_interval,
    "scrub_rate": check_scrub_rate,
    "unpack_max_size": lambda value: options.parse_size(value, "unpack_max_size"),
    "upstream": check_upstream,
    "upstream_token": _check_upstream_token,
    "upstream_sources": _check_upstream_sources,
    "prefetch": _check_prefetch,
    "log_level": _check_log_level,
}


def _cache_dir(where: _Where, shown: str, value: Any) -> str:
    """``~`` is expanded; a relative directory is relative to the config file's."""
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        where.fail("daemon", shown, f"invalid cache {value!r}: must be a directory path")
    expanded = os.path.expanduser(value)
    if expanded.startswith("~"):
        where.fail("daemon", shown, f"invalid cache {value!r}: cannot expand '~'")
    return os.path.normpath(os.path.join(os.path.abspath(where.path.parent), expanded))


# --- [defaults] and [sources.NAME] ------------------------------------------------------


def _load_defaults(where: _Where, raw: dict[str, Any]) -> dict[str, Any]:
    return _options(where, "defaults", raw, options.DEFAULT_OPTIONS)


def _load_source(where: _Where, name: str, table: Any,
                 defaults: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    shown = f"sources.{_key(name)}"
    try:
        options.check_name(name)
    except BadInput as e:
        where.fail(shown, None, str(e))
    if not isinstance(table, dict):
        where.fail("sources", _key(name), f"must be a table: [{shown}] with url = \"https://...\"")
    raw = dict(table)
    for key, value in raw.items():
        if isinstance(value, dict) and "url" in value and key not in options.DEFAULT_OPTIONS:
            dotted = json.dumps(f"{name}.{key}")
            where.fail(shown, _key(key), "a table here is not an option; a source name with "
                       f"dots is quoted: [sources.{dotted}]")
    if "url" not in raw:
        where.fail(shown, "url", "missing: every source needs url = \"https://...\"")
    url = raw.pop("url")
    try:
        options.check_url(url)
    except BadInput as e:
        where.fail(shown, "url", str(e))
    return url, _options(where, shown, raw, defaults)


def _options(where: _Where, table: str, raw: dict[str, Any],
             base: dict[str, Any]) -> dict[str, Any]:
    """``options.normalize_options(raw, base=base)``, one key at a time to name the culprit."""
    shared = table in ("defaults", "proxy.defaults")  # options for many sources: no url
    known = [*([] if shared else ["url"]), *options.DEFAULT_OPTIONS]
    out = options.normalize_options({}, base=base)
    for normal, (key, value) in _normal_keys(where, table, raw).items():
        shown = _key(key)
        head = normal.partition(".")[0]
        if head == "url":  # a source's own url was taken out before
            where.fail(table, shown, f"not allowed in [{table}]: each source has its own url"
                       if shared else "url is not a table")
        if head not in options.DEFAULT_OPTIONS:
            where.fail(table, None, f"unknown key {key!r}" + _hint(head, known)
                       + ": use " + ", ".join(known))
        if "." in normal and head not in TABLE_OPTIONS:
            where.fail(table, shown, f"option {head!r} is not a table: only "
                       + " and ".join(TABLE_OPTIONS) + " have entries")
        try:
            out = options.normalize_options({key: value}, base=out)
        except BadInput as e:
            if head in TABLE_OPTIONS and "." not in normal and isinstance(value, dict):
                _locate_table_error(where, table, key, value)
            where.fail(table, shown, str(e))
    return out


def _locate_table_error(where: _Where, table: str, key: str, value: dict[str, Any]) -> None:
    """Name the entry of a headers/validate table that is wrong, as ``validate.min_size``."""
    for sub, subvalue in value.items():
        try:
            options.normalize_options({key: {sub: subvalue}})
        except BadInput as e:
            where.fail(table, f"{_key(key)}.{_key(sub)}", str(e))


# --- [serve] ----------------------------------------------------------------------------


def _load_serve(where: _Where, raw: dict[str, Any]) -> ServeConfig:
    serve = ServeConfig()
    for normal, shown, value in _checked_keys(where, "serve", raw, SERVE_KEYS):
        if normal == "public":
            if not isinstance(value, bool):
                where.fail("serve", shown, "must be true or false")
            serve.public = value
        elif normal in ("read_tokens", "control_tokens"):
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                where.fail("serve", shown, 'must be a list of strings: ["token", ...]')
            setattr(serve, normal, list(value))  # values never echoed
        elif normal in ("read_token_files", "control_token_files"):
            if not isinstance(value, list) or not all(isinstance(t, str) and t.strip()
                                                      for t in value):
                where.fail("serve", shown, 'must be a list of file paths: ["/etc/...", ...]')
            setattr(serve, normal, [_path(where, t) for t in value])
        elif normal in ("tls_cert", "tls_key"):
            if not isinstance(value, str) or not value.strip():
                where.fail("serve", shown, "must be a file path")
            setattr(serve, normal, _path(where, value))
        else:  # listen
            if not isinstance(value, str) or not value.strip():
                where.fail("serve", shown, 'must be "HOST:PORT", e.g. "127.0.0.1:8631"')
            serve.listen = value
    return serve


def _path(where: _Where, value: str) -> str:
    """A file named in the config: ``~`` expanded, relative to the config's directory."""
    return os.path.normpath(os.path.join(os.path.abspath(where.path.parent),
                                         os.path.expanduser(value)))


# --- [proxy] ----------------------------------------------------------------------------


def _load_proxy(where: _Where, raw: dict[str, Any], defaults: dict[str, Any]) -> ProxyConfig:
    proxy = ProxyConfig(defaults=defaults)
    for normal, shown, value in _checked_keys(where, "proxy", raw, PROXY_KEYS):
        if normal == "allow":
            if not isinstance(value, list) or not all(
                    isinstance(g, str) and g.strip() and g.isprintable() for g in value):
                where.fail("proxy", shown, 'must be a list of URL globs: '
                           '["https://example.org/data/*", ...]')
            proxy.allow = list(value)
        elif normal == "allow_post":
            if not isinstance(value, bool):
                where.fail("proxy", shown, "must be true or false")
            proxy.allow_post = value
        else:  # defaults: source options, as in [defaults]
            if not isinstance(value, dict):
                where.fail("proxy", shown, 'must be a table: defaults = { refresh = "6h" }')
            proxy.defaults = _options(where, "proxy.defaults", value, defaults)
    return proxy
