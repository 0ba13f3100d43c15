"""Commands of the command line, applied through the running mount's control files.

With a mount running on the cache, ``buffyfs add``, ``remove``, ``set``, ``tag``,
``untag``, ``pin``, ``unpin``, ``hold``, ``release``, ``refresh`` and ``revalidate``
write their command to the mount's ``@control`` file. The mount applies it as it
applies any control write (commands.py, one index transaction) and answers the write
once the change shows in the mount, so the command has taken effect in the mount when
the CLI returns. Written to the index directly, it would show only at the mount's next
poll of the index, and the kernel's entry cache could serve the old ``latest`` for a
second more.

Without a mount, or when its control file cannot be opened from here (another user's
mount, another mount namespace), the command goes to the index directly, as before;
a running mount then catches up within 2 seconds.

Before the write, the command is checked against the index (``commands.dry_run``):
errors keep their kind (exit 2 for a bad argument, 1 for an unknown source, as
without a mount), and the CLI learns which version ``latest`` or ``newest`` names now
and writes its id, so that what it prints is what was changed.
"""

from __future__ import annotations

import errno
import os
import shlex
import threading
import time
from pathlib import Path
from typing import Any

from buffyfs import control, mounttable
from buffyfs.control import Command
from buffyfs.errors import BadInput, CacheError, NotFound
from buffyfs.store import commands
from buffyfs.store.cache import Cache
from buffyfs.store.records import Version

# How long the mount may take to answer a control write. A control write answers in
# milliseconds, except ``revalidate`` that runs the validation command (its own
# timeout, 60 s by default) before answering.
CONTROL_TIMEOUT = 300.0

# commands whose first argument is a version reference (an id, latest or newest)
VERSION_ARG = frozenset({"tag", "untag", "pin", "hold", "release", "revalidate"})


def apply(cache: Cache, cmd: Command, source: str | None = None) -> Any:
    """Apply one command (``source`` None: a command of the whole cache) through the
    running mount if there is one, else to the index; returns the command's result
    (commands.py's rules say what each returns)."""
    checked = commands.dry_run(cache.index, [cmd], source)  # BadInput, NotFound
    result = checked.results[0]
    line = control_line(_resolved(cmd, result))
    path = control_file(cache, source) if fits_one_write(line) else None
    if path is not None and _write(path, line, cache, cmd, source):
        if cmd.word == "revalidate":  # the mount's verdict, as it applied it
            with cache.index.read() as r:
                return r.version(source or "", result.id) or result
        return result
    refuse_mirrored(cache, source if source is not None else
                    (cmd.args[0] if cmd.word == "remove" else None))
    if cmd.word == "revalidate":
        cache.judge([cmd], source)  # the checks, before the transaction
    outcome = commands.run(cache.index, [cmd], source, refresh="request")
    for name in outcome.removed:
        cache.drop_partial(name)
    return outcome.results[0]


def refuse_mirrored(cache: Cache, name: str | None) -> None:
    """A replica's mirrored source (replica.py) changes only at its hub: its commands
    go through the running replica mount, which forwards them; never to the index."""
    if name is None:
        return
    with cache.index.read() as r:
        src = r.source(name)
    mirrored = src is not None and src.mirror
    if mirrored:
        raise CacheError(f"source {name!r} is mirrored from a hub: its commands go "
                         "through the running replica mount (which forwards them to "
                         "the hub), or to the hub itself")


def through_mount(cache: Cache, cmd: Command, source: str | None = None) -> bool:
    """Write ``cmd`` to the running mount's control file; False when there is none to
    write to (the caller does the work itself). Raises like ``apply``."""
    commands.dry_run(cache.index, [cmd], source)
    path = control_file(cache, source)
    return path is not None and _write(path, control_line(cmd), cache, cmd, source)


REFRESH_POLL = 0.1  # seconds between looks at the index while a refresh runs


def wait_refresh(cache: Cache, name: str, asked: float) -> dict[str, Any]:
    """Wait for the mount's first refresh of ``name`` that started after ``asked``
    (wall-clock seconds) to end; returns its ``last_refresh`` record (refresh.py).
    Ends early, with an error, when the source goes or the mount stops."""
    while True:
        with cache.index.read() as r:
            if r.source(name) is None:
                raise NotFound(f"source {name!r} was removed before its check finished")
            last = r.state(name).last_refresh
        if last and last["started"] >= asked:
            return last
        if cache.running_mount() is None:
            raise CacheError("the mount stopped before the check finished")
        time.sleep(REFRESH_POLL)


GC_POLL = 0.1  # seconds between looks at the index while the mount collects


