"""How the detached daemon is started: the installed ``buffyfs`` command, run from a
directory that holds a ``buffyfs`` package of its own, mounts with the installed code and
never imports the other one (it would run with the user's rights: root, for a system mount).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CLI_TIMEOUT, unmount, wait_for

# The console script pip made next to this interpreter (.venv/bin/buffyfs).
BUFFYFS = Path(sys.executable).parent / "buffyfs"

HOSTILE_INIT = """\
import os
open(os.path.join({marker!r}), "w").write("imported from the working directory")
"""
# A checkout of another buffyfs version: its modules do not fit the installed ones.
STALE_MAIN = "from buffyfs.no_such_module import main\nraise SystemExit(main())\n"


def plant_package(where: Path, marker: Path) -> None:
    pkg = where / "buffyfs"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(HOSTILE_INIT.format(marker=str(marker)))
    (pkg / "__main__.py").write_text(STALE_MAIN)
    (pkg / "cli.py").write_text(HOSTILE_INIT.format(marker=str(marker)))


def mount_args(style: str, mnt: Path, cache: Path) -> list[str]:
    if style == "command":
        return ["mount", str(mnt), "--cache", str(cache)]
    # as mount.fuse3 runs it for an fstab line: SOURCE MOUNTPOINT -o OPTIONS
    return ["none", str(mnt), "-o", f"rw,nodev,nosuid,cache={cache}"]


@pytest.mark.parametrize("style", ["command", "fstab"])
def test_working_directory_cannot_shadow_the_package(origin, tmp_path, style):
    assert BUFFYFS.is_file(), f"no console script at {BUFFYFS}: run scripts/install.sh"
    origin.set("/f", b"installed code")
    workdir = tmp_path / "work"
    marker = tmp_path / "HIJACKED"
    plant_package(workdir, marker)
    cache = tmp_path / "cache"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # the same directory as the cwd of the source registration, too
    done = subprocess.run([str(BUFFYFS), "add", "f", origin.url("/f"), "--cache", str(cache)],
                          cwd=workdir, capture_output=True, text=True, timeout=CLI_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    pid = None
    try:
        done = subprocess.run([str(BUFFYFS), *mount_args(style, mnt, cache)], cwd=workdir,
                              capture_output=True, text=True, timeout=CLI_TIMEOUT,
                              stdin=subprocess.DEVNULL)
        if (cache / "mount.json").exists():
            pid = json.loads((cache / "mount.json").read_text())["pid"]
        assert not marker.exists(), "the daemon imported buffyfs from the working directory"
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        assert os.path.ismount(mnt)
        with open(mnt / "f" / "latest", "rb") as f:
            assert f.read() == b"installed code"
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"-P" in cmdline  # the daemon keeps its working directory off sys.path
        assert os.readlink(f"/proc/{pid}/cwd") == "/"  # and keeps no directory busy
        done = subprocess.run([str(BUFFYFS), "umount", str(mnt)], cwd=workdir,
                              capture_output=True, text=True, timeout=CLI_TIMEOUT)
        assert done.returncode == 0, done.stderr
        assert not os.path.ismount(mnt)
        wait_for(lambda: not alive(pid), 10, what="the daemon to exit")
    finally:
        unmount(mnt)
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert not marker.exists()


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_daemon_inherits_the_interpreter_flags_of_the_command():
    # a script whose #! line says `python3 -s` (no user site-packages) starts a daemon
    # that sees the same packages; -P is always there
    shown = subprocess.run([sys.executable, "-s", "-c",
                            "from buffyfs.daemon import daemon_command; print(daemon_command())"],
                           capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd="/",
                           check=True).stdout
    assert shown.strip() == repr([sys.executable, "-P", "-s", "-m", "buffyfs"])
