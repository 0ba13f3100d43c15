"""Names, URLs and source options: parsing and validation (pure, no I/O).

Option values arrive typed from TOML and as strings from control lines and the
command line; ``normalize_options`` accepts both and returns one canonical dict,
which is what the index stores.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Any

import httpx

from buffyfs.errors import BadInput

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
TAG_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
RESERVED_TAGS = frozenset({"versions", "status", "control", "tags", "latest", "metrics",
                           "newest",  # newest: a version word, like latest
                           "unpacked", "blobs", "changes", "proxy"})  # SPEC part 2

_DURATION_RE = re.compile(r"(\d+)(s|m|h|d)")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_RE = re.compile(r"(\d+)([KMGT]?)")
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

DEFAULT_OPTIONS: dict[str, Any] = {
    "refresh": "1d",
    "attempt_timeout": "30s",
    # ours, not SPEC's: an attempt whose body moves fewer than min_speed bytes a second
    # over min_speed_time (curl's --speed-limit/--speed-time), or that takes longer than
    # attempt_max_time in all, fails (retryable, keeping its resume point)
    "min_speed": "1K",
    "min_speed_time": "60s",
    "attempt_max_time": "6h",
    "max_attempts": 5,
    "keep_versions": 5,
    "keep_for": "0s",  # a version that stops being latest is kept this long (gc.py)
    "method": "GET",
    "body": None,
    "headers": {},
    "pinned": False,
    "validate": {},
    "open_wait": "5s",
    "proxy": None,
    "retry_backoff": "1m",  # ours: the first wait after a failed refresh (policy.py)
    "connections": 4,  # ranged connections of one big download at once (parallel.py)
    "unpack": "auto",  # SOURCE/@unpacked/: auto (compressed files and archives) or off
}

# validate = { min_size, sha256, content_type, cmd, timeout }; timeout (ours, not SPEC's)
# bounds the cmd check.
VALIDATE_KEYS = ("min_size", "sha256", "content_type", "cmd", "timeout")
DEFAULT_VALIDATE_TIMEOUT = "60s"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name[0] in ".@":
        raise BadInput(
            f"invalid source name {name!r}: use 1-128 characters of A-Z a-z 0-9 . _ -, "
            "not starting with '.' or '@'"
        )
    return name


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag) or tag in RESERVED_TAGS:
        raise BadInput(
            f"invalid tag {tag!r}: use [a-z][a-z0-9_-]{{0,31}}, not one of "
            + ", ".join(sorted(RESERVED_TAGS))
        )
    return tag


def check_url(url: str) -> str:
    """Return the URL unchanged if it is a usable http(s) URL.

    httpx parses leniently (port ``99999``, ``+80``, an empty or ``exa<mple`` host all
    pass), so the authority is checked here: a host name of letters, digits, ``-``, ``_``
    and dots (IDNA names in their ASCII form), an IP literal, and a port of digits in
    1-65535. What passes may still fail to resolve or connect: that is a download error.
    """
    if not isinstance(url, str) or not url:
        raise BadInput(f"invalid URL {_shown(str(url))!r}")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise BadInput(f"invalid URL {_shown(url)!r}: it holds a space or a control character")
    try:
        parsed = httpx.URL(url)
    except Exception:  # httpx raises several types for malformed URLs
        parsed = None
    if parsed is not None:
        scheme = parsed.scheme
    else:
        m = _AUTHORITY_RE.match(url)
        scheme = m.group(1).lower() if m else ""
    if scheme not in ("http", "https"):
        raise BadInput(
            f"unsupported URL scheme {scheme or '(none)'!r} in {_shown(url)!r}: "
            "only http and https"
        )
    problem = _authority_problem(url)
    if problem or parsed is None:
        raise BadInput(f"invalid URL {_shown(url)!r}" + (f": {problem}" if problem else ""))
    return url


_AUTHORITY_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)")  # scheme, authority
_LABEL_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")


def _authority_problem(url: str) -> str | None:
    """What makes the ``[user@]host[:port]`` part of an http(s) URL unusable, if anything."""
    m = _AUTHORITY_RE.match(url)
    if not m:
        return "no host"
    problem = _hostport_problem(m.group(2).rpartition("@")[2])  # before '@': credentials
    if problem and "@" in url[m.end():]:
        # a password holding '/', '?' or '#' ends the authority early: what we took for
        # the host or port may be part of it, so quote nothing
        return "invalid host or port (not shown: the URL may hold credentials; " \
            "percent-encode '/', '?', '#' and '@' in a user name or password)"
    return problem


def _hostport_problem(hostport: str) -> str | None:
    if hostport.startswith("["):
        literal, bracket, port = hostport[1:].partition("]")
        if not bracket:
            return "unclosed '[' in the host"
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return f"invalid IPv6 address [{literal}]"
        if port and not port.startswith(":"):
            return f"unexpected {port!r} after the host"
        port = port[1:]
    else:
        host, _, port = hostport.partition(":")
        if not host:
            return "no host"
        try:
            ascii_host = host.encode("idna").decode("ascii") if not host.isascii() else host
        except UnicodeError:
            return f"invalid host name {host!r}"
        labels = ascii_host.removesuffix(".").split(".")
        if len(ascii_host) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
            return (f"invalid host name {host!r}: use letters, digits, '-', '_' and dots "
                    "between non-empty labels")
    if port and not (port.isascii() and port.isdigit()):
        return f"invalid port {port!r}: use a number from 1 to 65535"
    if port and not 1 <= int(port) <= 65535:
        return f"port {int(port)} is outside 1-65535"
    return None


def redact_url(url: str) -> str:
    """The URL without credentials (``user:pass@`` becomes nothing)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@", r"\1", url)


