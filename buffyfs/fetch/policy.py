"""When a source is due for a check, from its ``refresh`` option and its state.

After a failed refresh (``consecutive_failures`` > 0) a source is retried on a
backoff instead of waiting for its policy's next check: ``retry_backoff`` (default
1m) doubled per consecutive failure, with jitter, up to the policy's own next check.
A source with no version yet (every open of its ``latest`` fails) starts at half
the base and is capped at NO_VERSION_CAP, whatever its policy: ``never`` and
``on-open`` sources keep retrying until they have a version.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from buffyfs.options import DEFAULT_OPTIONS, cron_fields, parse_duration
from buffyfs.store.index import parse_rfc3339
from buffyfs.store.records import SourceState

NO_VERSION_CAP = 3600.0  # seconds: the longest wait between retries of a source with no version
JITTER = (0.5, 1.0)  # the delay is multiplied by a random factor in this range
MAX_DELAY = 3650 * 86400.0  # seconds: the longest duration an option may give


def next_check(
    options: dict[str, Any], state: SourceState,
    has_version: bool | Callable[[], bool], now: datetime
) -> datetime | None:
    """The time of the next automatic check, or None for "not until asked".

    A source that has never been checked is due now. ``never`` downloads once:
    after that only ``refresh`` fetches. A duration counts from the last check;
    ``cron:EXPR`` is the next match (UTC) after it. ``on-open`` checks only when
    ``latest`` is opened. A pinned source with a version is never checked. After a
    failed refresh the retry backoff (``retry_delay``) may bring the check forward,
    never past the policy's own. ``has_version`` may be a callable, called only when
    the answer matters (the mount's start evaluates every source, and most
    policies need no look at the versions).
    """
    if options.get("pinned") and _ask(has_version):
        return None  # pinned: the origin is not contacted
    last = state.last_check
    if last is None:
        return now
    last_at = parse_rfc3339(last)
    failures = state.consecutive_failures or 0
    policy = options.get("refresh", "1d")
    if policy in ("never", "on-open"):
        planned = None  # after the first download, only `refresh` or an open checks
        if policy == "on-open" and not failures and not _ask(has_version):
            return now
    elif policy.startswith("cron:"):
        from croniter import croniter

        planned = croniter(cron_fields(policy), last_at).get_next(datetime)
    else:
        planned = last_at + timedelta(seconds=parse_duration(policy))
    if failures:
        with_version = _ask(has_version)
        if policy in ("never", "on-open") and with_version:
            return None  # it serves a version; its policy says when to look again
        retry = last_at + timedelta(seconds=retry_delay(options, failures, with_version))
        planned = retry if planned is None else min(planned, retry)
    return None if planned is None else max(now, planned)


def retry_delay(options: dict[str, Any], failures: int, has_version: bool) -> float:
    """Seconds from a failed refresh to the next try: the source's ``retry_backoff``
    (half of it without a version), doubled per consecutive failure, jittered;
    without a version at most NO_VERSION_CAP."""
    base = float(parse_duration(options.get("retry_backoff", DEFAULT_OPTIONS["retry_backoff"]),
                                "retry_backoff"))
    if not has_version:
        base /= 2
    delay = base * 2.0 ** min(max(failures, 1) - 1, 40)
    delay = min(delay, max(NO_VERSION_CAP, base) if not has_version else MAX_DELAY)
    return delay * random.uniform(*JITTER)


def _ask(has_version: bool | Callable[[], bool]) -> bool:
    return has_version() if callable(has_version) else has_version
