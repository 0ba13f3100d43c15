"""What the commands do: add, remove, set, tag, untag, pin, unpin, refresh, hold,
release and revalidate, each checked and applied inside one index write transaction
(``dry_run``: checked only, in a transaction that is aborted).

The rules live here once, for every way in: the mount's control files (fs.py, through
``Cache.run_control``), the command line (cache.py) and, later, the HTTP server's
``POST .../@control``. ``apply`` runs a list of commands in the caller's write
transaction, one after the other:

- each command sees what the commands before it did: ``latest`` on a line is
  ``latest`` as the earlier lines of the same write left it (so ``tag latest failed``
  twice fails the two newest versions, and a third finds the one before them, or
  fails the whole write if there is none);
- a command that fails raises (BadInput, NotFound) naming its line, the transaction is
  aborted, and nothing of the write is applied;
- no other writer, in this process or another (the CLI), can change the index between
  a command's check and its effect: LMDB has one writer at a time.

What is not an index change (kicking the scheduler, dropping kernel caches, deleting
a removed source's partial download, cancelling its download) is listed in the
returned ``Outcome`` for the caller to do after the commit, and only if it commits.
The rules run in whatever thread holds the transaction; they never wait on the
event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from buffyfs.control import Command, check_version_ref
from buffyfs.errors import BadInput, NotFound
from buffyfs.options import (
    check_name,
    check_tag,
    check_url,
    normalize_options,
    parse_duration,
)
from buffyfs.store.index import Index, Reader, Writer
from buffyfs.store.records import Source, Version

# How ``refresh`` takes effect in the transaction:
#   "mount"    the mount runs the write: the source shows ``fetching`` at once and the
#              caller kicks its scheduler after the commit
#   "request"  another process asks the running mount (index ``requests``)
#   "check"    only the checks: the caller refreshes in the foreground (no mount)
RefreshBy = Literal["mount", "request", "check"]


@dataclass
class Outcome:
    """What a committed write did, and what its caller has left to do."""

    changed: list[str] = field(default_factory=list)  # sources to look at again, in order
    refresh: list[str] = field(default_factory=list)  # sources to check now
    removed: list[str] = field(default_factory=list)  # unregistered: drop their partials
    results: list[Any] = field(default_factory=list)  # per command, see each rule
    retention: bool = False  # something may be collectable now (a hold ended, a tag went)

    def touch(self, name: str) -> None:
        if name not in self.changed:
            self.changed.append(name)


# commands after which a version may have become collectable: the mount collects then
FREEING_WORDS = frozenset({"release", "untag", "unpin", "set", "remove", "revalidate"})


def run(index: Index, commands: list[Command], source: str | None = None,
        refresh: RefreshBy = "mount") -> Outcome:
    """Apply ``commands`` all or nothing, in one write transaction of its own."""
    with index.write() as w:
        return apply(w, commands, source, refresh)


class _Abort(Exception):
    """Ends ``dry_run``'s transaction without committing it."""


def dry_run(index: Index, commands: list[Command], source: str | None = None) -> Outcome:
    """Check ``commands`` as ``run`` would apply them now, and apply nothing: the same
    errors (BadInput, NotFound) and the same results (e.g. the version ``latest``
    names), from a write transaction that is aborted."""
    checked: list[Outcome] = []
    try:
        with index.write() as w:
            checked.append(apply(w, commands, source, refresh="check"))
            raise _Abort
    except _Abort:
        return checked[0]


def apply(w: Writer, commands: list[Command], source: str | None = None,
          refresh: RefreshBy = "mount") -> Outcome:
    """Apply ``commands`` in ``w``'s transaction; ``source`` is the source the commands
    are addressed to (None: the whole cache). Raises on the first command that fails,
    its message prefixed with its line (for commands from a control write): the
    caller's transaction must then be aborted, as ``Index.write`` does."""
    out = Outcome()
    for cmd in commands:
        try:
            rule = RULES[cmd.word]
            if (source is None) != (cmd.word in ROOT_WORDS):
                raise BadInput(f"{cmd.word!r} is not a command for "
                               + ("a source" if source is not None else "the whole cache"))
            out.results.append(rule(w, cmd, source or "", out, refresh))
            out.retention |= cmd.word in FREEING_WORDS
        except (BadInput, NotFound) as e:
            if cmd.line:
                raise type(e)(f"line {cmd.line}: {e}") from None
            raise
    return out


# --- the rules: (writer, command, source, outcome, refresh mode) -> result --------------


def _add(w: Writer, cmd: Command, _: str, out: Outcome, __: RefreshBy) -> str:
    """``add NAME URL [KEY=VALUE ...]``; the result is the name."""
    name, url = cmd.args
    check_name(name)
    check_url(url)
    if "url" in cmd.options:
        raise BadInput("give the URL once, as the second argument")
    options = normalize_options(cmd.options)
    if w.source(name) is not None:
        raise BadInput(f"a source named {name!r} exists already")
    w.add_source(name, url, options)
    out.touch(name)
    return name


def _remove(w: Writer, cmd: Command, _: str, out: Outcome, __: RefreshBy) -> str:
    """``remove NAME``: its versions become garbage; the result is the name."""
    [name] = cmd.args
    check_name(name)
    w.remove_source(name)  # NotFound if there is none
    out.touch(name)
    out.removed.append(name)
    return name


