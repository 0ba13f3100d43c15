"""The ``@status`` objects (SPEC), built from the index.

The same functions serve the mount's ``@status`` files and ``buffyfs status``, so
both always agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from typing import Any

from buffyfs import __version__
from buffyfs.options import public_options, redact_url
from buffyfs.store.gc import Why, kept_reasons
from buffyfs.store.index import Index, Reader, held_until, now_utc, resolve_latest, rfc3339
from buffyfs.store.records import Version


def source_status(
    r: Reader, name: str, live_progress: dict[str, Any] | None = None,
    open_inos: Collection[int] = (),
) -> dict[str, Any]:
    """The source's object; ``open_inos``: the versions readers have open (the mount's)."""
    src = r.source(name)
    if src is None:
        raise KeyError(name)
    state = r.state(name)
    versions = r.versions(name)
    latest = resolve_latest(src, versions)
    now = now_utc()
    why = kept_reasons(src, versions, now, open_inos)
    if latest is None and versions and not any(v.damaged for v in versions):
        earlier = (state.last_error or {}).get("message")
        state = dataclasses.replace(state, last_error={
            "at": rfc3339(now_utc()),  # a state of now: tags record no time
            "message": "every version is tagged failed; latest cannot be opened"
                       + (f" (last error: {earlier})" if earlier else "")})
    # (a damaged version names itself in last_error when found: index.mark_damaged)
    progress = state.progress
    if live_progress and name in live_progress:
        done, total = live_progress[name]
        progress = {"bytes": done, "total": total}
    run_state = state.state
    return {
        "name": name,
        "url": redact_url(src.url),
        "refresh": src.options["refresh"],
        "pinned": src.pin if src.options.get("pinned") else None,
        "state": run_state,
        "latest": latest.id if latest else None,
        "progress": progress if run_state == "fetching" else None,
        "last_check": state.last_check,
        "last_success": state.last_success,
        "next_check": state.next_check,
        "consecutive_failures": state.consecutive_failures,
        "stale": bool(latest) and state.consecutive_failures > 0,
        "last_error": state.last_error,
        "last_control_error": state.last_control_error,
        # ours: the attempt of the refresh under way (or next, while waiting), and why
        # a fetching source has no bytes yet (it waits for a download slot)
        "attempt": state.attempt if run_state != "idle" else None,
        "queued": state.queued if run_state == "fetching" else None,
        "versions": [_with_unpack(_version_entry(v, why[v.id], now),
                                  r.unpacked(v.sha256)) for v in versions],
        "options": public_options(src.options),  # ours: header values hidden
    }


def _version_entry(v: Version, why: list[Why], now: datetime) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": v.id, "size": v.size, "sha256": v.sha256,
                             "fetched_at": v.fetched_at}
    entry["tags"] = list(v.tags)
    entry["held_until"] = held_until(v, now)
    # ours: why collection keeps it ("latest", "valid", "keep tag", "held until T",
    # "grace until T", "keep_versions", "pinned", "open"); [] the next collection takes it
    entry["kept"] = [str(w) for w in why]
    if v.validation:
        entry["validation"] = v.validation  # why it was tagged failed
    if v.damaged:
        entry["damaged"] = v.damaged  # {"at", "reason"}: not served, downloading again
    if v.remote:
        entry["remote"] = True  # a replica's version whose bytes are not here yet
    return entry


def _with_unpack(entry: dict[str, Any], record: dict[str, Any] | None) -> dict[str, Any]:
    """A version entry with its unpacked view, for versions whose bytes are compressed
    or an archive (others' entries stay as they were): ``unpack_error`` (SPEC: a string
    when the unpack failed, else null) and, ours, ``unpack``: ``{"kind", "state"}``
    (state ``pending``, ``running``, ``done`` or ``error``) plus the bytes written while
    ``running``, the decompressed ``size`` and archive ``members`` when ``done``."""
    if record is None or not record.get("kind"):
        return entry
    entry["unpack_error"] = record.get("error")
    shown = {"kind": record["kind"], "state": record["state"]}
    if record["state"] == "running":
        shown["bytes"] = record.get("bytes", 0)
    if record["state"] == "done":
        if "file_size" in record:
            shown["size"] = record["file_size"]
        if "members" in record:
            shown["members"] = record["members"]
    entry["unpack"] = shown
    return entry


def root_status(
    index: Index, cache_dir: Path, cache_size: int, max_cache_size: int | None
) -> dict[str, Any]:
    with index.read() as r:
        sources = []
        for name, src in r.sources():
            state = r.state(name)
            latest = resolve_latest(src, r.versions(name))
            run_state = state.state
            failures = state.consecutive_failures
            sources.append({
                "name": name,
                "url": redact_url(src.url),
                "latest": latest.id if latest else None,
                "state": run_state,
                "consecutive_failures": failures,
                # ours: as in the source's object, and its latest's fetch time (the age)
                "stale": bool(latest) and failures > 0,
                "latest_fetched_at": latest.fetched_at if latest else None,
                "progress": state.progress if run_state == "fetching" else None,
            })
        last_control_error = r.meta_json("last_control_error")
        last_reload_error = r.meta_json("last_reload_error")
        scrub = r.meta_json("scrub")
    return {
        "version": __version__,
        "cache": str(cache_dir),
        "cache_size": cache_size,
        "max_cache_size": max_cache_size,
        "last_control_error": last_control_error,
        "scrub": scrub,  # ours: the last background scrub (scrub.py), null before the first
        # ours: why the last SIGHUP reload was refused ({"at", "message"}); null once a
        # reload succeeds
        "last_reload_error": last_reload_error,
        "sources": sources,
    }
