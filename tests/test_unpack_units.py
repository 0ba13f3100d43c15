"""The unpacker's commit against what a collection does meanwhile (no mount: the race
is set up by hand, in the order it happens)."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import pytest

from buffyfs.store.cache import Cache
from buffyfs.store.gc import collect_now
from buffyfs.store.unpack import DerivedStore
from buffyfs.store.unpacker import Unpacker
from tests.test_fs_api import put_version


@pytest.fixture
def cache(tmp_path: Path):
    c = Cache(tmp_path / "cache")
    yield c
    c.close()


def partial_unpack(derived: DerivedStore, sha: str, data: bytes) -> None:
    """What the unpacking child leaves: ``partial/SHA/data``."""
    derived.ensure()
    derived.partial(sha).mkdir()
    (derived.partial(sha) / "data").write_bytes(data)


def test_commit_replaces_a_stale_unpack_with_the_new_one(tmp_path: Path) -> None:
    derived = DerivedStore(tmp_path)
    sha = "ab" * 32
    partial_unpack(derived, sha, b"new")
    derived.path(sha).parent.mkdir(parents=True)
    derived.path(sha).mkdir()  # a crash between move and record left this one
    (derived.path(sha) / "data").write_bytes(b"stale")
    assert derived.commit(sha)
    assert derived.data_path(sha).read_bytes() == b"new"
    assert not derived.partial(sha).exists()


def test_an_unpack_whose_blob_was_collected_meanwhile_is_dropped_quietly(
        cache: Cache, caplog: pytest.LogCaptureFixture) -> None:
    cache.add_source("s", "http://127.0.0.1:9/s", {"keep_versions": "0"})
    old = put_version(cache, "s", gzip.compress(b"old" * 1000), 0)
    put_version(cache, "s", gzip.compress(b"new" * 1000), 1)
    unpacker = Unpacker(cache, 1 << 30)
    partial_unpack(unpacker.derived, old.sha256, b"old" * 1000)
    report = collect_now(cache.index, cache.blobs, set())  # takes the old blob's unpack too
    assert old.sha256 in report.unlink
    caplog.set_level(logging.INFO, "buffyfs")
    unpacker._commit(old.sha256, {"kind": "gzip", "size": 3000, "file_size": 3000})
    assert not unpacker.derived.path(old.sha256).exists()
    assert "collected while it unpacked" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_unpack_that_went_missing_otherwise_is_tried_again(
        cache: Cache, caplog: pytest.LogCaptureFixture) -> None:
    cache.add_source("s", "http://127.0.0.1:9/s", {})
    version = put_version(cache, "s", gzip.compress(b"x" * 1000), 0)
    unpacker = Unpacker(cache, 1 << 30)
    unpacker.derived.ensure()  # no partial: someone removed it
    unpacker._commit(version.sha256, {"kind": "gzip", "size": 1000, "file_size": 1000})
    with cache.index.read() as r:
        record = r.unpacked(version.sha256)
    assert record["state"] == "error" and record["retry"] is True
    assert "went missing" in caplog.text