def _set(w: Writer, cmd: Command, source: str, out: Outcome, _: RefreshBy) -> None:
    """``set KEY=VALUE ...``; ``pinned`` pins or unpins as ``pin`` and ``unpin`` do."""
    src = _source(w, source)
    raw = dict(cmd.options)
    url = check_url(raw.pop("url")) if "url" in raw else src.url
    options = normalize_options(raw, base=src.options)
    pinned = options["pinned"]
    options["pinned"] = src.options.get("pinned", False)  # the pin moves it, below
    w.add_source(source, url, options, replace=True)
    if pinned and not options["pinned"]:
        w.set_pin(source, True, _pin_target(w, source, None))
    elif options["pinned"] and not pinned:
        w.set_pin(source, False, None)
    out.touch(source)


def _tag(w: Writer, cmd: Command, source: str, out: Outcome, _: RefreshBy) -> Version:
    """``tag VERSION TAG`` / ``untag VERSION TAG``; the result is the version as tagged."""
    ref, tag = cmd.args
    check_tag(tag)
    _source(w, source)
    vid = version(w, source, ref).id
    change = {"add": tag} if cmd.word == "tag" else {"remove": tag}
    v = w.change_tag(source, vid, **change)
    out.touch(source)
    return v


def _pin(w: Writer, cmd: Command, source: str, out: Outcome, _: RefreshBy) -> str | None:
    """``pin [VERSION]``; the result is the version id pinned (None: the first to come)."""
    _source(w, source)
    vid = _pin_target(w, source, cmd.args[0] if cmd.args else None)
    w.set_pin(source, True, vid)
    out.touch(source)
    return vid


def _unpin(w: Writer, cmd: Command, source: str, out: Outcome, _: RefreshBy) -> None:
    _source(w, source)
    w.set_pin(source, False, None)
    out.touch(source)


def _hold(w: Writer, cmd: Command, source: str, out: Outcome, _: RefreshBy) -> Version:
    """``hold VERSION DURATION``: neither collection nor the quota takes the version
    before now + DURATION (a later hold extends, never shortens); ``latest`` is
    resolved now, once. The result is the version as held (the CLI prints its id)."""
    ref, duration = cmd.args
    seconds = parse_duration(duration, "hold duration")
    _source(w, source)
    vid = version(w, source, ref).id
    v = w.hold(source, vid, _round_up(datetime.now(UTC)) + timedelta(seconds=seconds))
    out.touch(source)
    return v


def _round_up(t: datetime) -> datetime:
    """``t`` on the next whole second (times are stored to the second): a hold lasts
    at least its duration."""
    whole = t.replace(microsecond=0)
    return whole if whole == t else whole + timedelta(seconds=1)


def _release(w: Writer, cmd: Command, source: str, out: Outcome, _: RefreshBy) -> Version:
    """``release VERSION``: end its hold now; the result is the version."""
    [ref] = cmd.args
    _source(w, source)
    v = w.release(source, version(w, source, ref).id)
    out.touch(source)
    return v


def _refresh(w: Writer, cmd: Command, source: str, out: Outcome, by: RefreshBy) -> None:
    """``refresh [--force]``: check the origin now; refused while the source is pinned.
    ``--force``: the next refresh asks without validators (an unconditional GET)."""
    src = _source(w, source)
    if src.options.get("pinned"):
        raise BadInput(f"source {source!r} is pinned: unpin it first")
    if cmd.args == ["--force"] and by != "check":
        w.put_state(source, force=True)  # the refresher takes it (refresh.py)
    if by == "mount":
        w.put_state(source, state="fetching")
    elif by == "request":
        w.request_refresh(source)
    out.refresh.append(source)
    out.touch(source)


def _revalidate(w: Writer, cmd: Command, source: str, out: Outcome,
                _: RefreshBy) -> Version:
    """``revalidate VERSION``: tag it ``valid`` or ``failed`` as ``cmd.verdict`` (the
    source's current checks, run before the transaction: revalidate.py) says; without a
    verdict (``dry_run``) only checked. The result is the version as it is now."""
    [ref] = cmd.args
    _source(w, source)
    v = version(w, source, ref)
    if cmd.verdict is None:
        return v
    if cmd.verdict["id"] != v.id:
        raise BadInput(f"{ref!r} named another version while its checks ran; try again")
    failure = cmd.verdict["failure"]
    v = w.change_tag(source, v.id, add="failed" if failure else "valid")
    v = replace(v, validation=failure or None)
    w.put_version(source, v)
    out.touch(source)
    return v


RULES: dict[str, Callable[[Writer, Command, str, Outcome, RefreshBy], Any]] = {
    "add": _add, "remove": _remove, "set": _set, "tag": _tag, "untag": _tag,
    "pin": _pin, "unpin": _unpin, "refresh": _refresh, "hold": _hold, "release": _release,
    "revalidate": _revalidate,
}
ROOT_WORDS = {"add", "remove"}


# --- references ---------------------------------------------------------------------------


def version(r: Reader, source: str, ref: str) -> Version:
    """A version of ``source`` by id, ``latest`` or ``newest`` (as the transaction sees
    it now)."""
    check_version_ref(ref)
    if ref == "newest":
        v = r.newest(source)
        if v is None:
            raise NotFound(f"source {source!r} has no version")
        return v
    if ref == "latest":
        v = r.latest(source)
        if v is None:
            raise NotFound(f"source {source!r} has no usable version")
        return v
    v = r.version(source, ref)
    if v is None:
        raise NotFound(f"source {source!r} has no version {ref!r}")
    return v


def _source(r: Reader, name: str) -> Source:
    src = r.source(name)
    if src is None:
        raise NotFound(f"no source named {name!r}")
    return src


def _pin_target(w: Writer, source: str, ref: str | None) -> str | None:
    """What ``pin [ref]`` pins: the version, else the current ``latest``; None for a
    source with no version yet (the first to arrive holds)."""
    if ref is None and not w.has_versions(source):
        return None
    return version(w, source, ref or "latest").id
