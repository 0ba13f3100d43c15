"""Daily use (issue 19, items 1-3): command-line commands that have taken effect in the
mount when they return, the commands people reached for (set, refresh --wait/--force,
revalidate, newest), and monitoring per source."""

from __future__ import annotations

import os

from tests.conftest import wait_for
from tests.test_cli import one_error_line
from tests.test_gc import make_versions
from tests.test_mount import read, status


def test_cli_commands_take_effect_in_the_mount_when_they_return(origin, mnt, cli):
    old, new = make_versions(origin, mnt, "csv", [b"one", b"two"])
    assert read(mnt / "csv/latest") == b"two"  # the kernel now holds the entry for a while
    cli("tag", "csv", "latest", "failed", check=True)
    assert read(mnt / "csv/latest") == b"one"  # at once, not a poll later
    cli("untag", "csv", new, "failed", check=True)
    assert read(mnt / "csv/latest") == b"two"
    cli("pin", "csv", old, check=True)
    assert read(mnt / "csv/latest") == b"one"
    cli("unpin", "csv", check=True)
    assert read(mnt / "csv/latest") == b"two"
    # add and remove, too
    origin.set("/y", b"why")
    cli("add", "y", origin.url("/y"), check=True)
    assert read(mnt / "y/latest") == b"why"
    cli("remove", "y", check=True)
    assert not os.path.exists(mnt / "y")


def test_cli_errors_through_the_mount_keep_their_exit_codes(origin, mnt, cli):
    make_versions(origin, mnt, "csv", [b"one"])
    done = cli("tag", "nosuch", "latest", "keep")
    assert done.returncode == 1 and "no source named 'nosuch'" in one_error_line(done)
    done = cli("tag", "csv", "20200101T000000Z-00000000", "keep")
    assert done.returncode == 1 and "has no version" in one_error_line(done)
    done = cli("tag", "csv", "latest", "newest")  # a version word is no tag name
    assert done.returncode == 2 and "newest" in one_error_line(done).split("not one of")[1]
    done = cli("add", "csv", origin.url("/csv"))
    assert done.returncode == 2 and "exists already" in one_error_line(done)
    done = cli("pin", "csv", "oops")
    assert done.returncode == 2 and "invalid version" in one_error_line(done)
    # nothing of that reached the mount as a change; the refusals were its own errors
    assert status(mnt / "csv/@status")["versions"][0]["tags"] == []
