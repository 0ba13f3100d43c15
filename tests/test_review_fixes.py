"""Regression tests of fixes from a review of the merged branches (issues 11, 12, 20)."""

from __future__ import annotations

import logging

import pytest

from buffyfs import log
from buffyfs.errors import BadInput
from buffyfs.options import check_url
from buffyfs.store import gc


def test_a_refused_url_never_quotes_what_may_be_a_password():
    # a password holding '/' ends the authority early: 'pa' would be quoted as the port
    with pytest.raises(BadInput) as e:
        check_url("http://user:pa/ss-secret@host/")
    assert "pa" not in str(e.value).replace("percent", "").replace("password", "")
    assert "secret" not in str(e.value)
    with pytest.raises(BadInput, match="port 99999 is outside"):  # no '@' later: detail
        check_url("http://user:pw@host:99999/x")


def test_only_a_version_nothing_else_keeps_sets_the_collectors_wake_time():
    held = gc.Why("held", "2030-01-01T00:00:00Z")
    grace = gc.Why("grace", "2029-01-01T00:00:00Z")
    assert gc._next_end([held], None) == "2030-01-01T00:00:00Z"
    assert gc._next_end([held, grace], "2031-01-01T00:00:00Z") == "2029-01-01T00:00:00Z"
    # kept as latest or by keep_versions anyway: its hold ending frees nothing
    assert gc._next_end([gc.Why("latest"), held], None) is None
    assert gc._next_end([gc.Why("keep_versions"), grace], "2031-01-01T00:00:00Z") == \
        "2031-01-01T00:00:00Z"


def test_a_failed_kernel_invalidation_is_one_warning_line(capsys, own_root_logger):
    log.setup("info")
    try:
        raise OSError(22, "fuse_lowlevel_notify_inval_entry returned: Invalid argument")
    except OSError:  # as pyfuse3's notify loop logs it
        logging.getLogger("pyfuse3").exception(
            "Failed to submit invalidate_entry request for parent inode %d, name %s", 1, b"a")
    logging.getLogger("pyfuse3").error("other errors stay errors")
    err = capsys.readouterr().err
    assert "WARNING pyfuse3: Failed to submit invalidate_entry request" in err
    assert "Invalid argument" in err and "Traceback" not in err
    assert "ERROR pyfuse3: other errors stay errors" in err


def test_damage_seen_through_an_old_file_is_not_the_current_blobs(tmp_path):
    """A repair renames fresh bytes over a damaged blob; a reader or the scrub holding the
    old file must not mark the repaired one damaged again (blobs.is_current)."""
    import hashlib
    import os

    from buffyfs.store.blobs import BlobStore

    store = BlobStore(tmp_path / "cache")
    body = b"good bytes"
    sha = hashlib.sha256(body).hexdigest()
    partial = store.partial_path("s")
    partial.write_bytes(body)
    store.commit_partial(partial, sha)
    fd = store.open_blob(sha)
    try:
        assert store.is_current(sha, fd)
        partial.write_bytes(body)
        store.commit_partial(partial, sha, replace=True)  # the repair
        assert not store.is_current(sha, fd)
        os.unlink(store.path(sha))
        assert store.is_current(sha, fd)  # missing: that damage is current
    finally:
        os.close(fd)
