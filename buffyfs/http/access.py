"""Who may do what on the server: bearer tokens (SPEC part 2, "Access").

Two scopes: ``read`` (every GET and HEAD) and ``control`` (``POST .../@control``,
and reads). With no read token configured reads are open; control always needs a
control token. A token comes in ``Authorization: Bearer T`` or, for reads only, in
the ``buffy_token`` cookie that ``?token=T`` sets (an HttpOnly, SameSite=Strict
cookie: a page elsewhere cannot make a browser send it, and control never takes it).

Tokens are compared in constant time, against every configured token (no early exit
that would tell how much of a guess was right). Tokens never appear in an answer or
a log line.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from buffyfs.errors import BadInput

Scope = Literal["read", "control"]
COOKIE = "buffy_token"


@dataclass
class Tokens:
    read: list[bytes] = field(default_factory=list)
    control: list[bytes] = field(default_factory=list)

    @property
    def open_reads(self) -> bool:
        return not self.read

    def scope_of(self, token: str | None) -> Scope | None:
        """What ``token`` grants (None: nothing, or no token)."""
        if not token:
            return None
        given = token.encode("utf-8", "surrogateescape")
        control = _matches(given, self.control)
        read = _matches(given, self.read)
        return "control" if control else "read" if read else None


def _matches(given: bytes, known: list[bytes]) -> bool:
    found = False
    for token in known:
        found |= hmac.compare_digest(given, token)
    return found


def decide(tokens: Tokens, want: Scope, header_token: str | None,
           cookie_token: str | None) -> tuple[int, str] | None:
    """None if the request may go on, else (status, reason): 401 without a usable
    token, 403 with a token whose scope is too small."""
    if want == "read":
        if tokens.open_reads:
            return None
        scope = tokens.scope_of(header_token) or tokens.scope_of(cookie_token)
        if scope is None:
            return 401, "a read token is needed (Authorization: Bearer TOKEN)"
        return None
    scope = tokens.scope_of(header_token)
    if scope == "control":
        return None
    if scope == "read":
        return 403, "this token may read, not control"
    return 401, "a control token is needed (Authorization: Bearer TOKEN)"


def bearer(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer T`` header."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def load_tokens(inline: list[str], files: list[str], what: str) -> list[bytes]:
    """Tokens given in the config and in token files (one a line, ``#`` comments);
    BadInput naming the file (never a token) when one cannot be used."""
    out = []
    for i, token in enumerate(inline):
        out.append(_check(token, f"{what} #{i + 1}"))
    for path in files:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise BadInput(f"cannot read {what} file {path}: {reason}") from None
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(_check(line, f"{path} line {number}"))
    return out


def _check(token: object, where: str) -> bytes:
    if not isinstance(token, str) or not token or any(c.isspace() or ord(c) < 33
                                                      for c in token):
        raise BadInput(f"{where}: a token is one word of printable characters")
    return token.encode()


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` stands for is a loopback one (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)
