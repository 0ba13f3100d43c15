"""Fewer surprises on the command line (issue 19, item 5): non-empty mount points,
read-only commands that never create a cache, ``check --repair`` and strays, sizes
people read, "did you mean", confirmations, and ``umount`` of what is not mounted or
is busy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import is_mounted, run_cli, stop_process, wait_for
from tests.test_cli import one_error_line


def test_mount_refuses_a_non_empty_directory(cli, tmp_path, mount_factory):
    point = tmp_path / "mnt0"  # where mount_factory mounts first
    point.mkdir()
    (point / "precious.txt").write_text("mine")
    done = cli("mount", str(point))
    assert done.returncode == 2
    line = one_error_line(done)
    assert "not empty" in line and "precious.txt" in line and "--allow-non-empty" in line
    assert not is_mounted(point)
    m = mount_factory("--allow-non-empty")
    assert os.listdir(m.path) == ["@status", "@control", "@metrics"]  # hidden, not gone
    m.close()
    assert (point / "precious.txt").read_text() == "mine"


def test_read_only_commands_never_create_a_cache(tmp_path):
    typo = tmp_path / "typo"
    for args in (["list"], ["status"], ["status", "--json"], ["versions", "x"]):
        done = run_cli(*args, cache=typo)
        assert done.returncode == 1, (args, done.stderr)
        assert f"no buffyfs cache in {typo}" in one_error_line(done)
        assert not typo.exists()
    env = dict(os.environ, BUFFYFS_CACHE=str(typo))
    done = subprocess.run([sys.executable, "-m", "buffyfs", "list"], capture_output=True,
                          text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and "does not exist" in one_error_line(done)
    assert not typo.exists()


def test_check_repair_exits_0_and_strays_are_reported(origin, cli, cache_dir):
    origin.set("/c", b"some body")
    cli("add", "c", origin.url("/c"), check=True)
    cli("fetch", "c", check=True)
    other = "cd" + "1" * 62
    (cache_dir / "blobs" / "ab").mkdir(exist_ok=True)
    planted = {
        "blobs/ab/junk": "not named by a sha256",
        f"blobs/ab/{other}": "belongs in blobs/cd/",
        "partial/gone.part": "a partial file of no source ('gone')",
    }
    for path in planted:
        (cache_dir / path).write_bytes(b"x")
    (cache_dir / "my-notes.txt").write_text("the user's")
    (cache_dir / "partial/notes").write_text("not buffyfs's either")
    done = cli("check")
    assert done.returncode == 1
    for path, why in planted.items():
        assert f"stray: {path}: {why}" in done.stdout
    for path in ("my-notes.txt", "partial/notes"):
        assert f"unknown entry (not made by buffyfs; left alone): {path}" in done.stdout
    done = cli("check", "--repair")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "repaired" in done.stdout
    assert not any((cache_dir / path).exists() for path in planted)
    assert (cache_dir / "my-notes.txt").read_text() == "the user's"
    assert (cache_dir / "partial/notes").exists()
    done = cli("check")
    assert done.returncode == 0 and "healthy" in done.stdout


def test_sizes_in_messages_are_human_readable(origin, cli):
    origin.set("/v", b"too small")
    cli("add", "v", origin.url("/v"), "--validate", "min_size=2K", check=True)
    cli("fetch", "v", check=True)
    st = json.loads(cli("status", "v", "--json", check=True).stdout)
    assert st["versions"][0]["validation"] == \
        "size 9 B is below validate.min_size 2.0 KiB"


def test_unknown_option_shows_the_commands_usage_and_a_guess(cli):
    done = cli("add", "x", "http://127.0.0.1:9/x", "--refesh", "1h")
    assert done.returncode == 2
    assert done.stderr.startswith("usage: buffyfs add ")
    line = one_error_line(done)
    assert "unrecognized arguments: --refesh 1h" in line and "did you mean '--refresh'" in line
    assert cli("list", check=True).stdout == ""  # nothing was added


def test_add_remove_unpin_say_what_they_did(cli):
    done = cli("add", "x", "http://user:secret@127.0.0.1:9/x", check=True)
    assert done.stdout == "added source x (http://127.0.0.1:9/x)\n"
    assert "secret" not in done.stdout + done.stderr
    cli("pin", "x", check=True)
    assert cli("unpin", "x", check=True).stdout.startswith("x: unpinned")
    assert cli("remove", "x", check=True).stdout.startswith("removed source x")


def test_umount_not_mounted_exits_1(tmp_path):
    done = run_cli("umount", str(tmp_path))
    assert done.returncode == 1 and "not mounted" in one_error_line(done)


def test_umount_of_a_busy_mount_names_its_holders_and_offers_lazy(mount_factory):
    m = mount_factory()
    holder = subprocess.Popen(["sleep", "60"], cwd=m.path, stdin=subprocess.DEVNULL)
    try:
        done = run_cli("umount", str(m.path))
        assert done.returncode == 1
        line = one_error_line(done)
        assert "busy" in line and f"pid {holder.pid} (sleep)" in line, line
        assert f"buffyfs umount --lazy {m.path}" in line
        assert is_mounted(m.path)
        done = run_cli("umount", "--lazy", str(m.path))
        assert done.returncode == 0, done.stderr
        assert not is_mounted(m.path)
    finally:
        stop_process(holder)
    wait_for(lambda: m.proc.poll() is not None, 10, what="the daemon to exit")
