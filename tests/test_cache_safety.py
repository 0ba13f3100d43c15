"""What someone plants in the cache directory is never followed: symlinks, fifos,
foreign or world-writable directories (issue 11, item 2). Through the command line
and the mount."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
from pathlib import Path

import pytest

from tests.conftest import run_cli, unmount, wait_for
from tests.test_cli import _alive, one_error_line
from tests.test_mount import read


def victim(tmp_path: Path, name: str = "victim", body: bytes = b"precious, not yours\n",
           mode: int = 0o640) -> Path:
    """A file outside the cache that a planted link points at."""
    path = tmp_path / name
    path.write_bytes(body)
    path.chmod(mode)
    return path


def unchanged(path: Path, body: bytes = b"precious, not yours\n", mode: int = 0o640) -> bool:
    return path.read_bytes() == body and stat.S_IMODE(path.stat().st_mode) == mode


def blob_of(cache: Path, body: bytes) -> Path:
    sha = hashlib.sha256(body).hexdigest()
    return cache / "blobs" / sha[:2] / sha


def test_fetch_never_writes_through_a_symlinked_partial(origin, cli, cache_dir, tmp_path):
    body = b"the real download\n" * 1000
    origin.set("/s", body)
    cli("add", "s", origin.url("/s"), check=True)
    target = victim(tmp_path)
    (cache_dir / "partial" / "s.part").symlink_to(target)
    dangling = tmp_path / "created-through-a-lock-link"
    (cache_dir / "partial" / "s.lock").symlink_to(dangling)
    done = cli("fetch", "s")
    assert done.returncode == 0, done.stderr
    assert "new version" in done.stdout
    assert unchanged(target)  # neither overwritten nor chmod-ed
    assert not dangling.exists()  # the lock was not created through its link
    blob = blob_of(cache_dir, body)
    assert stat.S_ISREG(blob.lstat().st_mode) and blob.read_bytes() == body
    st = json.loads(cli("status", "s", "--json", check=True).stdout)
    assert st["versions"][0]["sha256"] == hashlib.sha256(body).hexdigest()
    assert cli("check").returncode == 0


def test_mount_start_sweeps_what_was_planted(origin, cli, cache_dir, tmp_path,
                                             mount_factory):
    origin.set("/kept", b"kept body")
    cli("add", "kept", origin.url("/kept"), check=True)
    cli("fetch", "kept", check=True)
    target = victim(tmp_path)
    partial = cache_dir / "partial"
    (partial / "p.part").symlink_to(target)
    os.mkfifo(partial / "q.part")
    (partial / "r.lock").symlink_to(tmp_path / "nothing-here")
    (partial / "d.part").mkdir()
    (partial / "d.part" / "inner").symlink_to(target)
    stray = cache_dir / "blobs" / "ab" / ("ab" + "1" * 62)
    stray.parent.mkdir(mode=0o700, exist_ok=True)
    stray.symlink_to(target)
    origin.set("/p", b"through the mount")
    m = mount_factory()
    wait_for(lambda: not any(os.path.lexists(p) for p in
                             (partial / "p.part", partial / "q.part", stray)),
             10, what="the start-up sweep")
    log = m.log_text()
    for name in ("partial/p.part", "partial/q.part", "partial/r.lock", "partial/d.part",
                 str(stray.relative_to(cache_dir))):
        assert f"removed {name} from the cache" in log, log
    assert "a fifo" in log and "a symlink" in log and "a directory" in log
    assert read(m / "kept/latest") == b"kept body"
    (m / "@control").write_text(f"add p {origin.url('/p')}\n")
    assert read(m / "p/latest") == b"through the mount"
    assert unchanged(target)
    assert not (tmp_path / "nothing-here").exists()


def _unsafe_cache(kind: str, cache: Path, tmp_path: Path) -> Path:
    """Make the cache unsafe in one way; returns the --cache to pass."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if kind == "cache is a symlink":
        link = tmp_path / "link"
        link.symlink_to(cache)
        return link
    if kind in ("partial is a symlink", "index is a symlink", "blobs/xx is a symlink"):
        sub = {"partial": "partial", "index": "index", "blobs/xx": "blobs/ab"}[
            kind.split()[0]]
        if (cache / sub).exists():
            os.rename(cache / sub, elsewhere / "moved")
        (cache / sub).symlink_to(elsewhere / "moved" if (elsewhere / "moved").exists()
                                 else elsewhere)
        return cache
    if kind == "partial is world-writable":
        (cache / "partial").chmod(0o777)
    elif kind == "blobs is group-writable":
        (cache / "blobs").chmod(0o775)
    elif kind == "cache belongs to another user":
        os.chown(cache, 65534, 65534)
    elif kind == "index file is a symlink":
        os.rename(cache / "index" / "data.mdb", elsewhere / "data.mdb")
        (cache / "index" / "data.mdb").symlink_to(elsewhere / "data.mdb")
    return cache


