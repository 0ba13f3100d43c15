"""When sources are due: policy.next_check for every refresh policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from buffyfs.index import rfc3339
from buffyfs.options import normalize_options
from buffyfs.policy import next_check

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


def opts(**raw):
    return normalize_options(raw)


def state(last_check=None, failures=0):
    return {"last_check": last_check, "consecutive_failures": failures}


@pytest.mark.parametrize("policy", ["1d", "never", "on-open", "cron:0 3 * * *"])
def test_never_checked_is_due_now(policy):
    assert next_check(opts(refresh=policy), state(), False, NOW) == NOW


def test_duration_counts_from_last_check():
    last = "2026-11-27T11:30:00Z"
    assert next_check(opts(refresh="1h"), state(last), True, NOW) == NOW + timedelta(minutes=30)
    assert next_check(opts(refresh="10m"), state(last), True, NOW) == NOW  # overdue: now


def test_never_and_on_open_do_not_schedule_once_checked():
    last = "2026-11-27T11:00:00Z"
    assert next_check(opts(refresh="never"), state(last), True, NOW) is None
    assert next_check(opts(refresh="never"), state(last, 1), False, NOW) is None
    assert next_check(opts(refresh="on-open"), state(last), True, NOW) is None


def test_cron_is_the_next_match_in_utc():
    last = "2026-11-27T11:00:00Z"
    due = next_check(opts(refresh="cron:30 2 * * *"), state(last), True, NOW)
    assert due == datetime(2026, 11, 28, 2, 30, tzinfo=UTC)
    due = next_check(opts(refresh="cron:*/15 * * * *"), state(last), True, NOW)
    assert due == NOW  # 11:15 has passed: due now


def test_pinned_with_a_version_is_never_checked():
    options = opts(refresh="1s", pinned="true")
    assert next_check(options, state("2026-11-27T11:00:00Z"), True, NOW) is None
    assert next_check(options, state(), False, NOW) == NOW  # the first download still happens


def test_has_version_is_asked_only_when_it_matters():
    asked = []

    def has_version() -> bool:
        asked.append(1)
        return True

    last = rfc3339(NOW - timedelta(hours=1))
    assert next_check(opts(refresh="never"), state(last), has_version, NOW) is None
    assert next_check(opts(refresh="1h"), state(last), has_version, NOW) == NOW
    assert asked == []
    assert next_check(opts(refresh="on-open"), state(last), has_version, NOW) is None
    assert next_check(opts(refresh="1h", pinned=True), state(last), has_version, NOW) is None
    assert len(asked) == 2
