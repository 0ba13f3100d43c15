"""A failed refresh is retried on a short, growing backoff, not at the policy's next
check (issue 11 item 7): a source added while its origin is down gets its first
version by itself once the origin is back."""

from __future__ import annotations

import errno

import pytest

from buffyfs.store.index import parse_rfc3339
from tests.conftest import wait_for
from tests.test_mount import read, status, write_control


@pytest.mark.parametrize("policy", ["1d", "never", "on-open", "cron:0 0 1 1 *"])
def test_source_added_while_origin_down_gets_its_first_version(origin, mnt, policy):
    origin.set("/down", b"back again")
    origin.fail("/down", 503, 503, 503)  # down for the first three requests
    write_control(mnt / "@control", f"add d {origin.url('/down')} refresh='{policy}' "
                                    "max_attempts=1 retry_backoff=1s")
    wait_for(lambda: status(mnt / "d/@status")["consecutive_failures"] >= 1, 10,
             what="the first failure")
    if status(mnt / "d/@status")["latest"] is None and policy != "on-open":
        try:  # meanwhile latest fails (an on-open open checks) ...
            got = read(mnt / "d/latest")
        except OSError as e:
            assert e.errno == errno.EIO
        else:  # ... unless the open met a retry under way: it streams the version (issue 14)
            assert got == b"back again"
    # no refresh, no open: the retries alone bring the first version (about 0.5+1+2 s)
    wait_for(lambda: status(mnt / "d/@status")["latest"], 20, interval=0.2,
             what="the first version without a manual refresh")
    assert len(origin.seen("/down")) == 4  # three failures, then the version
    st = status(mnt / "d/@status")
    assert st["consecutive_failures"] == 0 and st["last_error"] is None
    assert read(mnt / "d/latest") == b"back again"


def test_a_failed_refresh_of_a_cached_source_is_retried_before_its_interval(origin, mnt):
    origin.set("/stale", b"old")
    write_control(mnt / "@control", f"add s {origin.url('/stale')} refresh=1h "
                                    "max_attempts=1 retry_backoff=1s")
    assert read(mnt / "s/latest") == b"old"
    origin.set("/stale", b"new")
    origin.fail("/stale", 500, 500)
    write_control(mnt / "s/@control", "refresh")
    wait_for(lambda: status(mnt / "s/@status")["consecutive_failures"] >= 1, 10,
             what="the failed refresh")
    assert read(mnt / "s/latest") == b"old"  # served stale meanwhile
    wait_for(lambda: read(mnt / "s/latest") == b"new", 20, interval=0.2,
             what="the retry, well before the 1h refresh")
    assert status(mnt / "s/@status")["consecutive_failures"] == 0


def test_default_backoff_shows_in_next_check(origin, mnt):
    """With the default retry_backoff (1m), a source with no version is retried within
    30 s of its failure, one with a version within 60 s; not a refresh interval later."""
    origin.set("/nb", b"x")
    origin.fail("/nb", 503, 503)
    write_control(mnt / "@control", f"add nb {origin.url('/nb')} max_attempts=1")
    wait_for(lambda: status(mnt / "nb/@status")["consecutive_failures"] == 1, 10,
             what="the failure")

    def planned() -> float | None:
        st = status(mnt / "nb/@status")
        if not st["next_check"]:
            return None
        return (parse_rfc3339(st["next_check"]) - parse_rfc3339(st["last_check"])).total_seconds()

    wait_for(lambda: planned() is not None and planned() <= 30, 10, what="a near next_check")
    assert planned() >= 14  # half of 30 s at the least (whole seconds: 15 may show as 14)