UNSAFE = {
    "cache is a symlink": "is a symlink",
    "partial is a symlink": "is a symlink",
    "index is a symlink": "is a symlink",
    "blobs/xx is a symlink": "is a symlink",
    "partial is world-writable": "writable by others (mode 0777)",
    "blobs is group-writable": "writable by others (mode 0775)",
    "cache belongs to another user": "belongs to uid 65534",
    "index file is a symlink": "is a symlink, not a regular file",
}


@pytest.mark.parametrize("kind", list(UNSAFE))
def test_unsafe_cache_directory_is_refused(kind, origin, cli, cache_dir, tmp_path):
    if kind == "cache belongs to another user" and os.geteuid() != 0:
        pytest.skip("needs root to give the cache away")
    origin.set("/u", b"u")
    cli("add", "u", origin.url("/u"), check=True)
    cli("fetch", "u", check=True)
    cache = _unsafe_cache(kind, cache_dir, tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        for command in (["list"], ["fetch", "u"], ["mount", str(mnt)]):
            done = run_cli(*command, cache=cache)
            assert done.returncode == 1, (command, done.stdout, done.stderr)
            assert UNSAFE[kind] in one_error_line(done), done.stderr
        assert not os.path.ismount(mnt)
    finally:  # before the fix, the mount started
        unmount(mnt)
        pid = (json.loads(p.read_text()) if (p := cache / "mount.json").exists() else {})
        if pid.get("pid") and _alive(pid["pid"]):
            os.kill(pid["pid"], signal.SIGKILL)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_check_reports_a_blob_that_is_not_a_regular_file(kind, origin, cli, cache_dir,
                                                         tmp_path):
    body = b"linked away"
    origin.set("/l", body)
    cli("add", "l", origin.url("/l"), check=True)
    cli("fetch", "l", check=True)
    vid = json.loads(cli("status", "l", "--json", check=True).stdout)["latest"]
    blob = blob_of(cache_dir, body)
    copy = victim(tmp_path, "copy", body, 0o444)  # same bytes: hashing alone says healthy
    blob.unlink()
    if kind == "symlink":
        blob.symlink_to(copy)
    elif kind == "fifo":
        os.mkfifo(blob)
    else:
        blob.mkdir()
        (blob / "inside").symlink_to(copy)
    done = cli("check", timeout=20)
    assert done.returncode == 1, done.stdout
    assert f"blob is a {kind}, not a regular file: l {vid}" in done.stdout
    assert "healthy" not in done.stdout
    done = cli("check", "--repair")
    assert done.returncode == 0 and "repaired" in done.stdout
    assert not os.path.lexists(blob)
    assert unchanged(copy, body, 0o444)
    assert json.loads(cli("status", "l", "--json", check=True).stdout)["versions"] == []
    assert cli("check").returncode == 0


def test_a_mount_never_serves_a_blob_through_a_symlink(origin, cli, cache_dir, tmp_path,
                                                      mount_factory):
    body = b"served from the store only"
    origin.set("/b", body)
    cli("add", "b", origin.url("/b"), "--refresh", "never", check=True)
    cli("fetch", "b", check=True)
    m = mount_factory()
    blob = blob_of(cache_dir, body)
    secret = victim(tmp_path, "secret", b"not for readers of the mount", 0o600)
    blob.unlink()
    blob.symlink_to(secret)  # planted while the mount runs
    with pytest.raises(OSError):
        read(m / "b/latest")
    assert "not a regular file" in m.log_text()


def test_detached_mount_never_writes_through_planted_links(origin, cli, cache_dir,
                                                           tmp_path):
    """The log, the start-error file and mount.json of a detached mount."""
    targets = {name: victim(tmp_path, name) for name in
               ("buffyfs.log", "buffyfs.start-error", "mount.json")}
    for name, target in targets.items():
        (cache_dir / name).symlink_to(target)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pid = None
    try:
        done = cli("mount", str(mnt), timeout=60)
        assert done.returncode == 0, done.stderr
        pid = json.loads((cache_dir / "mount.json").read_text())["pid"]
        for name, target in targets.items():
            assert unchanged(target), name
            assert stat.S_ISREG((cache_dir / name).lstat().st_mode), name
        assert run_cli("umount", str(mnt)).returncode == 0
        wait_for(lambda: not _alive(pid), 10, what="the daemon to exit")
        assert "mounted on" in (cache_dir / "buffyfs.log").read_text()
    finally:
        unmount(mnt)
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_commit_never_renames_a_link_into_the_store(tmp_path):
    from buffyfs.safeio import NotRegularFile
    from buffyfs.store.blobs import BlobStore

    store = BlobStore(tmp_path / "cache")
    target = victim(tmp_path)
    link = store.partial_path("x")
    link.symlink_to(target)
    sha = hashlib.sha256(target.read_bytes()).hexdigest()
    with pytest.raises(NotRegularFile):
        store.commit_partial(link, sha)
    assert not os.path.lexists(store.path(sha)) and not store.exists(sha)
    assert unchanged(target)
