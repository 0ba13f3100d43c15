"""When sources are due: policy.next_check for every refresh policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from buffyfs.fetch.policy import NO_VERSION_CAP, next_check, retry_delay
from buffyfs.options import normalize_options
from buffyfs.store.index import rfc3339
from buffyfs.store.records import SourceState

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


def opts(**raw):
    return normalize_options(raw)


def state(last_check=None, failures=0):
    return SourceState(last_check=last_check, consecutive_failures=failures)


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
    assert next_check(opts(refresh="never"), state(last, 1), True, NOW) is None
    assert next_check(opts(refresh="on-open"), state(last), True, NOW) is None
    assert next_check(opts(refresh="on-open"), state(last, 2), True, NOW) is None


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


# --- retries after a failed refresh (issue 11 item 7) ------------------------------------

LAST = "2026-11-27T12:00:00Z"  # == NOW: the failure just happened


def wait(options, failures, has_version, last=LAST):
    """Seconds from NOW to the next check (None: not planned)."""
    due = next_check(options, state(last, failures), has_version, NOW)
    return None if due is None else (due - NOW).total_seconds()


@pytest.mark.parametrize("policy", ["1d", "never", "on-open", "cron:0 3 * * *"])
def test_a_source_without_version_retries_on_a_short_growing_backoff(policy):
    options = opts(refresh=policy)
    for _ in range(20):  # the jitter: every draw stays in its bounds
        assert 15 <= wait(options, 1, False) <= 30  # half of retry_backoff 1m
        assert 30 <= wait(options, 2, False) <= 60
        assert 60 <= wait(options, 3, False) <= 120
        assert NO_VERSION_CAP / 2 <= wait(options, 30, False) <= NO_VERSION_CAP  # capped


def test_a_source_serving_a_cached_version_retries_later_up_to_its_interval():
    for _ in range(20):
        assert 30 <= wait(opts(refresh="1d"), 1, True) <= 60
        assert 60 <= wait(opts(refresh="1d"), 2, True) <= 120
        assert wait(opts(refresh="1d"), 1, True) >= wait(opts(refresh="1d"), 1, False) / 2
        assert wait(opts(refresh="1d"), 40, True) == 86400  # never later than the policy
        assert wait(opts(refresh="5m"), 10, True) == 300
        # a cron source retries before its next match, never after it (03:00 tomorrow)
        assert 30 <= wait(opts(refresh="cron:0 3 * * *"), 1, True) <= 60
        assert wait(opts(refresh="cron:0 3 * * *"), 40, True) == 15 * 3600


def test_retry_backoff_option_sets_the_base():
    options = opts(retry_backoff="2s")
    for _ in range(20):
        assert 1 <= wait(options, 1, True) <= 2
        assert 0.5 <= wait(options, 1, False) <= 1
        assert 4 <= wait(options, 3, True) <= 8
    assert retry_delay({}, 1, True) <= 60  # a source stored before the option existed


def test_backoff_counts_from_the_failed_check():
    last = rfc3339(NOW - timedelta(seconds=45))
    assert next_check(opts(), state(last, 1), True, NOW) >= NOW  # overdue: now at the soonest
    assert next_check(opts(), state(last, 1), False, NOW) == NOW  # 15-30 s have passed


def test_no_retry_without_failure_and_pinned_still_wins():
    last = rfc3339(NOW)
    assert wait(opts(refresh="1d"), 0, False, last) == 86400  # a check that succeeded
    assert wait(opts(refresh="1d", pinned=True), 3, True, last) is None
    assert 15 <= wait(opts(refresh="1d", pinned=True), 1, False, last) <= 30  # first one


def test_huge_failure_counts_and_bases_do_not_overflow():
    assert wait(opts(refresh="3650d", retry_backoff="3650d"), 10_000, True) <= 3650 * 86400
    assert wait(opts(refresh="never", retry_backoff="3650d"), 10_000, False) <= 3650 * 86400