def describe_body(body: str) -> str:
    """A request body as it may be shown: its size and a hash prefix, never its text
    (e.g. ``<120 bytes, sha256 3f2a9c1b…>``); enough to tell two bodies apart."""
    raw = body.encode()
    return f"<{len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()[:8]}…>"


def _shown(url: str) -> str:
    """A URL we refuse, for the error message: malformed, so whatever precedes an '@'
    (before any '?' or '#') may be a password, and is dropped."""
    clean = redact_url(url)
    if "@" in clean.split("?")[0].split("#")[0]:
        scheme = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/*", clean)
        head = scheme.group(0) if scheme else ""
        clean = head + re.sub(r"^[^?#]*@", "", clean[len(head):])
    return clean


def parse_duration(value: Any, key: str = "duration", allow_zero: bool = False) -> int:
    """``2s``, ``30m``, ``6h``, ``1d`` -> seconds (``0s`` only with ``allow_zero``)."""
    m = _DURATION_RE.fullmatch(value) if isinstance(value, str) else None
    if not m or len(m.group(1)) > 9 or (int(m.group(1)) == 0 and not allow_zero):
        raise BadInput(f"invalid {key} {value!r}: use a number and a unit s, m, h or d (e.g. 30m)")
    seconds = int(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds > 3650 * 86400:
        raise BadInput(f"invalid {key} {value!r}: at most 3650d")
    return seconds


def parse_size(value: Any, key: str = "size") -> int:
    """``50G`` -> bytes (1024-based); a plain integer is bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE_RE.fullmatch(value) if isinstance(value, str) else None
    if not m or len(m.group(1)) > 18:
        raise BadInput(f"invalid {key} {value!r}: use a number with an optional K, M, G or T")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def human_size(n: int) -> str:
    """A byte count for people: ``512 B``, ``1.5 KiB``, ``20.0 MiB`` (1024-based, as
    ``max_cache_size`` and the other size options are written)."""
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        size /= 1024
        if size < 1024 or unit == "PiB":
            break
    return f"{size:.1f} {unit}"


def check_refresh(value: Any) -> str:
    if value in ("never", "on-open"):
        return value
    if isinstance(value, str) and value.startswith("cron:"):
        cron_fields(value)
        return value
    if not isinstance(value, str) or not _DURATION_RE.fullmatch(value):
        raise BadInput(f"invalid refresh {value!r}: never, on-open, cron:EXPR or a duration "
                       "such as 30m, 6h, 1d")
    parse_duration(value, "refresh")
    return value


def cron_fields(value: str) -> str:
    """The five-field cron expression of ``cron:EXPR`` (UTC), or BadInput."""
    from croniter import croniter

    expr = value.removeprefix("cron:").strip()
    if len(expr.split()) != 5:
        raise BadInput(f"invalid refresh {value!r}: cron: needs five fields "
                       "(minute hour day month weekday), e.g. 'cron:30 2 * * *'")
    if not croniter.is_valid(expr):
        raise BadInput(f"invalid refresh {value!r}: not a valid cron expression "
                       "(a field is out of range?)")
    return expr


def _positive_int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, str) and value.isdecimal() and len(value) <= 18:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BadInput(f"invalid {key} {value!r}: must be an integer >= {minimum}")
    return value


def _check_entry_name(table: str, name: Any) -> None:
    """A header name, or the name of a validate check (BadInput if not)."""
    if table == "headers":
        if not isinstance(name, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise BadInput(f"invalid header name {name!r}")
    elif name not in VALIDATE_KEYS:
        raise BadInput(f"unknown check validate.{name}: use " + ", ".join(VALIDATE_KEYS))


def _check_headers(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise BadInput("invalid headers: must be a table of name = value")
    out: dict[str, str] = {}
    for k, v in value.items():
        _check_entry_name("headers", k)
        if not isinstance(v, str) or not v.isascii() or any(c in v for c in "\r\n\0"):
            raise BadInput(f"invalid value for header {k!r}")  # never echo the value
        out[k] = v
    return out


def _check_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise BadInput(f"invalid {key} {value!r}: true or false")


def _check_validate(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadInput("invalid validate: must be a table of checks")
    out: dict[str, Any] = {}
    for k, v in value.items():
        _check_entry_name("validate", k)
        if k == "min_size":
            out[k] = parse_size(v, "validate.min_size")
        elif k == "sha256":
            if not isinstance(v, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", v):
                raise BadInput(f"invalid validate.sha256 {v!r}: 64 hex digits")
            out[k] = v.lower()
        elif k == "content_type":
            if not isinstance(v, str) or not v.strip():
                raise BadInput("invalid validate.content_type: a media type such as text/csv")
            out[k] = v.strip()
        elif k == "cmd":
            import shlex

            try:
                words = shlex.split(v) if isinstance(v, str) else None
            except ValueError:
                words = None
            if not words:
                raise BadInput(f"invalid validate.cmd {v!r}: a command line")
            out[k] = v
        else:
            parse_duration(v, "validate.timeout")
            out[k] = v
    return out


def _check_option(key: str, value: Any) -> Any:
    if key == "refresh":
        return check_refresh(value)
    if key in ("attempt_timeout", "min_speed_time", "attempt_max_time"):
        parse_duration(value, key)
        return value
    if key == "min_speed":
        parse_size(value, key)  # bytes a second; 0: no low-speed limit
        return value
    if key in ("max_attempts", "connections"):
        return _positive_int(value, key, 1)
    if key == "keep_versions":
        return _positive_int(value, key, 0)
    if key == "keep_for":
        parse_duration(value, key, allow_zero=True)
        return value
    if key == "method":
        if not isinstance(value, str) or value.upper() not in ("GET", "POST"):
            raise BadInput(f"invalid method {value!r}: GET or POST")
        return value.upper()
    if key == "body":
        if value is not None and not isinstance(value, str):
            raise BadInput("invalid body: must be a string")
        return value or None  # body= removes it
    if key == "headers":
        return _check_headers(value)
    if key == "pinned":
        return _check_bool(value, key)
    if key in ("open_wait", "retry_backoff"):
        parse_duration(value, key)
        return value
    if key == "proxy":
        if value in (None, ""):
            return None
        check_url(value)
        return value
    if key == "validate":
        return _check_validate(value)
    if key == "unpack":
        if value not in ("auto", "off"):
            raise BadInput(f"invalid unpack {value!r}: auto or off")
        return value
    raise BadInput(f"unknown option {key!r}")


def normalize_options(raw: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate ``raw`` over ``base`` (default: DEFAULT_OPTIONS); return the merged dict.

    Dotted keys (``headers.Authorization``) set one entry of a table option; an empty
    value removes the entry (``set headers.Authorization=``), as ``body=`` and
    ``proxy=`` remove the body and the proxy.
    """
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (base or DEFAULT_OPTIONS).items()}
    for key, value in raw.items():
        if "." in key:
            table, _, sub = key.partition(".")
            table = table.replace("-", "_")
            if table == "validate":
                sub = sub.replace("-", "_")
            if table in ("headers", "validate") and value == "":
                _check_entry_name(table, sub)  # a typo is an error, not a silent no-op
                out[table] = {k: v for k, v in out.get(table, {}).items() if k != sub}
            elif table == "headers":
                out["headers"] = _check_headers({**out.get("headers", {}), sub: value})
            elif table == "validate":
                out["validate"] = _check_validate({**out.get("validate", {}), sub: value})
            else:
                _check_option(table, {})  # unknown / not-yet tables give their own error
                raise BadInput(f"option {table!r} is not a table")
        else:
            key = key.replace("-", "_")
            out[key] = _check_option(key, value)
    return out


def public_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options safe to show: header values hidden, the body only as its size and hash
    (API bodies carry keys as often as headers do)."""
    shown = dict(options)
    shown["headers"] = {k: "<hidden>" for k in options.get("headers", {})}
    if shown.get("body") is not None:
        shown["body"] = describe_body(shown["body"])
    if shown.get("proxy"):
        shown["proxy"] = redact_url(shown["proxy"])
    return shown