def wait_gc(cache: Cache, rid: int, stalled_after: float,
            dry_run: bool = False) -> dict[str, Any]:
    """Wait for the mount's answer to ``buffyfs gc`` request ``rid`` (``gc_result``):
    as long as the mount shows progress (``gc_progress`` moves: the plan began, a
    batch was committed; a collection of 100,000 versions takes a minute on a busy
    machine), at most ``stalled_after`` seconds without any, and not at all once the
    mount stopped.

    The index holds one request: a second ``buffyfs gc`` may replace ``rid`` before
    the mount reads it, and the mount then answers only the later one. Its answer, if
    of the same kind (a dry run or not), answers ``rid`` too: its collection began
    after ``rid`` was asked. Else ``rid`` is asked again."""
    seen: Any = None
    since = time.monotonic()
    while not isinstance(result := _gc_answer(cache, rid, dry_run), dict):
        if result is False:  # replaced by a request of the other kind: ask again
            rid = cache.request_gc(dry_run)
        with cache.index.read() as r:
            progress = r.meta_json("gc_progress")
        if progress != seen:
            seen, since = progress, time.monotonic()
        elif time.monotonic() - since > stalled_after:
            raise CacheError(f"the running mount did not answer the gc request (no "
                             f"progress for {stalled_after:g}s)")
        if cache.running_mount() is None and not _gc_answer(cache, rid, dry_run):
            raise CacheError("the mount stopped before answering the gc request")
        time.sleep(GC_POLL)
    return result


def _gc_answer(cache: Cache, rid: int, dry_run: bool) -> dict[str, Any] | bool | None:
    """The mount's answer to request ``rid``, or, when the mount answered a later one
    and not ``rid`` (which that one replaced), the later one's if of the same kind;
    False if of the other kind (``rid`` must be asked again); None: no answer yet."""
    result = cache.gc_result(rid)
    if result is not None:
        return result
    answered = cache.gc_answered()
    if not answered or answered["id"] <= rid:
        return None
    if answered["dry_run"] != dry_run:
        return False
    return cache.gc_result(answered["id"])


def control_file(cache: Cache, source: str | None) -> Path | None:
    """The ``@control`` file of the mount running on ``cache`` (``source`` None: the
    root's), or None when no mount of this cache is reachable from here."""
    mount = cache.running_mount()
    mountpoint = (mount or {}).get("mountpoint")
    if not mountpoint or mount_source(mountpoint) != f"buffyfs:{cache.root}":
        return None  # not mounted here (a stale record, another mount namespace)
    base = Path(mountpoint)
    return base / "@control" if source is None else base / source / "@control"


def mount_source(path: str) -> str | None:
    """The source field (``buffyfs:CACHE`` for ours) of the topmost mount on ``path``."""
    try:
        mounted = mounttable.topmost(path)
    except OSError:
        return None
    return mounted.source if mounted else None


def control_line(cmd: Command) -> str:
    """``cmd`` as one control line; table options as dotted keys, booleans as words."""
    words = [cmd.word, *cmd.args]
    for key, value in cmd.options.items():
        if isinstance(value, dict):
            words += [f"{key}.{sub}={_word(v)}" for sub, v in value.items()]
        elif value is not None:
            words.append(f"{key}={_word(value)}")
    return shlex.join(words) + "\n"


def fits_one_write(line: str) -> bool:
    """Can ``line`` go as one control write? Not a value with a line break (a POST
    body may have one: the grammar is one command a line), nor one over MAX_WRITE."""
    return "\n" not in line[:-1] and "\r" not in line and \
        len(line.encode()) <= control.MAX_WRITE


def _word(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _resolved(cmd: Command, result: Any) -> Command:
    """``cmd`` with a ``latest``/``newest`` argument replaced by the id it names now."""
    if cmd.word not in VERSION_ARG or not cmd.args:
        return cmd
    vid = result.id if isinstance(result, Version) else result
    if not isinstance(vid, str):
        return cmd
    return Command(cmd.word, [vid, *cmd.args[1:]], dict(cmd.options))


def _write(path: Path, line: str, cache: Cache, cmd: Command, source: str | None) -> bool:
    """Write ``line`` to the control file ``path``; False when it cannot be opened
    from here. A refused write raises as the command would against the index."""
    done: list[int | None] = []

    def write() -> None:
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError:
            done.append(-1)  # not ours to write to: the caller uses the index
            return
        try:
            os.write(fd, line.encode())
            done.append(None)
        except OSError as e:
            done.append(e.errno or errno.EIO)
        finally:
            os.close(fd)

    # In a daemon thread: a write the mount never answers waits, killably, until the
    # process exits; the command says so after CONTROL_TIMEOUT instead of hanging.
    writer = threading.Thread(target=write, name="control-write", daemon=True)
    writer.start()
    writer.join(CONTROL_TIMEOUT)
    if not done:
        raise CacheError(f"the mount on {path.parent} did not answer within "
                         f"{CONTROL_TIMEOUT:.0f}s")
    if done[0] == -1:
        return False
    if done[0] is None:
        return True
    # Refused: the index has changed since the check (or the mount judged otherwise).
    # The check again gives the error its kind; else the mount's own reason.
    commands.dry_run(cache.index, [cmd], source)
    with cache.index.read() as r:
        reason = r.meta_json("last_control_error") if source is None else \
            r.state(source).last_control_error
    reason = (reason or os.strerror(done[0])).removeprefix("line 1: ")
    if done[0] == errno.EINVAL:
        raise (NotFound if reason.startswith("no source") else BadInput)(reason)
    raise CacheError(f"the mount could not apply {cmd.word!r}: {reason}")
