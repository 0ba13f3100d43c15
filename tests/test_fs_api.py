"""The FUSE handlers called directly, without a mount (as S3QL's t3_fs_api.py does):
BuffyFS over a Cache in a temporary directory, no scheduler, so the tree logic (name
resolution, listings, attributes, errnos) is tested in milliseconds. The mount tests
cover the same through the kernel."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio

from buffyfs.fs.handlers import (
    FIRST_TAGDIR_INO,
    ROOT,
    ROOT_CONTROL,
    ROOT_METRICS,
    ROOT_STATUS,
    BuffyFS,
)
from buffyfs.fs.tree import read_sources
from buffyfs.store.cache import Cache
from buffyfs.store.index import SourceInode

T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)


@dataclass
class Ctx:
    """What pyfuse3 passes as a RequestContext (the handlers do not look at it)."""

    uid: int = os.getuid()
    gid: int = os.getgid()
    pid: int = os.getpid()
    umask: int = 0o022


CTX: Any = Ctx()


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Cache]:
    c = Cache(tmp_path / "cache")
    yield c
    c.close()


@pytest.fixture
def fs(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> BuffyFS:
    # Without a mount there is no kernel to reply to: readdir replies are collected.
    def readdir_reply(token: list, name: bytes, attr: pyfuse3.EntryAttributes,
                      next_id: int) -> bool:
        token.append((name.decode(), attr))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", readdir_reply)
    return BuffyFS(cache, None)


@pytest.fixture(autouse=True)
def no_unexpected_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A handler's bug is answered with EIO and logged: here it fails the test."""
    yield
    bugs = [r.getMessage() for r in caplog.records if r.exc_info or "unexpected" in r.msg]
    assert not bugs, bugs


def put_version(cache: Cache, name: str, data: bytes, minutes: int = 0,
                tags: tuple[str, ...] = ()) -> dict[str, Any]:
    """Store ``data`` as a version of ``name`` fetched ``minutes`` after T0."""
    sha = hashlib.sha256(data).hexdigest()
    partial = cache.blobs.partial_path(name)
    partial.write_bytes(data)
    cache.blobs.commit_partial(partial, sha)
    with cache.index.read() as r:
        url = r.source(name).url
    version = cache.index.commit_version(
        name, {"sha256": sha, "size": len(data), "tags": list(tags), "url": url},
        T0 + timedelta(minutes=minutes))
    assert version is not None
    return version


def three_versions(cache: Cache, name: str = "s", **options: Any) -> list[dict[str, Any]]:
    """A source with versions v1 (tagged keep), v2, v3 (oldest first)."""
    cache.add_source(name, f"http://127.0.0.1:9/{name}", options)
    return [put_version(cache, name, b"one", 0, ("keep",)), put_version(cache, name, b"two", 1),
            put_version(cache, name, b"three", 2)]


async def lookup(fs: BuffyFS, *path: str) -> pyfuse3.EntryAttributes:
    """Resolve ``path`` from the root, one lookup per name, as the kernel does."""
    attr = None
    ino = ROOT
    for name in path:
        attr = await fs.lookup(ino, name.encode(), CTX)
        ino = attr.st_ino
    assert attr is not None
    return attr


