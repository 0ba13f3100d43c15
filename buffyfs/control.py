"""The grammar of the ``@control`` files (pure: no I/O, easy to fuzz).

One command per line, words split as a POSIX shell splits them. ``parse`` checks a
whole write and either returns every command or raises BadInput naming the first
bad line; nothing is applied before the whole write has parsed. What the commands
do, against the index, is commands.py.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Literal

from buffyfs.errors import BadInput
from buffyfs.options import (
    check_name,
    check_tag,
    check_url,
    normalize_options,
    parse_duration,
)

Scope = Literal["root", "source"]

MAX_WRITE = 64 << 10  # below FUSE's max_write, so one write() arrives whole

# word -> (min positional args, max positional args, takes KEY=VALUE options)
GRAMMAR: dict[Scope, dict[str, tuple[int, int, bool]]] = {
    "root": {"add": (2, 2, True), "remove": (1, 1, False)},
    "source": {
        "refresh": (0, 1, False), "set": (0, 0, True), "tag": (2, 2, False),
        "untag": (2, 2, False), "pin": (0, 1, False), "unpin": (0, 0, False),
        "hold": (2, 2, False), "release": (1, 1, False), "revalidate": (1, 1, False),
    },
}
VERSION_RE = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}")

USAGE = {
    "add": "add NAME URL [KEY=VALUE ...]",
    "remove": "remove NAME",
    "refresh": "refresh [--force]",
    "set": "set KEY=VALUE ...",
    "tag": "tag VERSION TAG",
    "untag": "untag VERSION TAG",
    "pin": "pin [VERSION]",
    "unpin": "unpin",
    "hold": "hold VERSION DURATION",
    "release": "release VERSION",
    "revalidate": "revalidate VERSION",
}


@dataclass
class Command:
    word: str
    args: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    line: int = field(default=0, compare=False)  # its line in the write (0: not from one)
    # revalidate: the checks' result, found before the transaction (revalidate.py)
    verdict: dict[str, Any] | None = field(default=None, compare=False)


def parse(data: bytes, scope: Scope) -> list[Command]:
    if len(data) > MAX_WRITE:
        raise BadInput(f"control write too long ({len(data)} bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput("control write is not UTF-8") from None
    if "\0" in text:
        raise BadInput("control write contains a NUL byte")
    commands = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        try:
            cmd = _parse_line(line, scope)
        except BadInput as e:
            raise BadInput(f"line {number}: {e}") from None
        if cmd is not None:
            cmd.line = number
            commands.append(cmd)
    return commands  # empty: a blank or comment-only write does nothing


def _parse_line(line: str, scope: Scope) -> Command | None:
    try:
        words = shlex.split(_strip_comment(line))
    except ValueError as e:
        raise BadInput(f"cannot split the line: {e}") from None
    if not words:
        return None
    word, rest = words[0], words[1:]
    grammar = GRAMMAR[scope]
    if word not in grammar:
        raise BadInput(
            f"unknown command {word[:40]!r}; here: " + ", ".join(USAGE[w] for w in grammar)
        )
    lo, hi, takes_options = grammar[word]
    # Positional words come first (a URL may hold "="), then KEY=VALUE pairs.
    positional, pairs = (rest[:hi], rest[hi:]) if takes_options else (rest, [])
    if not lo <= len(positional) <= hi or any("=" not in p for p in pairs):
        raise BadInput(f"usage: {USAGE[word]}")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        options[key] = value
    if word == "add":
        check_name(positional[0])
        check_url(positional[1])
        if "url" in options:
            raise BadInput("give the URL once, as the second argument")
        normalize_options(options)
    elif word == "remove":
        check_name(positional[0])
    elif word == "set":
        if not options:
            raise BadInput(f"usage: {USAGE[word]}")
        if "url" in options:
            check_url(options["url"])
        normalize_options({k: v for k, v in options.items() if k != "url"})
    elif word in ("tag", "untag"):
        check_version_ref(positional[0])
        check_tag(positional[1])
    elif word == "pin" and positional:
        check_version_ref(positional[0])
    elif word == "hold":
        check_version_ref(positional[0])
        parse_duration(positional[1], "hold duration")
    elif word in ("release", "revalidate"):
        check_version_ref(positional[0])
    elif word == "refresh" and positional and positional[0] != "--force":
        raise BadInput(f"usage: {USAGE[word]}")
    return Command(word, positional, options)


VERSION_WORDS = ("latest", "newest")  # newest: the newest version, even a failed one


def check_version_ref(ref: str) -> str:
    if ref not in VERSION_WORDS and not VERSION_RE.fullmatch(ref):
        raise BadInput(f"invalid version {ref[:40]!r}: a version id, 'latest' or 'newest'")
    return ref


def _strip_comment(line: str) -> str:
    """The line up to a '#' that starts a word outside quotes (as a POSIX shell)."""
    quote = None
    escaped = False
    prev_blank = True
    for i, c in enumerate(line):
        blank = False
        if escaped:
            escaped = False
        elif quote:
            if c == quote:
                quote = None
            elif c == "\\" and quote == '"':
                escaped = True
        elif c == "\\":
            escaped = True
        elif c in "'\"":
            quote = c
        elif c == "#" and prev_blank:
            return line[:i]
        else:
            blank = c.isspace()
        prev_blank = blank
    return line


def help_text(scope: Scope) -> bytes:
    """What reading a control file gives: the commands it takes (so that ``cat``,
    ``tar`` and ``rsync`` of the mount can read it)."""
    where = "the whole cache" if scope == "root" else "this source"
    lines = [f"# buffyfs control file for {where}: write commands to it, one a line:"]
    lines += [f"#   {USAGE.get(word, word)}" for word in GRAMMAR[scope]]
    return ("\n".join(lines) + "\n").encode()
