"""When a source is due for a check, from its ``refresh`` option and its state."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from buffyfs.index import parse_rfc3339
from buffyfs.options import cron_fields, parse_duration


def next_check(
    options: dict[str, Any], state: dict[str, Any],
    has_version: bool | Callable[[], bool], now: datetime
) -> datetime | None:
    """The time of the next automatic check, or None for "not until asked".

    A source that has never been checked is due now. ``never`` downloads once:
    after that (or after a first attempt that gave up) only ``refresh`` fetches.
    A duration counts from the last check, successful or not; ``cron:EXPR`` is the
    next match (UTC) after it. ``on-open`` checks only when ``latest`` is opened. A
    pinned source with a version is never checked. ``has_version`` may be a callable,
    called only when the answer matters (the mount's start evaluates every source, and
    most policies need no look at the versions).
    """
    if options.get("pinned") and _ask(has_version):
        return None  # pinned: the origin is not contacted
    last = state.get("last_check")
    if last is None:
        return now
    policy = options.get("refresh", "1d")
    if policy == "never" or policy == "on-open" and _ask(has_version):
        return None
    if policy == "on-open":
        return None if state.get("consecutive_failures") else now
    if policy.startswith("cron:"):
        from croniter import croniter

        after = parse_rfc3339(last)
        return max(now, croniter(cron_fields(policy), after).get_next(datetime))
    return max(now, parse_rfc3339(last) + timedelta(seconds=parse_duration(policy)))


def _ask(has_version: bool | Callable[[], bool]) -> bool:
    return has_version() if callable(has_version) else has_version