async def errno_of(call: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as e:
        await call
    return e.value.errno


async def listdir(fs: BuffyFS, ino: int) -> dict[str, pyfuse3.EntryAttributes]:
    fh = await fs.opendir(ino, CTX)
    token: list = []
    try:
        await fs.readdir(fh, 0, token)  # type: ignore[arg-type]
    finally:
        await fs.releasedir(fh)
    return dict(token)


async def read_all(fs: BuffyFS, ino: int) -> bytes:
    info = await fs.open(ino, os.O_RDONLY, CTX)
    try:
        return bytes(await fs.read(info.fh, 0, 1 << 20))
    finally:
        await fs.release(info.fh)


# --- the root ----------------------------------------------------------------------------


async def test_root_files_have_fixed_inodes_and_sources_are_directories(fs, cache):
    cache.add_source("s", "http://127.0.0.1:9/s", {})
    assert (await lookup(fs, "@status")).st_ino == ROOT_STATUS
    assert (await lookup(fs, "@control")).st_ino == ROOT_CONTROL
    assert (await lookup(fs, "@metrics")).st_ino == ROOT_METRICS
    attr = await lookup(fs, "s")
    assert stat.S_ISDIR(attr.st_mode) and attr.st_mode & 0o777 == 0o555
    assert (await fs.getattr(ROOT, CTX)).st_mode == stat.S_IFDIR | 0o555
    assert sorted(await listdir(fs, ROOT)) == ["@control", "@metrics", "@status", "s"]


@pytest.mark.parametrize("name", [b"nope", b".s", b"@s", b"@versions", b"latest", b"..s",
                                  b"\xff\xfe", b"a" * 129, b"s\0"])
async def test_unknown_or_invalid_names_at_the_root_are_enoent(fs, cache, name):
    cache.add_source("s", "http://127.0.0.1:9/s", {})
    assert await errno_of(fs.lookup(ROOT, name, CTX)) == errno.ENOENT


# --- latest, @versions, @TAG ---------------------------------------------------------------


async def test_latest_is_the_newest_version_and_the_same_file_as_its_versions_entry(fs, cache):
    v1, v2, v3 = three_versions(cache)
    latest = await lookup(fs, "s", "latest")
    assert latest.st_ino == v3.ino
    assert (await lookup(fs, "s", "@versions", v3.id)).st_ino == v3.ino
    assert latest.st_size == 5 and latest.st_mode == stat.S_IFREG | 0o444
    assert latest.st_mtime_ns == int((T0 + timedelta(minutes=2)).timestamp() * 1e9)
    assert await read_all(fs, latest.st_ino) == b"three"
    assert await read_all(fs, v1.ino) == b"one"
    versions = await listdir(fs, (await lookup(fs, "s", "@versions")).st_ino)
    assert sorted(versions) == sorted(v.id for v in (v1, v2, v3))


async def test_latest_falls_back_past_failed_versions_and_is_eio_when_all_failed(fs, cache):
    v1, v2, v3 = three_versions(cache)
    cache.tag("s", v3.id, "failed")
    assert (await lookup(fs, "s", "latest")).st_ino == v2.ino
    cache.tag("s", v2.id, "failed")
    cache.tag("s", v1.id, "failed")
    pending = await lookup(fs, "s", "latest")
    assert pending.st_ino == (await lookup(fs, "s")).st_ino + SourceInode.pending
    assert await errno_of(fs.open(pending.st_ino, os.O_RDONLY, CTX)) == errno.EIO
    # the versions themselves stay readable under @versions
    assert await read_all(fs, (await lookup(fs, "s", "@versions", v3.id)).st_ino) == b"three"


async def test_a_pinned_source_keeps_its_latest_when_newer_versions_come(fs, cache):
    v1, v2, v3 = three_versions(cache)
    cache.pin("s", v2.id)
    assert (await lookup(fs, "s", "latest")).st_ino == v2.ino
    v4 = put_version(cache, "s", b"four", 3)
    assert (await lookup(fs, "s", "latest")).st_ino == v2.ino
    cache.unpin("s")
    assert (await lookup(fs, "s", "latest")).st_ino == v4.ino


async def test_versions_directory_knows_only_kept_ids(fs, cache):
    v1, _, _ = three_versions(cache)
    assert (await lookup(fs, "s", "@versions", v1.id)).st_ino == v1.ino
    versions = (await lookup(fs, "s", "@versions")).st_ino
    for name in (b"20990101T000000Z-00000000", b"latest", v1.id.encode() + b"x", b""):
        assert await errno_of(fs.lookup(versions, name, CTX)) == errno.ENOENT
    assert (await fs.lookup(versions, b"..", CTX)).st_ino == (await lookup(fs, "s")).st_ino


async def test_tag_directories_exist_while_a_version_carries_the_tag(fs, cache):
    v1, v2, v3 = three_versions(cache)
    source = await listdir(fs, (await lookup(fs, "s")).st_ino)
    assert sorted(source) == ["@control", "@keep", "@status", "@valid", "@versions", "latest",
                              "newest"]
    keep = await lookup(fs, "s", "@keep")
    assert keep.st_ino >= FIRST_TAGDIR_INO and stat.S_ISDIR(keep.st_mode)
    assert sorted(await listdir(fs, keep.st_ino)) == sorted(["latest", v1.id])
    assert (await lookup(fs, "s", "@keep", "latest")).st_ino == v1.ino
    assert (await lookup(fs, "s", "@keep", v1.id)).st_ino == v1.ino
    # a version without the tag is not in its directory
    assert await errno_of(fs.lookup(keep.st_ino, v2.id.encode(), CTX)) == errno.ENOENT
    cache.untag("s", v1.id, "keep")
    assert await errno_of(lookup(fs, "s", "@keep")) == errno.ENOENT
    # the same tag used again later gets its directory (and inode) back
    cache.tag("s", v2.id, "keep")
    assert (await lookup(fs, "s", "@keep")).st_ino == keep.st_ino
    assert (await lookup(fs, "s", "@keep", "latest")).st_ino == v2.ino


async def test_tag_latest_is_the_newest_carrying_the_tag_and_absent_when_none(fs, cache):
    v1, v2, v3 = three_versions(cache)
    valid = await lookup(fs, "s", "@valid")  # always present
    assert await listdir(fs, valid.st_ino) == {}
    assert await errno_of(fs.lookup(valid.st_ino, b"latest", CTX)) == errno.ENOENT
    cache.tag("s", v1.id, "valid")
    cache.tag("s", v2.id, "valid")
    assert (await lookup(fs, "s", "@valid", "latest")).st_ino == v2.ino
    assert (await fs.lookup(valid.st_ino, b"..", CTX)).st_ino == (await lookup(fs, "s")).st_ino


@pytest.mark.parametrize("name", ["@nope", "@latest", "@tags", "@Valid", "@", "valid",
                                  "@versions2", "latest2", "@keep/"])
async def test_unknown_names_in_a_source_are_enoent(fs, cache, name):
    three_versions(cache)
    assert await errno_of(lookup(fs, "s", name)) == errno.ENOENT


async def test_a_removed_source_is_gone_from_every_inode_it_had(fs, cache):
    v1, _, _ = three_versions(cache)
    base = (await lookup(fs, "s")).st_ino
    keep = (await lookup(fs, "s", "@keep")).st_ino
    cache.remove_source("s")
    for ino in (base, base + SourceInode.versions, keep):
        assert await errno_of(fs.getattr(ino, CTX)) == errno.ENOENT
    assert await errno_of(lookup(fs, "s")) == errno.ENOENT
    assert sorted(await listdir(fs, ROOT)) == ["@control", "@metrics", "@status"]


async def test_on_open_latest_is_its_own_inode_showing_the_cached_version(fs, cache):
    _, _, v3 = three_versions(cache, refresh="on-open")
    latest = await lookup(fs, "s", "latest")
    assert latest.st_ino == (await lookup(fs, "s")).st_ino + SourceInode.onopen
    assert latest.st_size == v3.size
    xattrs = await fs.listxattr(latest.st_ino, CTX)
    assert b"user.buffy.version" in xattrs
    assert await fs.getxattr(latest.st_ino, b"user.buffy.version", CTX) == v3.id.encode()


# --- files, attributes, refusals -------------------------------------------------------------


async def test_xattrs_of_a_version(fs, cache):
    cache.add_source("s", "http://user:secret@127.0.0.1:9/s", {})
    v = put_version(cache, "s", b"data", tags=("keep",))
    ino = (await lookup(fs, "s", "latest")).st_ino
    assert await fs.getxattr(ino, b"user.buffy.source", CTX) == b"s"
    assert await fs.getxattr(ino, b"user.buffy.sha256", CTX) == v.sha256.encode()
    assert await fs.getxattr(ino, b"user.buffy.tags", CTX) == b"keep"
    assert await errno_of(fs.getxattr(ino, b"user.buffy.nope", CTX)) == pyfuse3.ENOATTR
    assert await errno_of(fs.getxattr(ino, b"security.selinux", CTX)) == errno.EOPNOTSUPP
    values = [await fs.getxattr(ino, name, CTX) for name in await fs.listxattr(ino, CTX)]
    assert b"http://127.0.0.1:9/s" in values and not any(b"secret" in v for v in values)
    assert await fs.listxattr(ROOT, CTX) == []


async def test_writes_anywhere_but_control_files_are_refused(fs, cache):
    v1, _, _ = three_versions(cache)
    base = (await lookup(fs, "s")).st_ino
    for ino in (v1.ino, ROOT_STATUS, base + SourceInode.status, ROOT_METRICS):
        assert await errno_of(fs.open(ino, os.O_WRONLY, CTX)) in (errno.EROFS, errno.EACCES)
        assert await errno_of(fs.open(ino, os.O_RDWR, CTX)) in (errno.EROFS, errno.EACCES)
    for ino in (ROOT_CONTROL, base + SourceInode.control):  # reads give a help text
        info = await fs.open(ino, os.O_RDONLY, CTX)
        help_text = await fs.read(info.fh, 0, 4096)
        assert help_text.startswith(b"# buffyfs control file")
        assert (await fs.getattr(ino, CTX)).st_size == len(help_text)
        await fs.release(info.fh)
    for call in (fs.mkdir(base, b"d", 0o755, CTX), fs.create(base, b"f", 0o644, 0, CTX),
                 fs.unlink(base, b"latest", CTX), fs.rmdir(ROOT, b"s", CTX),
                 fs.rename(base, b"latest", base, b"x", 0, CTX),
                 fs.symlink(base, b"l", b"latest", CTX), fs.link(v1.ino, base, b"h", CTX),
                 fs.setxattr(v1.ino, b"user.x", b"1", CTX),
                 fs.removexattr(v1.ino, b"user.buffy.tags", CTX)):
        assert await errno_of(call) == errno.EROFS
    chmod, truncate = setattr_fields(update_mode=True), setattr_fields(update_size=True)
    assert await errno_of(fs.setattr(v1.ino, pyfuse3.EntryAttributes(), chmod, None,
                                     CTX)) == errno.EROFS
    assert await errno_of(fs.setattr(v1.ino, pyfuse3.EntryAttributes(), truncate, None,
                                     CTX)) == errno.EROFS
    # O_TRUNC of a control file (`echo cmd > @control`) is allowed, and does nothing
    assert (await fs.setattr(ROOT_CONTROL, pyfuse3.EntryAttributes(), truncate, None,
                             CTX)).st_ino == ROOT_CONTROL


def setattr_fields(**update: bool) -> Any:
    """A stand-in for pyfuse3.SetattrFields (whose fields only pyfuse3 can set)."""
    names = ("update_size", "update_mode", "update_uid", "update_gid", "update_atime",
             "update_mtime")
    return SimpleNamespace(**{name: update.get(name, False) for name in names})


async def test_wrong_kinds_of_nodes_give_their_errnos(fs, cache):
    v1, _, _ = three_versions(cache)
    assert await errno_of(fs.lookup(v1.ino, b"x", CTX)) == errno.ENOTDIR
    assert await errno_of(fs.opendir(v1.ino, CTX)) == errno.ENOTDIR
    assert await errno_of(fs.open((await lookup(fs, "s")).st_ino, os.O_RDONLY, CTX)) \
        == errno.EISDIR
    assert await errno_of(fs.getattr(1 << 40, CTX)) == errno.ENOENT
    assert await errno_of(fs.getattr(FIRST_TAGDIR_INO + 999, CTX)) == errno.ENOENT
    assert await errno_of(fs.read(12345, 0, 10)) == errno.EBADF
    assert await errno_of(fs.readdir(12345, 0, [])) == errno.EBADF


async def test_status_files_are_json_of_the_tree(fs, cache):
    three_versions(cache)
    root = json.loads(await read_all(fs, ROOT_STATUS))
    assert "s" in json.dumps(root)
    source = json.loads(await read_all(fs, (await lookup(fs, "s", "@status")).st_ino))
    assert len(source["versions"]) == 3


async def test_collected_versions_do_not_wake_the_unpacker(fs, cache):
    """A collection names thousands of sources: removed versions leave nothing to
    unpack, so the unpacker (``on_source_changed``) is not told of them; any other
    change of a source is told."""
    versions = three_versions(cache)
    await lookup(fs, "s", "latest")  # the kernel holds entries below it
    told: list[str] = []
    fs.on_source_changed = told.append
    collected(fs, "s", versions[1].id)
    assert told == []
    fs.source_changed("s")
    assert told == ["s"]


def collected(fs: BuffyFS, source: str, vid: str) -> tuple[list[tuple[int, str]], list[int]]:
    """What the loop decides to drop from the kernel after a collection's commit of
    ``vid`` (``versions_collected``, from what the worker read: ``read_sources``)."""
    entries: list[tuple[int, str]] = []
    inos: list[int] = []
    facts = read_sources(fs.index, [source])[source]
    fs.versions_collected(source, [vid], facts, entries, inos)
    return entries, inos


async def test_collected_versions_of_a_source_never_looked_into_cost_nothing(fs, cache):
    """A collection names thousands of sources, but the kernel holds entries (and link
    counts) only below those it looked into, and entries in ``@versions/`` only if it
    looked in there: the others get no invalidation and no look at their link
    counts."""
    versions = three_versions(cache)
    latest = versions[2]
    fs.shown_links[latest.ino] = 99  # the kernel holds a link count that is wrong
    assert collected(fs, "s", versions[1].id) == ([], [])
    fs.source_changed("s")  # any other change: no look at its link counts either
    assert fs.relink_pending == set()

    await lookup(fs, "s", "newest")  # now it holds entries below s, none in @versions
    base = (await lookup(fs, "s")).st_ino
    fs.shown_links[latest.ino] = 99
    assert collected(fs, "s", versions[1].id) == ([(base, "newest")], [latest.ino])

    await lookup(fs, "s", "@versions", versions[0].id)
    assert collected(fs, "s", versions[1].id)[0] == \
        [(base + SourceInode.versions, versions[1].id), (base, "newest")]


async def test_an_invalidation_the_kernel_holds_up_does_not_hold_up_the_rest(
        fs: BuffyFS, monkeypatch: pytest.MonkeyPatch) -> None:
    """A control write waits INVALIDATE_TIMEOUT at most for its invalidations; the
    entries the worker thread did not reach by then (stuck behind one the kernel holds
    up) go to pyfuse3's notification thread, and the stuck thread sends no more of
    them (its inodes it still does)."""
    import threading

    from buffyfs.fs import handlers

    release = threading.Event()
    sent: list[tuple[int, bytes]] = []
    handed: list[tuple[int, str]] = []
    inodes: list[int] = []

    def invalidate_entry(parent: int, name: bytes) -> None:
        sent.append((parent, name))
        if name == b"stuck":
            release.wait(10)  # as the kernel does while the directory is busy

    monkeypatch.setattr(handlers, "INVALIDATE_TIMEOUT", 0.2)
    monkeypatch.setattr(pyfuse3, "invalidate_entry", invalidate_entry)
    monkeypatch.setattr(pyfuse3, "invalidate_inode",
                        lambda ino, attr_only=False: inodes.append(ino))
    monkeypatch.setattr(handlers, "_invalidate", lambda p, n: handed.append((p, n)))
    entries = [(5, "first"), (5, "stuck"), (6, "later"), (7, "last")]
    await fs._invalidate_now(entries, [42])
    assert sent == [(5, b"first"), (5, b"stuck")]
    assert handed == [(6, "later"), (7, "last")]
    release.set()
    for _ in range(100):  # the abandoned thread ends: its inodes, no more entries
        if inodes:
            break
        await trio.sleep(0.05)
    assert inodes == [42]
    assert sent == [(5, b"first"), (5, b"stuck")]
