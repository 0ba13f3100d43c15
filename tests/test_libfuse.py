"""The libfuse fact said at start-up (fs/libfuse.py): its version, read from the loaded
library, and whether the kernel may look up names of one directory in parallel; and
that claim checked on a real mount whose lookups are slow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from buffyfs.fs import libfuse
from tests.conftest import Mount, stop_process, unmount, wait_for

LOOKUP_SECONDS = 0.3
# a pyfuse3 file system on trio whose every lookup waits LOOKUP_SECONDS on the loop
# (trio.sleep: other requests are read and answered meanwhile); once unmounted it
# prints how many lookups it held at once at most
SLOW_LOOKUPS = """
import errno, stat, sys
import pyfuse3, trio
held = [0, 0]
class Slow(pyfuse3.Operations):
    def _attr(self, ino):
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = stat.S_IFDIR | 0o555 if ino == 1 else stat.S_IFREG | 0o444
        return a
    async def getattr(self, ino, ctx=None):
        return self._attr(ino)
    async def lookup(self, parent, name, ctx=None):
        if not (name.startswith(b"f") and name[1:].isdigit()):
            raise pyfuse3.FUSEError(errno.ENOENT)
        held[0] += 1
        held[1] = max(held)
        try:
            await trio.sleep(float(sys.argv[2]))
        finally:
            held[0] -= 1
        return self._attr(int(name[1:]) + 2)
pyfuse3.init(Slow(), sys.argv[1], set(pyfuse3.default_options))
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close(unmount=False)
    print(held[1], flush=True)
"""


@pytest.mark.parametrize(("text", "parallel"), [
    ("3.14.0", False), ("3.16.2", False), ("3.17.0", False), ("3.17.1", True),
    ("3.17.2", True), ("3.18", True), ("4.0.0", True), ("", None), ("weird", None),
    (None, None),
])
def test_parallel_lookups_from_the_version(text: str | None, parallel: bool | None) -> None:
    assert libfuse.parallel_lookups(text) is parallel


def test_the_version_is_the_installed_library() -> None:
    text = libfuse.version()
    assert text is not None
    if shutil.which("pkg-config"):
        installed = subprocess.run(["pkg-config", "--modversion", "fuse3"], text=True,
                                   capture_output=True, timeout=10).stdout.strip()
        if installed:
            assert text == installed
    line = libfuse.describe()
    assert line.startswith(f"libfuse {text}: ")
    assert ("one at a time" in line) is (libfuse.parallel_lookups(text) is False)


def test_the_mount_says_it_in_its_log(mnt: Mount) -> None:
    wait_for(lambda: "libfuse " in mnt.log_text(), 10, what="the libfuse line")
    assert libfuse.describe() in mnt.log_text()


def _lookups_at_once(mountpoint: Path, count: int) -> None:
    """``count`` threads stat ``count`` different names at once."""
    threads = [threading.Thread(target=os.stat, args=(mountpoint / f"f{i}",), daemon=True)
               for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a lookup did not return"


def test_what_it_says_holds_on_a_real_mount(tmp_path: Path) -> None:
    """The claim of the log line, checked through the kernel: of 4 lookups of different
    names in one directory asked at once, each LOOKUP_SECONDS long in the daemon, the
    daemon holds one at a time when libfuse does not pass parallel lookups, all 4 at
    once when it does (more than one: all 4 overlap only if scheduled in time)."""
    mountpoint = tmp_path / "slow"
    mountpoint.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_LOOKUPS, str(mountpoint),
                             str(LOOKUP_SECONDS)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.ismount(mountpoint) or proc.poll() is not None, 30,
                 what="the slow file system")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        _lookups_at_once(mountpoint, 4)
        unmount(mountpoint)  # the file system's loop ends: it prints what it held
        out, err = proc.communicate(timeout=30)
    finally:
        unmount(mountpoint)
        stop_process(proc)
    held_at_once = int(out.strip() or 0)
    if libfuse.parallel_lookups(libfuse.version()):
        assert held_at_once > 1, err
    else:
        assert held_at_once == 1, err
